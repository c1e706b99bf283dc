//! Canonical, deterministic encoding of audit records and log entries.
//!
//! Protobuf encoding is not canonical (field order, default omission, unknown
//! fields and varint padding may differ between encoders), so the log never
//! stores protobuf bytes. Instead every record is written with the fixed rules
//! below, which make the encoding a bijection: one record has exactly one
//! encoding and the decoder rejects anything else (trailing bytes, invalid
//! UTF-8, a bool other than 0/1, an unknown entry version).
//!
//! * integers: fixed width, big-endian (`u32`, `u64`, `i32`, `i64`; enums are
//!   their `i32` protobuf value);
//! * `bool`: one byte, `0x00` or `0x01`;
//! * string: `u32` byte length, then the UTF-8 bytes;
//! * fields in the order listed in [`encode_record`], all present (defaults
//!   included), nothing else.
//!
//! An *entry* (what is hashed and chained) is
//!
//! ```text
//! entry = u8 version (=1) ‖ u64 index ‖ u64 log_time_unix_nanos ‖ record ‖ prev_hash[32]
//! ```
//!
//! where `index` is the entry's position in the log, `log_time_unix_nanos` is
//! the sequencer's clock (non-decreasing along the log) and `prev_hash` is the
//! chain hash of the previous entry (32 zero bytes for entry 0). The chain hash
//! of an entry is its RFC 6962 leaf hash `SHA-256(0x00 ‖ entry)`, so the chain
//! and the Merkle tree share one hash per entry.

use secureops_proto::v1::{AuditFinding, AuditRecord};

/// Entry format version written by this crate.
pub const ENTRY_VERSION: u8 = 1;
/// Length of a SHA-256 hash.
pub const HASH_LEN: usize = 32;
/// A SHA-256 hash.
pub type Hash = [u8; HASH_LEN];

/// Limits enforced on appended records; a record exceeding one is rejected
/// with a per-record error (an agent must not be able to bloat the log).
pub mod limits {
    /// `source_id` length in bytes.
    pub const SOURCE_ID: usize = 128;
    /// `detail` length in bytes.
    pub const DETAIL: usize = 4096;
    /// `exe` length in bytes.
    pub const EXE: usize = 4096;
    /// Every other string field, in bytes.
    pub const STRING: usize = 1024;
    /// Whole encoded entry, in bytes (also bounds what a reader accepts).
    pub const ENTRY: usize = 64 * 1024;
}

/// Why bytes are not a canonical entry / a record is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    /// The input ended inside a field.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// Bytes follow the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A string is not UTF-8.
    #[error("invalid UTF-8 in field {0}")]
    Utf8(&'static str),
    /// A bool byte is not 0 or 1.
    #[error("invalid bool in field {0}")]
    Bool(&'static str),
    /// Unknown entry version.
    #[error("unknown entry version {0}")]
    Version(u8),
    /// The record is not acceptable for appending.
    #[error("{0}")]
    Invalid(String),
}

/// Checks a record before it is sequenced. Returns a human-readable reason
/// (sent back in `AppendAck.error`).
pub fn validate_record(r: &AuditRecord) -> Result<(), EncodingError> {
    let bad = |m: String| Err(EncodingError::Invalid(m));
    if r.source_id.is_empty() {
        return bad("malformed record: empty source_id".into());
    }
    if r.source_id.len() > limits::SOURCE_ID {
        return bad(format!(
            "malformed record: source_id longer than {} bytes",
            limits::SOURCE_ID
        ));
    }
    if r.source_seq == 0 {
        return bad("malformed record: source_seq must be >= 1".into());
    }
    let Some(f) = &r.finding else {
        return bad("malformed record: missing finding".into());
    };
    let strings: [(&str, &str, usize); 14] = [
        ("pep_kind", &f.pep_kind, limits::STRING),
        ("pep_id", &f.pep_id, limits::STRING),
        ("workload_id", &f.workload_id, limits::STRING),
        ("exe", &f.exe, limits::EXE),
        ("host", &f.host, limits::STRING),
        ("dialled_ip", &f.dialled_ip, limits::STRING),
        ("reason", &f.reason, limits::STRING),
        ("rule_id", &f.rule_id, limits::STRING),
        ("fail_closed_cause", &f.fail_closed_cause, limits::STRING),
        ("escalation_id", &f.escalation_id, limits::STRING),
        ("request_id", &f.request_id, limits::STRING),
        ("fail_mode", &f.fail_mode, limits::STRING),
        ("trace_id", &f.trace_id, limits::STRING),
        ("detail", &f.detail, limits::DETAIL),
    ];
    for (name, value, max) in strings {
        if value.len() > max {
            return bad(format!(
                "malformed record: field {name} is {} bytes (max {max})",
                value.len()
            ));
        }
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Lengths are bounded by `validate_record` / `limits::ENTRY`, so they fit u32.
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends the canonical encoding of `(source_id, source_seq, finding)`.
///
/// Field order: source_id, source_seq, then the `AuditFinding` fields in
/// protobuf field-number order 1..=24: timestamp_unix_nanos (i64),
/// pep_kind, pep_id, workload_id (str), pid (u32), process_start_time (u64),
/// exe (str), uid (u32), host (str), host_source (i32), port (u32),
/// dialled_ip (str), transport (i32), decision (i32), reason, rule_id (str),
/// policy_version (u64), fail_closed_cause, escalation_id, request_id (str),
/// would_deny (bool), fail_mode, trace_id, detail (str).
pub fn encode_record(out: &mut Vec<u8>, source_id: &str, source_seq: u64, f: &AuditFinding) {
    put_str(out, source_id);
    out.extend_from_slice(&source_seq.to_be_bytes());
    out.extend_from_slice(&f.timestamp_unix_nanos.to_be_bytes());
    put_str(out, &f.pep_kind);
    put_str(out, &f.pep_id);
    put_str(out, &f.workload_id);
    out.extend_from_slice(&f.pid.to_be_bytes());
    out.extend_from_slice(&f.process_start_time.to_be_bytes());
    put_str(out, &f.exe);
    out.extend_from_slice(&f.uid.to_be_bytes());
    put_str(out, &f.host);
    out.extend_from_slice(&f.host_source.to_be_bytes());
    out.extend_from_slice(&f.port.to_be_bytes());
    put_str(out, &f.dialled_ip);
    out.extend_from_slice(&f.transport.to_be_bytes());
    out.extend_from_slice(&f.decision.to_be_bytes());
    put_str(out, &f.reason);
    put_str(out, &f.rule_id);
    out.extend_from_slice(&f.policy_version.to_be_bytes());
    put_str(out, &f.fail_closed_cause);
    put_str(out, &f.escalation_id);
    put_str(out, &f.request_id);
    out.push(u8::from(f.would_deny));
    put_str(out, &f.fail_mode);
    put_str(out, &f.trace_id);
    put_str(out, &f.detail);
}

/// Appends a whole canonical entry (see the module docs).
pub fn encode_entry(
    out: &mut Vec<u8>,
    index: u64,
    log_time_unix_nanos: u64,
    source_id: &str,
    source_seq: u64,
    finding: &AuditFinding,
    prev_hash: &Hash,
) {
    out.push(ENTRY_VERSION);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&log_time_unix_nanos.to_be_bytes());
    encode_record(out, source_id, source_seq, finding);
    out.extend_from_slice(prev_hash);
}

/// A decoded entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Position in the log.
    pub index: u64,
    /// Sequencer time, nanoseconds since the Unix epoch.
    pub log_time_unix_nanos: u64,
    /// Producing source.
    pub source_id: String,
    /// Per-source sequence number.
    pub source_seq: u64,
    /// The record.
    pub finding: AuditFinding,
    /// Chain hash of the previous entry.
    pub prev_hash: Hash,
}

/// Fixed-size header fields of an entry, read without decoding the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    /// Position in the log.
    pub index: u64,
    /// Sequencer time.
    pub log_time_unix_nanos: u64,
    /// Chain hash of the previous entry.
    pub prev_hash: Hash,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EncodingError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(EncodingError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], EncodingError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, EncodingError> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    fn i32(&mut self) -> Result<i32, EncodingError> {
        Ok(i32::from_be_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, EncodingError> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    fn i64(&mut self) -> Result<i64, EncodingError> {
        Ok(i64::from_be_bytes(self.arr()?))
    }
    fn bool(&mut self, name: &'static str) -> Result<bool, EncodingError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(EncodingError::Bool(name)),
        }
    }
    fn str_bytes(&mut self, name: &'static str) -> Result<&'a [u8], EncodingError> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        std::str::from_utf8(s).map_err(|_| EncodingError::Utf8(name))?;
        Ok(s)
    }
    fn string(&mut self, name: &'static str) -> Result<String, EncodingError> {
        let b = self.str_bytes(name)?;
        // Validated as UTF-8 by str_bytes.
        Ok(String::from_utf8_lossy(b).into_owned())
    }
}

const HEADER_LEN: usize = 1 + 8 + 8;

/// Reads the header fields and checks the version and minimum length.
pub fn entry_header(entry: &[u8]) -> Result<EntryHeader, EncodingError> {
    if entry.len() < HEADER_LEN + HASH_LEN {
        return Err(EncodingError::Truncated(entry.len()));
    }
    if entry[0] != ENTRY_VERSION {
        return Err(EncodingError::Version(entry[0]));
    }
    let mut r = Reader { buf: entry, pos: 1 };
    let index = r.u64()?;
    let log_time_unix_nanos = r.u64()?;
    let mut prev_hash = [0u8; HASH_LEN];
    prev_hash.copy_from_slice(&entry[entry.len() - HASH_LEN..]);
    Ok(EntryHeader {
        index,
        log_time_unix_nanos,
        prev_hash,
    })
}

/// Checks that `entry` is exactly one canonical entry, without allocating.
pub fn check_entry(entry: &[u8]) -> Result<EntryHeader, EncodingError> {
    let h = entry_header(entry)?;
    let body = &entry[..entry.len() - HASH_LEN];
    let mut r = Reader {
        buf: body,
        pos: HEADER_LEN,
    };
    r.str_bytes("source_id")?;
    r.take(8 + 8)?;
    for name in ["pep_kind", "pep_id", "workload_id"] {
        r.str_bytes(name)?;
    }
    r.take(4 + 8)?;
    r.str_bytes("exe")?;
    r.take(4)?;
    r.str_bytes("host")?;
    r.take(4 + 4)?;
    r.str_bytes("dialled_ip")?;
    r.take(4 + 4)?;
    r.str_bytes("reason")?;
    r.str_bytes("rule_id")?;
    r.take(8)?;
    for name in ["fail_closed_cause", "escalation_id", "request_id"] {
        r.str_bytes(name)?;
    }
    r.bool("would_deny")?;
    for name in ["fail_mode", "trace_id", "detail"] {
        r.str_bytes(name)?;
    }
    if r.pos != body.len() {
        return Err(EncodingError::Trailing(body.len() - r.pos));
    }
    Ok(h)
}

/// Decodes one canonical entry.
pub fn decode_entry(entry: &[u8]) -> Result<Entry, EncodingError> {
    let h = entry_header(entry)?;
    let body = &entry[..entry.len() - HASH_LEN];
    let mut r = Reader {
        buf: body,
        pos: HEADER_LEN,
    };
    let source_id = r.string("source_id")?;
    let source_seq = r.u64()?;
    let finding = AuditFinding {
        timestamp_unix_nanos: r.i64()?,
        pep_kind: r.string("pep_kind")?,
        pep_id: r.string("pep_id")?,
        workload_id: r.string("workload_id")?,
        pid: r.u32()?,
        process_start_time: r.u64()?,
        exe: r.string("exe")?,
        uid: r.u32()?,
        host: r.string("host")?,
        host_source: r.i32()?,
        port: r.u32()?,
        dialled_ip: r.string("dialled_ip")?,
        transport: r.i32()?,
        decision: r.i32()?,
        reason: r.string("reason")?,
        rule_id: r.string("rule_id")?,
        policy_version: r.u64()?,
        fail_closed_cause: r.string("fail_closed_cause")?,
        escalation_id: r.string("escalation_id")?,
        request_id: r.string("request_id")?,
        would_deny: r.bool("would_deny")?,
        fail_mode: r.string("fail_mode")?,
        trace_id: r.string("trace_id")?,
        detail: r.string("detail")?,
    };
    if r.pos != body.len() {
        return Err(EncodingError::Trailing(body.len() - r.pos));
    }
    Ok(Entry {
        index: h.index,
        log_time_unix_nanos: h.log_time_unix_nanos,
        source_id,
        source_seq,
        finding,
        prev_hash: h.prev_hash,
    })
}

/// Just the `(source_id, source_seq)` of an entry (used to rebuild the dedupe
/// index without decoding whole records).
pub fn entry_source(entry: &[u8]) -> Result<(&str, u64), EncodingError> {
    let mut r = Reader {
        buf: entry,
        pos: HEADER_LEN,
    };
    let sid = r.str_bytes("source_id")?;
    let seq = r.u64()?;
    let sid = std::str::from_utf8(sid).map_err(|_| EncodingError::Utf8("source_id"))?;
    Ok((sid, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding() -> AuditFinding {
        AuditFinding {
            timestamp_unix_nanos: -5,
            pep_kind: "proxy".into(),
            pid: 42,
            host: "evil.example".into(),
            would_deny: true,
            detail: "ü".into(),
            ..Default::default()
        }
    }

    #[test]
    fn roundtrip_and_canonical() {
        let f = finding();
        let mut b = Vec::new();
        encode_entry(&mut b, 7, 99, "pep-1", 3, &f, &[9u8; 32]);
        let e = decode_entry(&b).unwrap();
        assert_eq!(e.finding, f);
        assert_eq!((e.index, e.log_time_unix_nanos, e.source_seq), (7, 99, 3));
        assert_eq!(e.source_id, "pep-1");
        assert_eq!(e.prev_hash, [9u8; 32]);
        check_entry(&b).unwrap();
        assert_eq!(entry_source(&b).unwrap(), ("pep-1", 3));
        // Re-encoding the decoded entry gives the same bytes.
        let mut b2 = Vec::new();
        encode_entry(&mut b2, 7, 99, &e.source_id, 3, &e.finding, &e.prev_hash);
        assert_eq!(b, b2);
    }

    #[test]
    fn rejects_non_canonical() {
        let mut b = Vec::new();
        encode_entry(&mut b, 0, 0, "s", 1, &finding(), &[0u8; 32]);
        let mut extra = b.clone();
        extra.insert(extra.len() - 32, 0);
        assert!(matches!(
            check_entry(&extra),
            Err(EncodingError::Trailing(1))
        ));
        assert!(decode_entry(&extra).is_err());
        let mut v = b.clone();
        v[0] = 2;
        assert_eq!(check_entry(&v), Err(EncodingError::Version(2)));
        assert!(check_entry(&b[..b.len() - 40]).is_err());
    }

    #[test]
    fn validation() {
        let ok = AuditRecord {
            source_id: "a".into(),
            source_seq: 1,
            finding: Some(finding()),
            trace_parent: String::new(),
        };
        assert!(validate_record(&ok).is_ok());
        let mut r = ok.clone();
        r.finding = None;
        assert!(validate_record(&r).is_err());
        let mut r = ok.clone();
        r.source_seq = 0;
        assert!(validate_record(&r).is_err());
        let mut r = ok.clone();
        r.source_id.clear();
        assert!(validate_record(&r).is_err());
        let mut r = ok;
        if let Some(f) = r.finding.as_mut() {
            f.detail = "x".repeat(limits::DETAIL + 1);
        }
        assert!(validate_record(&r).is_err());
    }
}
