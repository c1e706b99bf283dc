//! Query-name normalisation and the "registered domain" heuristic used by the
//! exfiltration guard.

/// Normalise a DNS query name the way the PDP normalises host names
/// (DESIGN.md §4): lowercase, one trailing dot stripped, IDNA → punycode,
/// labels 1..=63 bytes of `[a-z0-9_-]`, at most 253 bytes, and no
/// all-numeric / hex last label (an IP spelling is never a host name).
///
/// Returns `None` for anything that is not a valid host name; the sinkhole
/// then denies the query without asking the PDP (a PEP may always deny on
/// its own).
pub fn normalize_query_name(raw: &str) -> Option<String> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return None;
    }
    // Fast path: the wire form of nearly every query is already ASCII; only
    // names with non-ASCII bytes need the IDNA machinery.
    let ascii = if trimmed.is_ascii() {
        trimmed.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii_strict(trimmed).ok()?
    };
    if ascii.len() > 253 {
        return None;
    }
    for label in ascii.split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        // Punycode labels must decode: refuse broken `xn--` labels.
        if label.starts_with("xn--") && idna::domain_to_unicode(label).1.is_err() {
            return None;
        }
    }
    if let Some(last) = ascii.rsplit('.').next()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || (last.starts_with("0x") && last[2..].bytes().all(|b| b.is_ascii_hexdigit())))
    {
        return None;
    }
    Some(ascii)
}

/// Second-level labels under which registries sell third-level names
/// (`example.co.uk`). Without a full public-suffix list this covers the
/// common ccTLD patterns; for anything else the registered domain is the
/// last two labels. Erring towards a *shorter* registered domain only makes
/// the exfiltration budget stricter (more names share one budget), which is
/// the safe direction.
const SECOND_LEVEL: &[&str] = &[
    "ac", "co", "com", "edu", "gov", "govt", "ltd", "mil", "ne", "net", "nhs", "or", "org", "plc",
    "sch",
];

/// The registered domain (eTLD+1 approximation) of a normalised name, and the
/// part to the left of it (the labels a tunnel can vary). `("", name)` when
/// the name has no subdomain part.
pub fn split_registered(name: &str) -> (&str, &str) {
    let labels: Vec<&str> = name.rsplitn(4, '.').collect();
    // labels = [tld, sld, third, rest...] (reversed)
    let keep = match labels.as_slice() {
        [tld, sld, ..] if tld.len() == 2 && SECOND_LEVEL.contains(sld) => 3,
        _ => 2,
    };
    let mut dots = 0;
    for (i, b) in name.bytes().enumerate().rev() {
        if b == b'.' {
            dots += 1;
            if dots == keep {
                return (&name[..i], &name[i + 1..]);
            }
        }
    }
    ("", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_the_pdp() {
        assert_eq!(
            normalize_query_name("WWW.Example.COM.").as_deref(),
            Some("www.example.com")
        );
        assert_eq!(
            normalize_query_name("bücher.example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(
            normalize_query_name("_dmarc.example.com").as_deref(),
            Some("_dmarc.example.com")
        );
        assert_eq!(normalize_query_name("."), None);
        assert_eq!(normalize_query_name(""), None);
        assert_eq!(normalize_query_name("127.0.0.1"), None);
        assert_eq!(normalize_query_name("0x7f.1"), None);
        assert_eq!(normalize_query_name("a b.example"), None);
        assert_eq!(normalize_query_name("a..example"), None);
        assert_eq!(
            normalize_query_name(&format!("{}.com", "a".repeat(64))),
            None
        );
    }

    #[test]
    fn registered_domain() {
        assert_eq!(split_registered("a.b.example.com"), ("a.b", "example.com"));
        assert_eq!(split_registered("example.com"), ("", "example.com"));
        assert_eq!(split_registered("com"), ("", "com"));
        assert_eq!(split_registered("x.example.co.uk"), ("x", "example.co.uk"));
        assert_eq!(split_registered("example.co.uk"), ("", "example.co.uk"));
        assert_eq!(split_registered("x.y.example.de"), ("x.y", "example.de"));
    }
}
