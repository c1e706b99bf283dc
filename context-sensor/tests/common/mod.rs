//! Shared test plumbing: a fake PDP (tonic `ProcessContext` server that
//! records events and acks them, with knobs), the sensor binary under test,
//! and a probe child process that opens files and times its `open()`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use secureops_proto::v1::process_context_server::{ProcessContext, ProcessContextServer};
use secureops_proto::v1::{EventAck, ProcessEvent, ReportSummary, process_event};
use secureops_test_support::Service;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// One event as the fake PDP received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub event: ProcessEvent,
    /// Wall-clock time of receipt (before the ack is sent).
    pub at: SystemTime,
    /// Which ReportAcked stream (1, 2, ...) carried it.
    pub stream: u64,
}

#[derive(Default)]
pub struct FakeState {
    events: Mutex<Vec<Recorded>>,
    ack_delay_ms: AtomicU64,
    reject: AtomicBool,
    streams: AtomicU64,
}

impl FakeState {
    pub fn events(&self) -> Vec<Recorded> {
        self.events.lock().map(|v| v.clone()).unwrap_or_default()
    }
    pub fn set_ack_delay(&self, d: Duration) {
        self.ack_delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }
    pub fn set_reject(&self, r: bool) {
        self.reject.store(r, Ordering::SeqCst);
    }
    /// FileOpened events (with their record).
    pub fn file_opens(&self) -> Vec<Recorded> {
        self.events()
            .into_iter()
            .filter(|r| matches!(r.event.event, Some(process_event::Event::FileOpened(_))))
            .collect()
    }
    pub fn heartbeats(&self) -> Vec<Recorded> {
        self.events()
            .into_iter()
            .filter(|r| matches!(r.event.event, Some(process_event::Event::Heartbeat(_))))
            .collect()
    }
}

struct Svc(Arc<FakeState>);

type AckStream = Pin<Box<dyn Stream<Item = Result<EventAck, Status>> + Send>>;

#[tonic::async_trait]
impl ProcessContext for Svc {
    async fn report(
        &self,
        req: Request<Streaming<ProcessEvent>>,
    ) -> Result<Response<ReportSummary>, Status> {
        let mut s = req.into_inner();
        let mut n = 0;
        let mut last = 0;
        while let Some(ev) = s.message().await? {
            last = ev.seq;
            n += 1;
            if let Ok(mut v) = self.0.events.lock() {
                v.push(Recorded {
                    event: ev,
                    at: SystemTime::now(),
                    stream: 0,
                });
            }
        }
        Ok(Response::new(ReportSummary {
            accepted: n,
            rejected: 0,
            last_seq: last,
        }))
    }

    type ReportAckedStream = AckStream;

    async fn report_acked(
        &self,
        req: Request<Streaming<ProcessEvent>>,
    ) -> Result<Response<AckStream>, Status> {
        let stream_no = self.0.streams.fetch_add(1, Ordering::SeqCst) + 1;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4096);
        let st = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(ev)) = inbound.message().await {
                let seq = ev.seq;
                let is_hb = matches!(ev.event, Some(process_event::Event::Heartbeat(_)));
                if let Ok(mut v) = st.events.lock() {
                    v.push(Recorded {
                        event: ev,
                        at: SystemTime::now(),
                        stream: stream_no,
                    });
                }
                let error = if st.reject.load(Ordering::SeqCst) && !is_hb {
                    "rejected by the fake PDP".to_string()
                } else {
                    String::new()
                };
                let delay = st.ack_delay_ms.load(Ordering::SeqCst);
                let ack = EventAck { seq, error };
                if delay == 0 || is_hb {
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                } else {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let _ = tx.send(Ok(ack)).await;
                    });
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A fake PDP on loopback; stops when dropped.
pub struct FakePdp {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakePdp {
    pub async fn start() -> FakePdp {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> FakePdp {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FakeState::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = ProcessContextServer::new(Svc(state.clone()));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        FakePdp {
            addr,
            state,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakePdp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A loopback address nobody listens on (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Whether fanotify permission events can be used here; `Err(reason)` if not.
pub fn fanotify_available() -> Result<(), String> {
    use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags};
    Fanotify::init(
        InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC,
        EventFFlags::O_RDONLY,
    )
    .map(drop)
    .map_err(|e| format!("fanotify_init(FAN_CLASS_CONTENT) failed: {e} (needs CAP_SYS_ADMIN)"))
}

/// The sensor binary, started with `--metrics-listen 127.0.0.1:0` and
/// waited for until `/readyz` says the marks are placed.
pub struct Sensor {
    pub svc: Service,
}

impl Sensor {
    pub fn start(args: &[&str]) -> Sensor {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--metrics-listen".into());
        all.push("127.0.0.1:0".into());
        let svc = match Service::spawn(env!("CARGO_BIN_EXE_secureops-sensor"), &all, &["metrics"]) {
            Ok(s) => s,
            Err(e) => panic!("sensor did not start: {e}"),
        };
        let s = Sensor { svc };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((status, _)) = http_get(s.metrics_addr(), "/readyz")
                && status == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sensor not ready; stderr:\n{}",
                s.svc.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.svc.addr("metrics")
    }

    pub fn pid(&self) -> u32 {
        self.svc.pid().unwrap()
    }

    pub fn metrics(&self) -> String {
        http_get(self.metrics_addr(), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Value of one sample line, e.g. `secureops_sensor_late_acks_total`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.metrics();
        text.lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// `(VmRSS, VmHWM)` of the sensor in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// Minimal HTTP/1.1 GET (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((status, body))
}

/// What the probe child observed for one open.
#[derive(Debug, Clone)]
pub struct ProbeOpen {
    pub path: String,
    pub pid: u32,
    pub start_time: u64,
    pub exe: String,
    pub ppid: u32,
    /// Wall clock right before `open()`.
    pub before: SystemTime,
    /// Wall clock right after `open()` returned.
    pub after: SystemTime,
    pub duration: Duration,
    /// `None` on success, else the errno.
    pub errno: Option<i32>,
}

/// Run the probe child (this test binary re-executed as the ignored
/// `probe_child` test) opening `paths` in order; one [`ProbeOpen`] each.
pub fn probe(paths: &[&Path]) -> Vec<ProbeOpen> {
    let exe = std::env::current_exe().unwrap();
    let plan = paths
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    let out = Command::new(exe)
        .args([
            "--exact",
            "probe_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SENSOR_PROBE_PLAN", plan)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let res: Vec<ProbeOpen> = stdout
        .lines()
        .filter_map(|l| l.split_once("PROBE\t").map(|x| x.1))
        .filter_map(parse_probe_line)
        .collect();
    assert_eq!(
        res.len(),
        paths.len(),
        "probe output:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    res
}

fn parse_probe_line(l: &str) -> Option<ProbeOpen> {
    let f: Vec<&str> = l.split('\t').collect();
    let ns = |s: &str| s.parse::<u64>().ok().map(Duration::from_nanos);
    Some(ProbeOpen {
        path: f.first()?.to_string(),
        pid: f.get(1)?.parse().ok()?,
        start_time: f.get(2)?.parse().ok()?,
        exe: f.get(3)?.to_string(),
        ppid: f.get(4)?.parse().ok()?,
        before: SystemTime::UNIX_EPOCH + ns(f.get(5)?)?,
        after: SystemTime::UNIX_EPOCH + ns(f.get(6)?)?,
        duration: ns(f.get(7)?)?,
        errno: match *f.get(8)? {
            "ok" => None,
            e => Some(e.parse().ok()?),
        },
    })
}

/// Body of the probe child: open each planned path, print one line each.
pub fn probe_child_main() {
    let Ok(plan) = std::env::var("SENSOR_PROBE_PLAN") else {
        return;
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid: u32 = fields[1].parse().unwrap();
    let start_time: u64 = fields[19].parse().unwrap();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let pid = std::process::id();
    let nanos = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
    for path in plan.lines() {
        let before = SystemTime::now();
        let t0 = Instant::now();
        let r = std::fs::File::open(path);
        let d = t0.elapsed();
        let after = SystemTime::now();
        let res = match &r {
            Ok(_) => "ok".to_string(),
            Err(e) => e.raw_os_error().unwrap_or(-1).to_string(),
        };
        drop(r);
        println!(
            "PROBE\t{path}\t{pid}\t{start_time}\t{}\t{ppid}\t{}\t{}\t{}\t{res}",
            exe.display(),
            nanos(before),
            nanos(after),
            d.as_nanos()
        );
    }
}

/// Poll `f` every 10 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
