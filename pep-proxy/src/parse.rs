//! Parsing of what the client tells the proxy: request heads, CONNECT
//! authorities and absolute URIs.
//!
//! Why a hand parser on top of `httparse` for the *first* request head
//! instead of letting hyper parse it: the proxy must (a) bound the head in
//! bytes and time itself, (b) write exactly one audit record for every
//! malformed attempt (hyper answers a parse error on its own and gives us
//! no hook), and (c) keep the raw `TcpStream` of a CONNECT tunnel so the
//! tunnel costs no hyper buffers. `httparse` is the zero-copy parser hyper
//! itself uses; plain-HTTP keep-alive connections are then handed to hyper,
//! which owns body framing.
//!
//! Authorities are parsed strictly: userinfo is refused, ports must be
//! 1..=65535 in plain decimal, IPv6 must be bracketed without a zone, and
//! every IPv4 spelling `inet_aton` accepts (decimal, hex, octal, short
//! forms) is recognised as an IP literal so that it is *never* resolved or
//! matched as a host name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an authority / URI was refused. The `reason()` strings are the deny
/// reasons written to the audit log and the `X-SecureOps-Decision` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("userinfo in authority")]
    Userinfo,
    #[error("invalid authority: {0}")]
    Invalid(&'static str),
    #[error("unsupported URI scheme")]
    Scheme,
}

impl AuthorityError {
    /// Machine-readable deny reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthorityError::Userinfo => "userinfo",
            AuthorityError::Invalid(_) => "invalid_authority",
            AuthorityError::Scheme => "unsupported_scheme",
        }
    }
}

/// A parsed `host:port` destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// The host as seen, lowercased, one trailing dot stripped; for an IP
    /// literal, the spelling the client used (lowercased, brackets removed).
    pub host: String,
    pub port: u16,
    /// Set when the host is an IP literal in any spelling.
    pub ip_literal: Option<IpAddr>,
}

impl Authority {
    /// Same destination (names compared case-insensitively, IP literals by
    /// value, ports exactly)?
    pub fn same_destination(&self, other: &Authority) -> bool {
        if self.port != other.port {
            return false;
        }
        match (self.ip_literal, other.ip_literal) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.host == other.host,
            _ => false,
        }
    }
}

/// Maximum authority length we accept (253-byte name + `[`/`]` + `:65535`).
const MAX_AUTHORITY: usize = 300;

/// Parse `host[:port]` strictly. `default_port` applies when the port is
/// absent; `None` makes the port mandatory (CONNECT).
pub fn parse_authority(s: &str, default_port: Option<u16>) -> Result<Authority, AuthorityError> {
    if s.is_empty() {
        return Err(AuthorityError::Invalid("empty"));
    }
    if s.len() > MAX_AUTHORITY {
        return Err(AuthorityError::Invalid("too long"));
    }
    if s.contains('@') {
        return Err(AuthorityError::Userinfo);
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthorityError::Invalid("control, space or non-ASCII byte"));
    }
    let (host_part, port_part, bracketed) = if let Some(rest) = s.strip_prefix('[') {
        let close = rest
            .find(']')
            .ok_or(AuthorityError::Invalid("unclosed ["))?;
        let inner = &rest[..close];
        let after = &rest[close + 1..];
        let port = if after.is_empty() {
            None
        } else {
            Some(
                after
                    .strip_prefix(':')
                    .ok_or(AuthorityError::Invalid("junk after ]"))?,
            )
        };
        (inner, port, true)
    } else {
        match s.rfind(':') {
            Some(i) => {
                if s[..i].contains(':') {
                    return Err(AuthorityError::Invalid("unbracketed IPv6"));
                }
                (&s[..i], Some(&s[i + 1..]), false)
            }
            None => (s, None, false),
        }
    };
    let port = match port_part {
        Some(p) => parse_port(p)?,
        None => default_port.ok_or(AuthorityError::Invalid("missing port"))?,
    };
    if bracketed {
        if host_part.contains('%') {
            return Err(AuthorityError::Invalid("IPv6 zone id"));
        }
        let v6: Ipv6Addr = host_part
            .parse()
            .map_err(|_| AuthorityError::Invalid("bad IPv6 literal"))?;
        return Ok(Authority {
            host: host_part.to_ascii_lowercase(),
            port,
            ip_literal: Some(IpAddr::V6(v6)),
        });
    }
    let lowered = host_part.to_ascii_lowercase();
    let host = lowered.strip_suffix('.').unwrap_or(&lowered).to_string();
    if host.is_empty() {
        return Err(AuthorityError::Invalid("empty host"));
    }
    if looks_numeric(&host) {
        let v4 = parse_ipv4_any(&host).ok_or(AuthorityError::Invalid("bad IPv4 spelling"))?;
        return Ok(Authority {
            host,
            port,
            ip_literal: Some(IpAddr::V4(v4)),
        });
    }
    if host.len() > 253 {
        return Err(AuthorityError::Invalid("name too long"));
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(AuthorityError::Invalid("bad label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AuthorityError::Invalid("bad character in name"));
        }
    }
    Ok(Authority {
        host,
        port,
        ip_literal: None,
    })
}

fn parse_port(p: &str) -> Result<u16, AuthorityError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthorityError::Invalid("bad port"));
    }
    match p.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(AuthorityError::Invalid("port out of range")),
    }
}

/// A name whose last label is all digits or `0x…` is an IP spelling, not a
/// DNS name (same rule as the PDP's normaliser).
fn looks_numeric(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    if last.is_empty() {
        return false;
    }
    last.bytes().all(|b| b.is_ascii_digit())
        || (last.len() > 2
            && last.starts_with("0x")
            && last[2..].bytes().all(|b| b.is_ascii_hexdigit()))
        || last == "0x"
}

/// `inet_aton` semantics: 1–4 parts, each decimal, `0x` hex or leading-0
/// octal; the last part fills the remaining bytes.
pub fn parse_ipv4_any(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut vals = Vec::with_capacity(4);
    for p in &parts {
        vals.push(parse_ipv4_part(p)?);
    }
    let (last, head) = vals.split_last()?;
    let mut acc: u64 = 0;
    for v in head {
        if *v > 255 {
            return None;
        }
        acc = (acc << 8) | v;
    }
    let rem_bytes = 4 - head.len() as u32;
    if *last >= 1u64 << (8 * rem_bytes) {
        return None;
    }
    acc = (acc << (8 * rem_bytes)) | last;
    u32::try_from(acc).ok().map(Ipv4Addr::from)
}

fn parse_ipv4_part(p: &str) -> Option<u64> {
    if p.is_empty() || p.len() > 12 {
        return None;
    }
    if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        if hex.is_empty() {
            return Some(0);
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if p.len() > 1 && p.starts_with('0') {
        return u64::from_str_radix(&p[1..], 8).ok();
    }
    if !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// An absolute-form request target `http://authority/path?query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsoluteUri {
    pub authority: Authority,
    /// Origin-form target to send upstream (`/` when the path is empty).
    pub origin_form: String,
}

/// Parse an absolute-form `http://` target. `https://` (which would need
/// TLS origination, i.e. MITM-like behaviour) and any other scheme are
/// refused; so is userinfo.
pub fn parse_absolute_uri(target: &str) -> Result<AbsoluteUri, AuthorityError> {
    let lower_scheme_end = target.find("://").ok_or(AuthorityError::Scheme)?;
    let scheme = &target[..lower_scheme_end];
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(AuthorityError::Scheme);
    }
    let rest = &target[lower_scheme_end + 3..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority_str = &rest[..end];
    let authority = parse_authority(authority_str, Some(80))?;
    let tail = &rest[end..];
    let tail = tail.split('#').next().unwrap_or("");
    let origin_form = if tail.is_empty() {
        "/".to_string()
    } else if tail.starts_with('?') {
        format!("/{tail}")
    } else {
        tail.to_string()
    };
    Ok(AbsoluteUri {
        authority,
        origin_form,
    })
}

/// A complete, parsed request head (first line + headers).
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Every `Host` header value (more than one is a mismatch).
    pub hosts: Vec<String>,
    /// Length of the head in bytes (bytes after it belong to the body /
    /// tunnel).
    pub head_len: usize,
}

/// Outcome of trying to parse a request head from a buffer.
#[derive(Debug)]
pub enum HeadParse {
    Complete(RequestHead),
    Partial,
    Invalid(&'static str),
}

/// Maximum number of header lines accepted in one head.
pub const MAX_HEADERS: usize = 96;

/// Parse the request head at the start of `buf`.
pub fn parse_request_head(buf: &[u8]) -> HeadParse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
            else {
                return HeadParse::Invalid("incomplete request line");
            };
            let mut hosts = Vec::new();
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("host") {
                    match std::str::from_utf8(h.value) {
                        Ok(v) => hosts.push(v.trim().to_string()),
                        Err(_) => return HeadParse::Invalid("non-UTF-8 Host"),
                    }
                }
            }
            HeadParse::Complete(RequestHead {
                method: method.to_string(),
                target: target.to_string(),
                version,
                hosts,
                head_len: len,
            })
        }
        Ok(httparse::Status::Partial) => HeadParse::Partial,
        Err(httparse::Error::TooManyHeaders) => HeadParse::Invalid("too many headers"),
        Err(_) => HeadParse::Invalid("malformed request head"),
    }
}

/// Does `buf` start like an HTTP/1.x request (an upper-case method token
/// followed by a space)? Used to classify peeked bytes.
pub fn looks_like_http(buf: &[u8]) -> bool {
    let n = buf
        .iter()
        .take(16)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    n >= 3 && buf.get(n) == Some(&b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        parse_authority(s, Some(443))
            .ok()
            .and_then(|a| a.ip_literal)
    }

    #[test]
    fn ipv4_spellings_are_ip_literals() {
        let lo = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        for s in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f000001",
            "0x7f.1",
            "0177.0.0.1",
            "127.0.1",
            "127.0.0.1.",
        ] {
            assert_eq!(ip(s), lo, "{s}");
        }
        assert!(parse_authority("256.0.0.1:443", None).is_err());
        assert!(parse_authority("1.2.3.4.5:443", None).is_err());
        assert!(parse_authority("08.1:443", None).is_err());
    }

    #[test]
    fn ipv6_forms() {
        let a = parse_authority("[::1]:443", None).unwrap();
        assert_eq!(a.ip_literal, Some("::1".parse().unwrap()));
        let a = parse_authority("[::ffff:127.0.0.1]:443", None).unwrap();
        assert_eq!(a.ip_literal, Some("::ffff:127.0.0.1".parse().unwrap()));
        assert!(parse_authority("::1:443", None).is_err());
        assert!(parse_authority("[fe80::1%25eth0]:443", None).is_err());
        assert!(parse_authority("[::1", None).is_err());
        assert!(parse_authority("[::1]x:443", None).is_err());
        assert!(parse_authority("[not-ip]:443", None).is_err());
    }

    #[test]
    fn names_and_ports() {
        let a = parse_authority("Example.COM.:8443", None).unwrap();
        assert_eq!(a.host, "example.com");
        assert_eq!(a.port, 8443);
        assert_eq!(a.ip_literal, None);
        assert!(parse_authority("example.com", None).is_err());
        assert_eq!(parse_authority("example.com", Some(80)).unwrap().port, 80);
        for bad in [
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            "example.com:",
            ":443",
            "exa mple.com:443",
            "ex%61mple.com:443",
            "a..b:443",
        ] {
            assert!(parse_authority(bad, None).is_err(), "{bad}");
        }
        assert_eq!(
            parse_authority("user:pw@example.com:443", None),
            Err(AuthorityError::Userinfo)
        );
    }

    #[test]
    fn absolute_uris() {
        let u = parse_absolute_uri("http://Example.com/a?b=1#frag").unwrap();
        assert_eq!(u.authority.host, "example.com");
        assert_eq!(u.authority.port, 80);
        assert_eq!(u.origin_form, "/a?b=1");
        assert_eq!(
            parse_absolute_uri("http://example.com")
                .unwrap()
                .origin_form,
            "/"
        );
        assert_eq!(
            parse_absolute_uri("http://example.com?x")
                .unwrap()
                .origin_form,
            "/?x"
        );
        assert_eq!(
            parse_absolute_uri("http://u:p@example.com/"),
            Err(AuthorityError::Userinfo)
        );
        assert_eq!(
            parse_absolute_uri("https://example.com/"),
            Err(AuthorityError::Scheme)
        );
        assert_eq!(parse_absolute_uri("/relative"), Err(AuthorityError::Scheme));
    }

    #[test]
    fn heads() {
        let HeadParse::Complete(h) =
            parse_request_head(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\nxyz")
        else {
            panic!("expected complete")
        };
        assert_eq!(h.method, "CONNECT");
        assert_eq!(h.hosts, vec!["a.test:443".to_string()]);
        assert_eq!(h.head_len, 49);
        assert!(matches!(
            parse_request_head(b"GET / HTTP/1.1\r\nHo"),
            HeadParse::Partial
        ));
        assert!(matches!(
            parse_request_head(b"\x16\x03\x01\x00"),
            HeadParse::Invalid(_)
        ));
        assert!(looks_like_http(b"GET / HTTP/1.1"));
        assert!(!looks_like_http(b"\x16\x03\x01"));
        assert!(!looks_like_http(b"SSH-2.0"));
    }
}
