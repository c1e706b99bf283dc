//! `secureops-proxy`: the egress PEP binary (explicit + transparent).

/// mimalloc instead of glibc malloc: a tunnel's request, record, task and
/// sockets are small short-lived allocations spread over the worker
/// threads. Measured side by side with glibc (BENCHMARKS.md):
/// ~10 % less CPU per tunnel and a smaller RSS per idle tunnel. (The DNS
/// sinkhole measured slower with it and keeps glibc.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use prometheus_client::registry::Registry;
use secureops_pep::telemetry::{self, LogFormat, Readiness};
use secureops_pep::{
    AllowlistPdp, AuditSpool, FailMode, PolicyDecisionPoint, Shipper, ShipperConfig, SpoolLimits,
    SpoolSync,
};
use secureops_proxy::audit::{
    AuditSink, JsonlAuditLog, SpoolAuditSink, TeeAuditSink, TracingAuditLog,
};
use secureops_proxy::metrics::ProxyMetrics;
use secureops_proxy::resolve::{Resolver, parse_override};
use secureops_proxy::{
    EgressProxy, EnforcementTier, ProxyConfig, handle_connection, handle_transparent,
};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument as _;

/// SecureOps egress proxy: every outbound TCP connection is decided by the
/// PDP before a byte leaves; deny ⇒ 403 (explicit) or RST (transparent).
#[derive(Debug, Parser)]
#[command(name = "secureops-proxy", version)]
struct Args {
    /// Explicit proxy listener (HTTP CONNECT + absolute-form HTTP).
    #[arg(long, env = "SECUREOPS_LISTEN", default_value = "127.0.0.1:7480")]
    listen: SocketAddr,
    /// Transparent listener (target of an iptables/nftables REDIRECT).
    #[arg(long, env = "SECUREOPS_TRANSPARENT_LISTEN")]
    transparent_listen: Option<SocketAddr>,
    /// PDP gRPC endpoint (`http://host:port`). Without it, --allow entries
    /// form a local standalone allowlist (loudly logged).
    #[arg(long, env = "SECUREOPS_PDP")]
    pdp: Option<String>,
    /// Standalone allowlist entry (exact host or `*.suffix`); repeatable.
    /// Only used without --pdp.
    #[arg(long = "allow", env = "SECUREOPS_ALLOW", value_delimiter = ',')]
    allow: Vec<String>,
    /// Standalone mode: special-purpose range (CIDR) that allowed names may
    /// resolve to (the policy's `resolved_ip_allow`); repeatable. Any other
    /// loopback / private / link-local / metadata answer for an allowed
    /// name is denied `dns_rebinding`.
    #[arg(
        long = "resolved-ip-allow",
        env = "SECUREOPS_RESOLVED_IP_ALLOW",
        value_delimiter = ','
    )]
    resolved_ip_allow: Vec<ipnet::IpNet>,
    /// Audit service endpoint (records are spooled, then shipped).
    #[arg(long, env = "SECUREOPS_AUDIT")]
    audit: Option<String>,
    /// File holding the bearer token for the audit service.
    #[arg(long, env = "SECUREOPS_AUDIT_TOKEN_FILE")]
    audit_token_file: Option<PathBuf>,
    /// Durable audit spool directory.
    #[arg(long, env = "SECUREOPS_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// When spooled records reach stable storage: `always` (no upstream
    /// byte before the record's fdatasync) or `interval:<n>ms` (the record
    /// is written before the dial; a background fdatasync follows within n ms).
    #[arg(long, env = "SECUREOPS_SPOOL_SYNC", default_value_t = SpoolSync::default())]
    spool_sync: SpoolSync,
    /// Unacknowledged records the spool holds before it refuses new ones
    /// (then every attempt is denied with `fail_closed:audit_spool`).
    #[arg(long, env = "SECUREOPS_SPOOL_MAX_RECORDS", default_value_t = 1_000_000)]
    spool_max_records: u64,
    /// Bytes of spool segments on disk before the spool refuses new records.
    #[arg(long, env = "SECUREOPS_SPOOL_MAX_BYTES", default_value_t = 256 << 20)]
    spool_max_bytes: u64,
    /// Also append every audit record as one JSON line to this file.
    #[arg(long, env = "SECUREOPS_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Workload id sent to the PDP and recorded in the audit log.
    #[arg(long, env = "SECUREOPS_WORKLOAD", default_value = "default")]
    workload: String,
    /// Stable id of this PEP instance.
    #[arg(long, env = "SECUREOPS_PEP_ID", default_value = "secureops-proxy")]
    pep_id: String,
    /// Overall PDP decision deadline.
    #[arg(long, env = "SECUREOPS_PDP_TIMEOUT_MS", default_value_t = 50)]
    pdp_timeout_ms: u64,
    /// closed (default) | open (PDP failures allow, audited as fail_open).
    #[arg(long, env = "SECUREOPS_FAIL_MODE", default_value = "closed")]
    fail_mode: FailMode,
    /// DNS server IP[:PORT], `system` (default) or `none` (only --resolve).
    #[arg(long, env = "SECUREOPS_DNS_SERVER", default_value = "system")]
    dns_server: String,
    /// Static HOST=IP answer; repeatable.
    #[arg(long = "resolve", env = "SECUREOPS_RESOLVE", value_delimiter = ',')]
    resolve: Vec<String>,
    /// Ops listener: /metrics, /healthz, /readyz.
    #[arg(long, env = "SECUREOPS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// text | json
    #[arg(long, env = "SECUREOPS_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Maximum request-head size in bytes.
    #[arg(long, env = "SECUREOPS_MAX_HEADER_BYTES", default_value_t = 16384)]
    max_header_bytes: usize,
    /// Time allowed for a complete request head (slowloris bound).
    #[arg(long, env = "SECUREOPS_HEADER_TIMEOUT_MS", default_value_t = 5000)]
    header_timeout_ms: u64,
    /// Bytes of the client's first flight peeked for SNI / Host.
    #[arg(long, env = "SECUREOPS_PEEK_BYTES", default_value_t = 16384)]
    peek_bytes: usize,
    /// How long to wait for the client's first bytes before treating the
    /// protocol as server-first.
    #[arg(long, env = "SECUREOPS_PEEK_TIMEOUT_MS", default_value_t = 1000)]
    peek_timeout_ms: u64,
    /// Upstream TCP connect timeout.
    #[arg(long, env = "SECUREOPS_CONNECT_TIMEOUT_MS", default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// SO_MARK on upstream sockets (exclude them from the REDIRECT rule).
    #[arg(long, env = "SECUREOPS_UPSTREAM_MARK")]
    upstream_mark: Option<u32>,
    /// Override the detected tier (proxy-only | transparent-redirect |
    /// kernel-backed); kernel-backed is only known to the operator.
    #[arg(long, env = "SECUREOPS_ENFORCEMENT_TIER")]
    enforcement_tier: Option<EnforcementTier>,
    /// Grace period for open connections at shutdown.
    #[arg(long, env = "SECUREOPS_SHUTDOWN_GRACE_MS", default_value_t = 5000)]
    shutdown_grace_ms: u64,
    /// Bytes a tunnel direction copies before switching to splice(2); 0 = never.
    #[arg(long, env = "SECUREOPS_SPLICE_AFTER_BYTES", default_value_t = 262144)]
    splice_after_bytes: u64,
    /// Do not attribute client sockets to processes (/proc lookups); every
    /// request then carries pid 0 and process rules cannot match.
    #[arg(long, env = "SECUREOPS_NO_ATTRIBUTION")]
    no_attribution: bool,
    /// Tokio worker threads (default: one per core the process may run on).
    /// One means a single-threaded runtime: no work stealing or cross-thread
    /// wake-ups (measured ~5 % less CPU per tunnel on one core).
    #[arg(long, env = "SECUREOPS_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

/// Each tunnel needs two descriptors (four more while splicing): raise the
/// soft `RLIMIT_NOFILE` to the hard limit, and the hard limit itself when
/// privileged, so tens of thousands of tunnels do not hit `EMFILE`.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want: u64 = 1 << 20;
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return;
    }
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_fd_limit();
    let workers = args.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut rt = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    rt.enable_all();
    rt.build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _guard = telemetry::init_tracing("secureops-proxy", args.log_format)?;
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::new();
    metrics.register(&mut registry);
    // Shared by the PDP client and the spool: registered once.
    let pep_metrics = secureops_pep::PepMetrics::new();
    pep_metrics.register(&mut registry);

    let tier = args
        .enforcement_tier
        .unwrap_or(if args.transparent_listen.is_some() {
            EnforcementTier::TransparentRedirect
        } else {
            EnforcementTier::ProxyOnly
        });

    let pdp: Arc<dyn PolicyDecisionPoint> = match &args.pdp {
        Some(url) => {
            let mut cfg = secureops_pep::GrpcPdpConfig::new(url.clone(), args.pep_id.clone());
            cfg.workload_id = args.workload.clone();
            cfg.deadline = Duration::from_millis(args.pdp_timeout_ms);
            Arc::new(
                secureops_pep::GrpcPdp::new(cfg, pep_metrics.clone())
                    .context("building the PDP client")?,
            )
        }
        None => {
            if args.allow.is_empty() {
                tracing::warn!(
                    "no --pdp and no --allow: STANDALONE mode with an empty allowlist, every connection is denied"
                );
            } else {
                tracing::warn!(entries = ?args.allow, "no --pdp: STANDALONE allowlist mode (local AllowlistPdp, no central policy, no process context)");
            }
            Arc::new(
                AllowlistPdp::new(&args.allow)
                    .context("invalid --allow entry")?
                    .with_resolved_ip_allow(args.resolved_ip_allow.iter().copied()),
            )
        }
    };
    if args.pdp.is_some() && !(args.allow.is_empty() && args.resolved_ip_allow.is_empty()) {
        bail!(
            "--allow and --resolved-ip-allow are only for standalone mode; the policy lives in the PDP when --pdp is set"
        );
    }
    if args.fail_mode == FailMode::Open {
        tracing::warn!("--fail-mode open: PDP failures ALLOW traffic (each audited as fail_open)");
    }

    let (audit, _shipper) = build_audit(&args, &pep_metrics)?;

    let overrides = args
        .resolve
        .iter()
        .map(|s| parse_override(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let (dns_server, use_dns) = match args.dns_server.as_str() {
        "system" => (None, true),
        "none" => (None, false),
        s => {
            let addr = s
                .parse::<SocketAddr>()
                .or_else(|_| {
                    s.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .with_context(|| format!("--dns-server {s:?}"))?;
            (Some(addr), true)
        }
    };
    let resolver = Resolver::new(&overrides, dns_server, use_dns, Duration::from_secs(2))?;

    let cfg = ProxyConfig {
        pep_id: args.pep_id.clone(),
        workload_id: args.workload.clone(),
        fail_mode: args.fail_mode,
        tier,
        max_header_bytes: args.max_header_bytes.max(1024),
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        peek_bytes: args.peek_bytes.max(512),
        peek_timeout: Duration::from_millis(args.peek_timeout_ms),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        upstream_mark: args.upstream_mark,
        splice_after: args.splice_after_bytes,
    };
    let mut proxy = EgressProxy::new(cfg, pdp, audit, resolver, metrics);
    if args.no_attribution {
        tracing::warn!("--no-attribution: requests carry no process identity");
    } else {
        proxy = proxy.with_attributor(secureops_pep::Attributor::new());
    }
    let proxy = Arc::new(proxy);
    tracing::info!(tier = %tier, "enforcement tier");

    let readiness = Readiness::new();
    let registry = Arc::new(registry);
    if let Some(addr) = args.metrics_listen {
        telemetry::serve_ops(addr, registry.clone(), readiness.clone()).await?;
    }

    tokio::spawn(keep_a_timer_pending());
    let (notify, _) = broadcast::channel::<()>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);

    let explicit = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    telemetry::announce_listener("proxy", explicit.local_addr()?);
    let mut tasks = vec![tokio::spawn(accept_loop(
        explicit,
        proxy.clone(),
        false,
        notify.clone(),
        done_tx.clone(),
    ))];
    if let Some(t) = args.transparent_listen {
        let l = TcpListener::bind(t)
            .await
            .with_context(|| format!("binding {t}"))?;
        telemetry::announce_listener("transparent", l.local_addr()?);
        tasks.push(tokio::spawn(accept_loop(
            l,
            proxy.clone(),
            true,
            notify.clone(),
            done_tx.clone(),
        )));
    }
    readiness.set(true);

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections");
    readiness.set(false);
    let _ = notify.send(());
    drop(done_tx);
    for t in tasks {
        let _ = t.await;
    }
    if tokio::time::timeout(
        Duration::from_millis(args.shutdown_grace_ms),
        done_rx.recv(),
    )
    .await
    .is_err()
    {
        tracing::warn!("grace period over: closing remaining connections");
    }
    Ok(())
}

/// The audit sinks and, with `--audit`, the shipper task (kept alive by the
/// caller).
fn build_audit(
    args: &Args,
    pep_metrics: &secureops_pep::PepMetrics,
) -> anyhow::Result<(Arc<dyn AuditSink>, Option<Shipper>)> {
    let mut sinks: Vec<Box<dyn AuditSink>> = Vec::new();
    let mut shipper = None;
    match (&args.spool_dir, &args.audit) {
        (None, Some(_)) => {
            bail!("--audit needs --spool-dir (records are spooled durably, then shipped)")
        }
        (Some(dir), audit) => {
            let limits = SpoolLimits {
                sync: args.spool_sync,
                max_records: args.spool_max_records,
                max_bytes: args.spool_max_bytes,
                ..SpoolLimits::default()
            };
            let spool = AuditSpool::open_with_metrics(dir, limits, pep_metrics.clone())
                .with_context(|| format!("opening the audit spool {}", dir.display()))?;
            if let Some(endpoint) = audit {
                let token = args
                    .audit_token_file
                    .clone()
                    .context("--audit needs --audit-token-file")?;
                let cfg = ShipperConfig::new(endpoint.clone(), args.pep_id.clone(), token);
                shipper =
                    Some(Shipper::spawn(spool.clone(), cfg).context("starting the audit shipper")?);
            } else {
                tracing::warn!(
                    "--spool-dir without --audit: records are spooled locally and not shipped"
                );
            }
            sinks.push(Box::new(SpoolAuditSink(spool)));
        }
        (None, None) => {}
    }
    if let Some(p) = &args.audit_log {
        sinks
            .push(Box::new(JsonlAuditLog::open(p).with_context(|| {
                format!("opening --audit-log {}", p.display())
            })?));
    }
    if sinks.is_empty() {
        tracing::warn!(
            "no --spool-dir/--audit/--audit-log: audit records go to the log only (not tamper-evident)"
        );
        sinks.push(Box::new(TracingAuditLog::new()));
    }
    // One sink (the usual case) is used as is: no tee around it.
    let sink: Arc<dyn AuditSink> = if sinks.len() == 1 {
        Arc::from(sinks.remove(0))
    } else {
        Arc::new(TeeAuditSink(sinks))
    };
    Ok((sink, shipper))
}

/// Keeps one timer pending in tokio's timer wheel, at most 250 ms out.
///
/// Why: when a task arms a timer that expires before the one the runtime
/// last parked for (or when none was pending), tokio's time driver wakes
/// its own event loop (an eventfd `write(2)` and an extra `epoll_wait`
/// round), so that it re-parks with the shorter timeout. Every connection
/// arms short-lived timers (connect 5 s, peek window 1 s) that are usually
/// cancelled within microseconds, so the wheel is often empty when the
/// runtime parks and nearly every connection paid for that wake-up
/// (`strace`: 1.2 eventfd writes per tunnel). With this tick pending, a
/// new timer is never the earliest; the cost is four wake-ups a second.
async fn keep_a_timer_pending() {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Accept until shutdown. Each connection holds a receiver of the shutdown
/// broadcast and a clone of the completion sender (dropped when it ends:
/// the main task waits for all of them, mini-redis style).
async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<EgressProxy>,
    transparent: bool,
    notify: broadcast::Sender<()>,
    done: mpsc::Sender<()>,
) {
    let mut shutdown = notify.subscribe();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.recv() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE & co: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let proxy = proxy.clone();
        let mut conn_shutdown = notify.subscribe();
        let guard = done.clone();
        // One span per connection: the PDP Check (`traceparent` metadata)
        // and the audit record (`AuditRecord.trace_parent`) run inside it, so
        // with an OTLP exporter proxy → PDP → audit is one trace. Without
        // one it only adds the peer to this connection's log lines.
        let span = tracing::info_span!(
            "egress.connection",
            %peer,
            mode = if transparent { "transparent" } else { "explicit" },
        );
        tokio::spawn(async move {
            // Boxed: a handler's state machine is kilobytes, and tokio
            // moves a task's future by value (spawn, task cell, completion);
            // those copies were ~2 % of the proxy's CPU per tunnel.
            let fut = async {
                if transparent {
                    Box::pin(handle_transparent(proxy, stream, peer)).await
                } else {
                    Box::pin(handle_connection(proxy, stream, peer)).await
                }
            }
            .instrument(span);
            tokio::select! {
                r = fut => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                },
                _ = conn_shutdown.recv() => {}
            }
            drop(guard);
        });
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
