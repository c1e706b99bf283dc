//! Upstream resolver specifications (`--upstream`).
//!
//! Three forms, always with an IP address (the sinkhole must not depend on
//! DNS to find its own upstream, so host names are refused):
//!
//! * `IP[:PORT]`, `[v6]:PORT`: plain DNS over UDP, TCP on truncation
//!   (default port 53);
//! * `tls://IP[:PORT][#tls-name]`: DNS over TLS, RFC 7858 (default port
//!   853);
//! * `https://IP[:PORT][/path][#tls-name]`: DNS over HTTPS, RFC 8484, POST
//!   `application/dns-message` over HTTP/2 (default port 443, default path
//!   `/dns-query`).
//!
//! `#tls-name` is the name the server certificate is verified against (and
//! sent as SNI); without it the certificate must carry the IP address as a
//! subject alternative name. Certificates are always verified.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use rustls_pki_types::ServerName;

/// Default DoH path (RFC 8484 §3 examples, what public resolvers serve).
pub const DEFAULT_DOH_PATH: &str = "/dns-query";

/// One configured upstream resolver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamSpec {
    /// Plain DNS: UDP, TCP when the UDP answer is truncated.
    Plain(SocketAddr),
    /// DNS over TLS (RFC 7858).
    Tls {
        addr: SocketAddr,
        /// Name to verify the certificate against (`None`: the IP).
        tls_name: Option<String>,
    },
    /// DNS over HTTPS (RFC 8484), HTTP/2 POST.
    Https {
        addr: SocketAddr,
        /// Absolute path (and optional query) of the DoH endpoint.
        path: String,
        /// Name to verify the certificate against (`None`: the IP).
        tls_name: Option<String>,
    },
}

/// Why an `--upstream` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamParseError {
    #[error("empty upstream")]
    Empty,
    #[error(
        "upstream {0:?}: unsupported scheme (expected IP[:PORT], tls://IP[:PORT][#name] or https://IP[:PORT][/path][#name])"
    )]
    UnsupportedScheme(String),
    #[error(
        "upstream {0:?}: a host name is not allowed, use an IP address (the sinkhole must not depend on DNS to find its upstream; put the certificate name after '#')"
    )]
    HostName(String),
    #[error("upstream {0:?}: expected IP[:PORT] or [IPv6]:PORT")]
    BadAddress(String),
    #[error("upstream {0:?}: port 0 is not a valid upstream port")]
    ZeroPort(String),
    #[error("upstream {0:?}: invalid TLS server name after '#'")]
    BadTlsName(String),
    #[error("upstream {0:?}: '#tls-name' only applies to tls:// and https:// upstreams")]
    NameOnPlain(String),
    #[error("upstream {0:?}: a path only applies to https:// upstreams")]
    PathOnNonHttps(String),
    #[error("upstream {0:?}: invalid DoH path (must start with '/', no templates or fragments)")]
    BadPath(String),
    #[error("upstream {0:?}: user info is not allowed")]
    UserInfo(String),
}

impl UpstreamSpec {
    /// The socket address the upstream is reached at.
    pub fn addr(&self) -> SocketAddr {
        match self {
            UpstreamSpec::Plain(a)
            | UpstreamSpec::Tls { addr: a, .. }
            | UpstreamSpec::Https { addr: a, .. } => *a,
        }
    }

    /// The TLS server name certificates are verified against (DoT / DoH).
    pub fn server_name(&self) -> Option<ServerName<'static>> {
        let (addr, name) = match self {
            UpstreamSpec::Plain(_) => return None,
            UpstreamSpec::Tls { addr, tls_name } | UpstreamSpec::Https { addr, tls_name, .. } => {
                (addr, tls_name)
            }
        };
        match name {
            // Validated by the parser; a hand-built invalid name yields
            // `None` and the forwarder refuses the upstream.
            Some(n) => ServerName::try_from(n.clone()).ok(),
            None => Some(ServerName::IpAddress(addr.ip().into())),
        }
    }
}

/// `IP`, `IP:PORT`, `[v6]`, `[v6]:PORT`, bare `v6`.
fn parse_host_port(
    whole: &str,
    s: &str,
    default_port: u16,
) -> Result<SocketAddr, UpstreamParseError> {
    if s.is_empty() {
        return Err(UpstreamParseError::BadAddress(whole.to_string()));
    }
    if s.contains('@') {
        return Err(UpstreamParseError::UserInfo(whole.to_string()));
    }
    let addr = if let Ok(a) = s.parse::<SocketAddr>() {
        a
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        SocketAddr::new(ip, default_port)
    } else if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        match inner.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => SocketAddr::new(IpAddr::V6(ip), default_port),
            Err(_) => return Err(UpstreamParseError::BadAddress(whole.to_string())),
        }
    } else {
        // Not an address. If the host part looks like a name, say so.
        let host = match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h,
            _ => s,
        };
        let looks_like_name = host.chars().any(|c| c.is_ascii_alphabetic())
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        return Err(if looks_like_name {
            UpstreamParseError::HostName(whole.to_string())
        } else {
            UpstreamParseError::BadAddress(whole.to_string())
        });
    };
    if addr.port() == 0 {
        return Err(UpstreamParseError::ZeroPort(whole.to_string()));
    }
    Ok(addr)
}

fn parse_tls_name(whole: &str, name: Option<&str>) -> Result<Option<String>, UpstreamParseError> {
    let Some(name) = name else { return Ok(None) };
    let name = name.trim_end_matches('.');
    let valid = !name.is_empty()
        && name.is_ascii()
        && !name.contains(['/', '#', '@', ' '])
        && ServerName::try_from(name).is_ok();
    if !valid {
        return Err(UpstreamParseError::BadTlsName(whole.to_string()));
    }
    Ok(Some(name.to_ascii_lowercase()))
}

impl FromStr for UpstreamSpec {
    type Err = UpstreamParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let whole = s;
        let s = s.trim();
        if s.is_empty() {
            return Err(UpstreamParseError::Empty);
        }
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
            None => (None, s),
        };
        let (rest, tls_name) = match rest.split_once('#') {
            Some((r, n)) => (r, Some(n)),
            None => (rest, None),
        };
        match scheme.as_deref() {
            None => {
                if tls_name.is_some() {
                    return Err(UpstreamParseError::NameOnPlain(whole.to_string()));
                }
                if rest.contains('/') {
                    return Err(UpstreamParseError::PathOnNonHttps(whole.to_string()));
                }
                Ok(UpstreamSpec::Plain(parse_host_port(whole, rest, 53)?))
            }
            Some("tls") => {
                let rest = rest.strip_suffix('/').unwrap_or(rest);
                if rest.contains('/') {
                    return Err(UpstreamParseError::PathOnNonHttps(whole.to_string()));
                }
                Ok(UpstreamSpec::Tls {
                    addr: parse_host_port(whole, rest, 853)?,
                    tls_name: parse_tls_name(whole, tls_name)?,
                })
            }
            Some("https") => {
                let (authority, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, DEFAULT_DOH_PATH),
                };
                let path_ok = path.starts_with('/')
                    && !path.contains(['{', '}'])
                    && path.parse::<http::uri::PathAndQuery>().is_ok();
                if !path_ok {
                    return Err(UpstreamParseError::BadPath(whole.to_string()));
                }
                Ok(UpstreamSpec::Https {
                    addr: parse_host_port(whole, authority, 443)?,
                    path: path.to_string(),
                    tls_name: parse_tls_name(whole, tls_name)?,
                })
            }
            Some(_) => Err(UpstreamParseError::UnsupportedScheme(whole.to_string())),
        }
    }
}

impl fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamSpec::Plain(a) => write!(f, "{a}"),
            UpstreamSpec::Tls { addr, tls_name } => {
                write!(f, "tls://{addr}")?;
                match tls_name {
                    Some(n) => write!(f, "#{n}"),
                    None => Ok(()),
                }
            }
            UpstreamSpec::Https {
                addr,
                path,
                tls_name,
            } => {
                write!(f, "https://{addr}{path}")?;
                match tls_name {
                    Some(n) => write!(f, "#{n}"),
                    None => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Result<UpstreamSpec, UpstreamParseError> {
        s.parse()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn plain_forms() {
        assert_eq!(p("9.9.9.9"), Ok(UpstreamSpec::Plain(sa("9.9.9.9:53"))));
        assert_eq!(
            p("9.9.9.9:5353"),
            Ok(UpstreamSpec::Plain(sa("9.9.9.9:5353")))
        );
        assert_eq!(
            p("2001:db8::1"),
            Ok(UpstreamSpec::Plain(sa("[2001:db8::1]:53")))
        );
        assert_eq!(
            p("[2001:db8::1]"),
            Ok(UpstreamSpec::Plain(sa("[2001:db8::1]:53")))
        );
        assert_eq!(
            p("[2001:db8::1]:5300"),
            Ok(UpstreamSpec::Plain(sa("[2001:db8::1]:5300")))
        );
        assert_eq!(
            p(" 127.0.0.1:53 "),
            Ok(UpstreamSpec::Plain(sa("127.0.0.1:53")))
        );
    }

    #[test]
    fn tls_forms() {
        assert_eq!(
            p("tls://1.1.1.1"),
            Ok(UpstreamSpec::Tls {
                addr: sa("1.1.1.1:853"),
                tls_name: None
            })
        );
        assert_eq!(
            p("TLS://1.1.1.1:8853#One.One.One.One."),
            Ok(UpstreamSpec::Tls {
                addr: sa("1.1.1.1:8853"),
                tls_name: Some("one.one.one.one".into())
            })
        );
        assert_eq!(
            p("tls://[2606:4700::1111]#cloudflare-dns.com"),
            Ok(UpstreamSpec::Tls {
                addr: sa("[2606:4700::1111]:853"),
                tls_name: Some("cloudflare-dns.com".into())
            })
        );
        let t = p("tls://127.0.0.1:1234#test.upstream").unwrap();
        assert_eq!(t.addr(), sa("127.0.0.1:1234"));
        assert_eq!(
            t.server_name(),
            Some(ServerName::try_from("test.upstream").unwrap())
        );
        let ip = p("tls://127.0.0.1").unwrap();
        assert_eq!(
            ip.server_name(),
            Some(ServerName::IpAddress(
                "127.0.0.1".parse::<IpAddr>().unwrap().into()
            ))
        );
        assert_eq!(p("9.9.9.9").unwrap().server_name(), None);
    }

    #[test]
    fn https_forms() {
        assert_eq!(
            p("https://9.9.9.9"),
            Ok(UpstreamSpec::Https {
                addr: sa("9.9.9.9:443"),
                path: "/dns-query".into(),
                tls_name: None
            })
        );
        assert_eq!(
            p("https://9.9.9.9:8443/resolve?x=1#dns.quad9.net"),
            Ok(UpstreamSpec::Https {
                addr: sa("9.9.9.9:8443"),
                path: "/resolve?x=1".into(),
                tls_name: Some("dns.quad9.net".into())
            })
        );
        assert_eq!(
            p("https://[::1]:4443/#localhost"),
            Ok(UpstreamSpec::Https {
                addr: sa("[::1]:4443"),
                path: "/".into(),
                tls_name: Some("localhost".into())
            })
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "9.9.9.9:53",
            "[2001:db8::1]:53",
            "tls://1.1.1.1:853",
            "tls://1.1.1.1:853#one.one.one.one",
            "https://9.9.9.9:443/dns-query#dns.quad9.net",
            "https://[::1]:443/q",
        ] {
            let u = p(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(p(&u.to_string()), Ok(u));
        }
    }

    type Check = fn(&UpstreamParseError) -> bool;

    #[test]
    fn bad_forms() {
        use UpstreamParseError as E;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, E::Empty)),
            ("dns.google", |e| matches!(e, E::HostName(_))),
            ("dns.google:53", |e| matches!(e, E::HostName(_))),
            ("tls://dns.google#dns.google", |e| {
                matches!(e, E::HostName(_))
            }),
            ("https://dns.google/dns-query", |e| {
                matches!(e, E::HostName(_))
            }),
            ("https://localhost:443", |e| matches!(e, E::HostName(_))),
            ("http://1.1.1.1/dns-query", |e| {
                matches!(e, E::UnsupportedScheme(_))
            }),
            ("udp://1.1.1.1", |e| matches!(e, E::UnsupportedScheme(_))),
            ("quic://1.1.1.1", |e| matches!(e, E::UnsupportedScheme(_))),
            ("1.1.1.1:0", |e| matches!(e, E::ZeroPort(_))),
            ("tls://1.1.1.1:0", |e| matches!(e, E::ZeroPort(_))),
            ("1.1.1.1:99999", |e| matches!(e, E::BadAddress(_))),
            ("1.1.1.1#name", |e| matches!(e, E::NameOnPlain(_))),
            ("1.1.1.1/dns-query", |e| matches!(e, E::PathOnNonHttps(_))),
            ("tls://1.1.1.1/x", |e| matches!(e, E::PathOnNonHttps(_))),
            ("tls://1.1.1.1#", |e| matches!(e, E::BadTlsName(_))),
            ("tls://1.1.1.1#bad name", |e| matches!(e, E::BadTlsName(_))),
            ("tls://1.1.1.1#a..b", |e| matches!(e, E::BadTlsName(_))),
            ("https://1.1.1.1/{?dns}", |e| matches!(e, E::BadPath(_))),
            ("https://1.1.1.1/a b", |e| matches!(e, E::BadPath(_))),
            ("https://user@1.1.1.1/", |e| matches!(e, E::UserInfo(_))),
            ("tls://", |e| matches!(e, E::BadAddress(_))),
            ("https:///dns-query", |e| matches!(e, E::BadAddress(_))),
            ("[1.1.1.1]:53", |e| matches!(e, E::BadAddress(_))),
            ("1.1.1", |e| matches!(e, E::BadAddress(_))),
        ];
        for (s, ok) in cases {
            match p(s) {
                Ok(u) => panic!("{s:?} parsed as {u:?}"),
                Err(e) => {
                    assert!(ok(&e), "{s:?}: unexpected error {e:?}");
                    assert!(!e.to_string().is_empty());
                }
            }
        }
        // The host-name error says why.
        let msg = p("tls://dns.google").unwrap_err().to_string();
        assert!(msg.contains("IP address"), "{msg}");
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC{0,60}") {
            let _ = p(&s);
        }

        #[test]
        fn parser_never_panics_on_near_misses(
            scheme in prop::sample::select(vec!["", "tls://", "https://", "http://", "TLS://"]),
            host in "[0-9a-f:.\\[\\]]{0,20}",
            port in prop::option::of(any::<u32>()),
            path in prop::option::of("/[ -~]{0,12}"),
            name in prop::option::of("[ -~]{0,12}"),
        ) {
            let mut s = format!("{scheme}{host}");
            if let Some(p) = port { s.push_str(&format!(":{p}")); }
            if let Some(p) = path { s.push_str(&p); }
            if let Some(n) = name { s.push('#'); s.push_str(&n); }
            if let Ok(u) = p(&s) {
                // Whatever parses round-trips through Display and has a
                // usable port and, for TLS, a server name.
                prop_assert_eq!(p(&u.to_string()), Ok(u.clone()));
                prop_assert_ne!(u.addr().port(), 0);
                if !matches!(u, UpstreamSpec::Plain(_)) {
                    prop_assert!(u.server_name().is_some());
                }
            }
        }
    }
}
