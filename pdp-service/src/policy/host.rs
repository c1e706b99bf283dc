//! Host-name normalisation and IP-literal parsing in every spelling.
//!
//! Attackers route around name rules with IP literals in exotic spellings
//! (`http://2130706433/`, `0x7f.1`, `0177.0.0.1`, `[::ffff:127.0.0.1]`,
//! fullwidth digits that IDNA maps to ASCII ...). The policy therefore
//! recognises every spelling that common resolvers (`inet_aton`, WHATWG URL)
//! accept, so that such a host is treated as an IP destination — which only
//! `cidr` rules can allow — and never as a name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest host text accepted at all (a DNS name is at most 253 octets; the
/// extra room is for IDNA input and IPv6 zone ids).
const MAX_RAW_HOST: usize = 1024;

/// Why a host name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Empty name.
    #[error("empty host name")]
    Empty,
    /// The text is an IP address literal (in some spelling), not a name.
    #[error("host is an IP address literal, not a name")]
    IpLiteral,
    /// Not a valid DNS host name.
    #[error("invalid host name: {0}")]
    Invalid(&'static str),
}

/// Normalise a host name: IDNA (UTS #46) mapping to punycode (which also
/// lowercases and maps fullwidth / ideographic dots), one trailing dot
/// stripped, then a strict label check (letters, digits, `-`, `_`; labels of
/// 1..=63 octets, no leading/trailing `-`; at most 253 octets).
///
/// IP literals in any spelling — and names whose last label is numeric,
/// which resolvers would treat as an IPv4 address — are refused with
/// [`HostError::IpLiteral`].
pub fn normalize_host(raw: &str) -> Result<String, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if raw.len() > MAX_RAW_HOST {
        return Err(HostError::Invalid("too long"));
    }
    if parse_ip_literal(raw).is_some() {
        return Err(HostError::IpLiteral);
    }
    normalize_non_literal(raw)
}

/// [`normalize_host`] for text already known not to parse as an IP literal
/// (the evaluator checks that first to route literals to `cidr` rules).
pub(crate) fn normalize_non_literal(raw: &str) -> Result<String, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if raw.len() > MAX_RAW_HOST {
        return Err(HostError::Invalid("too long"));
    }
    let (mut out, mapped) = if let Some(fast) = ascii_fast_path(raw) {
        (fast, false)
    } else {
        let mapped = idna::domain_to_ascii_cow(raw.as_bytes(), idna::AsciiDenyList::URL)
            .map_err(|_| HostError::Invalid("IDNA processing failed"))?
            .into_owned();
        (mapped, true)
    };
    if out.ends_with('.') {
        out.pop();
    }
    if out.is_empty() {
        return Err(HostError::Empty);
    }
    // IDNA mapping can turn a non-literal into a literal (fullwidth digits,
    // ideographic dots): check again. The ASCII fast path only lowercased,
    // which cannot create a literal that the raw check missed.
    if (mapped && parse_ip_literal(&out).is_some()) || ends_in_number(&out) {
        return Err(HostError::IpLiteral);
    }
    validate_ldh(&out)?;
    Ok(out)
}

/// Plain ASCII names without punycode labels need no IDNA processing beyond
/// lowercasing: skip the (comparatively slow) UTS #46 pipeline for them.
fn ascii_fast_path(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
    {
        return None;
    }
    let lower = raw.to_ascii_lowercase();
    if lower.starts_with("xn--") || lower.contains(".xn--") {
        return None;
    }
    Some(lower)
}

fn validate_ldh(name: &str) -> Result<(), HostError> {
    if name.len() > 253 {
        return Err(HostError::Invalid("name longer than 253 octets"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::Invalid("empty label"));
        }
        if label.len() > 63 {
            return Err(HostError::Invalid("label longer than 63 octets"));
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
        {
            return Err(HostError::Invalid("character not allowed in a host name"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostError::Invalid("label starts or ends with '-'"));
        }
    }
    Ok(())
}

/// WHATWG "ends in a number": a name whose last label is all digits or a
/// `0x` hex number is parsed as IPv4 by URL parsers (and would fail there if
/// out of range); it is never a legitimate DNS name, so refuse it as a name.
fn ends_in_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    if !last.is_empty() && last.bytes().all(|c| c.is_ascii_digit()) {
        return true;
    }
    let l = last.as_bytes();
    l.len() >= 2
        && l[0] == b'0'
        && (l[1] | 0x20) == b'x'
        && l[2..].iter().all(|c| c.is_ascii_hexdigit())
}

/// Parse an IP literal in any spelling resolvers accept:
///
/// * IPv4 `inet_aton` / WHATWG forms: 1 to 4 parts, each decimal, octal
///   (leading `0`) or hex (`0x`), the last part filling the remaining bytes —
///   `127.0.0.1`, `2130706433`, `0x7f000001`, `0x7f.1`, `0177.0.0.1`,
///   `127.1`; one trailing dot allowed.
/// * IPv6, bare or bracketed, with an optional zone id (`%eth0`, `%25eth0`),
///   including the IPv4-mapped / compatible dotted tail forms.
///
/// IPv4-mapped IPv6 addresses are returned as IPv6 (their classification
/// is [`crate::policy::SpecialRange::Embedded`]).
pub fn parse_ip_literal(raw: &str) -> Option<IpAddr> {
    if raw.is_empty() || raw.len() > MAX_RAW_HOST {
        return None;
    }
    let inner = raw
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(raw);
    if inner.contains(':') {
        return parse_v6(inner).map(IpAddr::V6);
    }
    // Quick reject for ordinary names: IPv4 spellings use only these bytes.
    if !raw
        .bytes()
        .all(|c| c.is_ascii_hexdigit() || c == b'.' || c == b'x' || c == b'X')
    {
        return None;
    }
    if inner.len() != raw.len() {
        // `[1.2.3.4]` is not a valid literal anywhere.
        return None;
    }
    parse_v4_loose(raw).map(IpAddr::V4)
}

fn parse_v6(s: &str) -> Option<Ipv6Addr> {
    let addr = match s.find('%') {
        Some(i) => {
            let zone = &s[i + 1..];
            let zone = zone.strip_prefix("25").unwrap_or(zone);
            if zone.is_empty() {
                return None;
            }
            &s[..i]
        }
        None => s,
    };
    addr.parse().ok()
}

fn parse_v4_loose(s: &str) -> Option<Ipv4Addr> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return None;
    }
    let mut parts = [0u64; 4];
    let mut n = 0;
    for part in s.split('.') {
        if n == 4 {
            return None;
        }
        parts[n] = parse_v4_part(part)?;
        n += 1;
    }
    let (head, last) = (&parts[..n - 1], parts[n - 1]);
    if head.iter().any(|&p| p > 255) {
        return None;
    }
    let last_bits = 8 * (5 - n as u32); // 32, 24, 16, 8 bits for the last part
    if last_bits < 64 && last >= (1u64 << last_bits) {
        return None;
    }
    let mut v: u64 = 0;
    for (i, &p) in head.iter().enumerate() {
        v |= p << (24 - 8 * i as u32);
    }
    v |= last;
    u32::try_from(v).ok().map(Ipv4Addr::from)
}

fn parse_v4_part(p: &str) -> Option<u64> {
    if p.is_empty() || p.len() > 34 {
        return None;
    }
    let b = p.as_bytes();
    let (digits, radix) = if b.len() >= 2 && b[0] == b'0' && (b[1] | 0x20) == b'x' {
        (&p[2..], 16)
    } else if b.len() >= 2 && b[0] == b'0' {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        // `0x` alone is 0 for inet_aton and WHATWG.
        return if radix == 16 { Some(0) } else { None };
    }
    if !digits.bytes().all(|c| (c as char).is_digit(radix)) {
        return None;
    }
    // Strip leading zeros so that long zero-padded spellings still parse.
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        return Some(0);
    }
    if trimmed.len() > 12 {
        return None; // far beyond 32 bits in every radix
    }
    u64::from_str_radix(trimmed, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Option<IpAddr> {
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }

    #[test]
    fn ipv4_spellings() {
        let lo = v4("127.0.0.1");
        for s in [
            "127.0.0.1",
            "127.0.0.1.",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "0x7f.1",
            "0177.0.0.1",
            "0177.0.0.01",
            "127.1",
            "127.0.1",
            "0x7f.0.0.0x1",
            "017700000001",
            "0000177.0.0.1",
        ] {
            assert_eq!(parse_ip_literal(s), lo, "{s}");
        }
        assert_eq!(parse_ip_literal("0"), v4("0.0.0.0"));
        assert_eq!(parse_ip_literal("0x"), v4("0.0.0.0"));
        assert_eq!(parse_ip_literal("1.2.65535"), v4("1.2.255.255"));
        assert_eq!(parse_ip_literal("4294967295"), v4("255.255.255.255"));
        for bad in [
            "4294967296",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "1.2.65536",
            "08.1.1.1",
            "1..1",
            "",
            ".",
            "1.2.3.4..",
            "[1.2.3.4]",
            "example.com",
            "0x1g",
        ] {
            assert_eq!(parse_ip_literal(bad), None, "{bad}");
        }
    }

    #[test]
    fn ipv6_spellings() {
        let one: IpAddr = "::1".parse().unwrap();
        for s in ["::1", "[::1]", "0:0:0:0:0:0:0:1", "[::1%25lo]", "::1%eth0"] {
            assert_eq!(parse_ip_literal(s), Some(one), "{s}");
        }
        assert_eq!(
            parse_ip_literal("[::ffff:127.0.0.1]"),
            Some("::ffff:7f00:1".parse().unwrap())
        );
        assert_eq!(parse_ip_literal("[::1"), None);
        assert_eq!(parse_ip_literal("::1%"), None);
        assert_eq!(parse_ip_literal("[::1]:443"), None);
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_host("GitHub.COM").unwrap(), "github.com");
        assert_eq!(normalize_host("github.com.").unwrap(), "github.com");
        assert_eq!(
            normalize_host("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            normalize_host("BÜCHER.example.").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            normalize_host("xn--bcher-kva.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(normalize_host("a_b.example").unwrap(), "a_b.example");
        // Ideographic full stop is a dot under UTS #46.
        assert_eq!(normalize_host("example\u{3002}com").unwrap(), "example.com");
        for bad in [
            "github.com..",
            ".github.com",
            "a..b",
            "-a.example",
            "a-.example",
            "a b.example",
            "a/b",
            "host:443",
            "*.example.com",
            "exa%mple.com",
            "xn--a.example",
            "a\u{0}b",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad}");
        }
        assert_eq!(normalize_host(""), Err(HostError::Empty));
        assert_eq!(normalize_host("."), Err(HostError::Empty));
        let long = format!("{}.com", "a".repeat(64));
        assert!(normalize_host(&long).is_err());
        let too_long = vec!["abcdefghij"; 25].join(".") + ".example";
        assert!(normalize_host(&too_long).is_err());
    }

    #[test]
    fn ip_spellings_are_not_names() {
        for s in [
            "127.0.0.1",
            "2130706433",
            "0x7f.1",
            "0177.0.0.1",
            "127.1",
            "[::1]",
            "::ffff:127.0.0.1",
            "\u{ff11}\u{ff12}\u{ff17}.0.0.1", // fullwidth digits "127"
            "127\u{3002}0\u{3002}0\u{3002}1",
            "99999999999", // out of range but numeric: still not a name
            "foo.0x7f",
            "foo.123",
        ] {
            assert_eq!(normalize_host(s), Err(HostError::IpLiteral), "{s}");
        }
    }
}
