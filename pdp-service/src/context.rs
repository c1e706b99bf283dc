//! The process-context store (Policy Information Point, DESIGN §6).
//!
//! Sensors push events (sensitive file opens, exec/exit ancestry, DNS
//! answers, heartbeats); [`Policy::evaluate`](crate::policy::Policy::evaluate)
//! reads them through [`ContextView`]. The store is keyed by
//! `(workload, pid, start_time)` so a reused PID never inherits the taint of
//! the process that had it before.
//!
//! Memory is bounded two ways: a maximum number of process entries and a
//! maximum number of (approximate) bytes. When either is exceeded the entry
//! touched least recently is evicted and counted
//! (`secureops_pdp_context_evictions_total`). Evicting taint is the only way
//! this store can lose information; operators size `--max-processes` so that
//! a flood from one workload cannot evict the taint of another in practice,
//! and the metric makes it visible when it happens.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::metrics::Metrics;
use crate::policy::ProcKey;

/// Sizing of the context store.
#[derive(Debug, Clone)]
pub struct ContextConfig {
    /// Maximum process entries before the oldest is evicted.
    pub max_processes: usize,
    /// Maximum approximate bytes held by process entries.
    pub max_bytes: usize,
    /// Maximum DNS (workload, ip) entries.
    pub max_dns_entries: usize,
    /// Sensitive opens remembered per process (most recent kept).
    pub max_opens_per_process: usize,
    /// How long an idle process entry (and an open) is kept. The effective
    /// retention is the maximum of this and the active policy's longest
    /// taint window.
    pub ttl: Duration,
    /// Upper bound on a DNS answer's TTL.
    pub max_dns_ttl: Duration,
    /// Lower bound on a DNS answer's TTL, so a connection made right after a
    /// zero-TTL answer can still be attributed to the name.
    pub min_dns_ttl: Duration,
    /// Maximum workloads with sensor heartbeat state.
    pub max_sensors: usize,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            max_processes: 100_000,
            max_bytes: 256 * 1024 * 1024,
            max_dns_entries: 100_000,
            max_opens_per_process: 16,
            ttl: Duration::from_secs(3600),
            max_dns_ttl: Duration::from_secs(3600),
            min_dns_ttl: Duration::from_secs(5),
            max_sensors: 10_000,
        }
    }
}

/// Fixed per-entry overhead counted against `max_bytes` (hash map slots,
/// order index, struct).
const ENTRY_OVERHEAD: usize = 160;
/// Per-open overhead on top of the path bytes.
const OPEN_OVERHEAD: usize = 40;
/// Names remembered per (workload, ip).
const MAX_NAMES_PER_IP: usize = 8;

#[derive(Debug)]
struct ProcEntry {
    seq: u64,
    parent: Option<ProcKey>,
    opens: Vec<(Box<str>, Instant)>,
    last_seen: Instant,
    exited: Option<Instant>,
    bytes: usize,
}

impl ProcEntry {
    fn new(seq: u64, now: Instant) -> Self {
        ProcEntry {
            seq,
            parent: None,
            opens: Vec::new(),
            last_seen: now,
            exited: None,
            bytes: ENTRY_OVERHEAD,
        }
    }
}

#[derive(Debug)]
struct DnsEntry {
    seq: u64,
    names: Vec<(Box<str>, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct SensorState {
    last: Instant,
    interval: Duration,
    /// Liveness as last reported by [`ContextStore::sweep_sensors`], to
    /// detect alive → dead transitions.
    reported_alive: bool,
}

#[derive(Debug, Default)]
struct Inner {
    procs: HashMap<Arc<str>, HashMap<ProcKey, ProcEntry>>,
    order: BTreeMap<u64, (Arc<str>, ProcKey)>,
    proc_count: usize,
    bytes: usize,
    next_seq: u64,
    dns: HashMap<Arc<str>, HashMap<IpAddr, DnsEntry>>,
    dns_order: BTreeMap<u64, (Arc<str>, IpAddr)>,
    dns_count: usize,
    sensors: HashMap<Arc<str>, SensorState>,
}

impl Inner {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn intern(&self, workload: &str) -> Arc<str> {
        if let Some((k, _)) = self.procs.get_key_value(workload) {
            return k.clone();
        }
        if let Some((k, _)) = self.dns.get_key_value(workload) {
            return k.clone();
        }
        if let Some((k, _)) = self.sensors.get_key_value(workload) {
            return k.clone();
        }
        Arc::from(workload)
    }

    /// Get or create the entry for `(workload, p)` and mark it most recently
    /// used.
    fn touch(&mut self, workload: &str, p: ProcKey, now: Instant) -> &mut ProcEntry {
        let seq = self.seq();
        let w = self.intern(workload);
        let map = self.procs.entry(w.clone()).or_default();
        let mut created = false;
        let e = map.entry(p).or_insert_with(|| {
            created = true;
            ProcEntry::new(seq, now)
        });
        if created {
            self.proc_count += 1;
            self.bytes += e.bytes + w.len();
        } else {
            self.order.remove(&e.seq);
            e.seq = seq;
        }
        e.last_seen = now;
        self.order.insert(seq, (w, p));
        e
    }

    fn remove_proc(&mut self, workload: &str, p: ProcKey) -> bool {
        let Some(map) = self.procs.get_mut(workload) else {
            return false;
        };
        let Some(e) = map.remove(&p) else {
            return false;
        };
        self.order.remove(&e.seq);
        self.proc_count -= 1;
        self.bytes = self.bytes.saturating_sub(e.bytes + workload.len());
        if map.is_empty() {
            self.procs.remove(workload);
        }
        true
    }

    /// Evict least recently touched entries until within bounds; returns the
    /// number evicted.
    fn enforce_bounds(&mut self, cfg: &ContextConfig) -> u64 {
        let mut evicted = 0;
        while self.proc_count > cfg.max_processes || self.bytes > cfg.max_bytes {
            let Some((_, (w, p))) = self.order.pop_first() else {
                break;
            };
            // `order` no longer holds the seq; remove_proc's order.remove is a no-op.
            if self.remove_proc(&w, p) {
                evicted += 1;
            }
        }
        while self.dns_count > cfg.max_dns_entries {
            let Some((_, (w, ip))) = self.dns_order.pop_first() else {
                break;
            };
            self.remove_dns(&w, ip);
            evicted += 1;
        }
        evicted
    }

    fn remove_dns(&mut self, workload: &str, ip: IpAddr) {
        if let Some(map) = self.dns.get_mut(workload) {
            if let Some(e) = map.remove(&ip) {
                self.dns_order.remove(&e.seq);
                self.dns_count -= 1;
            }
            if map.is_empty() {
                self.dns.remove(workload);
            }
        }
    }
}

/// What an applied event changed, so the caller can publish invalidations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextChange {
    /// Nothing a cached decision could depend on.
    None,
    /// A process of the workload opened a sensitive file.
    Tainted {
        /// The opener.
        process: ProcKey,
    },
    /// New DNS-learned (ip → name) context for the workload.
    DnsLearned,
    /// The workload's sensor came (back) alive.
    SensorAlive,
}

/// The bounded, TTL'd process-context store.
#[derive(Debug)]
pub struct ContextStore {
    cfg: ContextConfig,
    inner: RwLock<Inner>,
    metrics: Metrics,
    /// Longest taint window of the active policy, in milliseconds.
    policy_window_ms: std::sync::atomic::AtomicU64,
}

impl ContextStore {
    /// Create an empty store.
    pub fn new(cfg: ContextConfig, metrics: Metrics) -> Self {
        ContextStore {
            cfg,
            inner: RwLock::new(Inner::default()),
            metrics,
            policy_window_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The store's sizing.
    pub fn config(&self) -> &ContextConfig {
        &self.cfg
    }

    /// Tell the store the active policy's longest taint window so opens are
    /// retained at least that long.
    pub fn set_policy_window(&self, window: Option<Duration>) {
        let ms = window.map_or(0, |w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX));
        self.policy_window_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Effective retention of opens and idle entries.
    pub fn retention(&self) -> Duration {
        let w = Duration::from_millis(
            self.policy_window_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        w.max(self.cfg.ttl)
    }

    fn update_gauges(&self, inner: &Inner, evicted: u64) {
        self.metrics
            .context_processes
            .set(i64::try_from(inner.proc_count).unwrap_or(i64::MAX));
        self.metrics
            .context_dns_entries
            .set(i64::try_from(inner.dns_count).unwrap_or(i64::MAX));
        if evicted > 0 {
            self.metrics.context_evictions.inc_by(evicted);
        }
    }

    /// Record that `p` opened `path` (`opened_at` is when, no later than now).
    /// `parent` is the nearest ancestor when the sensor knows it.
    pub fn record_open(
        &self,
        workload: &str,
        p: ProcKey,
        parent: Option<ProcKey>,
        path: &str,
        opened_at: Instant,
    ) -> ContextChange {
        let max_opens = self.cfg.max_opens_per_process.max(1);
        let mut inner = self.inner.write();
        let now = Instant::now();
        let e = inner.touch(workload, p, now);
        let before = e.bytes;
        if parent.is_some() {
            e.parent = parent;
        }
        if let Some(o) = e.opens.iter_mut().find(|(q, _)| &**q == path) {
            if opened_at > o.1 {
                o.1 = opened_at;
            }
        } else {
            if e.opens.len() >= max_opens {
                // Drop the oldest open; the newest are what taint windows need.
                if let Some((idx, _)) = e.opens.iter().enumerate().min_by_key(|(_, (_, t))| *t) {
                    let (old, _) = e.opens.swap_remove(idx);
                    e.bytes = e.bytes.saturating_sub(old.len() + OPEN_OVERHEAD);
                }
            }
            e.bytes += path.len() + OPEN_OVERHEAD;
            e.opens.push((Box::from(path), opened_at));
        }
        let after = e.bytes;
        inner.bytes = (inner.bytes + after).saturating_sub(before);
        let evicted = inner.enforce_bounds(&self.cfg);
        self.update_gauges(&inner, evicted);
        ContextChange::Tainted { process: p }
    }

    /// Record an exec: keeps the (workload, pid, start time) → parent link
    /// fresh so taint can flow to descendants the PEP did not list.
    pub fn record_exec(
        &self,
        workload: &str,
        p: ProcKey,
        parent: Option<ProcKey>,
    ) -> ContextChange {
        let mut inner = self.inner.write();
        let now = Instant::now();
        let e = inner.touch(workload, p, now);
        e.parent = parent;
        e.exited = None;
        let evicted = inner.enforce_bounds(&self.cfg);
        self.update_gauges(&inner, evicted);
        ContextChange::None
    }

    /// Record an exit. The entry is kept until its opens age out of the
    /// retention window (a child may still be running, tainted by it).
    pub fn record_exit(&self, workload: &str, p: ProcKey) -> ContextChange {
        let mut inner = self.inner.write();
        let now = Instant::now();
        let has_opens = inner
            .procs
            .get(workload)
            .and_then(|m| m.get(&p))
            .is_some_and(|e| !e.opens.is_empty());
        if has_opens {
            if let Some(e) = inner.procs.get_mut(workload).and_then(|m| m.get_mut(&p)) {
                e.exited = Some(now);
            }
        } else {
            // Nothing to remember about it: drop it at once.
            inner.remove_proc(workload, p);
        }
        self.update_gauges(&inner, 0);
        ContextChange::None
    }

    /// Record a DNS answer the workload received for `name` (already
    /// normalised) with the given addresses and TTL.
    pub fn record_dns(
        &self,
        workload: &str,
        name: &str,
        ips: &[IpAddr],
        ttl: Duration,
    ) -> ContextChange {
        let ttl = ttl.clamp(self.cfg.min_dns_ttl, self.cfg.max_dns_ttl);
        let now = Instant::now();
        let expires = now + ttl;
        let mut inner = self.inner.write();
        let w = inner.intern(workload);
        let mut learned = false;
        for ip in ips {
            let seq = inner.seq();
            let map = inner.dns.entry(w.clone()).or_default();
            let mut created = false;
            let e = map.entry(*ip).or_insert_with(|| {
                created = true;
                DnsEntry {
                    seq,
                    names: Vec::new(),
                }
            });
            let old_seq = e.seq;
            e.seq = seq;
            e.names.retain(|(_, exp)| *exp > now);
            if let Some(n) = e.names.iter_mut().find(|(n, _)| &**n == name) {
                n.1 = n.1.max(expires);
            } else {
                learned = true;
                if e.names.len() >= MAX_NAMES_PER_IP {
                    e.names.remove(0);
                }
                e.names.push((Box::from(name), expires));
            }
            if created {
                inner.dns_count += 1;
            } else {
                inner.dns_order.remove(&old_seq);
            }
            inner.dns_order.insert(seq, (w.clone(), *ip));
        }
        let evicted = inner.enforce_bounds(&self.cfg);
        self.update_gauges(&inner, evicted);
        if learned {
            ContextChange::DnsLearned
        } else {
            ContextChange::None
        }
    }

    /// Record a sensor heartbeat promising the next one within `interval`.
    pub fn heartbeat(&self, workload: &str, interval: Duration) -> ContextChange {
        let now = Instant::now();
        let mut inner = self.inner.write();
        if !inner.sensors.contains_key(workload) && inner.sensors.len() >= self.cfg.max_sensors {
            // Drop the sensor state silent for the longest time.
            if let Some(k) = inner
                .sensors
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
            {
                inner.sensors.remove(&k);
            }
        }
        let w = inner.intern(workload);
        let st = inner.sensors.entry(w).or_insert(SensorState {
            last: now,
            interval,
            reported_alive: false,
        });
        st.last = now;
        st.interval = interval;
        if st.reported_alive {
            ContextChange::None
        } else {
            st.reported_alive = true;
            ContextChange::SensorAlive
        }
    }

    /// Ancestors of `p` known from exec / open events, nearest first, at most
    /// `max` of them (cycle-safe).
    pub fn known_ancestors(&self, workload: &str, p: ProcKey, max: usize) -> Vec<ProcKey> {
        let inner = self.inner.read();
        let Some(map) = inner.procs.get(workload) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut cur = p;
        while out.len() < max {
            let Some(parent) = map.get(&cur).and_then(|e| e.parent) else {
                break;
            };
            if parent == p || out.contains(&parent) {
                break;
            }
            out.push(parent);
            cur = parent;
        }
        out
    }

    /// Whether the store holds anything for the workload's processes (cheap
    /// pre-check for the hot path).
    pub fn has_workload(&self, workload: &str) -> bool {
        self.inner.read().procs.contains_key(workload)
    }

    /// Drop expired opens, idle and exited entries, expired DNS names.
    /// Returns the number of process entries removed.
    pub fn sweep(&self) -> usize {
        let retention = self.retention();
        let now = Instant::now();
        let mut inner = self.inner.write();
        let mut dead: Vec<(Arc<str>, ProcKey)> = Vec::new();
        let mut freed = 0usize;
        for (w, map) in inner.procs.iter_mut() {
            for (k, e) in map.iter_mut() {
                let before = e.opens.len();
                e.opens
                    .retain(|(_, t)| now.saturating_duration_since(*t) <= retention);
                if e.opens.len() != before {
                    let new_bytes = ENTRY_OVERHEAD
                        + e.opens
                            .iter()
                            .map(|(p, _)| p.len() + OPEN_OVERHEAD)
                            .sum::<usize>();
                    freed += e.bytes.saturating_sub(new_bytes);
                    e.bytes = new_bytes;
                }
                let idle = now.saturating_duration_since(e.last_seen) > retention;
                let gone = e.exited.is_some() && e.opens.is_empty();
                if idle || gone {
                    dead.push((w.clone(), *k));
                }
            }
        }
        inner.bytes = inner.bytes.saturating_sub(freed);
        for (w, k) in &dead {
            inner.remove_proc(w, *k);
        }
        let mut dns_dead = Vec::new();
        for (w, map) in inner.dns.iter_mut() {
            for (ip, e) in map.iter_mut() {
                e.names.retain(|(_, exp)| *exp > now);
                if e.names.is_empty() {
                    dns_dead.push((w.clone(), *ip));
                }
            }
        }
        for (w, ip) in dns_dead {
            inner.remove_dns(&w, ip);
        }
        self.update_gauges(&inner, 0);
        dead.len()
    }

    /// Workloads whose sensor went silent since the last call (alive →
    /// dead): cached allows of those workloads must be invalidated.
    pub fn sweep_sensors(&self) -> Vec<String> {
        let now = Instant::now();
        let mut inner = self.inner.write();
        let mut out = Vec::new();
        for (w, st) in inner.sensors.iter_mut() {
            if st.reported_alive && !sensor_state_alive(st, now) {
                st.reported_alive = false;
                out.push(w.to_string());
            }
        }
        out
    }

    /// Process entries currently held.
    pub fn process_count(&self) -> usize {
        self.inner.read().proc_count
    }

    /// Approximate bytes held by process entries.
    pub fn bytes(&self) -> usize {
        self.inner.read().bytes
    }

    /// Visit the opens of one process (see [`ContextView::visit_opens`]).
    pub fn visit_opens(&self, workload: &str, p: ProcKey, f: &mut dyn FnMut(&str, Duration)) {
        let now = Instant::now();
        let inner = self.inner.read();
        if let Some(e) = inner.procs.get(workload).and_then(|m| m.get(&p)) {
            for (path, t) in &e.opens {
                f(path, now.saturating_duration_since(*t));
            }
        }
    }

    /// Unexpired names the workload learned for `ip`.
    pub fn dns_names_for(&self, workload: &str, ip: IpAddr) -> Vec<String> {
        let now = Instant::now();
        let inner = self.inner.read();
        inner
            .dns
            .get(workload)
            .and_then(|m| m.get(&ip))
            .map(|e| {
                e.names
                    .iter()
                    .filter(|(_, exp)| *exp > now)
                    .map(|(n, _)| n.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Alive = last heartbeat within three promised intervals.
    pub fn sensor_alive(&self, workload: &str) -> bool {
        let now = Instant::now();
        self.inner
            .read()
            .sensors
            .get(workload)
            .is_some_and(|st| sensor_state_alive(st, now))
    }
}

fn sensor_state_alive(st: &SensorState, now: Instant) -> bool {
    now.saturating_duration_since(st.last) <= st.interval.saturating_mul(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max: usize) -> ContextStore {
        let (m, _r) = Metrics::new();
        ContextStore::new(
            ContextConfig {
                max_processes: max,
                ..ContextConfig::default()
            },
            m,
        )
    }

    fn pk(pid: u32, st: u64) -> ProcKey {
        ProcKey {
            pid,
            start_time: st,
        }
    }

    #[test]
    fn opens_are_per_pid_and_start_time() {
        let s = store(10);
        s.record_open("w", pk(10, 1), None, "/h/.env", Instant::now());
        let mut seen = Vec::new();
        s.visit_opens("w", pk(10, 1), &mut |p, _| seen.push(p.to_owned()));
        assert_eq!(seen, vec!["/h/.env".to_owned()]);
        let mut reused = 0;
        s.visit_opens("w", pk(10, 2), &mut |_, _| reused += 1);
        assert_eq!(reused, 0, "a reused PID must not inherit taint");
        let mut other = 0;
        s.visit_opens("x", pk(10, 1), &mut |_, _| other += 1);
        assert_eq!(other, 0, "workloads are separate");
    }

    #[test]
    fn oldest_entries_evicted_when_full() {
        let (m, _r) = Metrics::new();
        let s = ContextStore::new(
            ContextConfig {
                max_processes: 100,
                ..ContextConfig::default()
            },
            m.clone(),
        );
        for i in 0..1000u32 {
            s.record_open("w", pk(i + 1, 7), None, "/x/.env", Instant::now());
        }
        assert_eq!(s.process_count(), 100);
        assert_eq!(m.context_evictions.get(), 900);
        let mut newest = 0;
        s.visit_opens("w", pk(1000, 7), &mut |_, _| newest += 1);
        assert_eq!(newest, 1);
        let mut oldest = 0;
        s.visit_opens("w", pk(1, 7), &mut |_, _| oldest += 1);
        assert_eq!(oldest, 0);
    }

    #[test]
    fn byte_budget_bounds_memory() {
        let (m, _r) = Metrics::new();
        let s = ContextStore::new(
            ContextConfig {
                max_processes: 1_000_000,
                max_bytes: 64 * 1024,
                ..ContextConfig::default()
            },
            m,
        );
        let long = format!("/{}", "a".repeat(4000));
        for i in 0..1000u32 {
            s.record_open("w", pk(i + 1, 1), None, &long, Instant::now());
        }
        assert!(s.bytes() <= 64 * 1024, "bytes {}", s.bytes());
        assert!(s.process_count() < 20);
    }

    #[test]
    fn ancestry_from_exec_events_is_cycle_safe() {
        let s = store(100);
        s.record_exec("w", pk(3, 3), Some(pk(2, 2)));
        s.record_exec("w", pk(2, 2), Some(pk(1, 1)));
        s.record_exec("w", pk(1, 1), Some(pk(3, 3)));
        assert_eq!(
            s.known_ancestors("w", pk(3, 3), 10),
            vec![pk(2, 2), pk(1, 1)]
        );
    }

    #[test]
    fn dns_names_expire_and_are_per_workload() {
        let s = store(100);
        let ip: IpAddr = "93.184.216.34"
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(
            s.record_dns("w", "example.com", &[ip], Duration::from_secs(60)),
            ContextChange::DnsLearned
        );
        assert_eq!(
            s.record_dns("w", "example.com", &[ip], Duration::from_secs(60)),
            ContextChange::None
        );
        assert_eq!(s.dns_names_for("w", ip), vec!["example.com".to_owned()]);
        assert!(s.dns_names_for("v", ip).is_empty());
    }

    #[test]
    fn sensor_alive_within_three_intervals() {
        let s = store(10);
        assert!(!s.sensor_alive("w"));
        assert_eq!(
            s.heartbeat("w", Duration::from_millis(300)),
            ContextChange::SensorAlive
        );
        assert!(s.sensor_alive("w"));
        std::thread::sleep(Duration::from_millis(950));
        assert!(!s.sensor_alive("w"));
        assert_eq!(s.sweep_sensors(), vec!["w".to_owned()]);
        assert!(s.sweep_sensors().is_empty());
    }
}
