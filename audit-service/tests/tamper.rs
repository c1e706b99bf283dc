//! Offline verifier: a clean log verifies; every tamper class is detected and
//! the first bad index is named (library and `secureops-audit verify`).

mod common;

use secureops_audit::note::{Checkpoint, NoteSigner, NoteVerifier};
use secureops_audit::storage::{self, LogWriter, SEGMENT_HEADER_LEN};
use secureops_audit::verify::{CheckpointRef, VerifyErrorKind};
use secureops_audit::verify_dir;
use std::path::{Path, PathBuf};

const ORIGIN: &str = "test.example/audit";

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: NoteVerifier,
    pubkey: PathBuf,
    signer: NoteSigner,
}

/// 105 entries, batches of 10, a checkpoint after every 20 entries
/// (checkpoint sizes 0, 20, 40, 60, 80, 100), 5 entries unsigned at the end.
fn build(segment_target: Option<u64>) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let (mut w, _shared, _) = LogWriter::open(&dir, ORIGIN, signer.clone()).unwrap();
    if let Some(t) = segment_target {
        w.set_segment_target(t);
    }
    w.checkpoint(false).unwrap();
    let findings: Vec<_> = (1..=105).map(common::finding).collect();
    for b in 0..11u64 {
        let lo = b * 10;
        let hi = (lo + 10).min(105);
        let recs: Vec<_> = (lo..hi)
            .map(|i| ("pep-0", i + 1, &findings[i as usize]))
            .collect();
        w.append_batch(recs).unwrap();
        if hi % 20 == 0 && hi <= 100 {
            w.checkpoint(false).unwrap();
        }
    }
    drop(w);
    let pubkey = tmp.path().join("audit.pub");
    std::fs::write(&pubkey, signer.verifier().to_vkey()).unwrap();
    Fixture {
        key: signer.verifier(),
        _tmp: tmp,
        dir,
        pubkey,
        signer,
    }
}

fn seg_paths(dir: &Path) -> Vec<(u64, PathBuf)> {
    storage::list_segments(dir).unwrap()
}

/// (first byte, end byte, index) of every frame of a segment.
fn frames(bytes: &[u8], first: u64) -> Vec<(usize, usize, u64)> {
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    let mut i = first;
    while let Some((_, next)) = storage::next_frame(bytes, pos).unwrap() {
        out.push((pos, next, i));
        pos = next;
        i += 1;
    }
    out
}

fn err_index(f: &Fixture, trusted: Option<&str>) -> (u64, VerifyErrorKind) {
    let e = verify_dir(&f.dir, &f.key, trusted).expect_err("tampering not detected");
    (e.index, e.kind)
}

fn notes(dir: &Path) -> Vec<String> {
    let b = std::fs::read(dir.join(storage::CHECKPOINTS_FILE)).unwrap();
    let (n, bad) = storage::parse_checkpoint_file(&b);
    assert!(bad.is_none());
    n.into_iter().map(|x| x.1).collect()
}

fn write_notes(dir: &Path, notes: &[String]) {
    let mut out = storage::CHECKPOINTS_MAGIC.to_vec();
    for n in notes {
        out.extend_from_slice(&(n.len() as u32).to_be_bytes());
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(&crc32fast::hash(n.as_bytes()).to_be_bytes());
    }
    std::fs::write(dir.join(storage::CHECKPOINTS_FILE), out).unwrap();
}

#[test]
fn clean_log_verifies_lib_and_cli() {
    let f = build(None);
    let s = verify_dir(&f.dir, &f.key, None).unwrap();
    assert_eq!(
        (s.entries, s.checkpoints, s.last_checkpoint_size),
        (105, 6, 100)
    );
    let (code, out) = common::verify_cli(&f.dir, &f.pubkey, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("OK entries=105 checkpoints=6 root="),
        "{out}"
    );
    assert!(out.contains(&hex::encode(s.root)));
    let (code, out) = common::verify_cli(&f.dir, &f.pubkey, &["--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["entries"], 105);
    assert_eq!(v["checkpoints"], 6);
    // A trusted checkpoint that the log extends.
    let trusted = &notes(&f.dir)[3];
    let s = verify_dir(&f.dir, &f.key, Some(trusted)).unwrap();
    assert_eq!(s.trusted_checkpoint_size, Some(60));
}

#[test]
fn modified_byte_anywhere_in_segments_names_its_entry() {
    let f = build(Some(4096));
    let segs = seg_paths(&f.dir);
    assert!(
        segs.len() >= 3,
        "rotation expected, got {} segments",
        segs.len()
    );
    let mut cases = 0;
    for (first, path) in &segs {
        let clean = std::fs::read(path).unwrap();
        let fr = frames(&clean, *first);
        // Every 11th byte plus every header byte.
        let positions: Vec<usize> = (0..SEGMENT_HEADER_LEN)
            .chain((SEGMENT_HEADER_LEN..clean.len()).step_by(11))
            .collect();
        for pos in positions {
            let expected = if pos < SEGMENT_HEADER_LEN {
                *first
            } else {
                fr.iter().find(|(a, b, _)| *a <= pos && pos < *b).unwrap().2
            };
            let mut bad = clean.clone();
            bad[pos] ^= 0x20;
            std::fs::write(path, &bad).unwrap();
            let (idx, kind) = err_index(&f, None);
            assert_eq!(idx, expected, "byte {pos} of segment {first}: {kind:?}");
            cases += 1;
        }
        std::fs::write(path, &clean).unwrap();
    }
    assert!(cases > 1500, "{cases}");
    verify_dir(&f.dir, &f.key, None).unwrap();
}

#[test]
fn modified_byte_in_checkpoint_file_is_detected() {
    let f = build(None);
    let path = f.dir.join(storage::CHECKPOINTS_FILE);
    let clean = std::fs::read(&path).unwrap();
    let sizes = [0u64, 20, 40, 60, 80, 100];
    // Frame boundaries of the notes.
    let (ns, _) = storage::parse_checkpoint_file(&clean);
    let starts: Vec<usize> = ns.iter().map(|n| n.0).collect();
    for pos in (0..clean.len()).step_by(3) {
        let mut bad = clean.clone();
        bad[pos] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let (idx, kind) = err_index(&f, None);
        let note = starts.iter().rposition(|s| *s <= pos);
        let expected = match note {
            None | Some(0) => 0,
            Some(k) => sizes[k - 1],
        };
        assert_eq!(idx, expected, "byte {pos}: {kind:?}");
    }
    std::fs::write(&path, &clean).unwrap();
}

#[test]
fn deleted_entry_is_named() {
    let f = build(None);
    let (first, path) = seg_paths(&f.dir).remove(0);
    let b = std::fs::read(&path).unwrap();
    let fr = frames(&b, first);
    let (s, e, _) = fr[50];
    let mut out = b[..s].to_vec();
    out.extend_from_slice(&b[e..]);
    std::fs::write(&path, out).unwrap();
    let (idx, kind) = err_index(&f, None);
    assert_eq!(idx, 50);
    assert_eq!(kind, VerifyErrorKind::IndexMismatch { found: 51 });
    let (code, out) = common::verify_cli(&f.dir, &f.pubkey, &[]);
    assert_eq!(code, 1);
    assert!(out.starts_with("FAIL first bad index 50:"), "{out}");
}

#[test]
fn reordered_entries_are_named() {
    let f = build(None);
    let (first, path) = seg_paths(&f.dir).remove(0);
    let b = std::fs::read(&path).unwrap();
    let fr = frames(&b, first);
    let (s30, e30, _) = fr[30];
    let (s31, e31, _) = fr[31];
    let mut out = b[..s30].to_vec();
    out.extend_from_slice(&b[s31..e31]);
    out.extend_from_slice(&b[s30..e30]);
    out.extend_from_slice(&b[e31..]);
    std::fs::write(&path, out).unwrap();
    let (idx, kind) = err_index(&f, None);
    assert_eq!(idx, 30);
    assert_eq!(kind, VerifyErrorKind::IndexMismatch { found: 31 });
}

#[test]
fn deleted_segment_file_is_named() {
    let f = build(Some(4096));
    let segs = seg_paths(&f.dir);
    let (first, path) = &segs[1];
    std::fs::remove_file(path).unwrap();
    let (idx, kind) = err_index(&f, None);
    assert_eq!(idx, *first, "{kind:?}");
    assert!(matches!(kind, VerifyErrorKind::SegmentLayout(_)));
}

#[test]
fn truncated_tail_vs_last_checkpoint() {
    let f = build(None);
    let (first, path) = seg_paths(&f.dir).remove(0);
    let b = std::fs::read(&path).unwrap();
    let fr = frames(&b, first);
    // At a frame boundary: 90 entries left, checkpoint #5 covers 100.
    std::fs::write(&path, &b[..fr[90].0]).unwrap();
    let (idx, kind) = err_index(&f, None);
    assert_eq!(idx, 90);
    assert_eq!(
        kind,
        VerifyErrorKind::Truncated {
            checkpoint: CheckpointRef::Stored(5),
            size: 100
        }
    );
    let (code, out) = common::verify_cli(&f.dir, &f.pubkey, &[]);
    assert_eq!(code, 1);
    assert!(out.starts_with("FAIL first bad index 90:"), "{out}");
    // Inside a frame: torn entry 90.
    std::fs::write(&path, &b[..fr[90].0 + 10]).unwrap();
    let (idx, kind) = err_index(&f, None);
    assert_eq!(idx, 90);
    assert!(matches!(kind, VerifyErrorKind::Frame(_)), "{kind:?}");
}

#[test]
fn truncated_tail_vs_trusted_checkpoint() {
    let f = build(None);
    let trusted = notes(&f.dir)[5].clone(); // size 100, saved by an auditor
    // The attacker cuts the log to 80 entries AND drops the later checkpoints.
    let (first, path) = seg_paths(&f.dir).remove(0);
    let b = std::fs::read(&path).unwrap();
    let fr = frames(&b, first);
    std::fs::write(&path, &b[..fr[80].0]).unwrap();
    let ns = notes(&f.dir);
    write_notes(&f.dir, &ns[..5]);
    // Internally consistent: passes without the trusted checkpoint...
    let s = verify_dir(&f.dir, &f.key, None).unwrap();
    assert_eq!(s.entries, 80);
    // ...but not against it.
    let (idx, kind) = err_index(&f, Some(&trusted));
    assert_eq!(idx, 80);
    assert_eq!(
        kind,
        VerifyErrorKind::Truncated {
            checkpoint: CheckpointRef::Trusted,
            size: 100
        }
    );
    let cp_file = f.dir.join("trusted.note");
    std::fs::write(&cp_file, &trusted).unwrap();
    let (code, out) = common::verify_cli(
        &f.dir,
        &f.pubkey,
        &["--checkpoint", cp_file.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(out.starts_with("FAIL first bad index 80:"), "{out}");
}

#[test]
fn trusted_checkpoint_of_another_history_is_rejected() {
    let f = build(None);
    let cp = Checkpoint {
        origin: ORIGIN.into(),
        size: 60,
        root: [0x42; 32],
        time_unix_nanos: 1,
    };
    let note = cp.sign(&f.signer);
    let (idx, kind) = err_index(&f, Some(&note));
    assert_eq!(
        kind,
        VerifyErrorKind::CheckpointRootMismatch {
            checkpoint: CheckpointRef::Trusted
        }
    );
    // Checkpoints 0..=40 vouch for entries before 40.
    assert_eq!(idx, 40);
    // A trusted checkpoint signed by another key is refused outright.
    let other = NoteSigner::generate(ORIGIN).unwrap();
    let (_, kind) = err_index(&f, Some(&cp.sign(&other)));
    assert!(matches!(
        kind,
        VerifyErrorKind::CheckpointSignature {
            checkpoint: CheckpointRef::Trusted,
            ..
        }
    ));
}

#[test]
fn forged_checkpoint_signature_is_named() {
    let f = build(None);
    let mut ns = notes(&f.dir);
    // Checkpoint #3 (size 60): claim a different root, keep the signature.
    let lines: Vec<&str> = ns[3].split('\n').collect();
    let forged_root = base64_of(&[7u8; 32]);
    let forged = ns[3].replace(lines[2], &forged_root);
    assert_ne!(forged, ns[3]);
    ns[3] = forged;
    write_notes(&f.dir, &ns);
    let (idx, kind) = err_index(&f, None);
    assert_eq!(idx, 40, "{kind:?}");
    assert!(matches!(
        kind,
        VerifyErrorKind::CheckpointSignature {
            checkpoint: CheckpointRef::Stored(3),
            ..
        }
    ));
    let (code, out) = common::verify_cli(&f.dir, &f.pubkey, &[]);
    assert_eq!(code, 1);
    assert!(out.starts_with("FAIL first bad index 40:"), "{out}");
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn foreign_key_checkpoint_is_named() {
    let f = build(None);
    let mut ns = notes(&f.dir);
    let cp = Checkpoint::open(&ns[4], &f.key).unwrap();
    // Same name, different key: a correct-looking checkpoint by an impostor.
    let impostor = NoteSigner::generate(ORIGIN).unwrap();
    ns[4] = cp.sign(&impostor);
    write_notes(&f.dir, &ns);
    let (idx, kind) = err_index(&f, None);
    assert_eq!(idx, 60, "{kind:?}");
    assert!(matches!(
        kind,
        VerifyErrorKind::CheckpointSignature {
            checkpoint: CheckpointRef::Stored(4),
            ..
        }
    ));
}

#[test]
fn rewritten_history_with_valid_crcs_and_chain_is_caught_by_checkpoint() {
    // A careful attacker edits entry 70 and recomputes CRCs and the whole
    // chain after it: only the signed checkpoints can catch this.
    let f = build(None);
    let (first, path) = seg_paths(&f.dir).remove(0);
    let b = std::fs::read(&path).unwrap();
    let fr = frames(&b, first);
    let mut out = b[..fr[70].0].to_vec();
    let mut prev =
        secureops_audit::merkle::leaf_hash(storage::next_frame(&b, fr[69].0).unwrap().unwrap().0);
    for (s, _, _) in &fr[70..] {
        let (entry, _) = storage::next_frame(&b, *s).unwrap().unwrap();
        let mut e = secureops_audit::encoding::decode_entry(entry).unwrap();
        if e.index == 70 {
            e.finding.host = "innocent.example.com".into();
        }
        let mut enc = Vec::new();
        secureops_audit::encoding::encode_entry(
            &mut enc,
            e.index,
            e.log_time_unix_nanos,
            &e.source_id,
            e.source_seq,
            &e.finding,
            &prev,
        );
        prev = secureops_audit::merkle::leaf_hash(&enc);
        out.extend_from_slice(&(enc.len() as u32).to_be_bytes());
        out.extend_from_slice(&enc);
        out.extend_from_slice(&crc32fast::hash(&enc).to_be_bytes());
    }
    std::fs::write(&path, out).unwrap();
    let (idx, kind) = err_index(&f, None);
    assert_eq!(
        kind,
        VerifyErrorKind::CheckpointRootMismatch {
            checkpoint: CheckpointRef::Stored(4)
        }
    );
    // Checkpoint #3 (size 60) still vouches for 0..60; 60.. is unproven.
    assert_eq!(idx, 60);
}

#[test]
fn large_log_parallel_verification_names_the_damaged_entry() {
    // Over the verifier's parallel threshold, so the multi-threaded path runs.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let (mut w, _shared, _) = LogWriter::open(&dir, ORIGIN, signer.clone()).unwrap();
    let findings: Vec<_> = (1..=1000).map(common::finding).collect();
    for b in 0..10u64 {
        let recs: Vec<_> = (0..1000u64)
            .map(|i| ("pep-0", b * 1000 + i + 1, &findings[i as usize]))
            .collect();
        w.append_batch(recs).unwrap();
    }
    w.checkpoint(false).unwrap();
    drop(w);
    let key = signer.verifier();
    assert_eq!(verify_dir(&dir, &key, None).unwrap().entries, 10_000);
    let (first, path) = seg_paths(&dir).remove(0);
    let clean = std::fs::read(&path).unwrap();
    let fr = frames(&clean, first);
    for target in [0usize, 4095, 7777, 9999] {
        let mut bad = clean.clone();
        bad[fr[target].0 + 20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = verify_dir(&dir, &key, None).unwrap_err();
        assert_eq!(e.index, target as u64, "{e}");
    }
}
