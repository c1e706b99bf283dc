//! # secureops-sensor — process-context sensor (DESIGN.md §6, issue 6)
//!
//! Watches opens of **sensitive files** with fanotify *permission* events
//! (`FAN_OPEN_PERM`) and reports each one — opener PID, start time
//! (`/proc/PID/stat` field 22), executable, path and a bounded ancestor
//! chain — to the PDP over `ProcessContext.ReportAcked`. The open is held
//! until the PDP acknowledged the event, so a connection decided after the
//! `open()` returned always sees the taint (the §6 ordering guarantee).
//!
//! ## Default sensitive globs
//!
//! Matched against the absolute path of the opened file (`*` stays within
//! one path component, `**` crosses directories):
//!
//! `**/.env*`, `**/.aws/credentials`, `**/.aws/config`, `**/.ssh/id_*`,
//! `**/.netrc`, `**/.git-credentials`, `**/.npmrc`, `**/.pypirc`,
//! `**/.docker/config.json`, `**/.kube/config`,
//! `**/.config/gcloud/**/credentials*`,
//! `**/.config/gcloud/**/application_default_credentials.json`,
//! `**/.config/gcloud/**/access_tokens.db`, `**/.azure/accessTokens.json`,
//! `**/.azure/msal_token_cache.*`, `**/.azure/service_principal_entries.json`.
//!
//! `--watch GLOB` (repeatable) adds globs; `--watch-mode replace` uses only
//! the `--watch` globs.
//!
//! ## What is marked
//!
//! `--mount PATH` (default `/`) marks a whole mount: every open on it is an
//! event; non-sensitive ones are answered `FAN_ALLOW` at once on the reader
//! thread (readlink + glob match + write). `--mark-dir DIR` marks only the
//! files directly inside `DIR` (not recursive) — far less overhead and blast
//! radius when the credential locations are known. When any `--mark-dir` is
//! given and no `--mount`, no mount is marked.
//!
//! Kernel ignore cache: a non-sensitive file under a `--cache-prefix`
//! (default `/usr/ /lib/ /lib64/ /bin/ /sbin/`, root-owned) gets an evictable
//! fanotify ignore mark on its inode after the first open, so its later opens
//! never leave the kernel — in mount mode, shared libraries and binaries cost
//! nothing after warm-up. Only root-owned prefixes are safe: an ignore mark
//! follows the inode across a rename / hard link to a sensitive name.
//! `--no-ignore-cache` disables it.
//!
//! ## Bounded wait and `--on-timeout`
//!
//! A sensitive open waits at most `--ack-timeout-ms` (default 250 ms) for the
//! PDP ack, measured from when the sensor read the event. Past it — or when
//! the PDP is unreachable, rejected the event, or the queue is full — the
//! `--on-timeout` policy applies:
//!
//! * `deny` (**default**, fail closed): the open fails with `EPERM`.
//! * `allow`: the open proceeds. The workload never hangs on a sick PDP, at
//!   the price of a window in which the taint is not yet known.
//!
//! Either way the event **stays queued** and is re-sent (oldest first, before
//! the first heartbeat) when the stream is back; late acks are counted
//! (`secureops_sensor_late_acks_total`) and logged. A disconnected sensor
//! also stops heartbeating, so with `require_sensor: true` the PDP denies the
//! workload (`fail_closed:sensor_unavailable`) until the backlog is in.
//! If the sensor process dies, the kernel allows every pending open; the
//! missing heartbeats are what protects the workload then.
//!
//! ## Exec / exit tracking
//!
//! The sensor does not track exec/exit: taint flows to descendants through
//! the ancestor chain (pid, start time) the PEP sends with every `Check`,
//! and each `FileOpened` carries the opener's own ancestor chain as well.
//!
//! ## Privileges
//!
//! fanotify permission events need `CAP_SYS_ADMIN`. The binary checks it at
//! start and exits non-zero with e.g. `fanotify_init: EPERM — the sensor needs
//! CAP_SYS_ADMIN ...`.

pub mod fan;
pub mod globs;
pub mod metrics;
pub mod procinfo;
pub mod reporter;

pub use fan::{FanError, Marks, OnTimeout, SensorCtx};
pub use globs::{DEFAULT_SENSITIVE_GLOBS, SensitiveMatcher, WatchMode};
pub use metrics::Metrics;
pub use reporter::{AckOutcome, ReporterConfig, ReporterHandle, Submission};
