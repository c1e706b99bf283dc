//! Added `open()` latency with the sensor (BENCH_NOTES.md).
//!
//! Measures, in this process, N opens of a sensitive file (`.env`) and of a
//! non-sensitive file: first without a sensor, then with the real
//! `secureops-sensor` binary marking the directory (`--mark-dir`), and
//! optionally the whole mount (`--mount`), acked by a fast in-process PDP on
//! loopback. Prints p50/p90/p99/max per case.
//!
//! ```text
//! cargo build --release -p secureops-sensor --bins --examples
//! target/release/examples/open_latency [--sensor target/release/secureops-sensor] [--n 5000] [--mount]
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use secureops_proto::v1::process_context_server::{ProcessContext, ProcessContextServer};
use secureops_proto::v1::{EventAck, ProcessEvent, ReportSummary};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

struct FastPdp;

type AckStream = Pin<Box<dyn Stream<Item = Result<EventAck, Status>> + Send>>;

#[tonic::async_trait]
impl ProcessContext for FastPdp {
    async fn report(
        &self,
        req: Request<Streaming<ProcessEvent>>,
    ) -> Result<Response<ReportSummary>, Status> {
        let mut s = req.into_inner();
        let mut n = 0;
        while s.message().await?.is_some() {
            n += 1;
        }
        Ok(Response::new(ReportSummary {
            accepted: n,
            rejected: 0,
            last_seq: 0,
        }))
    }
    type ReportAckedStream = AckStream;
    async fn report_acked(
        &self,
        req: Request<Streaming<ProcessEvent>>,
    ) -> Result<Response<AckStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(ev)) = inbound.message().await {
                let ack = EventAck {
                    seq: ev.seq,
                    error: String::new(),
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct SensorProc(Child);
impl Drop for SensorProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sensor(bin: &Path, pdp: &str, mark: &[&str]) -> anyhow::Result<SensorProc> {
    let mut child = Command::new(bin)
        .args(["--pdp", pdp, "--metrics-listen", "127.0.0.1:0"])
        .args(mark)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let guard = SensorProc(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let addr: std::net::SocketAddr = line
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| anyhow::anyhow!("sensor printed {line:?}"))?
        .parse()?;
    // Ready = marks placed; connected = first heartbeat acked.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = http_get(addr, "/metrics").unwrap_or_default();
        if m.contains("secureops_sensor_pdp_connected 1")
            && http_get(addr, "/readyz").is_some_and(|b| b.contains("ready") && !b.contains("not"))
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "sensor not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(guard)
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    Some(b)
}

fn measure(path: &Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let f = std::fs::File::open(path)?;
        v.push(t.elapsed());
        drop(f);
    }
    v.sort();
    Ok(v)
}

fn report(case: &str, v: &[Duration]) {
    let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
    println!(
        "{case:<58} n={:<6} p50={:>8.1}us p90={:>8.1}us p99={:>8.1}us max={:>9.1}us",
        v.len(),
        q(0.50),
        q(0.90),
        q(0.99),
        v.last().map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut sensor = PathBuf::from("target/release/secureops-sensor");
    let mut n = 5000usize;
    let mut mount = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sensor" => sensor = PathBuf::from(args.next().unwrap_or_default()),
            "--n" => n = args.next().and_then(|s| s.parse().ok()).unwrap_or(n),
            "--mount" => mount = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("open-latency-")
        .tempdir_in("/tmp")?;
    let secret = dir.path().join(".env");
    let plain = dir.path().join("plain.txt");
    std::fs::write(&secret, b"K=V\n")?;
    std::fs::write(&plain, b"hello\n")?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let pdp = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ProcessContextServer::new(FastPdp))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );

    // A file under a root-owned prefix (--cache-prefix default).
    let sys = [
        "/usr/lib/os-release",
        "/usr/share/common-licenses/GPL-3",
        "/bin/sh",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    let (s2, p2) = (secret.clone(), plain.clone());
    let run = move |label: &'static str| {
        let (s, p, u) = (s2.clone(), p2.clone(), sys.clone());
        move || -> anyhow::Result<()> {
            // warm-up
            measure(&s, 200)?;
            measure(&p, 200)?;
            report(&format!("{label}: sensitive (.env)"), &measure(&s, n)?);
            report(&format!("{label}: non-sensitive (/tmp)"), &measure(&p, n)?);
            if let Some(u) = u {
                measure(&u, 200)?;
                report(
                    &format!("{label}: non-sensitive ({})", u.display()),
                    &measure(&u, n)?,
                );
            }
            Ok(())
        }
    };
    tokio::task::spawn_blocking(run("no sensor")).await??;
    {
        let _s = start_sensor(
            &sensor,
            &pdp,
            &["--mark-dir", dir.path().to_str().unwrap_or("/tmp")],
        )?;
        tokio::task::spawn_blocking(run("sensor --mark-dir")).await??;
    }
    if mount {
        let _s = start_sensor(&sensor, &pdp, &["--mount", "/"])?;
        tokio::task::spawn_blocking(run("sensor --mount /")).await??;
    }
    Ok(())
}
