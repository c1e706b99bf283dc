//! Property tests of host normalisation, IP-literal parsing and evaluation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use secureops_policy::policy::{
    EvalRequest, HostSource, MemoryContext, Policy, ProcKey, Verdict, classify_ip, normalize_host,
    parse_ip_literal,
};

/// A policy with host rules that an IP literal might try to hit: exact
/// names that look numeric-ish, wildcards over TLD-like suffixes, and no
/// cidr allow rules at all.
const HOST_ONLY: &str = r#"
version: 1
default: escalate
egress_allowlist:
  - localhost
  - "*.com"
  - "*.example"
  - "*.arpa"
rules:
  - id: names
    action: allow
    destinations:
      - host: "*.ip"
      - host: "*.local"
      - host: "*.x"
      - host: "*.a"
      - host: "*.f"
      - host: example.org
"#;

fn host_only() -> &'static Policy {
    use std::sync::OnceLock;
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| match Policy::compile(HOST_ONLY) {
        Ok(p) => p,
        Err(e) => panic!("{e:?}"),
    })
}

fn eval(host: &str, port: u16, source: HostSource, ctx: &MemoryContext) -> Verdict {
    host_only()
        .evaluate(
            &EvalRequest {
                workload: "w",
                exe: "/bin/x",
                host,
                port,
                ip: None,
                resolved_ips: &[],
                host_source: source,
                process: Some(ProcKey {
                    pid: 1,
                    start_time: 1,
                }),
                ancestors: &[],
            },
            ctx,
        )
        .verdict
}

/// Generates alternative spellings of an IPv4 address.
fn v4_spelling(ip: Ipv4Addr, style: u8) -> String {
    let o = ip.octets();
    let v = u32::from(ip);
    match style % 8 {
        0 => ip.to_string(),
        1 => v.to_string(),
        2 => format!("{v:#x}"),
        3 => format!("0{v:o}"),
        4 => format!("{}.{}", o[0], v & 0x00ff_ffff),
        5 => format!("{}.{}.{}", o[0], o[1], v & 0xffff),
        6 => format!("0{:o}.0x{:x}.{}.0{:o}", o[0], o[1], o[2], o[3]),
        _ => format!("{ip}."),
    }
}

fn v6_spelling(ip: Ipv6Addr, style: u8) -> String {
    match style % 4 {
        0 => ip.to_string(),
        1 => format!("[{ip}]"),
        2 => format!("[{ip}%25eth0]"),
        _ => {
            let s = ip.segments();
            format!(
                "{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}",
                s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
            )
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn normalize_host_never_panics(s in any::<String>()) {
        let _ = normalize_host(&s);
        let _ = parse_ip_literal(&s);
    }

    #[test]
    fn normalize_host_is_idempotent_and_canonical(s in "[a-zA-Z0-9.\\-_]{1,40}") {
        if let Ok(n) = normalize_host(&s) {
            let again = normalize_host(&n);
            prop_assert_eq!(again.as_deref(), Ok(n.as_str()));
            prop_assert!(!n.ends_with('.'));
            prop_assert!(n.bytes().all(|c| !c.is_ascii_uppercase()));
            prop_assert!(parse_ip_literal(&n).is_none());
        }
    }

    #[test]
    fn parse_agrees_with_std_for_canonical_forms(v4 in any::<u32>(), v6 in any::<u128>()) {
        let a = Ipv4Addr::from(v4);
        prop_assert_eq!(parse_ip_literal(&a.to_string()), Some(IpAddr::V4(a)));
        let b = Ipv6Addr::from(v6);
        prop_assert_eq!(parse_ip_literal(&b.to_string()), Some(IpAddr::V6(b)));
        prop_assert_eq!(parse_ip_literal(&format!("[{b}]")), Some(IpAddr::V6(b)));
    }

    #[test]
    fn std_parsable_text_parses_the_same(s in "[0-9a-fA-F:.]{1,45}") {
        if let Ok(ip) = s.parse::<IpAddr>() {
            prop_assert_eq!(parse_ip_literal(&s), Some(ip));
        }
    }

    #[test]
    fn every_spelling_parses_to_the_same_address(v4 in any::<u32>(), style in 0u8..8) {
        let ip = Ipv4Addr::from(v4);
        let s = v4_spelling(ip, style);
        prop_assert_eq!(parse_ip_literal(&s), Some(IpAddr::V4(ip)), "{}", s);
        prop_assert!(normalize_host(&s).is_err(), "{}", s);
    }

    #[test]
    fn ip_literals_never_allowed_by_host_rules(
        v4 in any::<u32>(),
        v6 in any::<u128>(),
        style in 0u8..8,
        port in 1u16..,
        src in 0usize..4,
    ) {
        let ctx = MemoryContext::new();
        let source = [HostSource::Connect, HostSource::Sni, HostSource::HttpHost, HostSource::DnsQuery][src];
        for s in [v4_spelling(Ipv4Addr::from(v4), style), v6_spelling(Ipv6Addr::from(v6), style)] {
            let v = eval(&s, port, source, &ctx);
            prop_assert_eq!(v, Verdict::Deny, "{} via {:?}", s, source);
        }
    }

    #[test]
    fn evaluation_never_panics_and_only_allows_names(s in any::<String>(), port in any::<u16>()) {
        let ctx = MemoryContext::new();
        let v = eval(&s, port, HostSource::Connect, &ctx);
        if v == Verdict::Allow {
            // Whatever was allowed must be a valid name (not an IP literal).
            prop_assert!(normalize_host(&s).is_ok(), "{:?}", s);
            prop_assert!(parse_ip_literal(&s).is_none(), "{:?}", s);
        }
    }

    #[test]
    fn ascii_hosts_evaluate_without_panic(s in "[a-z0-9.\\-\\[\\]:%x]{0,30}", port in any::<u16>()) {
        let ctx = MemoryContext::new();
        let v = eval(&s, port, HostSource::HttpHost, &ctx);
        if v == Verdict::Allow {
            prop_assert!(parse_ip_literal(&s).is_none(), "{:?}", s);
        }
    }

    #[test]
    fn compile_never_panics(s in any::<String>()) {
        let _ = Policy::compile(&s);
    }

    #[test]
    fn compile_never_panics_on_yamlish(s in "(version: 1\n|rules:\n|  - id: [a-z]{1,3}\n|    action: (allow|deny|escalate)\n|    destinations: \\[\\{host: [a-z*.]{0,8}\\}\\]\n|    when: \\{within: [0-9]{1,3}(ms|s|m)\\}\n|[a-z: \\[\\]{},\"-]{0,10}\n){0,12}") {
        if let Err(errs) = Policy::compile(&s) {
            for e in errs {
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}

/// Policies with every kind of rule that could be tempted to look at a
/// name's addresses: cidr allow and deny rules over public ranges, host
/// rules, destination-less rules, `resolved_ip_allow`, both modes.
const WITH_CIDRS: [&str; 2] = [
    r#"
version: 1
default: escalate
resolved_ip_allow: [10.20.0.0/16]
egress_allowlist:
  - "*.example"
  - api.example.com:443
rules:
  - id: block-range
    action: deny
    destinations:
      - cidr: 93.184.0.0/16
      - cidr: 2606:2800::/32
  - id: public-ips
    action: allow
    destinations:
      - cidr: 8.0.0.0/8
        ports: [443]
      - cidr: 2600::/12
  - id: psql
    action: escalate
    processes: ["/usr/bin/psql"]
  - id: named-deny
    action: deny
    destinations:
      - host: bad.example
"#,
    r#"
version: 1
mode: report
default: deny
rules:
  - id: cdn
    action: allow
    destinations:
      - host: "*.cdn.test"
        ports: [443, "8000-8100"]
      - cidr: 0.0.0.0/0
  - id: no-range
    action: deny
    destinations:
      - cidr: 8.8.0.0/16
"#,
];

fn with_cidrs(i: usize) -> &'static Policy {
    use std::sync::OnceLock;
    static P: OnceLock<Vec<Policy>> = OnceLock::new();
    &P.get_or_init(|| {
        WITH_CIDRS
            .iter()
            .map(|y| match Policy::compile(y) {
                Ok(p) => p,
                Err(e) => panic!("{e:?}"),
            })
            .collect()
    })[i]
}

/// Ordinary (non-special) addresses, biased towards the policies' ranges.
fn ordinary_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        any::<u16>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(0x5db8_0000 | u32::from(v)))),
        any::<u16>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(0x0808_0000 | u32::from(v)))),
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(0x0800_0000 | (v >> 8)))),
        any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        any::<u64>()
            .prop_map(|v| IpAddr::V6(Ipv6Addr::from((0x2606_2800u128 << 96) | u128::from(v)))),
    ]
    .prop_filter("ordinary", |ip| classify_ip(*ip).is_none())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// The PDP's half of the proxy's contract (`EgressProxy::confirm_answer`):
    /// for a name, a DNS answer made only of ordinary addresses never changes
    /// the evaluation, so the proxy may skip asking again with it.
    #[test]
    fn ordinary_answers_never_change_a_name_decision(
        policy in 0usize..WITH_CIDRS.len(),
        host in prop::sample::select(vec![
            "a.example", "api.example.com", "bad.example", "x.cdn.test", "other.test",
            "example", "deep.a.cdn.test", "api.example.com.",
        ]),
        port in prop::sample::select(vec![80u16, 443, 5432, 8080, 9000]),
        exe in prop::sample::select(vec!["/usr/bin/curl", "/usr/bin/psql"]),
        src in 0usize..3,
        ips in prop::collection::vec(ordinary_ip(), 1..5),
    ) {
        let ctx = MemoryContext::new();
        let source = [HostSource::Connect, HostSource::Sni, HostSource::HttpHost][src];
        let eval = |ip: Option<IpAddr>, resolved: &[IpAddr]| {
            with_cidrs(policy).evaluate(
                &EvalRequest {
                    workload: "w",
                    exe,
                    host,
                    port,
                    ip,
                    resolved_ips: resolved,
                    host_source: source,
                    process: Some(ProcKey { pid: 7, start_time: 1 }),
                    ancestors: &[],
                },
                &ctx,
            )
        };
        let name_only = eval(None, &[]);
        let answered = eval(Some(ips[0]), &ips);
        prop_assert_eq!(&name_only, &answered, "{} {:?}", host, ips);
    }
}
