//! Classifying the client's first bytes without terminating anything.
//!
//! The proxy reads (never answers) the first bytes the client sends and
//! decides what they are: a TLS ClientHello (we want its SNI and whether it
//! carries Encrypted Client Hello), an HTTP/1.x request head (we want its
//! `Host`), or something else. The buffer is bounded by the caller; this
//! module only says "complete", "need more" or "malformed". A ClientHello may
//! be fragmented over several TLS records; fragments are reassembled (within
//! the caller's byte bound) before tls-parser sees the handshake message.

use crate::parse::{HeadParse, RequestHead, looks_like_http, parse_request_head};

/// TLS extension code point of Encrypted Client Hello (draft-ietf-tls-esni).
pub const EXT_ECH: u16 = 0xfe0d;
const EXT_SNI: u16 = 0x0000;

/// What a complete ClientHello told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` SNI entry, lowercased, trailing dot stripped.
    pub sni: Option<String>,
    /// An ECH extension (real or GREASE) is present.
    pub ech: bool,
}

/// Classification of the peeked bytes.
#[derive(Debug)]
pub enum Peeked {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// A complete TLS ClientHello.
    Tls(ClientHelloInfo),
    /// Starts like TLS but is not a well-formed ClientHello.
    BadTls(&'static str),
    /// A complete HTTP/1.x request head.
    Http(RequestHead),
    /// Starts like HTTP but the head is malformed.
    BadHttp(&'static str),
    /// Neither TLS nor HTTP (e.g. SSH, a database protocol, garbage).
    Other,
}

/// Classify `buf` (the bytes read so far).
pub fn classify(buf: &[u8]) -> Peeked {
    let Some(&first) = buf.first() else {
        return Peeked::NeedMore;
    };
    if first == 0x16 {
        if buf.len() < 2 {
            return Peeked::NeedMore;
        }
        if buf[1] == 0x03 {
            return classify_tls(buf);
        }
        return Peeked::Other;
    }
    if looks_like_http(buf) {
        return match parse_request_head(buf) {
            HeadParse::Complete(h) => Peeked::Http(h),
            HeadParse::Partial => Peeked::NeedMore,
            HeadParse::Invalid(why) => Peeked::BadHttp(why),
        };
    }
    if buf.len() < 16 && buf.iter().all(|b| b.is_ascii_uppercase()) {
        return Peeked::NeedMore;
    }
    Peeked::Other
}

/// Reassemble handshake fragments from consecutive records and parse the
/// ClientHello once complete.
fn classify_tls(buf: &[u8]) -> Peeked {
    let mut hs: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Peeked::NeedMore;
        }
        if rest[0] != 0x16 {
            return Peeked::BadTls("non-handshake record before ClientHello");
        }
        if rest[1] != 0x03 {
            return Peeked::BadTls("bad record version");
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > 16384 {
            return Peeked::BadTls("bad record length");
        }
        if rest.len() < 5 + len {
            return Peeked::NeedMore;
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if hs.len() >= 4 {
            if hs[0] != 0x01 {
                return Peeked::BadTls("first handshake message is not a ClientHello");
            }
            let hs_len =
                (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if hs.len() >= 4 + hs_len {
                return parse_client_hello(&hs[..4 + hs_len]);
            }
        }
    }
}

fn parse_client_hello(msg: &[u8]) -> Peeked {
    use tls_parser::{TlsMessage, TlsMessageHandshake};
    let ch = match tls_parser::parse_tls_message_handshake(msg) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)))) => ch,
        Ok(_) => return Peeked::BadTls("not a ClientHello"),
        Err(_) => return Peeked::BadTls("malformed ClientHello"),
    };
    let mut info = ClientHelloInfo {
        sni: None,
        ech: false,
    };
    let Some(mut ext) = ch.ext else {
        return Peeked::Tls(info);
    };
    let mut seen: Vec<u16> = Vec::new();
    while !ext.is_empty() {
        if ext.len() < 4 {
            return Peeked::BadTls("truncated extension header");
        }
        let ty = u16::from_be_bytes([ext[0], ext[1]]);
        let len = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
        if ext.len() < 4 + len {
            return Peeked::BadTls("truncated extension");
        }
        let data = &ext[4..4 + len];
        ext = &ext[4 + len..];
        if seen.contains(&ty) {
            return Peeked::BadTls("duplicate extension");
        }
        seen.push(ty);
        match ty {
            EXT_SNI => match sni_from_extension(data) {
                Ok(name) => info.sni = name,
                Err(why) => return Peeked::BadTls(why),
            },
            EXT_ECH => info.ech = true,
            _ => {}
        }
    }
    Peeked::Tls(info)
}

fn sni_from_extension(data: &[u8]) -> Result<Option<String>, &'static str> {
    use tls_parser::TlsExtension;
    let (rest, ext) =
        tls_parser::parse_tls_extension_sni_content(data).map_err(|_| "malformed SNI extension")?;
    if !rest.is_empty() {
        return Err("trailing bytes in SNI extension");
    }
    let TlsExtension::SNI(list) = ext else {
        return Err("malformed SNI extension");
    };
    let mut names = list.iter().filter(|(ty, _)| ty.0 == 0);
    let Some((_, raw)) = names.next() else {
        return Ok(None);
    };
    if names.next().is_some() {
        return Err("several SNI host names");
    }
    let s = std::str::from_utf8(raw).map_err(|_| "non-ASCII SNI")?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) || s.contains([':', '@', '[']) {
        return Err("invalid SNI host name");
    }
    let lower = s.to_ascii_lowercase();
    Ok(Some(lower.strip_suffix('.').unwrap_or(&lower).to_string()))
}

/// Build a minimal, well-formed ClientHello record (for tests, fuzz seeds
/// and benchmarks): optional SNI, optional ECH extension, split over
/// `records` TLS records.
pub fn build_client_hello(sni: Option<&str>, ech: bool, records: usize) -> Vec<u8> {
    let mut exts: Vec<u8> = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let list_len = 3 + n.len();
        exts.extend_from_slice(&EXT_SNI.to_be_bytes());
        exts.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        exts.extend_from_slice(&(list_len as u16).to_be_bytes());
        exts.push(0);
        exts.extend_from_slice(&(n.len() as u16).to_be_bytes());
        exts.extend_from_slice(n);
    }
    // supported_versions: TLS 1.3, TLS 1.2
    exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x05, 0x04, 0x03, 0x04, 0x03, 0x03]);
    if ech {
        exts.extend_from_slice(&EXT_ECH.to_be_bytes());
        exts.extend_from_slice(&[0x00, 0x04, 0x00, 0x00, 0x01, 0x00]);
    }
    let mut body: Vec<u8> = Vec::new();
    body.extend_from_slice(&[0x03, 0x03]);
    body.extend_from_slice(&[0x5a; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let records = records.max(1);
    let chunk = hs.len().div_ceil(records);
    let mut out = Vec::new();
    for part in hs.chunks(chunk.max(1)) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_and_ech() {
        let ch = build_client_hello(Some("Allowed.Test."), false, 1);
        match classify(&ch) {
            Peeked::Tls(info) => {
                assert_eq!(info.sni.as_deref(), Some("allowed.test"));
                assert!(!info.ech);
            }
            other => panic!("{other:?}"),
        }
        let ch = build_client_hello(None, true, 1);
        match classify(&ch) {
            Peeked::Tls(info) => {
                assert_eq!(info.sni, None);
                assert!(info.ech);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fragmented_hello_is_reassembled() {
        let ch = build_client_hello(Some("a.test"), false, 3);
        match classify(&ch) {
            Peeked::Tls(info) => assert_eq!(info.sni.as_deref(), Some("a.test")),
            other => panic!("{other:?}"),
        }
        // Every strict prefix needs more bytes, none is accepted.
        for n in 0..ch.len() {
            assert!(matches!(classify(&ch[..n]), Peeked::NeedMore), "prefix {n}");
        }
    }

    #[test]
    fn malformed_hellos() {
        let mut ch = build_client_hello(Some("a.test"), false, 1);
        ch[5] = 0x02; // ServerHello
        assert!(matches!(classify(&ch), Peeked::BadTls(_)));
        assert!(matches!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x00]),
            Peeked::BadTls(_)
        ));
        assert!(matches!(
            classify(b"\x16\x03\x01\xff\xff"),
            Peeked::BadTls(_)
        ));
        assert!(matches!(classify(b"SSH-2.0-OpenSSH\r\n"), Peeked::Other));
        assert!(matches!(classify(b"\x00\x01\x02"), Peeked::Other));
        assert!(matches!(classify(b"GE"), Peeked::NeedMore));
        assert!(matches!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Peeked::Http(_)
        ));
    }
}
