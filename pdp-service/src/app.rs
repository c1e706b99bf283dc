//! The `secureops-pdp` process: flags, listeners, lifecycle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use secureops_pep::telemetry::{LogFormat, Readiness, announce_listener, init_tracing, serve_ops};
use secureops_proto::v1::policy_admin_server::PolicyAdminServer;
use secureops_proto::v1::policy_decision_server::PolicyDecisionServer;
use secureops_proto::v1::process_context_server::ProcessContextServer;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::admin::{AdminService, MAX_POLICY_BYTES};
use crate::auth::{BearerAuth, load_or_create_token, read_token};
use crate::context::ContextConfig;
use crate::escalation::EscalationConfig;
use crate::metrics::Metrics;
use crate::server::{ContextService, DecisionService};
use crate::state::Pdp;
use crate::validate::Limits;

/// Largest Check / context event message accepted by the data listener.
/// Field limits (see [`Limits`]) are far below; this only stops abuse
/// before decoding.
pub const MAX_DATA_MESSAGE: usize = 256 * 1024;

/// `secureops-pdp`: the SecureOps Policy Decision Point.
#[derive(Debug, Parser)]
#[command(name = "secureops-pdp", version, about)]
pub struct Args {
    /// Data-plane gRPC listener (PolicyDecision, ProcessContext).
    #[arg(long, env = "SECUREOPS_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Admin gRPC listener (PolicyAdmin, bearer-token authenticated).
    #[arg(long, env = "SECUREOPS_ADMIN_LISTEN", default_value = "127.0.0.1:7401")]
    pub admin_listen: SocketAddr,
    /// File holding the admin bearer token. Without it a token is generated
    /// into <data-dir>/admin.token (mode 0600).
    #[arg(long, env = "SECUREOPS_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Directory for policy versions and the generated admin token.
    #[arg(long, env = "SECUREOPS_DATA_DIR", default_value = "./.secureops/pdp")]
    pub data_dir: PathBuf,
    /// Policy YAML activated as version 1 when the store is empty. Without
    /// any policy the PDP serves a built-in deny-everything policy (version 0).
    #[arg(long, env = "SECUREOPS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Ops endpoint (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "SECUREOPS_METRICS_LISTEN",
        default_value = "127.0.0.1:7402"
    )]
    pub metrics_listen: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "SECUREOPS_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Maximum process entries in the context store (oldest evicted).
    #[arg(long, env = "SECUREOPS_MAX_PROCESSES", default_value_t = 100_000)]
    pub max_processes: usize,
    /// Maximum approximate bytes held by the context store.
    #[arg(long, env = "SECUREOPS_MAX_CONTEXT_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_context_bytes: usize,
    /// Retention of idle process context, in seconds (at least the active
    /// policy's longest taint window is always kept).
    #[arg(long, env = "SECUREOPS_CONTEXT_TTL_SECS", default_value_t = 3600)]
    pub context_ttl_secs: u64,
    /// Maximum pending escalations (oldest expired when exceeded).
    #[arg(
        long,
        env = "SECUREOPS_MAX_PENDING_ESCALATIONS",
        default_value_t = 10_000
    )]
    pub max_pending_escalations: usize,
    /// Tokio worker threads (0 = one per CPU).
    #[arg(long, env = "SECUREOPS_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Seconds an unresolved escalation stays pending.
    #[arg(
        long,
        env = "SECUREOPS_ESCALATION_PENDING_TTL_SECS",
        default_value_t = 86_400
    )]
    pub escalation_pending_ttl_secs: u64,
}

/// SIGTERM / SIGINT, registered eagerly: the handlers are installed when
/// this is constructed (before any listener is announced), so a signal that
/// arrives right after the `LISTENING` lines still shuts down gracefully
/// instead of killing the process.
struct ShutdownSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignal {
                term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(ShutdownSignal {})
        }
    }

    async fn wait(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Build the runtime (honouring `--worker-threads`) and run the PDP on it.
pub fn main_with(args: Args) -> anyhow::Result<()> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name("pdp-worker");
    if args.worker_threads > 0 {
        b.worker_threads(args.worker_threads);
    }
    b.build()?.block_on(run(args))
}

/// Run the PDP until SIGTERM / Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut signals = ShutdownSignal::install()?;
    let _telemetry = init_tracing("secureops-pdp", args.log_format)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;

    let token = match &args.admin_token_file {
        Some(f) => read_token(f)?,
        None => {
            let (t, path) = load_or_create_token(&args.data_dir)?;
            tracing::info!(path = %path.display(), "admin token file (generated on first start, mode 0600)");
            t
        }
    };
    let bootstrap = match &args.policy {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading policy {}", p.display()))?,
        ),
        None => None,
    };

    let (metrics, registry) = Metrics::new();
    let pdp = Arc::new(Pdp::open(
        &args.data_dir,
        bootstrap.as_deref(),
        ContextConfig {
            max_processes: args.max_processes,
            max_bytes: args.max_context_bytes,
            ttl: Duration::from_secs(args.context_ttl_secs),
            ..ContextConfig::default()
        },
        EscalationConfig {
            max_pending: args.max_pending_escalations,
            pending_ttl: Duration::from_secs(args.escalation_pending_ttl_secs),
            ..EscalationConfig::default()
        },
        metrics,
    )?);
    let ticker = pdp.spawn_ticker();

    let readiness = Readiness::new();
    let (_ops_addr, ops_task) =
        serve_ops(args.metrics_listen, Arc::new(registry), readiness.clone()).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = Arc::new(Limits::default());

    // Data plane.
    let incoming = TcpIncoming::bind(args.listen)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", args.listen))?
        .with_nodelay(Some(true));
    let grpc_addr = incoming.local_addr()?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<PolicyDecisionServer<DecisionService>>()
        .await;
    health
        .set_serving::<ProcessContextServer<ContextService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(secureops_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let decision = DecisionService::new(Arc::clone(&pdp), Arc::clone(&limits), stop_rx.clone());
    let context = ContextService::new(Arc::clone(&pdp), Arc::clone(&limits), stop_rx.clone());
    let mut stop = stop_rx.clone();
    let data = Server::builder()
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(
            PolicyDecisionServer::new(decision).max_decoding_message_size(MAX_DATA_MESSAGE),
        )
        .add_service(ProcessContextServer::new(context).max_decoding_message_size(MAX_DATA_MESSAGE))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.changed().await;
        });

    // Admin plane.
    let admin_incoming = TcpIncoming::bind(args.admin_listen)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", args.admin_listen))?
        .with_nodelay(Some(true));
    let admin_addr = admin_incoming.local_addr()?;
    let (admin_health, admin_health_svc) = tonic_health::server::health_reporter();
    admin_health
        .set_serving::<PolicyAdminServer<AdminService>>()
        .await;
    let admin_reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(secureops_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let admin_svc = PolicyAdminServer::new(AdminService::new(Arc::clone(&pdp)))
        .max_decoding_message_size(MAX_POLICY_BYTES + 64 * 1024);
    let auth = BearerAuth::new(&token);
    let mut stop = stop_rx.clone();
    let admin = Server::builder()
        .add_service(admin_health_svc)
        .add_service(admin_reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            admin_svc, auth,
        ))
        .serve_with_incoming_shutdown(admin_incoming, async move {
            let _ = stop.changed().await;
        });

    let mut data_task = tokio::spawn(data);
    let mut admin_task = tokio::spawn(admin);
    // Ready before announcing: whoever learns the address from the
    // LISTENING line finds /readyz already true (both sockets are bound and
    // the servers spawned, so connections are accepted from here on).
    readiness.set(true);
    announce_listener("grpc", grpc_addr);
    announce_listener("admin", admin_addr);
    tracing::info!(
        grpc = %grpc_addr,
        admin = %admin_addr,
        version = pdp.active_guard().version,
        "secureops-pdp ready"
    );

    let ended = tokio::select! {
        () = signals.wait() => None,
        r = &mut data_task => Some(("grpc", r)),
        r = &mut admin_task => Some(("admin", r)),
    };
    if let Some((name, r)) = ended {
        // A server ended on its own: report why and exit non-zero.
        let _ = stop_tx.send(true);
        return match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("{name} server stopped unexpectedly")),
            Ok(Err(e)) => Err(anyhow::anyhow!("{name} server failed: {e}")),
            Err(e) => Err(anyhow::anyhow!("{name} server task failed: {e}")),
        };
    }
    tracing::info!("shutting down");
    readiness.set(false);
    health
        .set_not_serving::<PolicyDecisionServer<DecisionService>>()
        .await;
    // Ends Watch streams and stops accepting; in-flight calls get a bounded
    // time to finish.
    let _ = stop_tx.send(true);
    let drain = async {
        let _ = data_task.await;
        let _ = admin_task.await;
    };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("in-flight calls did not finish within 10 s; exiting");
    }
    ticker.abort();
    ops_task.abort();
    tracing::info!("stopped");
    Ok(())
}
