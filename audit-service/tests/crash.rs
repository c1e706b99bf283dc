//! Crash safety with the real binary: kill -9 during heavy concurrent
//! append, restart, every acked record present exactly once, log verifies;
//! torn tails are repaired; damage elsewhere makes the service refuse to start.

mod common;

use common::{Server, append_all, record, tail_all, token, write_tokens};
use secureops_audit::note::NoteVerifier;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SOURCES: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_heavy_append_loses_no_acked_record() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens = write_tokens(tmp.path(), SOURCES);
    let mut srv = Server::spawn(&data, &tokens, &[]);
    let addr = srv.addr();

    // (source, seq) -> acked index
    let acked: Arc<Mutex<HashMap<(usize, u64), u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for s in 0..SOURCES {
        let addr = addr.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut st) = common::open_append(&addr, Some(&token(s))).await else {
                return;
            };
            let tx = st.tx.clone();
            let src = format!("pep-{s}");
            tokio::spawn(async move {
                for seq in 1..=1_000_000u64 {
                    if tx.send(record(&src, seq)).await.is_err() {
                        return;
                    }
                }
            });
            while let Ok(Some(ack)) = st.acks.message().await {
                assert!(ack.error.is_empty(), "{ack:?}");
                assert!(!ack.duplicate);
                acked.lock().unwrap().insert((s, ack.source_seq), ack.index);
            }
        }));
    }
    // Let the load run, then kill -9 mid-stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 20_000 {
        assert!(tokio::time::Instant::now() < deadline, "load too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    srv.kill9();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("stream did not end after kill")
            .unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 20_000);

    // Restart: every acked record present exactly once, at its acked index.
    let mut srv = Server::spawn(&data, &tokens, &[]);
    let addr = srv.addr();
    let entries = tail_all(&addr).await;
    let mut seen: HashMap<(usize, u64), u64> = HashMap::new();
    for e in &entries {
        let s: usize = e.source_id.strip_prefix("pep-").unwrap().parse().unwrap();
        assert!(
            seen.insert((s, e.source_seq), e.index).is_none(),
            "duplicate entry {:?}",
            (s, e.source_seq)
        );
    }
    for (k, idx) in &acked {
        assert_eq!(seen.get(k), Some(idx), "acked record {k:?} lost or moved");
    }
    let before = entries.len();
    assert!(before >= acked.len());

    // Replay what each source had sent (a PEP's spool): acked and
    // durable-but-unacked ones are duplicates, the rest is appended once.
    for s in 0..SOURCES {
        let max = seen
            .keys()
            .filter(|k| k.0 == s)
            .map(|k| k.1)
            .max()
            .unwrap_or(0)
            + 20;
        let acks = append_all(
            &addr,
            &token(s),
            (1..=max).map(|q| record(&format!("pep-{s}"), q)).collect(),
        )
        .await;
        for a in acks {
            if let Some(idx) = seen.get(&(s, a.source_seq)) {
                assert!(a.duplicate);
                assert_eq!(a.index, *idx);
            } else {
                assert!(!a.duplicate);
            }
        }
    }
    assert_eq!(srv.sigterm(), Some(0));
    let key = NoteVerifier::from_file(&data.join("audit.key.pub")).unwrap();
    let sum = secureops_audit::verify_dir(&data, &key, None).unwrap();
    assert!(sum.entries as usize >= before);
    assert_eq!(sum.last_checkpoint_size, sum.entries);
    let (code, out) = common::verify_cli(&data, &data.join("audit.key.pub"), &[]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn torn_tail_is_repaired_and_damage_elsewhere_refuses_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens = write_tokens(tmp.path(), 1);
    let mut srv = Server::spawn(&data, &tokens, &[]);
    append_all(
        &srv.addr(),
        &token(0),
        (1..=100).map(|i| record("pep-0", i)).collect(),
    )
    .await;
    assert_eq!(srv.sigterm(), Some(0));

    // A torn frame (length says 300 bytes, 5 present) and a torn checkpoint.
    let seg = secureops_audit::storage::list_segments(&data)
        .unwrap()
        .pop()
        .unwrap()
        .1;
    let clean_len = std::fs::metadata(&seg).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    use std::io::Write;
    f.write_all(&[0, 0, 1, 44, 1, 2, 3, 4, 5]).unwrap();
    drop(f);
    let cpf = data.join(secureops_audit::storage::CHECKPOINTS_FILE);
    let mut f = std::fs::OpenOptions::new().append(true).open(&cpf).unwrap();
    f.write_all(&[0, 0, 0]).unwrap();
    drop(f);

    let mut srv = Server::spawn(&data, &tokens, &[]);
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        clean_len,
        "tail repaired"
    );
    let acks = append_all(&srv.addr(), &token(0), vec![record("pep-0", 101)]).await;
    assert_eq!(acks[0].index, 100);
    assert_eq!(tail_all(&srv.addr()).await.len(), 101);
    assert_eq!(srv.sigterm(), Some(0));
    let key = NoteVerifier::from_file(&data.join("audit.key.pub")).unwrap();
    assert_eq!(
        secureops_audit::verify_dir(&data, &key, None)
            .unwrap()
            .entries,
        101
    );

    // Damage inside the signed part of the log: refuse to start.
    let mut b = std::fs::read(&seg).unwrap();
    b[200] ^= 0xff;
    std::fs::write(&seg, &b).unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SECUREOPS_DATA_DIR", &data)
        .env("SECUREOPS_TOKENS_FILE", &tokens)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("LISTENING"));
}
