//! Escalations: attempts the policy sends to an operator (DESIGN §3, §4).
//!
//! An `ESCALATE` verdict creates a pending escalation or joins the one
//! already pending for the same `(workload, normalised host, port)`, so a
//! retrying agent produces one operator task with a hit count, not thousands.
//! An operator approves (for a TTL, for one port or every port of the host)
//! or denies; the resolution is what [`ContextView::escalation_resolution`]
//! reports to the evaluator. Resolutions expire; an expired approval turns
//! the next attempt back into a new pending escalation.
//!
//! [`ContextView::escalation_resolution`]: crate::policy::ContextView::escalation_resolution

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rand::RngCore;
use secureops_proto::v1::{Escalation, EscalationState, ProcessInfo};

use crate::metrics::Metrics;

/// Default lifetime of an approval with `ttl_seconds == 0`.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(3600);

/// Sizing of the escalation store.
#[derive(Debug, Clone)]
pub struct EscalationConfig {
    /// Maximum pending escalations; the oldest is expired when exceeded.
    pub max_pending: usize,
    /// Resolved / expired escalations kept for `ListEscalations`.
    pub max_resolved: usize,
    /// A pending escalation nobody resolved expires after this long.
    pub pending_ttl: Duration,
    /// Maximum active resolutions (grants); the oldest is dropped when full.
    pub max_grants: usize,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        EscalationConfig {
            max_pending: 10_000,
            max_resolved: 1_000,
            pending_ttl: Duration::from_secs(24 * 3600),
            max_grants: 100_000,
        }
    }
}

/// Why a resolution was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// No escalation with that id.
    #[error("no escalation with id {0:?}")]
    NotFound(String),
    /// The escalation expired; a new attempt will create a new one.
    #[error("escalation {0:?} has expired")]
    Expired(String),
}

#[derive(Debug, Clone)]
struct Record {
    esc: Escalation,
    /// Pending: when it expires unresolved. Resolved: when the resolution
    /// expires (`None` = never).
    expires_at: Option<Instant>,
    pending_seq: u64,
}

#[derive(Debug, Clone)]
struct Grant {
    /// 0 = every port.
    port: u16,
    approved: bool,
    expires_at: Option<Instant>,
    escalation_id: String,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, Record>,
    /// (workload, host, port) -> pending escalation id.
    pending: HashMap<(String, String, u16), String>,
    /// Age order of pending escalations.
    pending_order: BTreeMap<u64, String>,
    /// Resolved ids, oldest first (bounded history).
    resolved_order: VecDeque<String>,
    /// workload -> host -> resolutions.
    grants: HashMap<String, HashMap<String, Vec<Grant>>>,
    grant_count: usize,
    seq: u64,
}

/// An escalation whose resolution expired or that expired unresolved; the
/// caller publishes an invalidation for it.
#[derive(Debug, Clone)]
pub struct Expired {
    /// The escalation after the state change.
    pub escalation: Escalation,
}

/// The escalation store.
#[derive(Debug)]
pub struct EscalationStore {
    cfg: EscalationConfig,
    inner: Mutex<Inner>,
    metrics: Metrics,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

fn new_id() -> String {
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    format!("esc-{}", hex::encode(b))
}

impl EscalationStore {
    /// Create an empty store.
    pub fn new(cfg: EscalationConfig, metrics: Metrics) -> Self {
        EscalationStore {
            cfg,
            inner: Mutex::new(Inner::default()),
            metrics,
        }
    }

    fn update_gauge(&self, inner: &Inner) {
        self.metrics
            .escalations_pending
            .set(i64::try_from(inner.pending.len()).unwrap_or(i64::MAX));
    }

    /// Create or join the pending escalation for `(workload, host, port)`;
    /// returns its id.
    pub fn escalate(
        &self,
        workload: &str,
        host: &str,
        port: u16,
        rule_id: &str,
        process: Option<&ProcessInfo>,
    ) -> String {
        let now = now_ms();
        let mut inner = self.inner.lock();
        let key = (workload.to_owned(), host.to_owned(), port);
        if let Some(id) = inner.pending.get(&key).cloned()
            && let Some(r) = inner.records.get_mut(&id)
        {
            r.esc.hits += 1;
            r.esc.last_seen_unix_ms = now;
            return id;
        }
        // Bounded: expire the oldest pending escalation to make room.
        while inner.pending.len() >= self.cfg.max_pending.max(1) {
            let Some((_, old)) = inner.pending_order.pop_first() else {
                break;
            };
            Self::finish(
                &mut inner,
                &old,
                EscalationState::Expired,
                None,
                self.cfg.max_resolved,
            );
        }
        let id = new_id();
        inner.seq += 1;
        let seq = inner.seq;
        let esc = Escalation {
            id: id.clone(),
            workload_id: workload.to_owned(),
            host: host.to_owned(),
            port: u32::from(port),
            rule_id: rule_id.to_owned(),
            state: EscalationState::Pending as i32,
            created_unix_ms: now,
            last_seen_unix_ms: now,
            hits: 1,
            expires_unix_ms: 0,
            first_process: process.cloned(),
            comment: String::new(),
        };
        inner.records.insert(
            id.clone(),
            Record {
                esc,
                expires_at: Some(Instant::now() + self.cfg.pending_ttl),
                pending_seq: seq,
            },
        );
        inner.pending.insert(key, id.clone());
        inner.pending_order.insert(seq, id.clone());
        self.update_gauge(&inner);
        id
    }

    /// Move a record out of the pending index into `state`.
    fn finish(
        inner: &mut Inner,
        id: &str,
        state: EscalationState,
        expires_at: Option<Instant>,
        max_resolved: usize,
    ) {
        let Some(r) = inner.records.get_mut(id) else {
            return;
        };
        let was_pending = r.esc.state == EscalationState::Pending as i32;
        r.esc.state = state as i32;
        r.expires_at = expires_at;
        let key = (
            r.esc.workload_id.clone(),
            r.esc.host.clone(),
            u16::try_from(r.esc.port).unwrap_or(0),
        );
        let seq = r.pending_seq;
        if was_pending {
            if inner.pending.get(&key).is_some_and(|p| p == id) {
                inner.pending.remove(&key);
            }
            inner.pending_order.remove(&seq);
            inner.resolved_order.push_back(id.to_owned());
        }
        while inner.resolved_order.len() > max_resolved {
            if let Some(old) = inner.resolved_order.pop_front() {
                // Keep records whose resolution is still in force.
                let in_force = inner
                    .records
                    .get(&old)
                    .is_some_and(|r| r.esc.state != EscalationState::Expired as i32);
                if in_force {
                    inner.resolved_order.push_back(old);
                    break;
                }
                inner.records.remove(&old);
            }
        }
    }

    fn remove_grants_of(inner: &mut Inner, workload: &str, host: &str, escalation_id: &str) {
        if let Some(hosts) = inner.grants.get_mut(workload) {
            if let Some(v) = hosts.get_mut(host) {
                let before = v.len();
                v.retain(|g| g.escalation_id != escalation_id);
                inner.grant_count -= before - v.len();
                if v.is_empty() {
                    hosts.remove(host);
                }
            }
            if hosts.is_empty() {
                inner.grants.remove(workload);
            }
        }
    }

    /// Approve (for `ttl`, default one hour; `all_ports` widens it to every
    /// port of the host) or deny (for `ttl`, default forever) an escalation.
    pub fn resolve(
        &self,
        id: &str,
        approve: bool,
        ttl_seconds: u32,
        all_ports: bool,
        comment: &str,
    ) -> Result<Escalation, ResolveError> {
        let mut inner = self.inner.lock();
        let Some(r) = inner.records.get(id) else {
            return Err(ResolveError::NotFound(id.to_owned()));
        };
        if r.esc.state == EscalationState::Expired as i32 {
            return Err(ResolveError::Expired(id.to_owned()));
        }
        let workload = r.esc.workload_id.clone();
        let host = r.esc.host.clone();
        let port = if all_ports {
            0
        } else {
            u16::try_from(r.esc.port).unwrap_or(0)
        };
        let ttl = match (approve, ttl_seconds) {
            (true, 0) => Some(DEFAULT_APPROVAL_TTL),
            (false, 0) => None,
            (_, s) => Some(Duration::from_secs(u64::from(s))),
        };
        let expires_at = ttl.map(|t| Instant::now() + t);
        let expires_ms = ttl.map_or(0, |t| {
            now_ms().saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
        });
        // A new resolution replaces any earlier one of this escalation.
        Self::remove_grants_of(&mut inner, &workload, &host, id);
        // Bounded: drop the oldest-expiring grant when full.
        if inner.grant_count >= self.cfg.max_grants.max(1) {
            Self::drop_one_grant(&mut inner);
        }
        inner
            .grants
            .entry(workload)
            .or_default()
            .entry(host)
            .or_default()
            .push(Grant {
                port,
                approved: approve,
                expires_at,
                escalation_id: id.to_owned(),
            });
        inner.grant_count += 1;
        let state = if approve {
            EscalationState::Approved
        } else {
            EscalationState::Denied
        };
        Self::finish(&mut inner, id, state, expires_at, self.cfg.max_resolved);
        let out = match inner.records.get_mut(id) {
            Some(r) => {
                r.esc.expires_unix_ms = expires_ms;
                r.esc.comment = comment.to_owned();
                if all_ports {
                    r.esc.port = 0;
                }
                r.esc.clone()
            }
            None => return Err(ResolveError::NotFound(id.to_owned())),
        };
        self.update_gauge(&inner);
        Ok(out)
    }

    fn drop_one_grant(inner: &mut Inner) {
        let victim = inner
            .grants
            .iter()
            .flat_map(|(w, hosts)| {
                hosts.iter().flat_map(move |(h, v)| {
                    v.iter()
                        .map(move |g| (g.expires_at, w.clone(), h.clone(), g.escalation_id.clone()))
                })
            })
            .min_by_key(|(exp, ..)| exp.map_or((1, None), |e| (0, Some(e))));
        if let Some((_, w, h, id)) = victim {
            Self::remove_grants_of(inner, &w, &h, &id);
        }
    }

    /// The operator's resolution in force for (workload, host, port): a
    /// denial (port-specific or all-port) wins over an approval.
    pub fn resolution(&self, workload: &str, host: &str, port: u16) -> Option<bool> {
        let now = Instant::now();
        let inner = self.inner.lock();
        let v = inner.grants.get(workload)?.get(host)?;
        let mut approved = false;
        for g in v {
            if (g.port == port || g.port == 0) && g.expires_at.is_none_or(|e| e > now) {
                if !g.approved {
                    return Some(false);
                }
                approved = true;
            }
        }
        approved.then_some(true)
    }

    /// Expire resolutions and stale pending escalations; returns what
    /// changed so invalidations can be published.
    pub fn sweep(&self) -> Vec<Expired> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let ids: Vec<String> = inner
            .records
            .iter()
            .filter(|(_, r)| {
                r.esc.state != EscalationState::Expired as i32
                    && r.expires_at.is_some_and(|e| e <= now)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in ids {
            let Some((w, h)) = inner
                .records
                .get(&id)
                .map(|r| (r.esc.workload_id.clone(), r.esc.host.clone()))
            else {
                continue;
            };
            Self::remove_grants_of(&mut inner, &w, &h, &id);
            Self::finish(
                &mut inner,
                &id,
                EscalationState::Expired,
                None,
                self.cfg.max_resolved,
            );
            if let Some(r) = inner.records.get(&id) {
                out.push(Expired {
                    escalation: r.esc.clone(),
                });
            }
        }
        if !out.is_empty() {
            self.update_gauge(&inner);
        }
        out
    }

    /// Escalations, newest first; resolved ones only when asked.
    pub fn list(&self, include_resolved: bool, workload: &str) -> Vec<Escalation> {
        let inner = self.inner.lock();
        let mut v: Vec<Escalation> = inner
            .records
            .values()
            .filter(|r| include_resolved || r.esc.state == EscalationState::Pending as i32)
            .filter(|r| workload.is_empty() || r.esc.workload_id == workload)
            .map(|r| r.esc.clone())
            .collect();
        v.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        v
    }

    /// Number of pending escalations.
    pub fn pending_count(&self) -> usize {
        self.inner.lock().pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> EscalationStore {
        let (m, _) = Metrics::new();
        EscalationStore::new(EscalationConfig::default(), m)
    }

    #[test]
    fn dedup_per_workload_host_port() {
        let s = store();
        let a = s.escalate("w", "x.com", 443, "r", None);
        let b = s.escalate("w", "x.com", 443, "r", None);
        let c = s.escalate("w", "x.com", 80, "r", None);
        let d = s.escalate("v", "x.com", 443, "r", None);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        let l = s.list(false, "w");
        assert_eq!(l.len(), 2);
        assert_eq!(l.iter().find(|e| e.id == a).map(|e| e.hits), Some(2));
    }

    #[test]
    fn approve_deny_and_expiry() {
        let s = store();
        let a = s.escalate("w", "x.com", 443, "r", None);
        assert_eq!(s.resolution("w", "x.com", 443), None);
        let e = s.resolve(&a, true, 1, false, "ok").map(|e| e.state);
        assert_eq!(e, Ok(EscalationState::Approved as i32));
        assert_eq!(s.resolution("w", "x.com", 443), Some(true));
        assert_eq!(s.resolution("w", "x.com", 80), None);
        assert_eq!(s.pending_count(), 0);
        // A new attempt after approval creates nothing pending here (the
        // evaluator allows); after expiry the resolution is gone.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(s.resolution("w", "x.com", 443), None);
        let ex = s.sweep();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].escalation.state, EscalationState::Expired as i32);
        assert_eq!(
            s.resolve(&a, true, 0, false, ""),
            Err(ResolveError::Expired(a.clone()))
        );
        let b = s.escalate("w", "x.com", 443, "r", None);
        assert_ne!(a, b);
        s.resolve(&b, false, 0, true, "no")
            .map(|_| ())
            .unwrap_or(());
        assert_eq!(s.resolution("w", "x.com", 1), Some(false));
        assert!(matches!(
            s.resolve("nope", true, 0, false, ""),
            Err(ResolveError::NotFound(_))
        ));
    }

    #[test]
    fn deny_wins_over_approve() {
        let s = store();
        let a = s.escalate("w", "x.com", 443, "r", None);
        let b = s.escalate("w", "x.com", 80, "r", None);
        assert!(s.resolve(&a, true, 0, true, "").is_ok());
        assert_eq!(s.resolution("w", "x.com", 80), Some(true));
        assert!(s.resolve(&b, false, 0, false, "").is_ok());
        assert_eq!(s.resolution("w", "x.com", 80), Some(false));
        assert_eq!(s.resolution("w", "x.com", 443), Some(true));
    }

    #[test]
    fn pending_is_bounded() {
        let (m, _) = Metrics::new();
        let s = EscalationStore::new(
            EscalationConfig {
                max_pending: 10,
                ..EscalationConfig::default()
            },
            m.clone(),
        );
        for p in 1..=50u16 {
            s.escalate("w", "x.com", p, "r", None);
        }
        assert_eq!(s.pending_count(), 10);
        assert_eq!(m.escalations_pending.get(), 10);
    }
}
