//! Shared state of the PDP: the active policy (atomically swappable), the
//! version store, the context and escalation stores, and the invalidation
//! bus that feeds every `Watch` stream.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use secureops_proto::v1::{Invalidation, ProcessRef, invalidation::Kind};
use tokio::sync::broadcast;

use crate::context::{ContextChange, ContextConfig, ContextStore};
use crate::escalation::{EscalationConfig, EscalationStore};
use crate::metrics::Metrics;
use crate::policy::{ContextView, Policy, PolicyError, ProcKey};
use crate::store::{PolicyStore, StoreError, VersionMeta, now_unix_ms, sha256_hex};

/// The policy served when nothing else is configured: deny everything. It
/// is version 0 and never stored, so the first real version is 1.
pub const DENY_ALL_POLICY: &str = "version: 1\nmode: enforce\ndefault: deny\n";

/// Capacity of the invalidation bus; a subscriber further behind than this
/// gets its stream closed (and its PEP flushes its cache).
pub const BUS_CAPACITY: usize = 4096;

/// A compiled policy together with its version.
#[derive(Debug)]
pub struct ActivePolicy {
    /// Version number (0 = built-in deny-everything).
    pub version: u64,
    /// The compiled policy.
    pub policy: Policy,
    /// Stored metadata (`None` for version 0).
    pub meta: Option<VersionMeta>,
}

/// Outcome of a Put / Rollback.
#[derive(Debug)]
pub enum PutOutcome {
    /// Activated as this version.
    Accepted(VersionMeta),
    /// The policy does not compile; the running one keeps serving.
    Rejected(Vec<PolicyError>),
    /// `expected_version` did not match the active version.
    Conflict {
        /// The active version.
        active: u64,
    },
}

/// Errors of policy administration.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Storage failure: the policy was not activated.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Shared PDP state.
#[derive(Debug)]
pub struct Pdp {
    active: ArcSwap<ActivePolicy>,
    store: Mutex<PolicyStore>,
    /// Process context.
    pub context: ContextStore,
    /// Escalations.
    pub escalations: EscalationStore,
    bus: broadcast::Sender<Invalidation>,
    /// Metrics handles.
    pub metrics: Metrics,
}

impl Pdp {
    /// Open the store under `data_dir` and activate the newest stored version
    /// that compiles; with an empty store, activate `bootstrap` (stored as
    /// version 1) or the built-in deny-everything policy (version 0).
    pub fn open(
        data_dir: &Path,
        bootstrap: Option<&str>,
        context: ContextConfig,
        escalations: EscalationConfig,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let mut store = PolicyStore::open(data_dir)?;
        let mut active = None;
        // Only the newest version may be restored. Falling back to an older
        // one could silently re-grant access the operator revoked with the
        // newer version, so an unusable newest version means deny-everything
        // (version 0) until an operator puts or rolls back.
        if let Some(meta) = store.history().last() {
            let restored = store
                .read(meta.version)
                .map_err(|e| e.to_string())
                .and_then(|text| Policy::compile(&text).map_err(|errs| join_errors(&errs)));
            match restored {
                Ok(policy) => {
                    tracing::info!(
                        version = meta.version,
                        rules = policy.rule_count(),
                        "restored policy"
                    );
                    active = Some(ActivePolicy {
                        version: meta.version,
                        policy,
                        meta: Some(meta.clone()),
                    });
                }
                Err(e) => tracing::error!(
                    version = meta.version,
                    error = %e,
                    "newest stored policy is unusable; serving the built-in deny-everything policy until an operator puts or rolls back"
                ),
            }
        }
        if active.is_none() && store.history().is_empty() {
            if let Some(text) = bootstrap {
                let policy = Policy::compile(text).map_err(|errs| {
                    anyhow::anyhow!("bootstrap policy refused:\n{}", join_errors(&errs))
                })?;
                let meta = store.append(text, "bootstrap", "--policy at first start")?;
                tracing::info!(
                    version = meta.version,
                    rules = policy.rule_count(),
                    "bootstrapped policy"
                );
                active = Some(ActivePolicy {
                    version: meta.version,
                    policy,
                    meta: Some(meta),
                });
            }
        } else if bootstrap.is_some() {
            tracing::info!("--policy ignored: the store already holds policy versions");
        }
        let active = match active {
            Some(a) => a,
            None => {
                tracing::warn!(
                    "no policy configured: serving the built-in deny-everything policy (version 0)"
                );
                let policy = Policy::compile(DENY_ALL_POLICY).map_err(|errs| {
                    anyhow::anyhow!("built-in policy refused:\n{}", join_errors(&errs))
                })?;
                ActivePolicy {
                    version: 0,
                    policy,
                    meta: None,
                }
            }
        };
        let context = ContextStore::new(context, metrics.clone());
        context.set_policy_window(active.policy.max_taint_window());
        metrics
            .policy_version
            .set(i64::try_from(active.version).unwrap_or(i64::MAX));
        let (bus, _) = broadcast::channel(BUS_CAPACITY);
        Ok(Pdp {
            active: ArcSwap::from_pointee(active),
            store: Mutex::new(store),
            context,
            escalations: EscalationStore::new(escalations, metrics.clone()),
            bus,
            metrics,
        })
    }

    /// The active policy (one snapshot; hold it for the whole check).
    pub fn active(&self) -> Arc<ActivePolicy> {
        self.active.load_full()
    }

    /// Cheaper snapshot for the hot path.
    pub fn active_guard(&self) -> arc_swap::Guard<Arc<ActivePolicy>> {
        self.active.load()
    }

    /// Subscribe to invalidations.
    pub fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.bus.subscribe()
    }

    /// Publish an invalidation to every Watch stream.
    pub fn publish(&self, mut inv: Invalidation) {
        if inv.policy_version == 0 {
            inv.policy_version = self.active_guard().version;
        }
        self.metrics.invalidations.inc();
        // Err = no subscribers: nothing is cached anywhere, nothing to do.
        let _ = self.bus.send(inv);
    }

    /// Publish what a context event changed.
    pub fn publish_context_change(&self, workload: &str, change: ContextChange) {
        let (kind, process) = match change {
            ContextChange::None => return,
            ContextChange::Tainted { process } => (
                Kind::WorkloadTainted,
                Some(ProcessRef {
                    pid: process.pid,
                    start_time: process.start_time,
                    exe: String::new(),
                }),
            ),
            ContextChange::DnsLearned | ContextChange::SensorAlive => (Kind::ContextChanged, None),
        };
        self.publish(Invalidation {
            kind: kind as i32,
            workload_id: workload.to_owned(),
            process,
            ..Invalidation::default()
        });
    }

    /// Validate without activating.
    pub fn validate(yaml: &str) -> Result<Policy, Vec<PolicyError>> {
        Policy::compile(yaml)
    }

    /// Compile, store durably and atomically activate a new version.
    /// Blocking (compiles and fsyncs): call from a blocking context.
    pub fn put(
        &self,
        yaml: &str,
        author: &str,
        comment: &str,
        expected_version: u64,
    ) -> Result<PutOutcome, AdminError> {
        let policy = match Policy::compile(yaml) {
            Ok(p) => p,
            Err(errs) => {
                self.metrics.policy_rejections.inc();
                return Ok(PutOutcome::Rejected(errs));
            }
        };
        let mut store = self.store.lock();
        let current = self.active_guard().version;
        if expected_version != 0 && expected_version != current {
            self.metrics.policy_rejections.inc();
            return Ok(PutOutcome::Conflict { active: current });
        }
        let meta = store.append(yaml, author, comment)?;
        self.context.set_policy_window(policy.max_taint_window());
        let version = meta.version;
        self.active.store(Arc::new(ActivePolicy {
            version,
            policy,
            meta: Some(meta.clone()),
        }));
        drop(store);
        self.metrics
            .policy_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        tracing::info!(version, author, comment, "policy activated");
        self.publish(Invalidation {
            kind: Kind::PolicyChanged as i32,
            policy_version: version,
            ..Invalidation::default()
        });
        Ok(PutOutcome::Accepted(meta))
    }

    /// Re-activate the text of `to_version` as a new version.
    pub fn rollback(
        &self,
        to_version: u64,
        author: &str,
        comment: &str,
    ) -> Result<PutOutcome, AdminError> {
        let text = if to_version == 0 {
            DENY_ALL_POLICY.to_owned()
        } else {
            self.store.lock().read(to_version)?
        };
        let comment = if comment.is_empty() {
            format!("rollback to version {to_version}")
        } else {
            format!("rollback to version {to_version}: {comment}")
        };
        self.put(&text, author, &comment, 0)
    }

    /// Text and metadata of a version (0 = active).
    pub fn get(&self, version: u64) -> Result<(String, Option<VersionMeta>, bool), AdminError> {
        let active = self.active();
        if version == 0 || version == active.version {
            return Ok((active.policy.source().to_owned(), active.meta.clone(), true));
        }
        let store = self.store.lock();
        let text = store.read(version)?;
        Ok((text, store.meta(version).cloned(), false))
    }

    /// Stored versions, newest first, at most `limit`.
    pub fn history(&self, limit: usize) -> Vec<VersionMeta> {
        self.store
            .lock()
            .history()
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }

    /// Run the periodic expiry work: escalation resolutions, sensor
    /// liveness and (every `context_every` ticks) the context TTL sweep.
    pub fn tick(&self, sweep_context: bool) {
        for ex in self.escalations.sweep() {
            let e = ex.escalation;
            self.publish(Invalidation {
                kind: Kind::EscalationResolved as i32,
                workload_id: e.workload_id,
                host: e.host,
                port: e.port,
                escalation_id: e.id,
                ..Invalidation::default()
            });
        }
        for w in self.context.sweep_sensors() {
            tracing::warn!(workload = %w, "context sensor went silent");
            self.publish(Invalidation {
                kind: Kind::ContextChanged as i32,
                workload_id: w,
                ..Invalidation::default()
            });
        }
        if sweep_context {
            let n = self.context.sweep();
            if n > 0 {
                tracing::debug!(removed = n, "context sweep");
            }
        }
    }

    /// Spawn the periodic expiry task (every 250 ms; context sweep every 5 s).
    pub fn spawn_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(250));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: u64 = 0;
            loop {
                iv.tick().await;
                n += 1;
                me.tick(n.is_multiple_of(20));
            }
        })
    }

    /// Metadata for a version the store may not know (version 0).
    pub fn meta_or_builtin(meta: Option<VersionMeta>, version: u64, text: &str) -> VersionMeta {
        meta.unwrap_or_else(|| VersionMeta {
            version,
            created_unix_ms: now_unix_ms(),
            author: "builtin".into(),
            comment: "built-in deny-everything policy".into(),
            sha256: sha256_hex(text),
        })
    }
}

/// One line per error, `line:column: [rule id] path: message`.
pub fn join_errors(errs: &[PolicyError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ContextView for Pdp {
    fn visit_opens(&self, workload: &str, p: ProcKey, f: &mut dyn FnMut(&str, Duration)) {
        self.context.visit_opens(workload, p, f);
    }
    fn dns_names_for(&self, workload: &str, ip: std::net::IpAddr) -> Vec<String> {
        self.context.dns_names_for(workload, ip)
    }
    fn sensor_alive(&self, workload: &str) -> bool {
        self.context.sensor_alive(workload)
    }
    fn escalation_resolution(&self, workload: &str, host: &str, port: u16) -> Option<bool> {
        self.escalations.resolution(workload, host, port)
    }
}
