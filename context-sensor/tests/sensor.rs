//! The real `secureops-sensor` binary against a fake PDP, with real child
//! processes opening real files. Only a temporary directory is marked
//! (`--mark-dir`), never a whole mount, so a bug cannot stall the box.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use secureops_proto::v1::process_event;

/// Helper process for [`probe`]: this test binary re-executed. Ignored in
/// normal runs; it does nothing without `SENSOR_PROBE_PLAN`.
#[test]
#[ignore = "helper process spawned by the other tests"]
fn probe_child() {
    probe_child_main();
}

macro_rules! require_fanotify {
    () => {
        if let Err(why) = fanotify_available() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sensor-test-")
        .tempdir_in("/tmp")
        .unwrap()
}

fn write(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b"SECRET=1\n").unwrap();
    p
}

async fn probe_async(paths: Vec<PathBuf>) -> Vec<ProbeOpen> {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        probe(&refs)
    })
    .await
    .unwrap()
}

/// The ordering guarantee of DESIGN.md §6: the PDP has the FileOpened event
/// (with the opener's pid, start time and exe) before the open() returns.
/// The fake PDP delays its ack by 200 ms; the child's open must take at
/// least that long, and the PDP's receipt must precede the open's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_open_is_held_until_the_pdp_acked() {
    require_fanotify!();
    let dir = tmpdir();
    let env = write(dir.path(), ".env");
    let pdp = FakePdp::start().await;
    pdp.state.set_ack_delay(Duration::from_millis(200));
    let _sensor = Sensor::start(&[
        "--pdp",
        &pdp.url(),
        "--workload",
        "wl-1",
        "--mark-dir",
        dir.path().to_str().unwrap(),
        "--ack-timeout-ms",
        "3000",
    ]);
    let opens = probe_async(vec![env.clone()]).await;
    let o = &opens[0];
    assert_eq!(o.errno, None, "{o:?}");
    assert!(
        o.duration >= Duration::from_millis(200),
        "open returned before the (200 ms delayed) ack: {:?}",
        o.duration
    );
    let recs = pdp.state.file_opens();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    let Some(process_event::Event::FileOpened(f)) = &r.event.event else {
        unreachable!()
    };
    assert_eq!(r.event.workload_id, "wl-1");
    assert_eq!(f.path, env.to_string_lossy());
    let p = f.process.as_ref().unwrap();
    assert_eq!(p.pid, o.pid);
    assert_eq!(p.start_time, o.start_time);
    assert_eq!(p.exe, o.exe);
    assert_eq!(f.ancestors.first().map(|a| a.pid), Some(o.ppid));
    assert_eq!(o.ppid, std::process::id());
    assert!(
        r.at < o.after,
        "PDP received the event after the open returned"
    );
    assert!(r.at >= o.before);
}

/// Non-sensitive opens in a marked directory are answered at once and never
/// reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_sensitive_opens_are_not_reported_nor_delayed() {
    require_fanotify!();
    let dir = tmpdir();
    let plain: Vec<PathBuf> = (0..20)
        .map(|i| write(dir.path(), &format!("notes-{i}.txt")))
        .collect();
    let pdp = FakePdp::start().await;
    // A PDP that would hold every reported open for 1 s.
    pdp.state.set_ack_delay(Duration::from_millis(1000));
    let sensor = Sensor::start(&[
        "--pdp",
        &pdp.url(),
        "--mark-dir",
        dir.path().to_str().unwrap(),
        "--ack-timeout-ms",
        "3000",
    ]);
    let opens = probe_async(plain.clone()).await;
    for o in &opens {
        assert_eq!(o.errno, None);
        assert!(o.duration < Duration::from_millis(200), "{o:?}");
    }
    assert!(pdp.state.file_opens().is_empty());
    // ... but the sensor did see them (the mark works).
    let seen = sensor
        .metric("secureops_sensor_events_total{kind=\"non_sensitive\"}")
        .unwrap_or(0.0);
    assert!(seen >= 20.0, "non-sensitive events seen: {seen}");
}

/// PDP unreachable, `--on-timeout allow`: the open completes within the
/// bounded wait; the event stays queued and reaches the PDP when it comes
/// up, before the first heartbeat of the new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdp_down_allow_completes_within_bound_and_delivers_later() {
    require_fanotify!();
    let dir = tmpdir();
    let env = write(dir.path(), ".env.local");
    let addr = dead_addr();
    let sensor = Sensor::start(&[
        "--pdp",
        &format!("http://{addr}"),
        "--mark-dir",
        dir.path().to_str().unwrap(),
        "--ack-timeout-ms",
        "300",
        "--on-timeout",
        "allow",
        "--heartbeat-ms",
        "100",
    ]);
    let opens = probe_async(vec![env.clone()]).await;
    let o = &opens[0];
    assert_eq!(o.errno, None, "{o:?}");
    assert!(o.duration >= Duration::from_millis(290), "{o:?}");
    assert!(o.duration < Duration::from_millis(1500), "{o:?}");
    assert_eq!(
        sensor.metric("secureops_sensor_ack_timeouts_total{cause=\"timeout\"}"),
        Some(1.0)
    );
    // The PDP comes up on the address the sensor keeps retrying.
    let pdp = FakePdp::start_on(addr).await;
    let rec = eventually(Duration::from_secs(15), || {
        pdp.state.file_opens().into_iter().next()
    })
    .await
    .expect("queued event never delivered after the PDP came back");
    let Some(process_event::Event::FileOpened(f)) = &rec.event.event else {
        unreachable!()
    };
    assert_eq!(f.process.as_ref().map(|p| p.pid), Some(o.pid));
    assert_eq!(f.process.as_ref().map(|p| p.start_time), Some(o.start_time));
    // Backlog before liveness: no heartbeat of that stream precedes it.
    let all = pdp.state.events();
    let first_of_stream = all
        .iter()
        .find(|r| r.stream == rec.stream)
        .expect("stream has events");
    assert!(
        matches!(
            first_of_stream.event.event,
            Some(process_event::Event::FileOpened(_))
        ),
        "first event of the new stream: {first_of_stream:?}"
    );
    let late = eventually(Duration::from_secs(5), || {
        sensor
            .metric("secureops_sensor_late_acks_total")
            .filter(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(late, Some(1.0));
    assert_eq!(sensor.metric("secureops_sensor_queue_depth"), Some(0.0));
}

/// PDP unreachable, default `--on-timeout deny`: fail closed, the open
/// fails with EPERM within the bounded wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdp_down_deny_fails_the_open_within_bound() {
    require_fanotify!();
    let dir = tmpdir();
    let env = write(dir.path(), ".env");
    let plain = write(dir.path(), "readme.md");
    let addr = dead_addr();
    let _sensor = Sensor::start(&[
        "--pdp",
        &format!("http://{addr}"),
        "--mark-dir",
        dir.path().to_str().unwrap(),
        "--ack-timeout-ms",
        "250",
    ]);
    let opens = probe_async(vec![env, plain]).await;
    assert_eq!(opens[0].errno, Some(nix::libc::EPERM), "{:?}", opens[0]);
    assert!(opens[0].duration >= Duration::from_millis(240));
    assert!(opens[0].duration < Duration::from_millis(1500));
    // Non-sensitive files stay readable while the PDP is down.
    assert_eq!(opens[1].errno, None);
    assert!(opens[1].duration < Duration::from_millis(200));
}

/// A PDP that rejects the event (not applied) is treated like no ack:
/// with `deny`, the open fails at once (no waiting for the timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdp_rejecting_the_event_fails_closed() {
    require_fanotify!();
    let dir = tmpdir();
    let env = write(dir.path(), ".netrc");
    let pdp = FakePdp::start().await;
    pdp.state.set_reject(true);
    let sensor = Sensor::start(&[
        "--pdp",
        &pdp.url(),
        "--mark-dir",
        dir.path().to_str().unwrap(),
        "--ack-timeout-ms",
        "2000",
    ]);
    let opens = probe_async(vec![env]).await;
    assert_eq!(opens[0].errno, Some(nix::libc::EPERM), "{:?}", opens[0]);
    assert!(opens[0].duration < Duration::from_millis(1500));
    assert_eq!(
        sensor.metric("secureops_sensor_ack_timeouts_total{cause=\"rejected\"}"),
        Some(1.0)
    );
}

/// Heartbeats arrive on the acked stream at the configured interval and
/// carry the workload and the promised interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_arrive() {
    require_fanotify!();
    let dir = tmpdir();
    let pdp = FakePdp::start().await;
    let _sensor = Sensor::start(&[
        "--pdp",
        &pdp.url(),
        "--workload",
        "wl-hb",
        "--mark-dir",
        dir.path().to_str().unwrap(),
        "--heartbeat-ms",
        "100",
    ]);
    // Count only heartbeats sent after t0: the sensor may already have sent
    // some while it was starting.
    let t0 = Instant::now();
    let n0 = pdp.state.heartbeats().len();
    let hbs = eventually(Duration::from_secs(5), || {
        let h = pdp.state.heartbeats();
        (h.len() >= n0 + 5).then_some(h)
    })
    .await
    .expect("fewer than 5 heartbeats in 5 s");
    // Five more at a 100 ms interval cannot all arrive within 300 ms: the
    // interval is honoured, not spun.
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "5 heartbeats in {:?}",
        t0.elapsed()
    );
    for h in &hbs {
        assert_eq!(h.event.workload_id, "wl-hb");
        assert!(!h.event.sensor_id.is_empty());
        assert!(h.event.timestamp_unix_nanos > 0);
        let Some(process_event::Event::Heartbeat(b)) = &h.event.event else {
            unreachable!()
        };
        assert_eq!(b.interval_ms, 100);
    }
    let seqs: Vec<u64> = hbs.iter().map(|h| h.event.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

/// 100,000 non-sensitive opens plus 200 sensitive ones: every sensitive
/// open is reported, the sensor's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_keeps_memory_bounded_and_loses_no_sensitive_open() {
    require_fanotify!();
    const PLAIN: usize = 100_000;
    const SENSITIVE: usize = 200;
    const RSS_BOUND_KIB: u64 = 96 * 1024;
    let dir = tmpdir();
    let plain: Vec<PathBuf> = (0..100)
        .map(|i| write(dir.path(), &format!("data-{i}.bin")))
        .collect();
    let secret: Vec<PathBuf> = (0..SENSITIVE)
        .map(|i| write(dir.path(), &format!(".env.{i}")))
        .collect();
    let pdp = FakePdp::start().await;
    let sensor = Sensor::start(&[
        "--pdp",
        &pdp.url(),
        "--mark-dir",
        dir.path().to_str().unwrap(),
        "--ack-timeout-ms",
        "5000",
    ]);
    eventually(Duration::from_secs(5), || {
        (sensor.metric("secureops_sensor_pdp_connected") == Some(1.0)).then_some(())
    })
    .await
    .expect("sensor never connected");
    let (rss0, _) = sensor.rss_kib();
    let t0 = Instant::now();
    let (plain2, secret2) = (plain.clone(), secret.clone());
    let failures = tokio::task::spawn_blocking(move || {
        let mut failures = 0usize;
        let every = PLAIN / SENSITIVE;
        for i in 0..PLAIN {
            if std::fs::File::open(&plain2[i % plain2.len()]).is_err() {
                failures += 1;
            }
            if i % every == 0 && std::fs::File::open(&secret2[i / every]).is_err() {
                failures += 1;
            }
        }
        failures
    })
    .await
    .unwrap();
    let elapsed = t0.elapsed();
    assert_eq!(failures, 0);
    let (rss1, hwm) = sensor.rss_kib();
    eprintln!(
        "flood: {PLAIN} plain + {SENSITIVE} sensitive opens in {elapsed:?}; sensor RSS {rss0} KiB -> {rss1} KiB, peak {hwm} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    assert!(hwm < RSS_BOUND_KIB, "sensor peak RSS {hwm} KiB");
    let mut paths: Vec<String> = pdp
        .state
        .file_opens()
        .into_iter()
        .filter_map(|r| match r.event.event {
            Some(process_event::Event::FileOpened(f)) => {
                assert_eq!(f.process.as_ref().map(|p| p.pid), Some(std::process::id()));
                Some(f.path)
            }
            _ => None,
        })
        .collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), SENSITIVE, "distinct sensitive paths reported");
    let seen = sensor
        .metric("secureops_sensor_events_total{kind=\"non_sensitive\"}")
        .unwrap_or(0.0);
    assert!(seen >= PLAIN as f64, "non-sensitive events seen: {seen}");
}

/// Without CAP_SYS_ADMIN the sensor refuses to start and says why.
#[test]
fn missing_cap_sys_admin_is_reported() {
    if !secureops_test_support::have_command("setpriv") {
        eprintln!("SKIPPED: setpriv not installed");
        return;
    }
    let dir = tmpdir();
    let out = std::process::Command::new("setpriv")
        .args([
            "--bounding-set",
            "-sys_admin",
            "--inh-caps",
            "-sys_admin",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_secureops-sensor"))
        .args([
            "--mark-dir",
            dir.path().to_str().unwrap(),
            "--pdp",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("setpriv:") {
        eprintln!("SKIPPED: setpriv cannot drop capabilities here: {stderr}");
        return;
    }
    assert!(
        !out.status.success(),
        "sensor started without CAP_SYS_ADMIN"
    );
    assert!(stderr.contains("fanotify_init"), "{stderr}");
    assert!(stderr.contains("CAP_SYS_ADMIN"), "{stderr}");
}

/// `--cache-prefix`: a non-sensitive file under the prefix reaches the
/// sensor once, then the kernel ignore mark keeps later opens away; a
/// sensitive file under the same prefix is reported every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_prefix_ignores_repeat_opens_but_never_sensitive_ones() {
    require_fanotify!();
    let dir = tmpdir();
    let plain = write(dir.path(), "lib.so");
    let env = write(dir.path(), ".env");
    let pdp = FakePdp::start().await;
    let prefix = format!("{}/", dir.path().display());
    let sensor = Sensor::start(&[
        "--pdp",
        &pdp.url(),
        "--mark-dir",
        dir.path().to_str().unwrap(),
        "--cache-prefix",
        &prefix,
    ]);
    let (p2, e2) = (plain.clone(), env.clone());
    tokio::task::spawn_blocking(move || {
        for _ in 0..50 {
            std::fs::File::open(&p2).unwrap();
        }
        for _ in 0..3 {
            std::fs::File::open(&e2).unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(
        sensor.metric("secureops_sensor_events_total{kind=\"non_sensitive\"}"),
        Some(1.0)
    );
    assert_eq!(
        sensor.metric("secureops_sensor_ignore_marks_total"),
        Some(1.0)
    );
    assert_eq!(pdp.state.file_opens().len(), 3);
}
