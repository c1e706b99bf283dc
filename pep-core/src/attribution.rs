//! Process attribution: which local process is behind a client socket
//! (DESIGN.md §6).
//!
//! 1. Find the *client-side* socket: its local address is the peer address
//!    of our accepted connection (or the source of a DNS datagram), its
//!    remote address is our listener. TCP: one exact `NETLINK_SOCK_DIAG`
//!    lookup (O(1)); fallback and UDP: scan `/proc/net/{tcp,udp}{,6}`.
//! 2. Find the process holding that socket inode by scanning
//!    `/proc/<pid>/fd` (bounded; pids that recently matched are tried first,
//!    since an agent opens many connections from the same process).
//! 3. Read exe, argv (bounded), real uid, start time (`/proc/<pid>/stat`
//!    field 22, parsed after the *last* `)` because `comm` may contain spaces
//!    and parentheses) and the ancestor chain (bounded depth).
//!
//! Best effort, never panics: a process that exits mid-way yields a partial
//! identity; an unattributable socket yields pid 0. The work is blocking
//! file I/O: async callers use [`Attributor::attribute_tcp_async`] /
//! [`Attributor::attribute_udp_async`] (run on the blocking pool).
//!
//! Other network namespaces (`secureops run`, sidecar-less containers): the
//! client may sit in a netns connected to ours by a veth pair, so its socket
//! is invisible to netlink and `/proc/net` here. When the socket is not in
//! our own netns, [`crate::netns`] groups the host's pids by
//! `/proc/<pid>/ns/net` inode and reads `/proc/<member>/net/{tcp,udp}{,6}`
//! of each foreign netns (bounded in namespaces and time; the grouping is
//! cached briefly). There the client's *local* address is the peer address
//! we saw, but its *remote* address is whatever it dialled: our listener for
//! an explicit proxy connection, the original destination for a REDIRECTed
//! one. So the match is on the local address, preferring an exact remote
//! match. Loopback clients are never looked for elsewhere: loopback traffic
//! cannot cross namespaces.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::decision::ProcessIdentity;
use crate::netns::NetnsMap;
use crate::sockdiag::Lookup;

/// Bounds of the attribution work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributionLimits {
    /// Most fd entries examined per lookup.
    pub max_fds_scanned: usize,
    /// Ancestors reported (nearest first).
    pub max_ancestors: usize,
    /// Bytes of `/proc/<pid>/cmdline` read.
    pub max_argv_bytes: usize,
    /// Arguments reported.
    pub max_args: usize,
    /// Foreign network namespaces searched per lookup (0 disables the
    /// cross-namespace search).
    pub max_namespaces: usize,
    /// Wall-clock budget of the cross-namespace search of one lookup.
    pub foreign_budget: Duration,
}

impl Default for AttributionLimits {
    fn default() -> Self {
        AttributionLimits {
            max_fds_scanned: 200_000,
            max_ancestors: 16,
            max_argv_bytes: 4096,
            max_args: 64,
            max_namespaces: 256,
            foreign_budget: Duration::from_millis(100),
        }
    }
}

/// Maps client sockets to processes. Cheap to clone (shared hint list).
#[derive(Debug, Clone)]
pub struct Attributor {
    proc_root: PathBuf,
    limits: AttributionLimits,
    /// Pids that owned recently attributed sockets (with the fd numbers
    /// they had then), most recent first.
    recent: Arc<Mutex<VecDeque<PidHint>>>,
    /// Pids grouped by network namespace (briefly cached).
    netns: Arc<NetnsMap>,
}

impl Default for Attributor {
    fn default() -> Self {
        Self::new()
    }
}

const RECENT: usize = 16;

/// A pid that recently owned an attributed socket, with its fd numbers then.
/// (`Arc`: hints are copied out of the lock on every lookup.)
type PidHint = (u32, Arc<HashSet<u32>>);

/// Transport of the socket to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Tcp,
    Udp,
}

impl Attributor {
    pub fn new() -> Self {
        Self::with_limits(AttributionLimits::default())
    }

    pub fn with_limits(limits: AttributionLimits) -> Self {
        Attributor {
            proc_root: PathBuf::from("/proc"),
            limits,
            recent: Arc::new(Mutex::new(VecDeque::new())),
            netns: Arc::new(NetnsMap::new(PathBuf::from("/proc"))),
        }
    }

    /// Who is behind an accepted TCP connection: `local` and `peer` are our
    /// socket's `local_addr()` / `peer_addr()`. pid 0 when unknown.
    pub fn attribute_tcp(&self, local: SocketAddr, peer: SocketAddr) -> ProcessIdentity {
        self.attribute(SocketKind::Tcp, peer, Some(local))
    }

    /// Who sent a UDP datagram from `client` to our socket at `server`.
    pub fn attribute_udp(&self, client: SocketAddr, server: SocketAddr) -> ProcessIdentity {
        self.attribute(SocketKind::Udp, client, Some(server))
    }

    /// Who owns the client socket `client` (`server`: its remote address as
    /// we know it, `None` when unknown, e.g. a wildcard listener). Same
    /// search as [`Attributor::attribute_tcp`] / [`Attributor::attribute_udp`],
    /// including other network namespaces, where the pid search is limited
    /// to that namespace's members. pid 0 when unknown.
    pub fn attribute_socket(
        &self,
        kind: SocketKind,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> ProcessIdentity {
        self.attribute(kind, client, server)
    }

    /// [`Attributor::attribute_tcp`] on the blocking pool.
    pub async fn attribute_tcp_async(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> ProcessIdentity {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.attribute_tcp(local, peer))
            .await
            .unwrap_or_default()
    }

    /// [`Attributor::attribute_udp`] on the blocking pool.
    pub async fn attribute_udp_async(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> ProcessIdentity {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.attribute_udp(client, server))
            .await
            .unwrap_or_default()
    }

    fn attribute(
        &self,
        kind: SocketKind,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> ProcessIdentity {
        let Some(found) = self.locate(kind, client, server) else {
            return ProcessIdentity::default();
        };
        let pid = match &found.netns_pids {
            // Foreign netns: only its members can hold the socket.
            Some(pids) => self.pid_of_inode_among(found.inode, pids),
            None => self.pid_of_inode(found.inode),
        };
        let Some(pid) = pid else {
            return ProcessIdentity::default();
        };
        self.identity(pid)
    }

    /// Inode of the client-side socket whose local address is `client`
    /// (and remote address `server`, when given). Looks in our own network
    /// namespace first, then in the other namespaces of the host (where the
    /// remote address is only preferred, not required: see the module doc).
    pub fn find_socket_inode(
        &self,
        kind: SocketKind,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> Option<u64> {
        self.locate(kind, client, server).map(|f| f.inode)
    }

    /// Like [`Attributor::find_socket_inode`], and also says which network
    /// namespace the socket was found in: `None` for our own, else the
    /// netns inode (as in `/proc/<pid>/ns/net`).
    pub fn find_socket(
        &self,
        kind: SocketKind,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> Option<(u64, Option<u64>)> {
        self.locate(kind, client, server)
            .map(|f| (f.inode, f.netns))
    }

    fn locate(
        &self,
        kind: SocketKind,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> Option<Found> {
        let client = canonical(client);
        let server = server.map(canonical);
        let mut own_absent = false;
        if kind == SocketKind::Tcp
            && let Some(server) = server
        {
            match crate::sockdiag::tcp_lookup(client, server) {
                Lookup::Found(inode) => return Some(Found::own(inode)),
                // The kernel said so: skip the O(sockets) `/proc/net` scan.
                Lookup::Absent => own_absent = true,
                Lookup::Failed => {}
            }
        }
        if !own_absent && let Some(inode) = self.proc_socket_inode(kind, client, server) {
            return Some(Found::own(inode));
        }
        self.foreign_socket(kind, client, server)
    }

    /// Search the other network namespaces of the host (bounded).
    fn foreign_socket(
        &self,
        kind: SocketKind,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> Option<Found> {
        // Loopback and wildcard sources never come from another namespace.
        if self.limits.max_namespaces == 0
            || client.ip().is_loopback()
            || client.ip().is_unspecified()
        {
            return None;
        }
        let deadline = Instant::now() + self.limits.foreign_budget;
        let search = |snap: &crate::netns::Snapshot| -> Option<Found> {
            for ns in snap
                .foreign(self.netns.preferred())
                .take(self.limits.max_namespaces)
            {
                if Instant::now() >= deadline {
                    tracing::debug!(%client, "attribution: foreign netns budget exhausted");
                    return None;
                }
                // Any live member shows the namespace's sockets.
                for pid in ns.pids.iter().take(3) {
                    let base = self.proc_root.join(pid.to_string());
                    match scan_net(&base, kind, client, server, true) {
                        Scan::Found(inode) => {
                            self.netns.prefer(ns.inode);
                            return Some(Found {
                                inode,
                                netns: Some(ns.inode),
                                netns_pids: Some(ns.pids.clone()),
                            });
                        }
                        Scan::Absent => break,
                        Scan::Unreadable => continue,
                    }
                }
            }
            None
        };
        let (snap, fresh) = self.netns.snapshot();
        if let Some(f) = search(&snap) {
            return Some(f);
        }
        // A namespace created since the snapshot (e.g. a new
        // `secureops run`) is found after one rebuild.
        if !fresh && Instant::now() < deadline {
            let snap = self.netns.rebuild();
            return search(&snap);
        }
        None
    }

    /// The `/proc/net` scan behind [`Attributor::find_socket_inode`]
    /// (addresses already canonical).
    pub(crate) fn proc_socket_inode(
        &self,
        kind: SocketKind,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> Option<u64> {
        match scan_net(&self.proc_root, kind, client, server, false) {
            Scan::Found(inode) => Some(inode),
            Scan::Absent | Scan::Unreadable => None,
        }
    }

    /// The process (thread-group leader) holding socket `inode`.
    pub fn pid_of_inode(&self, inode: u64) -> Option<u32> {
        let target = format!("socket:[{inode}]");
        let hints: Vec<PidHint> = self.recent.lock().iter().cloned().collect();
        let mut budget = self.limits.max_fds_scanned;
        for (pid, known) in &hints {
            if let Some(fds) = self.pid_has(*pid, &target, &mut budget, Some(&**known)) {
                self.remember(*pid, fds);
                return Some(*pid);
            }
        }
        let dir = fs::read_dir(self.proc_root.as_path()).ok()?;
        for ent in dir {
            let Ok(ent) = ent else { continue };
            let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if hints.iter().any(|(p, _)| *p == pid) {
                continue;
            }
            if budget == 0 {
                tracing::debug!(inode, "attribution: fd scan budget exhausted");
                return None;
            }
            if let Some(fds) = self.pid_has(pid, &target, &mut budget, None) {
                self.remember(pid, fds);
                return Some(pid);
            }
        }
        None
    }

    /// [`Attributor::pid_of_inode`] restricted to `pids` (the members of
    /// the network namespace the socket was found in); recent pids first.
    pub fn pid_of_inode_among(&self, inode: u64, pids: &[u32]) -> Option<u32> {
        let target = format!("socket:[{inode}]");
        let hints: Vec<PidHint> = self.recent.lock().iter().cloned().collect();
        let mut budget = self.limits.max_fds_scanned;
        for (pid, known) in &hints {
            if !pids.contains(pid) {
                continue;
            }
            if let Some(fds) = self.pid_has(*pid, &target, &mut budget, Some(&**known)) {
                self.remember(*pid, fds);
                return Some(*pid);
            }
        }
        for pid in pids {
            if hints.iter().any(|(p, _)| p == pid) {
                continue;
            }
            if budget == 0 {
                tracing::debug!(inode, "attribution: fd scan budget exhausted");
                return None;
            }
            if let Some(fds) = self.pid_has(*pid, &target, &mut budget, None) {
                self.remember(*pid, fds);
                return Some(*pid);
            }
        }
        // Created after the snapshot: fall back to the full scan.
        self.pid_of_inode(inode)
    }

    fn remember(&self, pid: u32, fds: HashSet<u32>) {
        let mut r = self.recent.lock();
        r.retain(|(p, _)| *p != pid);
        r.push_front((pid, Arc::new(fds)));
        r.truncate(RECENT);
    }

    /// Whether `pid` holds `target`; on success, the fd numbers it has now.
    ///
    /// With `known` (the fds seen at this pid's previous match), fds that
    /// are new since then are examined first: a process that keeps opening
    /// connections is found after a handful of `readlink`s instead of one
    /// per open fd. The known fds are examined next (an fd number may have
    /// been closed and reused), so the answer never depends on the hint.
    fn pid_has(
        &self,
        pid: u32,
        target: &str,
        budget: &mut usize,
        known: Option<&HashSet<u32>>,
    ) -> Option<HashSet<u32>> {
        let fd_dir = self.proc_root.join(pid.to_string()).join("fd");
        let rd = fs::read_dir(&fd_dir).ok()?;
        let fds: HashSet<u32> = rd
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let empty = HashSet::new();
        let known = known.unwrap_or(&empty);
        let fresh = fds.iter().filter(|fd| !known.contains(fd));
        let old = fds.iter().filter(|fd| known.contains(fd));
        for fd in fresh.chain(old) {
            if *budget == 0 {
                return None;
            }
            *budget -= 1;
            if let Ok(link) = fs::read_link(fd_dir.join(fd.to_string()))
                && link.as_os_str() == target
            {
                return Some(fds);
            }
        }
        None
    }

    /// Everything readable about `pid`; fields stay empty/zero when the
    /// process vanished or is unreadable.
    pub fn identity(&self, pid: u32) -> ProcessIdentity {
        let base = self.proc_root.join(pid.to_string());
        let stat = read_stat(&base.join("stat"));
        let mut id = ProcessIdentity {
            pid,
            start_time: stat.map(|s| s.start_time).unwrap_or(0),
            exe: read_exe(&base),
            argv: read_argv(&base, self.limits.max_argv_bytes, self.limits.max_args),
            uid: read_uid(&base).unwrap_or(u32::MAX),
            ancestors: Vec::new(),
        };
        let mut ppid = stat.map(|s| s.ppid).unwrap_or(0);
        while ppid != 0 && id.ancestors.len() < self.limits.max_ancestors {
            let pbase = self.proc_root.join(ppid.to_string());
            let pstat = read_stat(&pbase.join("stat"));
            id.ancestors.push((
                ppid,
                pstat.map(|s| s.start_time).unwrap_or(0),
                read_exe(&pbase),
            ));
            match pstat {
                Some(s) if s.ppid != ppid => ppid = s.ppid,
                _ => break,
            }
        }
        id
    }
}

/// Where a socket was found.
struct Found {
    inode: u64,
    /// `None`: our own network namespace.
    netns: Option<u64>,
    /// Members of the foreign namespace (pid search is limited to them).
    netns_pids: Option<Arc<[u32]>>,
}

impl Found {
    fn own(inode: u64) -> Self {
        Found {
            inode,
            netns: None,
            netns_pids: None,
        }
    }
}

enum Scan {
    Found(u64),
    /// The tables were read; no such socket.
    Absent,
    /// No table could be opened (process gone, no permission).
    Unreadable,
}

/// TCP state `LISTEN` in `/proc/net/tcp`.
const TCP_LISTEN: u8 = 0x0A;

/// Scan `<base>/net/{tcp,udp}{,6}` for the client socket whose local address
/// is `client`.
///
/// Preference: local and remote (`server`) both match; then (`relaxed`, for
/// foreign namespaces where the client dialled something else than our
/// listener) the local address alone on a non-listening socket; then, UDP
/// only, an unconnected socket on the client's port bound to the client
/// address or the wildcard address.
fn scan_net(
    base: &std::path::Path,
    kind: SocketKind,
    client: SocketAddr,
    server: Option<SocketAddr>,
    relaxed: bool,
) -> Scan {
    let files: &[&str] = match kind {
        SocketKind::Tcp => &["net/tcp", "net/tcp6"],
        SocketKind::Udp => &["net/udp", "net/udp6"],
    };
    let mut opened = false;
    let mut local_only = None;
    let mut loose = None;
    for f in files {
        let Ok(file) = fs::File::open(base.join(f)) else {
            continue;
        };
        opened = true;
        for line in BufReader::new(file).lines().skip(1) {
            let Ok(line) = line else { break };
            let Some(e) = parse_net_line(&line) else {
                continue;
            };
            if e.inode == 0 {
                continue;
            }
            let exact_local = e.local == client;
            let remote_ok = match server {
                Some(s) => e.remote == s,
                None => true,
            };
            if exact_local && remote_ok {
                return Scan::Found(e.inode);
            }
            if relaxed
                && exact_local
                && local_only.is_none()
                && !(kind == SocketKind::Tcp && e.state == TCP_LISTEN)
            {
                local_only = Some(e.inode);
            }
            let remote_loose =
                remote_ok || relaxed || (e.remote.ip().is_unspecified() && e.remote.port() == 0);
            if kind == SocketKind::Udp
                && loose.is_none()
                && e.local.port() == client.port()
                && (exact_local || e.local.ip().is_unspecified())
                && remote_loose
            {
                loose = Some(e.inode);
            }
        }
    }
    match local_only.or(loose) {
        Some(i) => Scan::Found(i),
        None if opened => Scan::Absent,
        None => Scan::Unreadable,
    }
}

/// IPv4-mapped IPv6 → IPv4, so dual-stack listeners match v4 entries.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

struct NetEntry {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    inode: u64,
}

/// One line of `/proc/net/{tcp,udp}{,6}`.
fn parse_net_line(line: &str) -> Option<NetEntry> {
    let mut it = line.split_whitespace();
    let _sl = it.next()?;
    let local = parse_hex_addr(it.next()?)?;
    let remote = parse_hex_addr(it.next()?)?;
    let state = u8::from_str_radix(it.next()?, 16).ok()?;
    // tx:rx, tr:when, retrnsmt, uid, timeout, inode
    let inode = it.nth(5)?.parse().ok()?;
    Some(NetEntry {
        local: canonical(local),
        remote: canonical(remote),
        state,
        inode,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6). The address is
/// printed as native-endian 32-bit words of the network-order bytes.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = s.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let ip = match ip_hex.len() {
        8 => {
            let w = u32::from_str_radix(ip_hex, 16).ok()?;
            IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes()))
        }
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[derive(Debug, Clone, Copy)]
struct Stat {
    ppid: u32,
    start_time: u64,
}

/// Parse `/proc/<pid>/stat` robustly: fields are counted after the *last*
/// `)` (comm may contain spaces and parentheses). ppid is field 4,
/// starttime field 22.
fn parse_stat(s: &str) -> Option<Stat> {
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state)
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

fn read_stat(p: &std::path::Path) -> Option<Stat> {
    parse_stat(&fs::read_to_string(p).ok()?)
}

fn read_exe(base: &std::path::Path) -> String {
    fs::read_link(base.join("exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_uid(base: &std::path::Path) -> Option<u32> {
    let s = fs::read_to_string(base.join("status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn read_argv(base: &std::path::Path, max_bytes: usize, max_args: usize) -> Vec<String> {
    let Ok(f) = fs::File::open(base.join("cmdline")) else {
        return Vec::new();
    };
    let mut buf = Vec::new();
    if f.take(max_bytes as u64).read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    buf.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .take(max_args)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let s = "1234 (a) b (c) d) S 77 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.ppid, 77);
        assert_eq!(st.start_time, 987654);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S").is_none());
    }

    #[test]
    fn hex_addresses() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_hex_addr("0100007F:1F90").unwrap(),
                "127.0.0.1:8080".parse().unwrap()
            );
            assert_eq!(
                parse_hex_addr("00000000000000000000000001000000:0035").unwrap(),
                "[::1]:53".parse().unwrap()
            );
            // v4-mapped in tcp6 canonicalises to v4
            let l = "   0: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 4242 1";
            let e = parse_net_line(l).unwrap();
            assert_eq!(e.local, "127.0.0.1:8080".parse().unwrap());
            assert_eq!(e.inode, 4242);
        }
        assert!(parse_hex_addr("zz:1").is_none());
        assert!(parse_hex_addr("0100007F").is_none());
    }
}
