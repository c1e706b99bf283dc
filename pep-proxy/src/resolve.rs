//! Name resolution: resolve once, hand every answer to the PDP, dial the
//! checked IP.
//!
//! Sources, in order: static `--resolve HOST=IP` overrides (air-gapped hosts,
//! tests, benchmarks), then hickory-resolver against `--dns-server` (in a
//! deployment: the SecureOps DNS sinkhole, so the lookup itself is policed)
//! or the system configuration. IP literals are never passed here: the proxy
//! must not "helpfully" turn an IP spelling into something else.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// Why a name did not resolve. The proxy denies in every case.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The name has no address: NXDOMAIN, an empty answer, or no override
    /// and no DNS. The name's own fault, not the resolver's.
    #[error("no address for {0}")]
    NoAddress(String),
    /// The DNS service failed to answer: SERVFAIL, REFUSED, a transport
    /// error, or hickory's own per-query timeout (which may fire before
    /// [`ResolveError::Timeout`]'s outer deadline).
    #[error("resolver error for {name}: {msg}")]
    Lookup { name: String, msg: String },
    #[error("resolver timed out for {0}")]
    Timeout(String),
    #[error("resolver setup: {0}")]
    Setup(String),
}

/// The proxy's resolver.
pub struct Resolver {
    overrides: HashMap<String, Vec<IpAddr>>,
    dns: Option<TokioResolver>,
    timeout: Duration,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("overrides", &self.overrides)
            .field("dns", &self.dns.is_some())
            .finish()
    }
}

impl Resolver {
    /// `overrides`: `(host, ip)` pairs (a host may repeat). `dns_server`:
    /// `Some(addr)` to query that server over UDP+TCP, `None` for the system
    /// configuration. `use_dns = false` makes the overrides the only source
    /// (everything else fails to resolve, hence is denied).
    pub fn new(
        overrides: &[(String, IpAddr)],
        dns_server: Option<SocketAddr>,
        use_dns: bool,
        timeout: Duration,
    ) -> Result<Self, ResolveError> {
        let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (h, ip) in overrides {
            let key = normalize(h);
            let e = map.entry(key).or_default();
            if !e.contains(ip) {
                e.push(*ip);
            }
        }
        let dns = if !use_dns {
            None
        } else {
            let mut builder = match dns_server {
                Some(addr) => {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(vec![ns]),
                        TokioRuntimeProvider::default(),
                    )
                }
                None => TokioResolver::builder_tokio()
                    .map_err(|e| ResolveError::Setup(e.to_string()))?,
            };
            let opts = builder.options_mut();
            opts.timeout = timeout;
            opts.attempts = 1;
            Some(
                builder
                    .build()
                    .map_err(|e| ResolveError::Setup(e.to_string()))?,
            )
        };
        Ok(Resolver {
            overrides: map,
            dns,
            timeout,
        })
    }

    /// Resolve a host *name* (never an IP literal) to every address.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let key = normalize(host);
        if let Some(ips) = self.overrides.get(&key) {
            return Ok(ips.clone());
        }
        let Some(dns) = &self.dns else {
            return Err(ResolveError::NoAddress(key));
        };
        // Fully qualified: no search-domain expansion of what the client sent.
        let fqdn = format!("{key}.");
        match tokio::time::timeout(self.timeout * 2, dns.lookup_ip(fqdn.as_str())).await {
            Err(_) => Err(ResolveError::Timeout(key)),
            Ok(Err(e)) if e.is_no_records_found() => Err(ResolveError::NoAddress(key)),
            Ok(Err(e)) => Err(ResolveError::Lookup {
                name: key,
                msg: e.to_string(),
            }),
            Ok(Ok(lookup)) => {
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if ips.is_empty() {
                    Err(ResolveError::NoAddress(key))
                } else {
                    Ok(ips)
                }
            }
        }
    }
}

fn normalize(h: &str) -> String {
    let l = h.trim().to_ascii_lowercase();
    l.strip_suffix('.').unwrap_or(&l).to_string()
}

/// Parse a `HOST=IP` flag value.
pub fn parse_override(s: &str) -> Result<(String, IpAddr), String> {
    let (h, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected HOST=IP"))?;
    let ip: IpAddr = ip
        .trim()
        .trim_matches(['[', ']'])
        .parse()
        .map_err(|e| format!("{s:?}: bad IP: {e}"))?;
    if h.trim().is_empty() {
        return Err(format!("{s:?}: empty host"));
    }
    Ok((normalize(h), ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overrides_only() {
        let r = Resolver::new(
            &[parse_override("A.test.=10.0.0.1").unwrap()],
            None,
            false,
            Duration::from_millis(100),
        )
        .unwrap();
        assert_eq!(
            r.resolve("a.test").await.unwrap(),
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert!(r.resolve("b.test").await.is_err());
        assert!(parse_override("nohost").is_err());
        assert!(parse_override("h=notip").is_err());
    }
}
