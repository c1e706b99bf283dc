//! [`AllowlistPdp`]: a local, dependency-free PDP.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::decision::{ConnectionRequest, Decision, PdpFuture, PdpOutcome, PolicyDecisionPoint};
use crate::special_ip::rebinding_violation;

/// Why an allowlist entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllowlistError {
    #[error("allowlist entry {0:?}: a bare `*` would allow everything")]
    BareWildcard(String),
    #[error("allowlist entry {entry:?}: invalid host name: {why}")]
    InvalidHost { entry: String, why: String },
    #[error("allowlist entry {0:?}: IP literals are not host names (use a cidr rule in the PDP)")]
    IpLiteral(String),
}

/// Allow a connection only when its host is in the egress allowlist;
/// everything else is denied (fail-closed).
///
/// Entries are exact names (`github.com`) or `*.suffix` patterns, which match
/// any subdomain of `suffix` but never `suffix` itself. IP literals never
/// match. Names are normalised (lowercase, trailing dot, IDNA → punycode).
///
/// The PDP's DNS-rebinding guard applies here too (DESIGN §4): an allowed
/// name whose dialled or resolved address is special-purpose (loopback,
/// RFC 1918, link-local and the metadata address, ...; see
/// [`crate::classify_ip`]) is denied `dns_rebinding`, unless one of
/// [`AllowlistPdp::with_resolved_ip_allow`]'s ranges covers it. Without
/// it, `*.example.com` would let whoever controls one name under it point
/// the agent at `169.254.169.254`.
///
/// The sets use `foldhash` rather than SipHash: their keys come from the
/// operator's configuration and lookups never insert, so there is no
/// hash-flooding surface, and the sinkhole asks once per DNS query.
#[derive(Debug, Clone, Default)]
pub struct AllowlistPdp {
    exact: HashSet<String, foldhash::fast::RandomState>,
    /// `*.githubusercontent.com` is stored as `githubusercontent.com`; a host
    /// matches when one of its proper parent domains is in the set (one hash
    /// lookup per label, not a scan of every pattern).
    suffixes: HashSet<String, foldhash::fast::RandomState>,
    /// Special-purpose ranges allowed names may resolve to (the policy's
    /// `resolved_ip_allow`).
    resolved_ip_allow: Vec<IpNet>,
}

impl AllowlistPdp {
    /// Build from entries; any invalid entry refuses the whole list.
    pub fn new<I, S>(entries: I) -> Result<Self, AllowlistError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut pdp = AllowlistPdp::default();
        for entry in entries {
            let raw = entry.as_ref().trim();
            if raw == "*" {
                return Err(AllowlistError::BareWildcard(raw.to_string()));
            }
            if let Some(suffix) = raw.strip_prefix("*.") {
                let norm = normalize_host(suffix).map_err(|why| AllowlistError::InvalidHost {
                    entry: raw.to_string(),
                    why,
                })?;
                pdp.suffixes.insert(norm);
            } else {
                if raw.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
                    return Err(AllowlistError::IpLiteral(raw.to_string()));
                }
                let norm = normalize_host(raw).map_err(|why| AllowlistError::InvalidHost {
                    entry: raw.to_string(),
                    why,
                })?;
                pdp.exact.insert(norm);
            }
        }
        Ok(pdp)
    }

    /// Special-purpose ranges that allowed names may resolve to, for
    /// internal services reached by name (the policy's `resolved_ip_allow`).
    /// It never makes an IP literal allowed: those never match at all.
    pub fn with_resolved_ip_allow(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.resolved_ip_allow = nets.into_iter().map(|n| n.trunc()).collect();
        self
    }

    /// The DNS-rebinding guard: a dialled or resolved address that is
    /// special-purpose and not covered by `resolved_ip_allow`.
    fn rebinding_violation(&self, req: &ConnectionRequest) -> bool {
        rebinding_violation(req.ip.iter().chain(&req.resolved_ips).copied(), |ip| {
            self.resolved_ip_allow.iter().any(|n| n.contains(&ip))
        })
    }

    /// Whether `host` (as seen on the wire) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        let Ok(host) = normalize_host_cow(host) else {
            return false;
        };
        let host: &str = &host;
        self.exact.contains(host)
            || host
                .bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'.')
                .any(|(i, _)| self.suffixes.contains(&host[i + 1..]))
    }
}

impl PolicyDecisionPoint for AllowlistPdp {
    fn decide<'a>(&'a self, req: &'a ConnectionRequest) -> PdpFuture<'a> {
        let outcome = if !self.allows(&req.host) {
            PdpOutcome::new(Decision::Deny, "not_in_allowlist")
        } else if self.rebinding_violation(req) {
            PdpOutcome::new(Decision::Deny, "dns_rebinding")
        } else {
            PdpOutcome::new(Decision::Allow, "allowlist")
        };
        Box::pin(std::future::ready(outcome))
    }
}

/// Whether `last_label` (a name's last label) spells a number, so the name
/// is an IP literal in some spelling (`127.1`, `0x7f.1`), never a host.
pub fn is_ip_spelling(last_label: &[u8]) -> bool {
    last_label.iter().all(u8::is_ascii_digit)
        || last_label
            .strip_prefix(b"0x")
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
}

/// [`normalize_host`] without an allocation when `raw` is already in
/// normal form (what the DNS sinkhole and most clients send).
fn normalize_host_cow(raw: &str) -> Result<Cow<'_, str>, String> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if is_normal_ldh(trimmed) {
        Ok(Cow::Borrowed(trimmed))
    } else {
        normalize_host(raw).map(Cow::Owned)
    }
}

/// Whether `name` is already what [`normalize_host`] would return for it:
/// lowercase letters, digits and `-` in 1–63 byte labels, at most 253
/// bytes, no label that IDNA would look at (leading / trailing `-`, `--` in
/// positions 3–4), and a last label that is not an IP spelling. One pass,
/// no allocation; anything else takes the full path.
fn is_normal_ldh(name: &str) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > 253 {
        return false;
    }
    let mut start = 0;
    for i in 0..=b.len() {
        let at_end = i == b.len();
        if at_end || b[i] == b'.' {
            let l = &b[start..i];
            if l.is_empty()
                || l.len() > 63
                || l.first() == Some(&b'-')
                || l.last() == Some(&b'-')
                || l.get(2..4) == Some(b"--")
            {
                return false;
            }
            if at_end {
                return !is_ip_spelling(l);
            }
            start = i + 1;
        } else if !(b[i].is_ascii_lowercase() || b[i].is_ascii_digit() || b[i] == b'-') {
            return false;
        }
    }
    false
}

/// Normalise a host name: lowercase, one trailing dot stripped, IDNA →
/// punycode, and refuse anything that is not a valid DNS name or that looks
/// like an IP literal in any spelling.
pub(crate) fn normalize_host(raw: &str) -> Result<String, String> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return Err("empty name".into());
    }
    let ascii = match plain_ldh(trimmed) {
        Some(lower) => lower,
        None => idna::domain_to_ascii_strict(trimmed).map_err(|e| format!("{e:?}"))?,
    };
    if ascii.len() > 253 {
        return Err("name longer than 253 bytes".into());
    }
    for label in ascii.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("bad label length in {ascii:?}"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("invalid character in {ascii:?}"));
        }
    }
    // All-numeric last label (e.g. 127.1, 0x7f.1) is an IP spelling, not a name.
    if let Some(last) = ascii.rsplit('.').next()
        && is_ip_spelling(last.as_bytes())
    {
        return Err(format!("{ascii:?} is an IP literal spelling"));
    }
    Ok(ascii)
}

/// The lowercase form of `name` when IDNA processing is the identity on it:
/// only ASCII letters, digits, `-` and `.`, no label that starts or ends
/// with `-` or has `--` in positions 3–4 (`xn--` and its kin need the full
/// UTS 46 check). Everything else (`None`) takes the IDNA path. This is the
/// common case — every name a DNS resolver sends — and skips the IDNA
/// machinery (the biggest part of a sinkholed query's decision).
fn plain_ldh(name: &str) -> Option<String> {
    let ok_bytes = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !ok_bytes {
        return None;
    }
    for label in name.split('.') {
        let l = label.as_bytes();
        if l.first() == Some(&b'-') || l.last() == Some(&b'-') || l.get(2..4) == Some(b"--") {
            return None;
        }
    }
    Some(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The ASCII shortcut never changes the result of normalisation.
        #[test]
        fn plain_ldh_agrees_with_idna(name in "[a-zA-Z0-9.\\-]{0,70}") {
            let trimmed = name.strip_suffix('.').unwrap_or(&name);
            if let Some(fast) = plain_ldh(trimmed) {
                let slow = idna::domain_to_ascii_strict(trimmed).map_err(|e| format!("{e:?}"));
                match slow {
                    Ok(s) => prop_assert_eq!(fast, s),
                    // IDNA refuses it (empty label, length): the label
                    // checks after the shortcut must refuse it too.
                    Err(_) => prop_assert!(normalize_host(&name).is_err(), "{name:?} accepted"),
                }
            }
        }

        /// The allocation-free shortcut accepts only names that are already
        /// normal: the full normaliser returns them unchanged.
        #[test]
        fn normal_ldh_shortcut_is_exact(name in "[a-z0-9.\\-]{0,70}|[a-zA-Z0-9_.\\-]{0,12}|0x[0-9a-f]{0,3}") {
            if is_normal_ldh(&name) {
                prop_assert_eq!(normalize_host(&name), Ok(name.clone()));
            }
            let trimmed = name.strip_suffix('.').unwrap_or(&name);
            prop_assert_eq!(
                normalize_host_cow(&name).map(|c| c.into_owned()),
                normalize_host(&name),
                "{:?} trimmed {:?}", name, trimmed
            );
        }

        /// Suffix lookup by label = the old scan over every pattern.
        #[test]
        fn suffix_lookup_matches_scan(host in "[a-c]{1,2}(\\.[a-c]{1,2}){0,4}") {
            let pats = ["a", "b.a", "c.b.a", "aa.bb"];
            let pdp = AllowlistPdp::new(pats.iter().map(|p| format!("*.{p}"))).unwrap();
            let scan = pats.iter().any(|p| host.ends_with(&format!(".{p}")));
            prop_assert_eq!(pdp.allows(&host), scan);
        }
    }

    #[test]
    fn wildcard_semantics() {
        let pdp = AllowlistPdp::new(["github.com", "*.githubusercontent.com"]).unwrap();
        assert!(pdp.allows("github.com"));
        assert!(pdp.allows("GitHub.com."));
        assert!(pdp.allows("raw.githubusercontent.com"));
        assert!(!pdp.allows("githubusercontent.com"));
        assert!(!pdp.allows("evilgithubusercontent.com"));
        assert!(!pdp.allows("githubusercontent.com.evil"));
        assert!(!pdp.allows("github.com.evil"));
        assert!(!pdp.allows("127.0.0.1"));
        assert!(!pdp.allows("0x7f.1"));
        assert!(!pdp.allows(""));
    }

    fn decide_now(pdp: &AllowlistPdp, host: &str, ips: &[&str]) -> PdpOutcome {
        let resolved: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
        let req = ConnectionRequest {
            request_id: "r".into(),
            workload_id: "w".into(),
            process: Default::default(),
            host: host.into(),
            port: 443,
            ip: resolved.first().copied(),
            resolved_ips: resolved,
            host_source: crate::HostSource::Connect,
            transport: crate::Transport::Tcp,
        };
        let fut = pdp.decide(&req);
        futures::executor::block_on(fut)
    }

    /// An allowed name may not resolve to a special-purpose address unless
    /// `resolved_ip_allow` covers it (also through an IPv4-mapped spelling);
    /// a name outside the list keeps its own reason.
    #[test]
    fn rebinding_guard() {
        let pdp = AllowlistPdp::new(["*.example.com", "internal.corp"]).unwrap();
        let reason = |host, ips: &[&str]| decide_now(&pdp, host, ips).reason;
        assert_eq!(reason("a.example.com", &[]), "allowlist");
        assert_eq!(reason("a.example.com", &["93.184.216.34"]), "allowlist");
        for special in [
            "169.254.169.254",
            "127.0.0.1",
            "10.1.2.3",
            "::ffff:10.1.2.3",
            "fd00:ec2::254",
            "::1",
        ] {
            assert_eq!(
                reason("a.example.com", &["93.184.216.34", special]),
                "dns_rebinding",
                "{special}"
            );
        }
        assert_eq!(reason("evil.test", &["10.1.2.3"]), "not_in_allowlist");

        let pdp = AllowlistPdp::new(["internal.corp"])
            .unwrap()
            .with_resolved_ip_allow(["10.20.0.0/16".parse().unwrap()]);
        let reason = |host, ips: &[&str]| decide_now(&pdp, host, ips).reason;
        assert_eq!(reason("internal.corp", &["10.20.3.4"]), "allowlist");
        assert_eq!(reason("internal.corp", &["::ffff:10.20.3.4"]), "allowlist");
        assert_eq!(reason("internal.corp", &["10.21.3.4"]), "dns_rebinding");
        assert_eq!(
            reason("internal.corp", &["169.254.169.254"]),
            "dns_rebinding"
        );
    }

    #[test]
    fn refuses_bare_star_and_ips() {
        assert!(matches!(
            AllowlistPdp::new(["*"]),
            Err(AllowlistError::BareWildcard(_))
        ));
        assert!(matches!(
            AllowlistPdp::new(["10.0.0.1"]),
            Err(AllowlistError::IpLiteral(_))
        ));
        assert!(AllowlistPdp::new(["bad host"]).is_err());
    }

    #[test]
    fn idna_is_normalised() {
        let pdp = AllowlistPdp::new(["bücher.example"]).unwrap();
        assert!(pdp.allows("xn--bcher-kva.example"));
        assert!(pdp.allows("BÜCHER.example"));
    }
}
