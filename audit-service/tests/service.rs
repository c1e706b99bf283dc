//! The real `secureops-audit` binary on loopback: authentication, malformed
//! records, dedupe across reconnects, Prove / Tail / Checkpoint, ops
//! endpoint, graceful shutdown checkpoint.

mod common;

use common::{Server, append_all, open_append, record, tail_all, token, write_tokens};
use secureops_audit::note::{Checkpoint, NoteVerifier};
use secureops_proto::v1::{AuditRecord, CheckpointRequest, ConsistencyRequest};
use std::time::Duration;

fn setup(n_tokens: usize) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens = write_tokens(tmp.path(), n_tokens);
    (tmp, data, tokens)
}

async fn entries_count(addr: &str) -> usize {
    tail_all(addr).await.len()
}

#[tokio::test]
async fn unauthenticated_wrong_token_and_wrong_source_are_refused() {
    let (_tmp, data, tokens) = setup(2);
    let srv = Server::spawn(&data, &tokens, &[]);
    let addr = srv.addr();

    // No token.
    let e = match open_append(&addr, None).await {
        Err(e) => e,
        Ok(mut s) => {
            s.tx.send(record("pep-0", 1)).await.unwrap();
            s.acks.message().await.unwrap_err()
        }
    };
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // Unknown token.
    let e = match open_append(&addr, Some("not-a-valid-token-at-all")).await {
        Err(e) => e,
        Ok(mut s) => {
            s.tx.send(record("pep-0", 1)).await.unwrap();
            s.acks.message().await.unwrap_err()
        }
    };
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // pep-1's token, record claims pep-0: an agent holding one PEP's token
    // must not inject records for another source.
    let mut s = open_append(&addr, Some(&token(1))).await.unwrap();
    s.tx.send(record("pep-0", 1)).await.unwrap();
    let e = s.acks.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    assert_eq!(entries_count(&addr).await, 0, "nothing may be appended");

    // The right token works.
    let acks = append_all(&addr, &token(1), vec![record("pep-1", 1)]).await;
    assert!(acks[0].error.is_empty());
    assert_eq!(entries_count(&addr).await, 1);
}

#[tokio::test]
async fn malformed_records_get_errors_while_stream_and_log_stay_healthy() {
    let (_tmp, data, tokens) = setup(1);
    let srv = Server::spawn(&data, &tokens, &[]);
    let addr = srv.addr();
    let mut no_finding = record("pep-0", 2);
    no_finding.finding = None;
    let empty_source = AuditRecord {
        source_id: String::new(),
        ..record("pep-0", 3)
    };
    let seq_zero = record("pep-0", 0);
    let mut oversized = record("pep-0", 4);
    if let Some(f) = oversized.finding.as_mut() {
        f.detail = "x".repeat(10_000);
    }
    let acks = append_all(
        &addr,
        &token(0),
        vec![
            record("pep-0", 1),
            no_finding,
            empty_source,
            seq_zero,
            oversized,
            record("pep-0", 5),
        ],
    )
    .await;
    assert!(acks[0].error.is_empty() && acks[0].index == 0);
    assert!(acks[1].error.contains("missing finding"), "{:?}", acks[1]);
    // Rejections echo the record's key so a shipper can match them.
    assert_eq!(
        (acks[1].source_id.as_str(), acks[1].source_seq),
        ("pep-0", 2)
    );
    assert!(acks[2].error.contains("empty source_id"), "{:?}", acks[2]);
    assert!(acks[3].error.contains("source_seq"), "{:?}", acks[3]);
    assert!(acks[4].error.contains("detail"), "{:?}", acks[4]);
    assert!(
        acks[5].error.is_empty() && acks[5].index == 1,
        "{:?}",
        acks[5]
    );
    let all = tail_all(&addr).await;
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].source_seq, all[1].source_seq), (1, 5));
}

#[tokio::test]
async fn dedupe_across_reconnects_and_restarts() {
    let (tmp, data, tokens) = setup(2);
    let mut srv = Server::spawn(&data, &tokens, &[]);
    let addr = srv.addr();
    let first = append_all(
        &addr,
        &token(0),
        (1..=50).map(|i| record("pep-0", i)).collect(),
    )
    .await;
    assert!(first.iter().all(|a| !a.duplicate && a.error.is_empty()));
    // Another source interleaves.
    append_all(
        &addr,
        &token(1),
        (1..=5).map(|i| record("pep-1", i)).collect(),
    )
    .await;
    // Reconnect and replay 1..=60: 50 duplicates with their original index.
    let second = append_all(
        &addr,
        &token(0),
        (1..=60).map(|i| record("pep-0", i)).collect(),
    )
    .await;
    for (a, b) in first.iter().zip(&second) {
        assert!(b.duplicate, "{b:?}");
        assert_eq!(a.index, b.index);
    }
    assert!(second[50..].iter().all(|a| !a.duplicate));
    assert_eq!(entries_count(&addr).await, 65);
    // The same within one stream (a replay racing the original).
    let third = append_all(
        &addr,
        &token(0),
        vec![record("pep-0", 61), record("pep-0", 61)],
    )
    .await;
    assert!(!third[0].duplicate && third[1].duplicate);
    assert_eq!(third[0].index, third[1].index);
    // And after a restart the index is rebuilt from the log.
    assert_eq!(srv.sigterm(), Some(0));
    let srv2 = Server::spawn(&data, &tokens, &[]);
    let again = append_all(
        &srv2.addr(),
        &token(0),
        (1..=61).map(|i| record("pep-0", i)).collect(),
    )
    .await;
    assert!(again.iter().all(|a| a.duplicate));
    assert_eq!(entries_count(&srv2.addr()).await, 66);
    drop(tmp);
}

#[tokio::test]
async fn prove_tail_checkpoint_consistency_and_shutdown_checkpoint() {
    let (tmp, data, tokens) = setup(1);
    let mut srv = Server::spawn(&data, &tokens, &["--metrics-listen", "127.0.0.1:0"]);
    let addr = srv.addr();
    let pubkey = data.join("audit.key.pub");
    let key = NoteVerifier::from_file(&pubkey).unwrap();
    // Private key mode 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("audit.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut follower = secureops_audit::client::tail(&addr, 0, true).await.unwrap();
    let acks = append_all(
        &addr,
        &token(0),
        (1..=20).map(|i| record("pep-0", i)).collect(),
    )
    .await;
    assert_eq!(acks.last().unwrap().index, 19);

    // Library client: proof verified locally, including the signature.
    let p = secureops_audit::prove(&addr, 7, Some(&key), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((p.index, p.source_seq), (7, 8));
    assert!(p.signature_verified);
    // CLI.
    let out = std::process::Command::new(common::BIN)
        .args(["prove", "7", "--server", &addr, "--json", "--pubkey"])
        .arg(&pubkey)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["index"], 7);
    assert_eq!(v["signature_verified"], true);
    // The printed proof verifies independently against the checkpoint.
    let note = v["checkpoint_note"].as_str().unwrap();
    let cp = Checkpoint::open(note, &key).unwrap();
    let path: Vec<[u8; 32]> = v["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            hex::decode(h.as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap()
        })
        .collect();
    let leaf: [u8; 32] = hex::decode(v["leaf_hash"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    assert!(secureops_audit::merkle::verify_inclusion(
        &leaf, 7, cp.size, &path, &cp.root
    ));

    // Checkpoint within ~1 s of the appends, covering all 20.
    let mut c = common::client(&addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let signed = loop {
        let s = c
            .checkpoint(CheckpointRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.size == 20 || tokio::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(signed.size, 20);
    let cp20 = Checkpoint::open(&signed.note, &key).unwrap();
    assert_eq!(cp20.root.to_vec(), signed.root_hash);

    // Consistency from an earlier size.
    let cons = c
        .consistency(ConsistencyRequest {
            from_size: 0,
            to_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cons.to_size, 20);

    // Witness check of the size-20 checkpoint against the log later on.
    let (old, new) = secureops_audit::client::check_consistency(&addr, &signed.note, &key)
        .await
        .unwrap();
    assert_eq!((old.size, new.size), (20, 20));
    // A checkpoint of another history (validly signed by the same key, as a
    // compromised-then-rolled-back log would present) is not consistent.
    let secret = std::fs::read_to_string(data.join("audit.key")).unwrap();
    let signer = secureops_audit::NoteSigner::parse(&secret).unwrap();
    let other = Checkpoint {
        root: [9; 32],
        size: 7,
        ..cp20.clone()
    }
    .sign(&signer);
    let e = secureops_audit::client::check_consistency(&addr, &other, &key)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a prefix"), "{e}");

    // Follower sees all 20, then a new one.
    for i in 0..20u64 {
        let e = tokio::time::timeout(Duration::from_secs(10), follower.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.index, i);
        assert_eq!(
            e.finding.unwrap().host,
            format!("host{}.example.com", i + 1)
        );
    }
    append_all(&addr, &token(0), vec![record("pep-0", 21)]).await;
    let e = tokio::time::timeout(Duration::from_secs(10), follower.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((e.index, e.source_seq), (20, 21));

    // Ops endpoint.
    let m = srv.metrics.unwrap();
    let body = http_get(m, "/metrics").await;
    assert!(body.contains("secureops_audit_appended_total 21"), "{body}");
    assert!(http_get(m, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(m, "/readyz").await.starts_with("HTTP/1.1 200"));

    // SIGTERM: clean exit with a final checkpoint covering entry 20.
    assert_eq!(srv.sigterm(), Some(0));
    let s = secureops_audit::verify_dir(&data, &key, Some(&signed.note)).unwrap();
    assert_eq!((s.entries, s.last_checkpoint_size), (21, 21));
    drop(tmp);
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn explicit_missing_signing_key_fails_closed_and_bad_flags_refused() {
    let (tmp, data, tokens) = setup(1);
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--signing-key"])
        .arg(tmp.path().join("missing.key"))
        .env("SECUREOPS_DATA_DIR", &data)
        .env("SECUREOPS_TOKENS_FILE", &tokens)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.key"));
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--batch-delay-ms", "6"])
        .env("SECUREOPS_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn without_credentials_every_append_is_refused_and_bad_tokens_file_fails_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, "# no sources configured\n").unwrap();
    let srv = Server::spawn(&data, &tokens, &[]);
    let e = match open_append(&srv.addr(), Some(&token(0))).await {
        Err(e) => e,
        Ok(mut s) => {
            s.tx.send(record("pep-0", 1)).await.unwrap();
            s.acks.message().await.unwrap_err()
        }
    };
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(entries_count(&srv.addr()).await, 0);
    // A weak (short) token is a configuration error: refuse to start.
    let bad = tmp.path().join("bad-tokens");
    std::fs::write(&bad, "pep-0 short\n").unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--tokens-file"])
        .arg(&bad)
        .env("SECUREOPS_DATA_DIR", tmp.path().join("data2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shorter than 16"));
}
