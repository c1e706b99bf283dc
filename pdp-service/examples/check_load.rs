//! Closed-loop gRPC load generator for `PolicyDecision.Check`.
//!
//! N concurrent clients spread over a few HTTP/2 channels each send one Check,
//! wait for the answer, and send the next, for a fixed duration after a
//! warm-up. Prints decisions/s and latency percentiles.
//!
//! Without `--addr` it starts the PDP binary itself (`--pdp-bin`, default the
//! release build) on 127.0.0.1:0 with a temporary data dir and a benchmark
//! policy (allowlist + wildcard + taint rule + `--extra-rules` generated exact
//! host rules), so the command in BENCH_NOTES.md is self-contained:
//!
//! ```text
//! cargo build --release -p secureops-policy --bin secureops-pdp --example check_load
//! target/release/examples/check_load --clients 8 --channels 2 --duration 10
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use secureops_proto::v1::policy_decision_client::PolicyDecisionClient;
use secureops_proto::v1::{
    CheckRequest, Destination, HostSource, ProcessInfo, ProcessRef, Transport, Verdict,
};
use tonic::transport::{Channel, Endpoint};

struct Opts {
    addr: Option<String>,
    pdp_bin: PathBuf,
    clients: usize,
    channels: usize,
    duration: Duration,
    warmup: Duration,
    extra_rules: usize,
    threads: usize,
    server_threads: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: check_load [--addr HOST:PORT | --pdp-bin PATH] [--clients N] [--channels N] \
         [--duration SECS] [--warmup SECS] [--extra-rules N] [--threads N] [--server-threads N]"
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        addr: None,
        pdp_bin: secureops_test_support::workspace_root().join("target/release/secureops-pdp"),
        clients: 8,
        channels: 2,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        extra_rules: 1000,
        threads: 1,
        server_threads: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--addr" => o.addr = Some(val()),
            "--pdp-bin" => o.pdp_bin = PathBuf::from(val()),
            "--clients" => o.clients = usize::try_from(num(val())).unwrap_or(1).max(1),
            "--channels" => o.channels = usize::try_from(num(val())).unwrap_or(1).max(1),
            "--duration" => o.duration = Duration::from_secs(num(val())),
            "--warmup" => o.warmup = Duration::from_secs(num(val())),
            "--extra-rules" => o.extra_rules = usize::try_from(num(val())).unwrap_or(0),
            "--threads" => o.threads = usize::try_from(num(val())).unwrap_or(1).max(1),
            "--server-threads" => o.server_threads = usize::try_from(num(val())).unwrap_or(0),
            _ => usage(),
        }
    }
    o
}

fn bench_policy(extra: usize) -> String {
    let mut p = String::from(
        "version: 1\nmode: enforce\ndefault: deny\negress_allowlist:\n  - github.com\n  - \"*.githubusercontent.com\"\n  - pypi.org:443\nrules:\n  - id: tainted\n    action: deny\n    when:\n      process_or_ancestor_opened: [\"**/.env\", \"**/.aws/credentials\", \"**/.ssh/id_*\"]\n      within: 10m\n",
    );
    for i in 0..extra {
        let _ = write!(
            p,
            "  - id: r{i}\n    action: allow\n    destinations:\n      - host: svc{i}.internal.example\n        ports: [443]\n      - cidr: 10.{}.{}.0/24\n        ports: [5432]\n",
            (i / 256) % 256,
            i % 256
        );
    }
    p
}

/// A realistic mix: allowlisted, wildcard, denied, generated rule hosts,
/// with a process and a two-deep ancestor chain (so the taint rule runs).
fn request(i: u64, extra: usize) -> CheckRequest {
    let host = match i % 4 {
        0 => "github.com".to_owned(),
        1 => "objects.githubusercontent.com".to_owned(),
        2 => "evil.example".to_owned(),
        _ if extra > 0 => format!("svc{}.internal.example", i % extra as u64),
        _ => "pypi.org".to_owned(),
    };
    CheckRequest {
        request_id: String::new(),
        workload_id: "bench-agent".into(),
        process: Some(ProcessInfo {
            pid: 1000 + (i % 64) as u32,
            start_time: 12345,
            exe: "/usr/bin/python3".into(),
            argv: vec!["python3".into(), "agent.py".into()],
            uid: 1000,
            ancestors: vec![
                ProcessRef {
                    pid: 900,
                    start_time: 100,
                    exe: "/bin/sh".into(),
                },
                ProcessRef {
                    pid: 1,
                    start_time: 1,
                    exe: "/sbin/init".into(),
                },
            ],
        }),
        destination: Some(Destination {
            host,
            port: 443,
            ip: String::new(),
            resolved_ips: Vec::new(),
        }),
        host_source: HostSource::Connect as i32,
        transport: Transport::Tcp as i32,
        pep_id: "bench".into(),
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = parse_opts();
    let rt = if o.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(o.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(run(o))
}

async fn run(o: Opts) -> Result<(), Box<dyn std::error::Error>> {
    let mut _guard = None;
    let _dir;
    let addr = match &o.addr {
        Some(a) => a.clone(),
        None => {
            let dir = tempfile::tempdir()?;
            let pol = dir.path().join("policy.yaml");
            std::fs::write(&pol, bench_policy(o.extra_rules))?;
            let data = dir.path().join("data");
            let svc = secureops_test_support::Service::spawn_with(
                &o.pdp_bin,
                secureops_test_support::PdpArgs::new(&data)
                    .policy(&pol)
                    .arg("--worker-threads")
                    .arg(o.server_threads)
                    .build(),
                &[("RUST_LOG", "warn")],
                &["grpc"],
            )?;
            let a = svc.addr("grpc").to_string();
            _guard = Some(svc);
            _dir = dir;
            a
        }
    };
    let mut chans: Vec<Channel> = Vec::new();
    for _ in 0..o.channels {
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        chans.push(ch);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..o.clients {
        let mut client = PolicyDecisionClient::new(chans[c % chans.len()].clone());
        let measuring = measuring.clone();
        let stop = stop.clone();
        let extra = o.extra_rules;
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u64> = Vec::with_capacity(1 << 16);
            let mut verdicts = [0u64; 4];
            let mut errors = 0u64;
            let mut i = c as u64 * 7919;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let t = Instant::now();
                let r = client.check(request(i, extra)).await;
                let ns = t.elapsed().as_nanos() as u64;
                if measuring.load(Ordering::Relaxed) {
                    match r {
                        Ok(resp) => {
                            let d = resp.into_inner().decision;
                            verdicts[usize::try_from(d).unwrap_or(0).min(3)] += 1;
                            lat.push(ns);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (lat, verdicts, errors)
        }));
    }
    tokio::time::sleep(o.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(o.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut verdicts = [0u64; 4];
    let mut errors = 0;
    for t in tasks {
        let (l, v, e) = t.await?;
        all.extend(l);
        for k in 0..4 {
            verdicts[k] += v[k];
        }
        errors += e;
    }
    all.sort_unstable();
    let n = all.len() as f64;
    println!(
        "clients={} channels={} threads={} server_threads={} duration={:.1}s decisions={} errors={} rate={:.0}/s p50={:.3}ms p90={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms allow={} deny={} escalate={}",
        o.clients,
        o.channels,
        o.threads,
        o.server_threads,
        elapsed.as_secs_f64(),
        all.len(),
        errors,
        n / elapsed.as_secs_f64(),
        pct(&all, 0.50) / 1000.0,
        pct(&all, 0.90) / 1000.0,
        pct(&all, 0.99) / 1000.0,
        pct(&all, 0.999) / 1000.0,
        pct(&all, 1.0) / 1000.0,
        verdicts[Verdict::Allow as usize],
        verdicts[Verdict::Deny as usize],
        verdicts[Verdict::Escalate as usize],
    );
    Ok(())
}
