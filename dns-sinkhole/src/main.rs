//! `secureops-dns`: the SecureOps DNS sinkhole binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use prometheus_client::registry::Registry;
use secureops_dns::audit::{AuditSink, LogAuditSink};
use secureops_dns::cache::AnswerCache;
use secureops_dns::context::ContextReporter;
use secureops_dns::exfil::{ExfilConfig, ExfilGuard};
use secureops_dns::forward::{Forwarder, ForwarderConfig};
use secureops_dns::metrics::DnsMetrics;
use secureops_dns::upstream::UpstreamSpec;
use secureops_dns::{DnsSinkhole, SinkholeAnswer, SinkholeConfig, SinkholeParts};
use secureops_pep::telemetry::{LogFormat, Readiness, announce_listener, init_tracing, serve_ops};
use secureops_pep::{
    AllowlistPdp, AuditSpool, FailMode, GrpcPdp, GrpcPdpConfig, PepMetrics, PolicyDecisionPoint,
    Shipper, ShipperConfig, SpoolLimits, SpoolSync,
};

/// SecureOps DNS sinkhole: every query is decided by the PDP; allowed names
/// are forwarded, everything else is sinkholed and never leaves the box.
#[derive(Debug, Parser)]
#[command(name = "secureops-dns", version)]
struct Args {
    /// UDP and TCP listen address (same port for both; port 0 = any).
    #[arg(long, env = "SECUREOPS_LISTEN", default_value = "127.0.0.1:7453")]
    listen: SocketAddr,
    /// Upstream resolver; repeatable (or a comma list), tried in round-robin
    /// order with failover. Always an IP address, never a host name:
    /// `IP[:PORT]` / `[v6]:PORT` plain DNS (UDP, TCP on truncation; port
    /// 53), `tls://IP[:PORT][#tls-name]` DNS over TLS (port 853),
    /// `https://IP[:PORT][/path][#tls-name]` DNS over HTTPS (HTTP/2 POST,
    /// port 443, path /dns-query). `#tls-name` is the name the certificate
    /// is verified against (default: the IP address).
    #[arg(long = "upstream", env = "SECUREOPS_UPSTREAM", value_delimiter = ',')]
    upstreams: Vec<UpstreamSpec>,
    /// PEM CA bundle trusted for DoT / DoH upstream certificates instead of
    /// the built-in Mozilla roots. Certificates are always verified.
    #[arg(long, env = "SECUREOPS_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// PDP data endpoint (`http://host:port`). Without it the sinkhole runs
    /// standalone on the `--allow` list.
    #[arg(long, env = "SECUREOPS_PDP")]
    pdp: Option<String>,
    /// Standalone allowlist entries (`name` or `*.suffix`); only without `--pdp`.
    #[arg(long = "allow", env = "SECUREOPS_ALLOW", value_delimiter = ',')]
    allow: Vec<String>,
    /// Audit service endpoint (`http://host:port`); needs --spool-dir and
    /// --audit-token-file.
    #[arg(long, env = "SECUREOPS_AUDIT")]
    audit: Option<String>,
    /// File with the bearer token for the audit service.
    #[arg(long, env = "SECUREOPS_AUDIT_TOKEN_FILE")]
    audit_token_file: Option<PathBuf>,
    /// Durable audit spool directory. Without it audit records are logged
    /// (target `secureops_audit`), which is not durable.
    #[arg(long, env = "SECUREOPS_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Unacknowledged records the spool holds before it refuses new ones
    /// (then every query is sinkholed with `fail_closed:audit_spool`).
    #[arg(long, env = "SECUREOPS_SPOOL_MAX_RECORDS", default_value_t = 1_000_000)]
    spool_max_records: u64,
    /// Bytes of spool segments on disk before the spool refuses new records.
    #[arg(long, env = "SECUREOPS_SPOOL_MAX_BYTES", default_value_t = 256 << 20)]
    spool_max_bytes: u64,
    /// When spooled records reach stable storage: `always` (an answer waits
    /// for its record's fdatasync) or `interval:<n>ms` (the record is
    /// written before the answer; a background fdatasync follows within n ms).
    #[arg(long, env = "SECUREOPS_SPOOL_SYNC", default_value_t = SpoolSync::default())]
    spool_sync: SpoolSync,
    /// With `--spool-sync always`: answer sinkholed queries once their audit
    /// record is written, without waiting for its fdatasync (allowed answers
    /// always wait for it). With interval sync no answer waits for an
    /// fdatasync anyway; every record is written before its answer leaves.
    #[arg(long, env = "SECUREOPS_AUDIT_ASYNC_DENY")]
    audit_async_deny: bool,
    /// Workload this sinkhole enforces for.
    #[arg(long, env = "SECUREOPS_WORKLOAD", default_value = "default")]
    workload: String,
    /// PEP instance id (sent to the PDP, audit source id).
    #[arg(long, env = "SECUREOPS_PEP_ID", default_value = "secureops-dns")]
    pep_id: String,
    /// Deadline of one PDP decision; past it the query is sinkholed
    /// (`fail_closed:pdp_timeout`).
    #[arg(long, env = "SECUREOPS_PDP_TIMEOUT_MS", default_value_t = 50)]
    pdp_timeout_ms: u64,
    /// Answer for sinkholed queries: nxdomain | refused | nodata | zero.
    #[arg(long, env = "SECUREOPS_SINKHOLE_ANSWER", default_value = "nxdomain")]
    sinkhole_answer: SinkholeAnswer,
    /// closed (default) | open: `open` allows on PDP failure, audited loudly.
    #[arg(long, env = "SECUREOPS_FAIL_MODE", default_value = "closed")]
    fail_mode: FailMode,
    /// Ops endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "SECUREOPS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// text | json
    #[arg(long, env = "SECUREOPS_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Per-attempt upstream timeout.
    #[arg(long, env = "SECUREOPS_UPSTREAM_TIMEOUT_MS", default_value_t = 1500)]
    upstream_timeout_ms: u64,
    /// Answer cache entries (0 disables the answer cache).
    #[arg(long, env = "SECUREOPS_CACHE_SIZE", default_value_t = 100_000)]
    cache_size: usize,
    /// Upper bound on the TTL of cached answers, seconds.
    #[arg(long, env = "SECUREOPS_CACHE_MAX_TTL", default_value_t = 3600)]
    cache_max_ttl: u32,
    /// Turn the DNS exfiltration guard off (not recommended).
    #[arg(long, env = "SECUREOPS_EXFIL_DISABLE")]
    exfil_disable: bool,
    /// Exfiltration budget window, seconds.
    #[arg(long, env = "SECUREOPS_EXFIL_WINDOW_SECS", default_value_t = 60)]
    exfil_window_secs: u64,
    /// Information budget per (workload, registered domain) and window, bits.
    #[arg(long, env = "SECUREOPS_EXFIL_BUDGET_BITS", default_value_t = 4096.0)]
    exfil_budget_bits: f64,
    /// Unique names per (workload, registered domain) and window.
    #[arg(long, env = "SECUREOPS_EXFIL_MAX_UNIQUE", default_value_t = 300)]
    exfil_max_unique: usize,
    /// Names below this many bits (and without long labels) are "cheap".
    #[arg(long, env = "SECUREOPS_EXFIL_CHEAP_BITS", default_value_t = 64.0)]
    exfil_cheap_bits: f64,
    /// A label longer than this makes a name expensive.
    #[arg(long, env = "SECUREOPS_EXFIL_LONG_LABEL", default_value_t = 24)]
    exfil_long_label: usize,
    /// Tracked (workload, domain) pairs; new ones are denied past it.
    #[arg(long, env = "SECUREOPS_EXFIL_MAX_DOMAINS", default_value_t = 10_000)]
    exfil_max_domains: usize,
    /// Attribute each query to the local process that sent it (/proc scan,
    /// memoised per client socket for 1 s).
    #[arg(long, env = "SECUREOPS_ATTRIBUTION", default_value_t = true, action = clap::ArgAction::Set)]
    attribution: bool,
    /// Worker threads (0 = available CPUs).
    #[arg(long, env = "SECUREOPS_THREADS", default_value_t = 0)]
    threads: usize,
    /// Answer plain UDP queries on the batched fast path (recvmmsg /
    /// sendmmsg, wire-form answers). `false`: every UDP query through the
    /// hickory path (for comparison; slower).
    #[arg(long, env = "SECUREOPS_UDP_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    udp_fast_path: bool,
    /// UDP receive sockets on the listen port (SO_REUSEPORT; 0 = threads).
    #[arg(long, env = "SECUREOPS_UDP_SOCKETS", default_value_t = 0)]
    udp_sockets: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    // One core: a current-thread runtime avoids cross-thread wake-ups
    // between the block_on thread and a single worker.
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .context("building the tokio runtime")?;
    rt.block_on(run(args, threads))
}

async fn run(args: Args, threads: usize) -> anyhow::Result<()> {
    let _guard = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some_and(|v| !v.is_empty()) {
        Some(init_tracing("secureops-dns", args.log_format)?)
    } else {
        init_local_tracing(args.log_format)?;
        None
    };
    let mut registry = Registry::default();
    let metrics = DnsMetrics::default();
    metrics.register(&mut registry);
    let pep_metrics = PepMetrics::new();
    pep_metrics.register(&mut registry);
    let pdp_timeout = Duration::from_millis(args.pdp_timeout_ms.max(1));

    let (pdp, pdp_guard): (Arc<dyn PolicyDecisionPoint>, Duration) = match &args.pdp {
        Some(endpoint) => {
            if !args.allow.is_empty() {
                bail!("--allow is the standalone mode; it cannot be combined with --pdp");
            }
            let mut cfg = GrpcPdpConfig::new(endpoint.clone(), args.pep_id.clone());
            cfg.workload_id = args.workload.clone();
            cfg.deadline = pdp_timeout;
            let pdp = GrpcPdp::new(cfg, pep_metrics.clone())
                .with_context(|| format!("PDP endpoint {endpoint}"))?;
            // The client enforces the deadline itself (and feeds its
            // breaker); the outer guard only catches a stuck client.
            (Arc::new(pdp), pdp_timeout + Duration::from_millis(50))
        }
        None => {
            if args.allow.is_empty() {
                tracing::warn!("no --pdp and no --allow: every query will be sinkholed");
            } else {
                tracing::warn!(
                    entries = args.allow.len(),
                    "standalone mode: decisions from the local --allow list"
                );
            }
            let pdp = AllowlistPdp::new(&args.allow).context("invalid --allow entry")?;
            (Arc::new(pdp), pdp_timeout)
        }
    };

    let mut _shipper = None;
    let audit: Arc<dyn AuditSink> = match &args.spool_dir {
        Some(dir) => {
            let spool = AuditSpool::open_with_metrics(
                dir,
                SpoolLimits {
                    max_records: args.spool_max_records,
                    max_bytes: args.spool_max_bytes,
                    sync: args.spool_sync,
                    ..SpoolLimits::default()
                },
                pep_metrics.clone(),
            )
            .with_context(|| format!("opening the audit spool {}", dir.display()))?;
            if let Some(endpoint) = &args.audit {
                let Some(token) = &args.audit_token_file else {
                    bail!("--audit needs --audit-token-file");
                };
                let cfg = ShipperConfig::new(endpoint.clone(), args.pep_id.clone(), token.clone());
                _shipper = Some(Shipper::spawn(spool.clone(), cfg)?);
            } else {
                tracing::warn!(
                    "no --audit: records stay in the spool until an audit service is configured"
                );
            }
            Arc::new(spool)
        }
        None => {
            if args.audit.is_some() {
                bail!("--audit needs --spool-dir (records are spooled before they are shipped)");
            }
            tracing::warn!(
                "no --spool-dir: audit records are only logged (target secureops_audit)"
            );
            Arc::new(LogAuditSink)
        }
    };

    if args.upstreams.is_empty() {
        tracing::warn!("no --upstream: allowed names will get SERVFAIL");
    }
    let encrypted = args
        .upstreams
        .iter()
        .any(|u| !matches!(u, UpstreamSpec::Plain(_)));
    let tls_roots = match &args.upstream_ca {
        Some(path) => {
            if !encrypted {
                tracing::warn!("--upstream-ca given but no tls:// or https:// upstream");
            }
            Some(Arc::new(secureops_dns::tls::load_ca_bundle(path)?))
        }
        None => None,
    };
    for u in &args.upstreams {
        tracing::info!(upstream = %u, "upstream configured");
    }
    let forwarder = Forwarder::new(ForwarderConfig {
        upstreams: args.upstreams.clone(),
        timeout: Duration::from_millis(args.upstream_timeout_ms.max(1)),
        tls_roots,
        ..ForwarderConfig::default()
    })
    .await
    .context("setting up the upstreams")?;

    let context = match &args.pdp {
        Some(endpoint) => Some(ContextReporter::spawn(
            endpoint.clone(),
            args.workload.clone(),
            args.pep_id.clone(),
            metrics.clone(),
        )?),
        None => None,
    };

    let exfil = ExfilGuard::new(ExfilConfig {
        enabled: !args.exfil_disable,
        window: Duration::from_secs(args.exfil_window_secs.max(1)),
        budget_bits: args.exfil_budget_bits,
        max_unique_names: args.exfil_max_unique,
        cheap_bits: args.exfil_cheap_bits,
        long_label: args.exfil_long_label,
        max_domains: args.exfil_max_domains,
    });

    let udp_sockets = if args.udp_sockets == 0 {
        threads
    } else {
        args.udp_sockets
    };
    let listeners = secureops_dns::server::bind(args.listen, udp_sockets)
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listeners.addr;
    let sinkhole = DnsSinkhole::new(SinkholeParts {
        cfg: SinkholeConfig {
            workload_id: args.workload.clone(),
            pep_id: args.pep_id.clone(),
            sinkhole_answer: args.sinkhole_answer,
            pdp_timeout: pdp_guard,
            fail_mode: args.fail_mode,
            audit_async_deny: args.audit_async_deny,
            // AllowlistPdp (standalone) decides on the host alone.
            pdp_uses_process: args.pdp.is_some(),
            ..SinkholeConfig::default()
        },
        pdp,
        forwarder,
        cache: Arc::new(AnswerCache::new(args.cache_size, args.cache_max_ttl)),
        exfil: Arc::new(exfil),
        audit,
        context,
        attributor: args.attribution.then(|| {
            Arc::new(secureops_dns::attribution::ClientAttribution::new(
                addr,
                Duration::from_secs(1),
            ))
        }),
        metrics,
    });
    if args.fail_mode == FailMode::Open {
        tracing::warn!("--fail-mode open: PDP failures ALLOW queries (audited as fail_open)");
    }

    let mut server = secureops_dns::server::serve(
        Arc::new(sinkhole),
        listeners,
        Duration::from_secs(10),
        args.udp_fast_path,
    );
    let readiness = Readiness::new();
    if let Some(m) = args.metrics_listen {
        serve_ops(m, Arc::new(registry), readiness.clone()).await?;
    }
    announce_listener("dns", addr);
    readiness.set(true);
    tracing::info!(%addr, "dns sinkhole listening (udp+tcp)");

    tokio::select! {
        r = server.block_until_done() => {
            r.context("dns server stopped")?;
        }
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            readiness.set(false);
            let _ = server.shutdown_gracefully().await;
        }
    }
    Ok(())
}

/// Logging without OTLP export. Same output as pep-core's `init_tracing`,
/// but hickory-server logs one INFO line per request, which at DNS rates
/// would cost more than answering: its targets default to WARN (override
/// with `RUST_LOG`).
fn init_local_tracing(format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,hickory_server=warn,hickory_net=warn,hickory_proto=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    res.map_err(|e| anyhow::anyhow!("installing the tracing subscriber: {e}"))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
