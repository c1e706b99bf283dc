//! Hand-written DNS wire handling for the UDP fast path.
//!
//! The fast path answers the common case — one standard query, one
//! uncompressed question, at most one plain EDNS OPT record — without
//! building hickory `Request` / `MessageResponse` objects. Anything else
//! ([`ParseError::Slow`]) is handed to the hickory path, which stays the
//! reference implementation: FORMERR / NOTIMP / REFUSED / BADVERS, IDNA
//! names, invalid names, truncation. The rule for this module is therefore
//! "accept only what is certainly plain, and answer it exactly like the
//! hickory path would"; `tests` (and `fastpath::tests`) check that both
//! paths agree.
//!
//! Every read is bounds-checked (`get`), so malformed input can only ever
//! produce `Drop` or `Slow`, never a panic.

use crate::sinkhole::SinkholeAnswer;

/// Longest wire name (RFC 1035 §2.3.4).
pub const MAX_WIRE_NAME: usize = 255;
/// Longest normalised host name (what `normalize_query_name` accepts).
pub const MAX_HOST: usize = 253;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// Why a datagram is not answered by the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header or a response (QR=1): never answered.
    Drop,
    /// Anything unusual: the hickory path decides and answers.
    Slow,
}

/// The EDNS part of a query the fast path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdnsInfo {
    pub payload: u16,
    pub dnssec_ok: bool,
}

/// A parsed, plain query. Holds a copy of its question (≤ 259 bytes), so it
/// can outlive the receive buffer.
#[derive(Clone)]
pub struct Query {
    pub id: u16,
    pub rd: bool,
    pub cd: bool,
    pub ad: bool,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<EdnsInfo>,
    /// Wire question: name, type, class (the client's case preserved).
    question: [u8; MAX_WIRE_NAME + 4],
    question_len: u16,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("id", &self.id)
            .field("qtype", &self.qtype)
            .field("question", &self.question())
            .field("edns", &self.edns)
            .finish()
    }
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(i)?,
        *b.get(i + 1)?,
        *b.get(i + 2)?,
        *b.get(i + 3)?,
    ]))
}

/// Span of an uncompressed wire name starting at `start` (labels + the
/// terminating zero), or `None` when it is compressed, uses a reserved label
/// type, is longer than 255 bytes or runs past the end.
pub(crate) fn plain_name_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    loop {
        let len = usize::from(*b.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        i += 1 + len;
        if i - start > MAX_WIRE_NAME {
            return None;
        }
    }
    (i - start <= MAX_WIRE_NAME && i <= b.len()).then_some(i)
}

/// Parse `raw` as a plain query. See the module documentation for what is
/// plain; everything else is [`ParseError::Slow`] (or `Drop`).
pub fn parse_query(raw: &[u8]) -> Result<Query, ParseError> {
    use ParseError::{Drop, Slow};
    if raw.len() < 12 || raw[2] & 0x80 != 0 {
        return Err(Drop);
    }
    let (f1, f2) = (raw[2], raw[3]);
    // opcode QUERY, AA=0, TC=0; Z=0; no rcode in a query.
    if f1 & 0x7E != 0 || f2 & 0x4F != 0 {
        return Err(Slow);
    }
    let qd = u16_at(raw, 4).ok_or(Slow)?;
    let an = u16_at(raw, 6).ok_or(Slow)?;
    let ns = u16_at(raw, 8).ok_or(Slow)?;
    let ar = u16_at(raw, 10).ok_or(Slow)?;
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return Err(Slow);
    }
    let name_end = plain_name_end(raw, 12).ok_or(Slow)?;
    if name_end == 13 {
        return Err(Slow); // the root name is not a host name
    }
    let qtype = u16_at(raw, name_end).ok_or(Slow)?;
    let qclass = u16_at(raw, name_end + 2).ok_or(Slow)?;
    if qclass != CLASS_IN || matches!(qtype, 0 | TYPE_OPT | 251 | 252 | 255) {
        return Err(Slow);
    }
    let q_end = name_end + 4;
    let mut edns = None;
    let mut end = q_end;
    if ar == 1 {
        // Exactly one OPT: root owner, version 0, well-formed options of
        // kinds hickory keeps as opaque bytes (they are not echoed).
        if raw.get(end) != Some(&0) || u16_at(raw, end + 1) != Some(TYPE_OPT) {
            return Err(Slow);
        }
        let payload = u16_at(raw, end + 3).ok_or(Slow)?;
        let ttl = u32_at(raw, end + 5).ok_or(Slow)?;
        let rdlen = usize::from(u16_at(raw, end + 9).ok_or(Slow)?);
        let rdata = raw.get(end + 11..end + 11 + rdlen).ok_or(Slow)?;
        if (ttl >> 16) & 0xFF != 0 {
            return Err(Slow); // version > 0: BADVERS from the slow path
        }
        let mut i = 0;
        while i < rdata.len() {
            let code = u16_at(rdata, i).ok_or(Slow)?;
            let len = usize::from(u16_at(rdata, i + 2).ok_or(Slow)?);
            // NSID, DAU, client subnet are parsed (and may be refused) by
            // hickory; keep those on the slow path.
            if matches!(code, 3 | 5 | 8) || i + 4 + len > rdata.len() {
                return Err(Slow);
            }
            i += 4 + len;
        }
        edns = Some(EdnsInfo {
            payload,
            dnssec_ok: ttl & 0x8000 != 0,
        });
        end += 11 + rdlen;
    }
    if end != raw.len() {
        return Err(Slow); // trailing bytes
    }
    let mut question = [0u8; MAX_WIRE_NAME + 4];
    let qlen = q_end - 12;
    question[..qlen].copy_from_slice(&raw[12..q_end]);
    Ok(Query {
        id: u16::from_be_bytes([raw[0], raw[1]]),
        rd: f1 & 0x01 != 0,
        cd: f2 & 0x10 != 0,
        ad: f2 & 0x20 != 0,
        qtype,
        qclass,
        edns,
        question,
        question_len: qlen as u16,
    })
}

impl Query {
    /// Wire question (name, type, class) as the client sent it.
    pub fn question(&self) -> &[u8] {
        &self.question[..usize::from(self.question_len)]
    }

    /// Wire name of the question.
    pub fn qname(&self) -> &[u8] {
        &self.question[..usize::from(self.question_len) - 4]
    }

    /// UDP payload the client accepts (512 without EDNS, capped at 4096).
    pub fn udp_limit(&self) -> usize {
        usize::from(self.edns.map_or(512, |e| e.payload.clamp(512, 4096)))
    }

    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }

    /// The normalised host name (as `normalize_query_name` would produce
    /// it) appended to `out`, or `false` when the name needs the full
    /// normaliser (IDNA, punycode, odd bytes, IP spellings, > 253 bytes):
    /// the caller then takes the slow path.
    pub fn normalized_name(&self, out: &mut String) -> bool {
        let name = self.qname();
        let start = out.len();
        let mut i = 0;
        let mut last = 0..0;
        while let Some(&len) = name.get(i) {
            let len = usize::from(len);
            if len == 0 {
                break;
            }
            let Some(label) = name.get(i + 1..i + 1 + len) else {
                return false;
            };
            if label.len() >= 4 && label[..4].eq_ignore_ascii_case(b"xn--") {
                return false;
            }
            if out.len() > start {
                out.push('.');
            }
            let lstart = out.len();
            for &b in label {
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                    out.truncate(start);
                    return false;
                }
                out.push(char::from(b.to_ascii_lowercase()));
            }
            last = lstart..out.len();
            i += 1 + len;
        }
        let host_len = out.len() - start;
        if host_len == 0
            || host_len > MAX_HOST
            || secureops_pep::is_ip_spelling(&out.as_bytes()[last])
        {
            out.truncate(start);
            return false;
        }
        true
    }

    /// Rebuild an equivalent query message (header, question, OPT without
    /// options) for the hickory path. Options are never echoed by either
    /// path, so dropping them changes no answer.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.question().len() + 11);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.push(u8::from(self.rd));
        out.push((u8::from(self.ad) << 5) | (u8::from(self.cd) << 4));
        out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(self.edns.is_some())]);
        out.extend_from_slice(self.question());
        if let Some(e) = self.edns {
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&e.payload.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(if e.dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        out
    }
}

/// Header + echoed question of a response to `q` (counts: 1 question,
/// `an`/`ns`/`ar` as given, +1 additional for our OPT when the query had
/// EDNS).
fn write_head(out: &mut Vec<u8>, q: &Query, rcode: u8, ad: bool, an: u16, ns: u16, ar: u16) {
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR=1, opcode QUERY, AA=0, TC=0, RD echoed.
    out.push(0x80 | u8::from(q.rd));
    // RA=1, AD as computed, CD echoed, rcode.
    out.push(0x80 | (u8::from(ad) << 5) | (u8::from(q.cd) << 4) | (rcode & 0x0F));
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&an.to_be_bytes());
    out.extend_from_slice(&ns.to_be_bytes());
    out.extend_from_slice(&(ar + u16::from(q.edns.is_some())).to_be_bytes());
    out.extend_from_slice(q.question());
}

/// Our OPT record (payload `edns_payload`, version 0, the client's DO bit)
/// when the query had EDNS, like the hickory path's `response_edns`.
fn write_opt(out: &mut Vec<u8>, q: &Query, edns_payload: u16) {
    if let Some(e) = q.edns {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&edns_payload.max(512).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(if e.dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
}

/// The sinkholed answer to `q` (see [`SinkholeAnswer`]), appended to `out`.
pub fn sinkhole_response(
    out: &mut Vec<u8>,
    q: &Query,
    answer: SinkholeAnswer,
    ttl: u32,
    edns_payload: u16,
) {
    let (rcode, record): (u8, Option<&[u8]>) = match answer {
        SinkholeAnswer::NxDomain => (3, None),
        SinkholeAnswer::Refused => (5, None),
        SinkholeAnswer::NoData => (0, None),
        SinkholeAnswer::Zero => match q.qtype {
            TYPE_A => (0, Some(&[0u8; 4][..])),
            TYPE_AAAA => (0, Some(&[0u8; 16][..])),
            _ => (0, None),
        },
    };
    write_head(out, q, rcode, false, u16::from(record.is_some()), 0, 0);
    if let Some(rdata) = record {
        out.extend_from_slice(&[0xC0, 12]); // the question's name
        out.extend_from_slice(&q.qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
    }
    write_opt(out, q, edns_payload);
}

/// The answer, authority and additional sections of an upstream answer in
/// wire form, ready to be copied behind a response header + question of the
/// same length (compression pointers into the question stay valid because
/// the question sits at the same offset with the same length).
#[derive(Debug, Clone)]
pub struct WireSections {
    /// Offset of the sections in the upstream message (12 + question).
    base: usize,
    bytes: Box<[u8]>,
    an: u16,
    ns: u16,
    ar: u16,
    /// Offsets (into `bytes`) and original values of every record TTL.
    ttls: Box<[(u32, u32)]>,
}

/// End of a possibly compressed name at `i` (pointers are not followed:
/// only the span in this message is needed).
fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *b.get(i)?;
        match len & 0xC0 {
            0x00 if len == 0 => return Some(i + 1),
            0x00 => i += 1 + usize::from(len),
            0xC0 => {
                b.get(i + 1)?;
                return Some(i + 2);
            }
            _ => return None,
        }
    }
    None
}

impl WireSections {
    /// Split an upstream answer whose question has `question_len` bytes.
    /// `None` when the message does not have the expected shape (then the
    /// hickory path serves it). The upstream's OPT record must be the last
    /// record (it is dropped; we add our own).
    pub fn from_upstream(raw: &[u8], question_len: usize) -> Option<Self> {
        let an = u16_at(raw, 6)?;
        let ns = u16_at(raw, 8)?;
        let ar = u16_at(raw, 10)?;
        if u16_at(raw, 4)? != 1 {
            return None;
        }
        let base = 12 + question_len;
        let qname_end = plain_name_end(raw, 12)?;
        if qname_end + 4 != base || raw.len() < base {
            return None;
        }
        let mut i = base;
        let mut ttls = Vec::new();
        let mut end_without_opt = None;
        let total = usize::from(an) + usize::from(ns) + usize::from(ar);
        let mut ar_kept = ar;
        for k in 0..total {
            let start = i;
            i = skip_name(raw, i)?;
            let rtype = u16_at(raw, i)?;
            let ttl = u32_at(raw, i + 4)?;
            let rdlen = usize::from(u16_at(raw, i + 8)?);
            let ttl_at = i + 4;
            i += 10 + rdlen;
            if i > raw.len() {
                return None;
            }
            if rtype == TYPE_OPT {
                // Only a final OPT in the additional section can be cut.
                if k + 1 != total || k < usize::from(an) + usize::from(ns) {
                    return None;
                }
                end_without_opt = Some(start);
                ar_kept -= 1;
            } else {
                ttls.push((u32::try_from(ttl_at - base).ok()?, ttl));
            }
        }
        let end = end_without_opt.unwrap_or(i);
        Some(WireSections {
            base,
            bytes: raw[base..end].into(),
            an,
            ns,
            ar: ar_kept,
            ttls: ttls.into(),
        })
    }

    /// Wire length of the sections.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A cached answer to `q` appended to `out`: header (rcode, AD), the
/// client's question, the cached sections with TTLs reduced by `age`, our
/// OPT. Returns `false` (and leaves `out` untouched) when it would not fit
/// the client's UDP limit or the question length differs from the cached
/// one: the hickory path then serves it (it truncates properly).
pub fn cached_response(
    out: &mut Vec<u8>,
    q: &Query,
    rcode: u8,
    ad: bool,
    s: &WireSections,
    age: u32,
    edns_payload: u16,
) -> bool {
    let opt = if q.edns.is_some() { 11 } else { 0 };
    if 12 + q.question().len() != s.base || s.base + s.bytes.len() + opt > q.udp_limit() {
        return false;
    }
    let start = out.len();
    write_head(out, q, rcode, ad, s.an, s.ns, s.ar);
    let sec = out.len();
    out.extend_from_slice(&s.bytes);
    if age > 0 {
        for &(at, ttl) in s.ttls.iter() {
            let at = sec + at as usize;
            if let Some(slot) = out.get_mut(at..at + 4) {
                slot.copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
            }
        }
    }
    write_opt(out, q, edns_payload);
    debug_assert_eq!(out.len() - start, s.base + s.bytes.len() + opt);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::normalize_query_name;
    use hickory_proto::op::Message;
    use proptest::prelude::*;

    fn query(name: &[&[u8]], qtype: u16, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name {
            p.push(l.len() as u8);
            p.extend_from_slice(l);
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        if let Some((payload, d)) = edns {
            p[11] = 1;
            p.push(0);
            p.extend_from_slice(&[0, 41]);
            p.extend_from_slice(&payload.to_be_bytes());
            p.extend_from_slice(&[0, 0, if d { 0x80 } else { 0 }, 0, 0, 0]);
        }
        p
    }

    #[test]
    fn plain_query_parses() {
        let q = parse_query(&query(&[b"WWW", b"Example", b"com"], 1, Some((1232, true)))).unwrap();
        assert_eq!(q.id, 0x1234);
        assert!(q.rd);
        assert_eq!(q.qtype, 1);
        assert_eq!(q.udp_limit(), 1232);
        assert!(q.dnssec_ok());
        let mut s = String::new();
        assert!(q.normalized_name(&mut s));
        assert_eq!(s, "www.example.com");
        assert_eq!(parse_query(&q.to_wire()).unwrap().question(), q.question());
    }

    #[test]
    fn unusual_queries_take_the_slow_path() {
        use ParseError::{Drop, Slow};
        let ok = query(&[b"a", b"test"], 1, None);
        assert!(parse_query(&ok).is_ok());
        assert_eq!(parse_query(&ok[..11]).unwrap_err(), Drop);
        assert_eq!(parse_query(&ok[..ok.len() - 1]).unwrap_err(), Slow);
        let mut resp = ok.clone();
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp).unwrap_err(), Drop);
        for (i, v) in [(5, 0u8), (5, 2), (7, 1), (9, 1), (11, 2)] {
            let mut p = ok.clone();
            p[i] = v;
            assert_eq!(parse_query(&p).unwrap_err(), Slow, "count byte {i}={v}");
        }
        let mut upd = ok.clone();
        upd[2] = 0x28;
        assert_eq!(parse_query(&upd).unwrap_err(), Slow);
        // Compression pointer, reserved label type, label overflow.
        let mut ptr = ok[..12].to_vec();
        ptr.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&ptr).unwrap_err(), Slow);
        let mut res = ok[..12].to_vec();
        res.extend_from_slice(&[0x41, b'a', 0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&res).unwrap_err(), Slow);
        let mut over = ok[..12].to_vec();
        over.extend_from_slice(&[40, b'a', b'b']);
        assert_eq!(parse_query(&over).unwrap_err(), Slow);
        let l = [b'a'; 63];
        let long = query(&[&l, &l, &l, &l, &l], 1, None);
        assert_eq!(parse_query(&long).unwrap_err(), Slow);
        // Root name, AXFR, ANY, CH class, trailing bytes, EDNS version 1.
        assert_eq!(parse_query(&query(&[], 1, None)).unwrap_err(), Slow);
        assert_eq!(parse_query(&query(&[b"a"], 252, None)).unwrap_err(), Slow);
        assert_eq!(parse_query(&query(&[b"a"], 255, None)).unwrap_err(), Slow);
        let mut ch = ok.clone();
        let n = ch.len();
        ch[n - 1] = 3;
        assert_eq!(parse_query(&ch).unwrap_err(), Slow);
        let mut trailing = ok.clone();
        trailing.push(0);
        assert_eq!(parse_query(&trailing).unwrap_err(), Slow);
        let mut v1 = query(&[b"a", b"test"], 1, Some((1232, false)));
        let n = v1.len();
        v1[n - 5] = 1;
        assert_eq!(parse_query(&v1).unwrap_err(), Slow);
    }

    #[test]
    fn names_needing_the_full_normaliser_are_refused() {
        for name in [
            &[&b"xn--bcher-kva"[..], b"example"][..],
            &[b"127", b"0", b"0", b"1"],
            &[b"a", b"0x7f"],
            &[b"a b", b"test"],
            &[b"a.b", b"test"],
            &[&[0xC3, 0xBC][..], b"test"],
        ] {
            let q = parse_query(&query(name, 1, None)).unwrap();
            let mut s = String::new();
            assert!(!q.normalized_name(&mut s), "{name:?}");
            assert!(s.is_empty());
        }
    }

    #[test]
    fn wire_sections_roundtrip() {
        use hickory_proto::op::{MessageType, OpCode, Query as HQuery};
        use hickory_proto::rr::rdata::A;
        use hickory_proto::rr::{Name, RData, Record, RecordType};
        let name = Name::from_ascii("www.example.com.").unwrap();
        let mut m = Message::new(9, MessageType::Response, OpCode::Query);
        m.add_query(HQuery::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            name.clone(),
            300,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m.add_answer(Record::from_rdata(
            name.clone(),
            200,
            RData::A(A::new(192, 0, 2, 2)),
        ));
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
        let raw = m.to_vec().unwrap();
        let q = parse_query(&query(&[b"WWW", b"example", b"com"], 1, None)).unwrap();
        let s = WireSections::from_upstream(&raw, q.question().len()).unwrap();
        let mut out = Vec::new();
        assert!(cached_response(&mut out, &q, 0, false, &s, 50, 1232));
        let back = Message::from_vec(&out).unwrap();
        assert_eq!(back.metadata.id, 0x1234);
        assert_eq!(back.answers.len(), 2);
        assert_eq!(back.answers[0].ttl, 250);
        assert_eq!(back.answers[1].ttl, 150);
        assert!(back.edns.is_none());
        assert_eq!(back.queries[0].name().to_ascii(), "WWW.example.com.");
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(q) = parse_query(&bytes) {
                let mut s = String::new();
                let _ = q.normalized_name(&mut s);
                let _ = WireSections::from_upstream(&bytes, q.question().len());
            }
        }

        #[test]
        fn fast_normaliser_agrees(labels in proptest::collection::vec("[a-zA-Z0-9_-]{1,20}", 1..6)) {
            let refs: Vec<&[u8]> = labels.iter().map(|l| l.as_bytes()).collect();
            let q = parse_query(&query(&refs, 1, None)).unwrap();
            let mut s = String::new();
            let fast = q.normalized_name(&mut s).then_some(s);
            let slow = normalize_query_name(&format!("{}.", labels.join(".")));
            // The fast normaliser may refuse (slow path), never disagree.
            if let Some(f) = fast {
                prop_assert_eq!(Some(f), slow);
            }
        }
    }
}
