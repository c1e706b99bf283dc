//! Decision cache with `Watch` invalidation (DESIGN.md §8).
//!
//! Rules, each of which exists because a stale *allow* is an exfiltration
//! path:
//!
//! * an entry lives only for the scope and TTL the PDP returned (capped by
//!   [`CacheConfig::max_ttl`]); `Process` scope entries are keyed by
//!   (pid, start time) and never stored for an unattributed process (pid 0);
//! * the cache is **bypassed and empty** unless the `Watch` stream is up and
//!   its `HELLO` was received; stream down ⇒ flushed and disabled;
//! * every invalidation flushes everything (fine-grained flushing would save
//!   a few PDP calls and add a class of bugs);
//! * an answer is inserted only if no flush happened since the request was
//!   sent ([`DecisionCache::epoch`]): otherwise an allow computed under the
//!   old policy could land in the cache after the invalidation that should
//!   have removed it;
//! * the key covers everything the PDP decides on except the process for
//!   `Workload` scope: workload, normalised host, port, dialled IP, every
//!   resolved IP (DNS-rebinding guard), host source and transport.
//! * bounded: when full, expired entries are purged; if still full the new
//!   answer is simply not cached.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use secureops_proto::v1::invalidation::Kind;
use secureops_proto::v1::policy_decision_client::PolicyDecisionClient;
use secureops_proto::v1::{Invalidation, WatchRequest};
use tonic::transport::Channel;

use crate::decision::{CacheHint, ConnectionRequest, PdpOutcome};
use crate::metrics::PepMetrics;

/// Cache limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Maximum number of entries.
    pub max_entries: usize,
    /// Upper bound on any TTL the PDP returns.
    pub max_ttl: Duration,
    /// First reconnect delay of the Watch stream (doubles up to `max_backoff`).
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 10_000,
            max_ttl: Duration::from_secs(300),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    workload: String,
    host: String,
    port: u16,
    ip: Option<IpAddr>,
    resolved: Vec<IpAddr>,
    host_source: i32,
    transport: i32,
    /// `Some((pid, start_time))` for process-scoped entries.
    process: Option<(u32, u64)>,
}

impl CacheKey {
    fn new(req: &ConnectionRequest, process: Option<(u32, u64)>) -> Self {
        let mut resolved = req.resolved_ips.clone();
        resolved.sort();
        resolved.dedup();
        let host = req.host.trim_end_matches('.').to_ascii_lowercase();
        CacheKey {
            workload: req.workload_id.clone(),
            host,
            port: req.port,
            ip: req.ip,
            resolved,
            host_source: req.host_source as i32,
            transport: req.transport as i32,
            process,
        }
    }
}

#[derive(Debug)]
struct Entry {
    outcome: PdpOutcome,
    expires: Instant,
}

#[derive(Debug)]
struct State {
    /// True only between a Watch `HELLO` and the stream going down.
    enabled: bool,
    epoch: u64,
    map: HashMap<CacheKey, Entry>,
}

/// The decision cache shared by a PEP's PDP client.
#[derive(Debug)]
pub struct DecisionCache {
    cfg: CacheConfig,
    state: Mutex<State>,
    metrics: PepMetrics,
}

impl DecisionCache {
    /// A new, *disabled* cache (enabled by a Watch `HELLO`).
    pub fn new(cfg: CacheConfig, metrics: PepMetrics) -> Self {
        DecisionCache {
            cfg,
            state: Mutex::new(State {
                enabled: false,
                epoch: 0,
                map: HashMap::new(),
            }),
            metrics,
        }
    }

    /// Whether lookups can hit (Watch connected and `HELLO` seen).
    pub fn is_enabled(&self) -> bool {
        self.state.lock().enabled
    }

    /// Changes on every flush; pass the value read *before* asking the PDP to
    /// [`DecisionCache::insert`].
    pub fn epoch(&self) -> u64 {
        self.state.lock().epoch
    }

    pub fn len(&self) -> usize {
        self.state.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cached, unexpired outcome for `req`, if any (process scope first).
    pub fn get(&self, req: &ConnectionRequest) -> Option<PdpOutcome> {
        let now = Instant::now();
        let mut st = self.state.lock();
        if !st.enabled {
            drop(st);
            self.metrics.count_cache("bypass");
            return None;
        }
        let mut found = None;
        if req.process.pid != 0 {
            let k = CacheKey::new(req, Some((req.process.pid, req.process.start_time)));
            found = lookup(&mut st.map, &k, now);
        }
        if found.is_none() {
            let k = CacheKey::new(req, None);
            found = lookup(&mut st.map, &k, now);
        }
        drop(st);
        self.metrics
            .count_cache(if found.is_some() { "hit" } else { "miss" });
        found
    }

    /// Store `outcome` if its hint allows it, the cache is enabled, and no
    /// flush happened since `epoch_at_request` was read. Returns whether it
    /// was stored.
    pub fn insert(
        &self,
        req: &ConnectionRequest,
        outcome: &PdpOutcome,
        epoch_at_request: u64,
    ) -> bool {
        if outcome.fail_closed_cause.is_some() {
            return false;
        }
        let (ttl, process) = match outcome.cache {
            CacheHint::None => return false,
            CacheHint::Workload { ttl } => (ttl, None),
            CacheHint::Process { ttl } => {
                if req.process.pid == 0 {
                    return false;
                }
                (ttl, Some((req.process.pid, req.process.start_time)))
            }
        };
        let ttl = ttl.min(self.cfg.max_ttl);
        if ttl.is_zero() {
            return false;
        }
        let now = Instant::now();
        let mut st = self.state.lock();
        if !st.enabled || st.epoch != epoch_at_request {
            return false;
        }
        if st.map.len() >= self.cfg.max_entries {
            st.map.retain(|_, e| e.expires > now);
            if st.map.len() >= self.cfg.max_entries {
                return false;
            }
        }
        st.map.insert(
            CacheKey::new(req, process),
            Entry {
                outcome: outcome.clone(),
                expires: now + ttl,
            },
        );
        true
    }

    /// Drop every entry (an invalidation arrived).
    pub fn flush(&self) {
        let mut st = self.state.lock();
        st.map.clear();
        st.epoch = st.epoch.wrapping_add(1);
        drop(st);
        self.metrics.cache_flushes.inc();
    }

    /// Watch stream up (after `HELLO`) or down; both flush.
    pub fn set_connected(&self, up: bool) {
        let mut st = self.state.lock();
        st.map.clear();
        st.epoch = st.epoch.wrapping_add(1);
        st.enabled = up;
        drop(st);
        self.metrics.cache_flushes.inc();
        self.metrics.watch_connected.set(i64::from(up));
    }

    /// Apply one message of the Watch stream.
    pub fn apply(&self, inv: &Invalidation) {
        match Kind::try_from(inv.kind) {
            Ok(Kind::Hello) => self.set_connected(true),
            _ => self.flush(),
        }
    }
}

fn lookup(map: &mut HashMap<CacheKey, Entry>, k: &CacheKey, now: Instant) -> Option<PdpOutcome> {
    match map.get(k) {
        Some(e) if e.expires > now => Some(e.outcome.clone()),
        Some(_) => {
            map.remove(k);
            None
        }
        None => None,
    }
}

/// Keep a `Watch` stream to the PDP open and feed it into `cache`.
///
/// Stream down (error, end, PDP gone, HTTP/2 keep-alive timeout) ⇒ the cache
/// is flushed and disabled, then the stream is re-opened with exponential
/// backoff; the cache is re-enabled only by the next `HELLO`.
pub fn spawn_watch(
    channel: Channel,
    cache: Arc<DecisionCache>,
    pep_id: String,
    workload_id: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = cache.cfg.min_backoff;
        loop {
            let mut client = PolicyDecisionClient::new(channel.clone());
            let req = WatchRequest {
                pep_id: pep_id.clone(),
                workload_id: workload_id.clone(),
            };
            match client.watch(req).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(inv)) => {
                                if inv.kind == Kind::Hello as i32 {
                                    backoff = cache.cfg.min_backoff;
                                }
                                cache.apply(&inv);
                            }
                            Ok(None) => {
                                tracing::warn!("pdp watch stream ended");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(%status, "pdp watch stream failed");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(%status, "pdp watch connect failed");
                }
            }
            cache.set_connected(false);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(cache.cfg.max_backoff);
        }
    })
}
