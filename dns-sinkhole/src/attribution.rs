//! Which local process sent a query (pep-core's /proc attribution), with a
//! short per-client-socket memo.
//!
//! Attribution scans `/proc/net/udp{,6}` and `/proc/*/fd`: far more work
//! than answering a query. A client socket (address + port) that asked
//! within the last `ttl` (default 1 s) is mapped to the identity found
//! then: stub resolvers that keep a socket open (dnsperf, long-running
//! agents, nscd-like caches) pay the scan once per second, while glibc's
//! one-socket-per-lookup pattern still gets a fresh scan per lookup. The
//! residual risk is a different process reusing the same ephemeral port
//! within `ttl`; the identity is keyed by (pid, start time) downstream, so
//! at worst that query is judged as the previous process's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use secureops_pep::{Attributor, ProcessIdentity};

const MAX_MEMO: usize = 4096;

/// (client socket, tcp) → (when attributed, identity).
type Memo = HashMap<(SocketAddr, bool), (Instant, Arc<ProcessIdentity>)>;

#[derive(Debug)]
pub struct ClientAttribution {
    inner: Attributor,
    /// Our listening address as the client sees it; `None` when we listen
    /// on a wildcard address (match on the client side only).
    server: Option<SocketAddr>,
    ttl: Duration,
    memo: Mutex<Memo>,
}

impl ClientAttribution {
    pub fn new(listen: SocketAddr, ttl: Duration) -> Self {
        ClientAttribution {
            inner: Attributor::new(),
            server: (!listen.ip().is_unspecified()).then_some(listen),
            ttl,
            memo: Mutex::new(HashMap::new()),
        }
    }

    /// The memoised identity of `client`, if it asked within the last
    /// `ttl` (no /proc scan; `None` ⇒ call [`Self::attribute`]).
    pub fn cached(&self, client: SocketAddr, tcp: bool) -> Option<Arc<ProcessIdentity>> {
        let now = Instant::now();
        match self.memo.lock().get(&(client, tcp)) {
            Some((at, id)) if now.duration_since(*at) < self.ttl => Some(id.clone()),
            _ => None,
        }
    }

    /// Identity of the process behind `client` (pid 0 when unknown).
    pub async fn attribute(&self, client: SocketAddr, tcp: bool) -> ProcessIdentity {
        let now = Instant::now();
        if let Some((at, id)) = self.memo.lock().get(&(client, tcp))
            && now.duration_since(*at) < self.ttl
        {
            return ProcessIdentity::clone(id);
        }
        let id = match (tcp, self.server) {
            (true, Some(server)) => self.inner.attribute_tcp_async(server, client).await,
            (false, Some(server)) => self.inner.attribute_udp_async(client, server).await,
            (true, None) => {
                let me = self.inner.clone();
                tokio::task::spawn_blocking(move || {
                    me.find_socket_inode(secureops_pep::SocketKind::Tcp, client, None)
                        .and_then(|inode| me.pid_of_inode(inode))
                        .map(|pid| me.identity(pid))
                        .unwrap_or_default()
                })
                .await
                .unwrap_or_default()
            }
            (false, None) => {
                let me = self.inner.clone();
                tokio::task::spawn_blocking(move || {
                    me.find_socket_inode(secureops_pep::SocketKind::Udp, client, None)
                        .and_then(|inode| me.pid_of_inode(inode))
                        .map(|pid| me.identity(pid))
                        .unwrap_or_default()
                })
                .await
                .unwrap_or_default()
            }
        };
        let mut memo = self.memo.lock();
        if memo.len() >= MAX_MEMO {
            memo.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
            if memo.len() >= MAX_MEMO {
                memo.clear();
            }
        }
        memo.insert((client, tcp), (now, Arc::new(id.clone())));
        id
    }
}
