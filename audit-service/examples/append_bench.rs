//! Load generator for `secureops-audit`: many concurrent Append streams, each
//! keeping a fixed window of records in flight (closed loop), measuring
//! durable appends/s and send→ack latency; then offline verification speed.
//!
//! ```sh
//! cargo build --release -p secureops-audit --bin secureops-audit --example append_bench
//! target/release/examples/append_bench --streams 32 --window 16 --seconds 10
//! ```
//!
//! It starts `target/release/secureops-audit` (or `--bin PATH`) on
//! 127.0.0.1:0 with a fresh data directory (pinned with `--server-cpu N`
//! via taskset; `--server-arg X` passes flags through).
//! `--keep DIR` leaves the log in DIR (a fresh directory) for later
//! `secureops-audit verify --dir DIR --pubkey DIR/audit.key.pub`.
//! `BENCH_TRACE_SLOW=1` prints every ack slower than 20 ms with its time
//! (how the missing TCP_NODELAY was found: slow acks came per whole window).

use anyhow::{Context, Result, bail};
use secureops_proto::v1::{AuditFinding, AuditRecord};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

struct Args {
    streams: usize,
    window: usize,
    seconds: u64,
    warmup: u64,
    bin: Option<String>,
    server_cpu: Option<String>,
    extra: Vec<String>,
    keep: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        streams: 32,
        window: 16,
        seconds: 10,
        warmup: 2,
        bin: None,
        server_cpu: None,
        extra: Vec::new(),
        keep: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().context("missing value");
        match k.as_str() {
            "--streams" => a.streams = v()?.parse()?,
            "--window" => a.window = v()?.parse()?,
            "--seconds" => a.seconds = v()?.parse()?,
            "--warmup" => a.warmup = v()?.parse()?,
            "--bin" => a.bin = Some(v()?),
            "--server-cpu" => a.server_cpu = Some(v()?),
            "--server-arg" => a.extra.push(v()?),
            "--keep" => a.keep = Some(v()?.into()),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn finding(i: u64) -> AuditFinding {
    AuditFinding {
        timestamp_unix_nanos: 1_763_800_000_000_000_000 + i as i64,
        pep_kind: "proxy".into(),
        pep_id: "proxy-7f3c".into(),
        workload_id: "agent-42".into(),
        pid: 31337,
        process_start_time: 123_456_789,
        exe: "/usr/bin/python3.12".into(),
        uid: 1000,
        host: format!("api{}.example.com", i % 100),
        host_source: 2,
        port: 443,
        dialled_ip: "203.0.113.17".into(),
        transport: 1,
        decision: 1,
        reason: "rule:allow-apis".into(),
        rule_id: "allow-apis".into(),
        policy_version: 12,
        fail_closed_cause: String::new(),
        escalation_id: String::new(),
        request_id: format!("01JD{i:022}"),
        would_deny: false,
        fail_mode: "closed".into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        detail: String::new(),
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = parse_args()?;
    let tmp = tempfile::tempdir()?;
    // --keep DIR: write the log there and leave it (e.g. to time `verify`).
    let data = a.keep.clone().unwrap_or_else(|| tmp.path().join("data"));
    let tokens = tmp.path().join("tokens");
    let mut t = String::new();
    for s in 0..a.streams {
        t.push_str(&format!("bench-{s} bench-token-{s}-0123456789abcdef\n"));
    }
    std::fs::write(&tokens, t)?;
    let bin = match &a.bin {
        Some(b) => b.clone(),
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().and_then(|p| p.parent()).context("exe dir")?;
            dir.join("secureops-audit").display().to_string()
        }
    };
    let mut cmd = match &a.server_cpu {
        Some(cpu) => {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", cpu, &bin]);
            c
        }
        None => std::process::Command::new(&bin),
    };
    let mut child = cmd
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(&a.extra)
        .env("SECUREOPS_DATA_DIR", &data)
        .env("SECUREOPS_TOKENS_FILE", &tokens)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {bin}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let l = lines.next().context("server exited")??;
        if let Some(x) = l.strip_prefix("LISTENING grpc ") {
            break x.to_owned();
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..a.streams {
        let addr = addr.clone();
        let stop = stop.clone();
        let measuring = measuring.clone();
        let window = a.window;
        tasks.push(tokio::spawn(async move {
            let mut c = secureops_audit::client::connect(&addr).await?;
            let (tx, rx) = tokio::sync::mpsc::channel::<AuditRecord>(window);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer bench-token-{s}-0123456789abcdef").parse()?,
            );
            let mut acks = c.append(req).await?.into_inner();
            let sem = Arc::new(Semaphore::new(window));
            let sent: Arc<parking_lot::Mutex<VecDeque<Instant>>> = Arc::default();
            let (sem2, sent2, stop2) = (sem.clone(), sent.clone(), stop.clone());
            let source = format!("bench-{s}");
            let sender = tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop2.load(Ordering::Relaxed) {
                    let Ok(p) = sem2.acquire().await else { break };
                    p.forget();
                    seq += 1;
                    let r = AuditRecord {
                        source_id: source.clone(),
                        source_seq: seq,
                        finding: Some(finding(seq)),
                        trace_parent: String::new(),
                    };
                    sent2.lock().push_back(Instant::now());
                    if tx.send(r).await.is_err() {
                        break;
                    }
                }
            });
            let mut lat = Vec::with_capacity(1 << 20);
            let mut count = 0u64;
            while let Some(ack) = acks.message().await? {
                let t0 = sent.lock().pop_front();
                sem.add_permits(1);
                if !ack.error.is_empty() {
                    bail!("ack error {}", ack.error);
                }
                if measuring.load(Ordering::Relaxed) {
                    count += 1;
                    if let Some(t0) = t0 {
                        let l = t0.elapsed().as_micros() as u64;
                        lat.push(l);
                        if l > 20_000 && std::env::var_os("BENCH_TRACE_SLOW").is_some() {
                            eprintln!("slow ack {l} us at {:?}", std::time::SystemTime::now());
                        }
                    }
                }
                if stop.load(Ordering::Relaxed) && sent.lock().is_empty() {
                    break;
                }
            }
            sender.abort();
            Ok::<_, anyhow::Error>((count, lat))
        }));
    }
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    measuring.store(false, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let mut total = 0u64;
    let mut lat = Vec::new();
    for t in tasks {
        let (c, l) = tokio::time::timeout(Duration::from_secs(30), t).await???;
        total += c;
        lat.extend(l);
    }
    lat.sort_unstable();
    println!(
        "append: streams={} window={} durable_appends_per_s={:.0} ack_p50_ms={:.2} ack_p99_ms={:.2} ack_max_ms={:.2} measured={} over {:.1}s",
        a.streams,
        a.window,
        total as f64 / elapsed,
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        total,
        elapsed
    );
    // Graceful stop (final checkpoint), then offline verification.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let key = secureops_audit::NoteVerifier::from_file(&data.join("audit.key.pub"))?;
    let t0 = Instant::now();
    let s = secureops_audit::verify_dir(&data, &key, None)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "verify: entries={} checkpoints={} seconds={:.3} entries_per_s={:.0}",
        s.entries,
        s.checkpoints,
        secs,
        s.entries as f64 / secs
    );
    Ok(())
}
