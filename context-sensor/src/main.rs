//! `secureops-sensor`: see the crate docs of `secureops_sensor`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use prometheus_client::registry::Registry;
use secureops_pep::telemetry::{self, LogFormat, Readiness};
use secureops_sensor::{
    Marks, Metrics, OnTimeout, ReporterConfig, SensitiveMatcher, SensorCtx, WatchMode, fan,
    reporter,
};

const AFTER_HELP: &str = "\
Default sensitive globs (matched on the absolute path; `*` stays in one path
component, `**` crosses directories):
  **/.env*  **/.aws/credentials  **/.aws/config  **/.ssh/id_*  **/.netrc
  **/.git-credentials  **/.npmrc  **/.pypirc  **/.docker/config.json
  **/.kube/config  **/.config/gcloud/**/credentials*
  **/.config/gcloud/**/application_default_credentials.json
  **/.config/gcloud/**/access_tokens.db  **/.azure/accessTokens.json
  **/.azure/msal_token_cache.*  **/.azure/service_principal_entries.json

A sensitive open is held until the PDP acknowledged the FileOpened event, at
most --ack-timeout-ms; past it (or PDP down) --on-timeout applies: deny (the
open fails with EPERM, default) or allow (the open proceeds). The event stays
queued either way and is delivered when the PDP is back.

Needs CAP_SYS_ADMIN (fanotify permission events).";

/// Process-context sensor: holds opens of sensitive files until the PDP
/// recorded them (fanotify FAN_OPEN_PERM).
#[derive(Debug, Parser)]
#[command(name = "secureops-sensor", version, after_help = AFTER_HELP)]
struct Args {
    /// PDP gRPC endpoint (ProcessContext.ReportAcked).
    #[arg(long, env = "SECUREOPS_PDP", default_value = "http://127.0.0.1:7400")]
    pdp: String,
    /// Workload id stamped on every event.
    #[arg(long, env = "SECUREOPS_WORKLOAD", default_value = "default")]
    workload: String,
    /// Sensor id (default: sensor-<hostname>-<pid>).
    #[arg(long, env = "SECUREOPS_SENSOR_ID")]
    sensor_id: Option<String>,
    /// Extra sensitive path glob (repeatable; env: comma-separated).
    #[arg(long = "watch", env = "SECUREOPS_WATCH", value_delimiter = ',')]
    watch: Vec<String>,
    /// extend: defaults + --watch; replace: only --watch.
    #[arg(long, env = "SECUREOPS_WATCH_MODE", default_value = "extend")]
    watch_mode: WatchMode,
    /// Mount to mark (repeatable). Default `/` unless --mark-dir is given.
    #[arg(long = "mount", env = "SECUREOPS_MOUNT", value_delimiter = ',')]
    mount: Vec<PathBuf>,
    /// Directory whose direct children are marked (repeatable, not recursive).
    #[arg(long = "mark-dir", env = "SECUREOPS_MARK_DIR", value_delimiter = ',')]
    mark_dir: Vec<PathBuf>,
    /// Non-sensitive files under these root-owned prefixes are cached in the
    /// kernel (evictable ignore mark) after their first open, so later opens
    /// never reach the sensor. List only directories the workload cannot
    /// write (an ignore mark follows the inode across renames).
    #[arg(
        long = "cache-prefix",
        env = "SECUREOPS_CACHE_PREFIX",
        value_delimiter = ',',
        default_value = "/usr/,/lib/,/lib64/,/bin/,/sbin/"
    )]
    cache_prefix: Vec<String>,
    /// Disable the kernel ignore cache (every open of a marked file is seen).
    #[arg(long, env = "SECUREOPS_NO_IGNORE_CACHE")]
    no_ignore_cache: bool,
    /// Bounded wait for the PDP ack of a sensitive open, in milliseconds.
    #[arg(long, env = "SECUREOPS_ACK_TIMEOUT_MS", default_value_t = 250)]
    ack_timeout_ms: u64,
    /// What a sensitive open gets without a timely ack: deny | allow.
    #[arg(long, env = "SECUREOPS_ON_TIMEOUT", default_value = "deny")]
    on_timeout: OnTimeout,
    /// Heartbeat interval on the PDP stream, in milliseconds.
    #[arg(long, env = "SECUREOPS_HEARTBEAT_MS", default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Connect timeout to the PDP, in milliseconds.
    #[arg(long, env = "SECUREOPS_CONNECT_TIMEOUT_MS", default_value_t = 200)]
    connect_timeout_ms: u64,
    /// Maximum unacknowledged events kept for re-delivery.
    #[arg(long, env = "SECUREOPS_MAX_QUEUED", default_value_t = 16_384)]
    max_queued: usize,
    /// Ops listener (/metrics, /healthz, /readyz), e.g. 127.0.0.1:9464.
    #[arg(long, env = "SECUREOPS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log format: text | json.
    #[arg(long, env = "SECUREOPS_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _guard = match telemetry::init_tracing("secureops-sensor", args.log_format) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("secureops-sensor: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("secureops-sensor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Privileges first: a clear message beats an EPERM deep inside.
    if fan::has_cap_sys_admin() == Some(false) {
        tracing::warn!("CAP_SYS_ADMIN is not in the effective capability set");
    }
    let fan = Arc::new(fan::init()?);
    let matcher = SensitiveMatcher::new(&args.watch, args.watch_mode)?;
    let mut marks = Marks {
        mounts: args.mount.clone(),
        dirs: args.mark_dir.clone(),
    };
    if marks.mounts.is_empty() && marks.dirs.is_empty() {
        marks.mounts.push(PathBuf::from("/"));
    }
    for p in marks.mounts.iter().chain(marks.dirs.iter()) {
        fan::check_markable(p)?;
    }
    let sensor_id = args.sensor_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        format!("sensor-{host}-{}", std::process::id())
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sensor-rt")
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async move {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let readiness = Readiness::new();
        if let Some(listen) = args.metrics_listen {
            telemetry::serve_ops(listen, Arc::new(registry), readiness.clone()).await?;
        }
        let (reporter, _task) = reporter::spawn(
            ReporterConfig {
                pdp: args.pdp.clone(),
                workload: args.workload.clone(),
                sensor_id: sensor_id.clone(),
                heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)),
                connect_timeout: Duration::from_millis(args.connect_timeout_ms.max(1)),
                max_queued: args.max_queued.max(1),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
            },
            metrics.clone(),
        );
        let ctx = Arc::new(SensorCtx {
            matcher,
            reporter,
            metrics,
            ack_timeout: Duration::from_millis(args.ack_timeout_ms),
            on_timeout: args.on_timeout,
            runtime: tokio::runtime::Handle::current(),
            cache_prefixes: args
                .cache_prefix
                .iter()
                .filter(|p| p.starts_with('/'))
                .map(|p| {
                    if p.ends_with('/') {
                        p.clone()
                    } else {
                        format!("{p}/")
                    }
                })
                .collect(),
            cache_enabled: std::sync::atomic::AtomicBool::new(!args.no_ignore_cache),
        });
        let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let reader_fan = fan.clone();
        let reader_ctx = ctx.clone();
        std::thread::Builder::new()
            .name("fanotify-reader".into())
            .spawn(move || {
                let err = match fan::run_reader(reader_fan, reader_ctx) {
                    Ok(()) => anyhow::anyhow!("fanotify reader stopped"),
                    Err(e) => anyhow::Error::new(e),
                };
                let _ = fatal_tx.send(err);
            })
            .context("spawning the fanotify reader thread")?;
        fan::mark(&fan, &marks)?;
        readiness.set(true);
        tracing::info!(
            pdp = %args.pdp,
            workload = %args.workload,
            sensor_id = %sensor_id,
            globs = ?ctx.matcher.globs(),
            ack_timeout_ms = args.ack_timeout_ms,
            on_timeout = ?args.on_timeout,
            "sensor running"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting (kernel allows pending opens)"),
            _ = term.recv() => tracing::info!("SIGTERM: exiting (kernel allows pending opens)"),
            err = fatal_rx => {
                readiness.set(false);
                return Err(err.unwrap_or_else(|_| anyhow::anyhow!("fanotify reader vanished")));
            }
        }
        Ok::<(), anyhow::Error>(())
    })?;
    // Do not wait for the blocked reader thread or in-flight tasks: exiting
    // closes the group and the kernel answers pending events itself.
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_default_glob() {
        for g in secureops_sensor::DEFAULT_SENSITIVE_GLOBS {
            assert!(AFTER_HELP.contains(g), "{g} missing from --help");
        }
    }

    #[test]
    fn flags_parse_with_defaults() {
        let a = Args::try_parse_from(["secureops-sensor"]).unwrap();
        assert_eq!(a.pdp, "http://127.0.0.1:7400");
        assert_eq!(a.ack_timeout_ms, 250);
        assert_eq!(a.on_timeout, OnTimeout::Deny);
        assert_eq!(a.heartbeat_ms, 1000);
        let a = Args::try_parse_from([
            "secureops-sensor",
            "--watch",
            "**/x",
            "--watch",
            "**/y",
            "--on-timeout",
            "allow",
            "--mark-dir",
            "/tmp",
        ])
        .unwrap();
        assert_eq!(a.watch, vec!["**/x", "**/y"]);
        assert_eq!(a.on_timeout, OnTimeout::Allow);
        assert!(Args::try_parse_from(["secureops-sensor", "--on-timeout", "maybe"]).is_err());
    }
}
