//! # secureops-audit: a signed, verifiable, lossless audit log
//!
//! One entry per egress decision (DESIGN.md §7). The log is a hash chain and
//! an RFC 6962 Merkle tree over canonical entries, with Ed25519-signed C2SP
//! `tlog-checkpoint` notes, stored in append-only segment files. This page
//! specifies everything a third party needs to write a verifier.
//!
//! ## Entries
//!
//! Canonical encoding (all integers big-endian, fixed width; strings are a
//! `u32` byte length followed by UTF-8; bools one byte 0/1; enums their `i32`
//! protobuf number; every field always present, nothing else):
//!
//! ```text
//! entry  = u8 version (=1) ‖ u64 index ‖ u64 log_time_unix_nanos ‖ record ‖ prev_hash[32]
//! record = str source_id ‖ u64 source_seq ‖ finding
//! finding = i64 timestamp_unix_nanos ‖ str pep_kind ‖ str pep_id ‖ str workload_id
//!         ‖ u32 pid ‖ u64 process_start_time ‖ str exe ‖ u32 uid ‖ str host
//!         ‖ i32 host_source ‖ u32 port ‖ str dialled_ip ‖ i32 transport
//!         ‖ i32 decision ‖ str reason ‖ str rule_id ‖ u64 policy_version
//!         ‖ str fail_closed_cause ‖ str escalation_id ‖ str request_id
//!         ‖ bool would_deny ‖ str fail_mode ‖ str trace_id ‖ str detail
//! ```
//!
//! (the `AuditFinding` fields in protobuf field-number order). `index` is
//! the entry's position (0-based, consecutive); `log_time_unix_nanos` is the
//! sequencer's clock, non-decreasing along the log; `prev_hash` is the chain
//! hash of entry `index-1`, or 32 zero bytes for entry 0.
//!
//! **Chain hash = Merkle leaf hash** = `SHA-256(0x00 ‖ entry)`. Interior
//! nodes are `SHA-256(0x01 ‖ left ‖ right)`; the tree is the RFC 6962 MTH
//! over the leaf hashes in index order (empty tree: `SHA-256("")`).
//!
//! ## Files in the data directory
//!
//! ```text
//! segments/<first index, 20 decimal digits>.seg   entries, in index order
//! checkpoints                                      every signed checkpoint, in signing order
//! checkpoint                                       the latest note (plain text copy)
//! audit.key, audit.key.pub                         default key location (see below)
//! ```
//!
//! A segment is `"SOAUDSG1" ‖ u64 first_index` followed by frames
//! `u32 len ‖ entry ‖ u32 crc32(entry)` (CRC-32/ISO-HDLC, as zlib). The CRC
//! localises accidental or single-byte damage; the chain and the signed
//! checkpoints detect deliberate damage. Segments are contiguous: each starts
//! at the index after the previous one's last entry; a new one is begun once
//! the current one exceeds 64 MiB.
//!
//! The checkpoints file is `"SOAUDCP1"` followed by frames
//! `u32 len ‖ note (UTF-8) ‖ u32 crc32(note)`. Each note is a C2SP signed note
//! whose body is a C2SP tlog-checkpoint:
//!
//! ```text
//! <origin>\n<tree size>\n<base64 root>\ntime <unix nanos>\n\n— <key name> <base64(key id ‖ signature)>\n
//! ```
//!
//! Checkpoints have non-decreasing size and time; each is signed only after
//! the entries it covers were `fdatasync`ed, and its time is not earlier than
//! the log time of the last entry it covers. Key formats: see [`note`].
//!
//! ## Writing (the sequencer)
//!
//! Many concurrent `Append` streams feed one writer thread. It gathers a
//! batch (up to `--batch-max` records, waiting at most `--batch-delay-ms`
//! once a batch has begun), deduplicates by `(source_id, source_seq)`,
//! writes all frames with one `write`, calls `fdatasync` once, and only then
//! acks each record (with its index, or the original index and
//! `duplicate=true`). A checkpoint is signed at least every second while
//! entries arrive, and on shutdown.
//!
//! ## Crash recovery
//!
//! On start the whole log is scanned: a torn or invalid tail of the last
//! segment (and of the checkpoints file) is truncated — only bytes that were
//! never acked can be there, since acks follow `fdatasync`. Damage anywhere
//! else, a checkpoint that does not verify with the signing key, or a repair
//! that would cut entries covered by a checkpoint, makes the service refuse
//! to start (fail closed). The dedupe index, Merkle tree and entry offsets
//! are rebuilt from the log during this scan, so they can never disagree
//! with it; the log is the persistent form of the dedupe index.
//!
//! ## Verifying
//!
//! [`verify::verify_dir`] (CLI: `secureops-audit verify` / `secureops audit
//! verify`) checks everything above and names the first bad index.
//! [`client::prove`] / [`client::verify_inclusion_proof`] fetch and check
//! an inclusion proof; [`client::tail`] streams entries;
//! [`client::check_consistency`] checks a saved checkpoint against the live
//! log (RFC 6962 consistency proof).

pub mod client;
pub mod encoding;
pub mod merkle;
pub mod metrics;
pub mod note;
pub mod server;
pub mod storage;
pub mod verify;

pub use client::{
    ProvenEntry, check_consistency, latest_checkpoint, prove, tail, verify_inclusion_proof,
};
pub use note::{Checkpoint, NoteSigner, NoteVerifier};
pub use verify::{Summary, VerifyError, VerifyErrorKind, verify_dir};

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7410";
/// Default log name (checkpoint origin and key name).
pub const DEFAULT_ORIGIN: &str = "secureops.local/audit";
/// Default key file name inside the data directory.
pub const DEFAULT_KEY_FILE: &str = "audit.key";
