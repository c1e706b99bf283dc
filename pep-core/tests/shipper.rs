//! Shipper against a fake, deduplicating audit service on loopback.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use secureops_pep::{AuditFinding, AuditSpool, Shipper, ShipperConfig, SpoolLimits};

fn finding(host: &str) -> AuditFinding {
    AuditFinding {
        pep_kind: "proxy".into(),
        host: host.into(),
        port: 443,
        ..Default::default()
    }
}

fn shipper_cfg(addr: std::net::SocketAddr, token_file: &std::path::Path) -> ShipperConfig {
    let mut c = ShipperConfig::new(format!("http://{addr}"), "pep-a", token_file);
    c.min_backoff = Duration::from_millis(20);
    c.max_backoff = Duration::from_millis(100);
    c.persist_interval = Duration::from_millis(20);
    c
}

fn assert_exactly_once(log: &AuditLog, n: u64) {
    let entries = log.entries.lock();
    let seqs: Vec<u64> = entries.iter().map(|e| e.1).collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "each seq exactly once, in order"
    );
    assert!(entries.iter().all(|e| e.0 == "pep-a"));
}

#[tokio::test]
async fn audit_down_then_back_delivers_exactly_once_and_trims() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let spool = AuditSpool::open(
        tmp.path().join("spool"),
        SpoolLimits {
            segment_bytes: 256,
            ..SpoolLimits::default()
        },
    )
    .unwrap();
    let addr = dead_addr();
    let _shipper = Shipper::spawn(spool.clone(), shipper_cfg(addr, &token)).unwrap();
    // Audit down: decisions still get spooled.
    for i in 0..30 {
        spool.record(finding(&format!("h{i}"))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(spool.unacked_len(), 30);
    let segs_before = spool.segment_count();
    assert!(segs_before > 2);

    let log = AuditLog::new("s3cret");
    let _audit = start_audit(addr, log.clone());
    assert!(
        wait_until(Duration::from_secs(10), || spool.unacked_len() == 0).await,
        "unacked {}",
        spool.unacked_len()
    );
    assert_exactly_once(&log, 30);
    // New records flow while connected.
    for i in 30..35 {
        spool.record(finding(&format!("h{i}"))).await.unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || log.len() == 35).await);
    assert_exactly_once(&log, 35);
    // Watermark persisted and fully-acked segments deleted.
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(tmp.path().join("spool/acked"))
                .map(|s| s.trim() == "35")
                .unwrap_or(false)
        })
        .await
    );
    assert!(
        wait_until(Duration::from_secs(5), || spool.segment_count() == 1).await,
        "fully-acked segments trimmed: {} left of {segs_before}",
        spool.segment_count()
    );
    assert_eq!(log.duplicates.load(Ordering::SeqCst), 0);
    assert_eq!(spool.metrics().shipped.get(), 35);
    assert_eq!(spool.metrics().spool_unacked.get(), 0);
}

#[tokio::test]
async fn replay_across_restart_is_deduplicated() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "tok").unwrap();
    let spool_dir = tmp.path().join("spool");
    let addr = dead_addr();
    // Run 1: audit down, 10 records spooled, then the PEP "crashes".
    {
        let spool = AuditSpool::open(&spool_dir, SpoolLimits::default()).unwrap();
        let shipper = Shipper::spawn(spool.clone(), shipper_cfg(addr, &token)).unwrap();
        for i in 0..10 {
            spool.record(finding(&format!("a{i}"))).await.unwrap();
        }
        shipper.shutdown().await;
    }
    // Run 2: 5 more, audit comes back: all 15 exactly once.
    let log = AuditLog::new("tok");
    let mut audit = start_audit(addr, log.clone());
    {
        let spool = AuditSpool::open(&spool_dir, SpoolLimits::default()).unwrap();
        assert_eq!(spool.unacked_len(), 10);
        for i in 10..15 {
            assert_eq!(
                spool.record(finding(&format!("a{i}"))).await.unwrap(),
                i + 1
            );
        }
        let mut cfg = shipper_cfg(addr, &token);
        // Never persist the watermark during this run: simulate a crash
        // after acks arrived but before the watermark hit the disk.
        cfg.persist_interval = Duration::from_secs(3600);
        let shipper = Shipper::spawn(spool.clone(), cfg).unwrap();
        assert!(wait_until(Duration::from_secs(10), || spool.unacked_len() == 0).await);
        shipper.shutdown().await;
    }
    assert_exactly_once(&log, 15);
    // Run 3: the audit service restarts too; the replayed records are
    // deduplicated, nothing new appended.
    audit.stop();
    let audit2 = start_audit(addr, log.clone());
    let spool = AuditSpool::open(&spool_dir, SpoolLimits::default()).unwrap();
    let replay = spool.unacked_len();
    assert_eq!(replay, 15, "acks of run 2 were never persisted");
    let _shipper = Shipper::spawn(spool.clone(), shipper_cfg(addr, &token)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || spool.unacked_len() == 0).await);
    assert_exactly_once(&log, 15);
    assert_eq!(log.duplicates.load(Ordering::SeqCst), replay);
    drop(audit2);
}

#[tokio::test]
async fn wrong_token_delivers_nothing_and_keeps_records() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "wrong").unwrap();
    let log = AuditLog::new("right");
    let audit = start_audit("127.0.0.1:0".parse().unwrap(), log.clone());
    let spool = AuditSpool::open(tmp.path().join("spool"), SpoolLimits::default()).unwrap();
    let _shipper = Shipper::spawn(spool.clone(), shipper_cfg(audit.addr, &token)).unwrap();
    for _ in 0..3 {
        spool.record(finding("x")).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(5), || log
            .rejected_auth
            .load(Ordering::SeqCst)
            >= 2)
        .await
    );
    assert_eq!(log.len(), 0);
    assert_eq!(spool.unacked_len(), 3);
    // Token rotated on disk: picked up at the next reconnect.
    std::fs::write(&token, "right").unwrap();
    assert!(wait_until(Duration::from_secs(5), || log.len() == 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_backlog_is_windowed_and_delivered_once() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let spool = AuditSpool::open(tmp.path().join("spool"), SpoolLimits::default()).unwrap();
    let mut hs = Vec::new();
    for i in 0..3000 {
        let s = spool.clone();
        hs.push(tokio::spawn(async move {
            s.record(finding(&format!("b{i}"))).await
        }));
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
    let log = AuditLog::new("t");
    let audit = start_audit("127.0.0.1:0".parse().unwrap(), log.clone());
    let mut cfg = shipper_cfg(audit.addr, &token);
    cfg.window = 64;
    let _shipper = Shipper::spawn(spool.clone(), cfg).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || spool.unacked_len() == 0).await,
        "unacked {}",
        spool.unacked_len()
    );
    assert_exactly_once(&log, 3000);
}
