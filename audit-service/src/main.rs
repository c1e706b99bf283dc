//! `secureops-audit`: the audit service (`serve`, default) and offline tools
//! (`verify`, `prove`).

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use secureops_audit::metrics::{Metrics, Readiness};
use secureops_audit::note::{self, NoteVerifier};
use secureops_audit::server::{AuditService, Sequencer, SequencerConfig, TokenStore};
use secureops_audit::storage::LogWriter;
use secureops_proto::v1::audit_server::AuditServer;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "secureops-audit",
    version,
    about = "SecureOps audit service: signed, verifiable, lossless log",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the audit service (default).
    Serve(ServeArgs),
    /// Verify a log directory offline.
    Verify(VerifyArgs),
    /// Fetch and verify the inclusion proof of one entry.
    Prove(ProveArgs),
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "SECUREOPS_LISTEN", default_value = secureops_audit::DEFAULT_LISTEN)]
    listen: String,
    /// Data directory (segments, checkpoints, default key).
    #[arg(
        long,
        env = "SECUREOPS_DATA_DIR",
        default_value = "secureops-audit-data"
    )]
    data_dir: PathBuf,
    /// Signing key (PRIVATE+KEY+... file). Default: <data-dir>/audit.key,
    /// generated on first start (mode 0600, public key next to it as .pub).
    #[arg(long, env = "SECUREOPS_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// Log name: checkpoint origin and the generated key's name.
    #[arg(long, env = "SECUREOPS_ORIGIN", default_value = secureops_audit::DEFAULT_ORIGIN)]
    origin: String,
    /// Per-source credentials, lines `source_id token`. Without it every
    /// Append is refused.
    #[arg(long, env = "SECUREOPS_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// /metrics, /healthz, /readyz listen address.
    #[arg(long, env = "SECUREOPS_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Most records per batch (one fdatasync per batch).
    #[arg(long, env = "SECUREOPS_BATCH_MAX", default_value_t = 4096)]
    batch_max: usize,
    /// Longest extra wait (ms, at most 5) for more records once a batch has
    /// begun. 0 (default): pure group commit — a batch is whatever arrived
    /// while the previous fdatasync ran, which measured lower latency at
    /// every load than an artificial delay.
    #[arg(long, env = "SECUREOPS_BATCH_DELAY_MS", default_value_t = 0)]
    batch_delay_ms: u64,
    /// Log format.
    #[arg(long, env = "SECUREOPS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Log data directory.
    #[arg(long, env = "SECUREOPS_DIR")]
    dir: PathBuf,
    /// Verifier key file (`name+hash+base64`).
    #[arg(long, env = "SECUREOPS_PUBKEY")]
    pubkey: PathBuf,
    /// A trusted checkpoint note (file) the log must extend.
    #[arg(long, env = "SECUREOPS_CHECKPOINT")]
    checkpoint: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ProveArgs {
    /// Entry index.
    seq: u64,
    /// Audit server address.
    #[arg(long, env = "SECUREOPS_SERVER", default_value = secureops_audit::DEFAULT_LISTEN)]
    server: String,
    /// Verifier key file; when given the checkpoint signature is checked too.
    #[arg(long, env = "SECUREOPS_PUBKEY")]
    pubkey: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            None => serve(cli.serve).await,
            Some(Cmd::Serve(a)) => serve(a).await,
            Some(Cmd::Verify(a)) => verify(a),
            Some(Cmd::Prove(a)) => prove(a).await,
        }
    });
    match res {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn verify(a: VerifyArgs) -> Result<u8> {
    let key = NoteVerifier::from_file(&a.pubkey)?;
    let trusted = match &a.checkpoint {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let t0 = std::time::Instant::now();
    let res = secureops_audit::verify_dir(&a.dir, &key, trusted.as_deref());
    let secs = t0.elapsed().as_secs_f64();
    match res {
        Ok(s) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "entries": s.entries, "checkpoints": s.checkpoints,
                        "root": hex::encode(s.root), "last_checkpoint_size": s.last_checkpoint_size,
                        "trusted_checkpoint_size": s.trusted_checkpoint_size, "seconds": secs})
                );
            } else {
                println!(
                    "OK entries={} checkpoints={} root={} last_checkpoint_size={}{} ({:.3}s)",
                    s.entries,
                    s.checkpoints,
                    hex::encode(s.root),
                    s.last_checkpoint_size,
                    s.trusted_checkpoint_size
                        .map(|t| format!(" trusted_checkpoint_size={t}"))
                        .unwrap_or_default(),
                    secs
                );
            }
            Ok(0)
        }
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "first_bad_index": e.index, "error": e.kind.to_string()})
                );
            } else {
                println!("FAIL first bad index {}: {}", e.index, e.kind);
            }
            Ok(1)
        }
    }
}

async fn prove(a: ProveArgs) -> Result<u8> {
    let key = match &a.pubkey {
        Some(p) => Some(NoteVerifier::from_file(p)?),
        None => None,
    };
    let p = secureops_audit::prove(&a.server, a.seq, key.as_ref(), Duration::from_secs(3)).await?;
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        println!(
            "entry {} (source {} seq {}) is in the tree of size {} with root {}",
            p.index, p.source_id, p.source_seq, p.tree_size, p.root
        );
        println!("leaf hash {}", p.leaf_hash);
        for (i, h) in p.path.iter().enumerate() {
            println!("path[{i}] {h}");
        }
        println!(
            "checkpoint signature: {}",
            if p.signature_verified {
                "verified"
            } else {
                "not checked (pass --pubkey)"
            }
        );
        print!("{}", p.checkpoint_note);
    }
    Ok(0)
}

async fn serve(a: ServeArgs) -> Result<u8> {
    // Text or JSON logs on stderr; OTLP trace export when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set (shared with every SecureOps binary).
    let format: secureops_pep::telemetry::LogFormat =
        a.log_format.parse().map_err(anyhow::Error::msg)?;
    let _telemetry = secureops_pep::telemetry::init_tracing("secureops-audit", format)?;
    if a.batch_delay_ms > 5 {
        bail!("--batch-delay-ms must be at most 5");
    }
    if a.batch_max == 0 {
        bail!("--batch-max must be at least 1");
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let (key_path, generate) = match &a.signing_key {
        Some(p) => (p.clone(), false),
        None => (a.data_dir.join(secureops_audit::DEFAULT_KEY_FILE), true),
    };
    let (signer, generated) = note::load_or_generate_key(&key_path, &a.origin, generate)?;
    let pub_path = note::public_key_path(&key_path);
    if generated {
        tracing::info!(key = %key_path.display(), pubkey = %pub_path.display(),
            vkey = %signer.verifier().to_vkey(), "generated a new signing key");
    } else {
        tracing::info!(key = %key_path.display(), vkey = %signer.verifier().to_vkey(), "loaded signing key");
    }
    let tokens = match &a.tokens_file {
        Some(p) => TokenStore::from_file(p)?,
        None => {
            tracing::warn!("no --tokens-file: every Append will be refused");
            TokenStore::default()
        }
    };
    let (writer, shared, rec) = LogWriter::open(&a.data_dir, &a.origin, signer)?;
    tracing::info!(
        entries = rec.entries,
        checkpoints = rec.checkpoints,
        truncated_segment_bytes = rec.truncated_segment_bytes,
        truncated_checkpoint_bytes = rec.truncated_checkpoint_bytes,
        "log recovered"
    );
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.entries.set(rec.entries as i64);
    let seq = Sequencer::start(
        writer,
        SequencerConfig {
            batch_max: a.batch_max,
            batch_delay: Duration::from_millis(a.batch_delay_ms),
            checkpoint_interval: Duration::from_secs(1),
        },
        metrics.clone(),
    )?;
    let svc = AuditService::new(shared, &seq, tokens, metrics);

    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let addr = listener.local_addr()?;
    let ready = Readiness::default();
    let mut out = std::io::stdout();
    writeln!(out, "LISTENING grpc {addr}")?;
    if let Some(m) = &a.metrics_listen {
        let ml = tokio::net::TcpListener::bind(m)
            .await
            .with_context(|| format!("binding {m}"))?;
        writeln!(out, "LISTENING metrics {}", ml.local_addr()?)?;
        tokio::spawn(secureops_audit::metrics::serve_ops(
            ml,
            Arc::new(registry),
            ready.clone(),
        ));
    }
    out.flush()?;

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<AuditServer<AuditService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(secureops_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(AuditServer::new(svc).max_decoding_message_size(256 * 1024))
        // A caller-supplied incoming stream does not get the builder's
        // TCP_NODELAY: set it here, or Nagle + delayed ACK stall small ack
        // writes for 40 ms.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stop_rx.await;
            },
        );
    let server = tokio::spawn(server);
    ready.set(true);
    tracing::info!(%addr, "audit service ready");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let failed = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break false,
            _ = sigterm.recv() => break false,
            _ = tick.tick() => if !seq.is_running() { break true },
        }
    };
    ready.set(false);
    health.set_not_serving::<AuditServer<AuditService>>().await;
    let _ = stop_tx.send(());
    let res = tokio::task::spawn_blocking(move || seq.shutdown()).await?;
    // In-flight streams are not waited for beyond a short grace period:
    // every durable record was acked or will be replayed by its source.
    let _ = tokio::time::timeout(Duration::from_millis(500), server).await;
    match res {
        Ok(()) if !failed => {
            tracing::info!("shut down cleanly (final checkpoint signed)");
            Ok(0)
        }
        Ok(()) => bail!("sequencer stopped unexpectedly"),
        Err(e) => Err(e).context("sequencer failed (fail closed)"),
    }
}
