//! DESIGN §4 semantics of the policy language, evaluated in-process.

use std::net::IpAddr;
use std::time::Duration;

use secureops_policy::policy::{
    CacheScope, ContextView, EvalRequest, Evaluation, HostSource, MemoryContext, Mode, Policy,
    PolicyError, ProcKey, Verdict,
};

const W: &str = "agent-1";
const P: ProcKey = ProcKey {
    pid: 100,
    start_time: 5000,
};
const PARENT: ProcKey = ProcKey {
    pid: 50,
    start_time: 4000,
};

fn compile(y: &str) -> Policy {
    match Policy::compile(y) {
        Ok(p) => p,
        Err(errs) => {
            let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
            panic!("policy refused:\n{}", msgs.join("\n"))
        }
    }
}

fn errors(y: &str) -> Vec<PolicyError> {
    match Policy::compile(y) {
        Ok(_) => panic!("policy unexpectedly accepted:\n{y}"),
        Err(e) => e,
    }
}

/// A request builder with sensible defaults (CONNECT, attributed, no IPs).
#[derive(Clone)]
struct Req {
    workload: String,
    exe: String,
    host: String,
    port: u16,
    ip: Option<IpAddr>,
    resolved: Vec<IpAddr>,
    source: HostSource,
    process: Option<ProcKey>,
    ancestors: Vec<ProcKey>,
}

fn req(host: &str, port: u16) -> Req {
    Req {
        workload: W.into(),
        exe: "/usr/bin/curl".into(),
        host: host.into(),
        port,
        ip: None,
        resolved: vec![],
        source: HostSource::Connect,
        process: Some(P),
        ancestors: vec![PARENT],
    }
}

impl Req {
    fn ip(mut self, ip: &str) -> Self {
        self.ip = Some(ip.parse().unwrap());
        self
    }
    fn source(mut self, s: HostSource) -> Self {
        self.source = s;
        self
    }
    fn exe(mut self, e: &str) -> Self {
        self.exe = e.into();
        self
    }
    fn workload(mut self, w: &str) -> Self {
        self.workload = w.into();
        self
    }
    fn process(mut self, p: Option<ProcKey>) -> Self {
        self.process = p;
        self
    }
    fn eval(&self, p: &Policy, ctx: &dyn ContextView) -> Evaluation {
        p.evaluate(
            &EvalRequest {
                workload: &self.workload,
                exe: &self.exe,
                host: &self.host,
                port: self.port,
                ip: self.ip,
                resolved_ips: &self.resolved,
                host_source: self.source,
                process: self.process,
                ancestors: &self.ancestors,
            },
            ctx,
        )
    }
}

fn verdict(p: &Policy, r: &Req) -> Verdict {
    r.eval(p, &MemoryContext::new()).verdict
}

const BASE: &str = r#"
version: 1
egress_allowlist:
  - github.com
  - "*.githubusercontent.com"
  - pypi.org:443
rules:
  - id: api
    action: allow
    destinations:
      - host: api.example.com
        ports: [443, "8000-8100"]
  - id: block-evil
    action: deny
    destinations:
      - host: "*.evil.example"
  - id: nets
    action: allow
    destinations:
      - cidr: 93.184.216.0/24
        ports: [443]
      - cidr: 10.20.0.0/16
        ports: [5432]
      - cidr: "2606:2800:220::/48"
"#;

#[test]
fn allowlist_shorthand_ports_and_wildcards() {
    let p = compile(BASE);
    assert_eq!(p.rule_count(), 4);
    assert_eq!(p.mode(), Mode::Enforce);
    assert_eq!(verdict(&p, &req("github.com", 443)), Verdict::Allow);
    assert_eq!(verdict(&p, &req("github.com", 80)), Verdict::Allow);
    assert_eq!(verdict(&p, &req("github.com", 22)), Verdict::Deny);
    assert_eq!(verdict(&p, &req("pypi.org", 443)), Verdict::Allow);
    assert_eq!(verdict(&p, &req("pypi.org", 80)), Verdict::Deny);
    let e = req("raw.githubusercontent.com", 443).eval(&p, &MemoryContext::new());
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.reason, "rule:egress_allowlist");
    assert_eq!(e.rule_id.as_deref(), Some("egress_allowlist"));
    assert_eq!(e.cache_scope, CacheScope::Workload);
    assert_eq!(e.cache_ttl, Duration::from_secs(30));
    assert!(!e.context_dependent);
    assert_eq!(
        verdict(&p, &req("a.b.githubusercontent.com", 443)),
        Verdict::Allow
    );
}

#[test]
fn wildcard_never_matches_apex_or_lookalikes() {
    let p = compile(BASE);
    for host in [
        "githubusercontent.com",
        "githubusercontent.com.evil",
        "evilgithubusercontent.com",
        "x.githubusercontent.com.evil",
        "githubusercontent.com.",
        "xgithubusercontent.com",
    ] {
        let e = req(host, 443).eval(&p, &MemoryContext::new());
        assert_eq!(e.verdict, Verdict::Deny, "{host}: {e:?}");
    }
    // Exact rules are exact too.
    assert_eq!(verdict(&p, &req("www.github.com", 443)), Verdict::Deny);
    assert_eq!(verdict(&p, &req("github.com.evil", 443)), Verdict::Deny);
}

#[test]
fn normalisation_at_request() {
    let p = compile(BASE);
    for host in ["GitHub.COM", "github.com.", "GITHUB.com."] {
        let e = req(host, 443).eval(&p, &MemoryContext::new());
        assert_eq!(e.verdict, Verdict::Allow, "{host}");
        assert_eq!(e.normalized_host.as_deref(), Some("github.com"));
    }
    // IDNA: a rule written in Unicode matches the punycode on the wire and
    // vice versa.
    let p = compile(
        "version: 1\nrules:\n  - id: idn\n    action: allow\n    destinations:\n      - host: bücher.example\n",
    );
    assert_eq!(
        verdict(&p, &req("xn--bcher-kva.example", 443)),
        Verdict::Allow
    );
    assert_eq!(verdict(&p, &req("BÜCHER.example", 443)), Verdict::Allow);
    for bad in [
        "github.com..",
        "git hub.com",
        "-x.example",
        "a..b",
        "x/y",
        "github.com:443",
    ] {
        let e = req(bad, 443).eval(&p, &MemoryContext::new());
        assert_eq!(e.verdict, Verdict::Deny, "{bad}");
        assert!(e.reason.starts_with("invalid_host"), "{bad}: {}", e.reason);
    }
}

#[test]
fn deny_overrides_allow_and_escalate() {
    let y = r#"
version: 1
rules:
  - id: allow-all-evil
    action: allow
    destinations: [{host: "*.evil.example"}]
  - id: esc
    action: escalate
    destinations: [{host: "x.evil.example"}]
  - id: no-evil
    action: deny
    destinations: [{host: "x.evil.example", ports: [443]}]
"#;
    let p = compile(y);
    let e = req("x.evil.example", 443).eval(&p, &MemoryContext::new());
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "rule:no-evil")
    );
    // Port 80: deny does not match, escalate beats allow.
    let e = req("x.evil.example", 80).eval(&p, &MemoryContext::new());
    assert_eq!(e.verdict, Verdict::Escalate);
    assert_eq!(e.rule_id.as_deref(), Some("esc"));
    assert_eq!(e.cache_scope, CacheScope::None);
    // Only the allow rule.
    let e = req("y.evil.example", 80).eval(&p, &MemoryContext::new());
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Allow, "rule:allow-all-evil")
    );
}

#[test]
fn port_ranges() {
    let p = compile(BASE);
    for (port, want) in [
        (443, Verdict::Allow),
        (8000, Verdict::Allow),
        (8050, Verdict::Allow),
        (8100, Verdict::Allow),
        (7999, Verdict::Deny),
        (8101, Verdict::Deny),
        (80, Verdict::Deny),
    ] {
        assert_eq!(
            verdict(&p, &req("api.example.com", port)),
            want,
            "port {port}"
        );
    }
}

#[test]
fn ip_literals_never_match_host_rules() {
    let y = r#"
version: 1
rules:
  - id: names
    action: allow
    destinations:
      - host: localhost
      - host: "*.nip.io"
      - host: example.com
"#;
    let p = compile(y);
    for lit in [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "127.0.0.1.",
        "[::1]",
        "::1",
        "[::ffff:127.0.0.1]",
        "::ffff:7f00:1",
        "[fe80::1%25eth0]",
        "93.184.216.34",
        "1572395042",
        "[2606:2800:220:1:248:1893:25c8:1946]",
        "\u{ff11}\u{ff12}\u{ff17}.0.0.1",
    ] {
        for src in [
            HostSource::Connect,
            HostSource::HttpHost,
            HostSource::DnsQuery,
        ] {
            let e = req(lit, 443).source(src).eval(&p, &MemoryContext::new());
            assert_ne!(e.verdict, Verdict::Allow, "{lit} via {src:?}: {e:?}");
        }
    }
    // SNI must never carry an IP literal at all.
    let e = req("93.184.216.34", 443)
        .source(HostSource::Sni)
        .eval(&compile(BASE), &MemoryContext::new());
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "sni_ip_literal")
    );
    // Host rules written as IPs are refused at load.
    let errs = errors(
        "version: 1\nrules:\n  - id: x\n    action: allow\n    destinations: [{host: 10.0.0.1}]\n",
    );
    assert!(errs[0].message.contains("cidr"), "{errs:?}");
    let errs = errors("version: 1\negress_allowlist: [\"2130706433\"]\n");
    assert!(errs[0].message.contains("IP address"), "{errs:?}");
}

#[test]
fn ip_destinations_only_via_cidr_rules() {
    let p = compile(BASE);
    let ok = req("93.184.216.34", 443).eval(&p, &MemoryContext::new());
    assert_eq!(
        (ok.verdict, ok.reason.as_str()),
        (Verdict::Allow, "rule:nets")
    );
    assert_eq!(ok.normalized_host.as_deref(), Some("93.184.216.34"));
    // Any spelling of the same IP.
    for s in ["1572395042", "0x5db8d822", "[::ffff:93.184.216.34]"] {
        assert_eq!(verdict(&p, &req(s, 443)), Verdict::Allow, "{s}");
    }
    assert_eq!(verdict(&p, &req("93.184.216.34", 80)), Verdict::Deny);
    let e = req("93.184.217.1", 443).eval(&p, &MemoryContext::new());
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "ip_literal_no_cidr")
    );
    assert_eq!(
        verdict(&p, &req("[2606:2800:220:1::1]", 8443)),
        Verdict::Allow
    );
    // Host literal and dialled IP must agree.
    let e = req("93.184.216.34", 443)
        .ip("1.1.1.1")
        .eval(&p, &MemoryContext::new());
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "ip_mismatch")
    );
    // default: escalate never escalates an IP literal (names only).
    let p = compile("version: 1\ndefault: escalate\n");
    assert_eq!(verdict(&p, &req("8.8.8.8", 443)), Verdict::Deny);
    assert_eq!(verdict(&p, &req("dns.google", 443)), Verdict::Escalate);
}

#[test]
fn special_ips_and_embeddings_denied_unless_cidr_allows() {
    let y = "version: 1\ndefault: escalate\negress_allowlist: [example.com]\nrules:\n  - id: any-dest-escalate\n    action: escalate\n    destinations: [{cidr: 0.0.0.0/0}, {cidr: \"::/0\"}]\n";
    let p = compile(y);
    for ip in [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.0.1",
        "100.64.0.1",
        "169.254.169.254",
        "169.254.1.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "[::1]",
        "[::]",
        "[fc00::1]",
        "[fd00:ec2::254]",
        "[fe80::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",
        "[64:ff9b:1:a00:0:100::]",
        "[2002:7f00:1::1]",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
        "[::127.0.0.1]",
    ] {
        let e = req(ip, 443).eval(&p, &MemoryContext::new());
        assert_eq!(e.verdict, Verdict::Deny, "{ip}: {e:?}");
        assert_eq!(e.reason, "special_ip", "{ip}");
    }
    // A public IP goes through the escalate cidr rule.
    assert_eq!(verdict(&p, &req("8.8.8.8", 443)), Verdict::Escalate);

    // An allow rule's cidr containing the special IP allows it.
    let p = compile(
        "version: 1\nrules:\n  - id: db\n    action: allow\n    destinations: [{cidr: 10.20.0.0/16, ports: [5432]}, {cidr: \"fd00::/8\"}]\n",
    );
    assert_eq!(verdict(&p, &req("10.20.1.2", 5432)), Verdict::Allow);
    assert_eq!(
        verdict(&p, &req("[::ffff:10.20.1.2]", 5432)),
        Verdict::Allow
    );
    assert_eq!(verdict(&p, &req("10.21.1.2", 5432)), Verdict::Deny);
    assert_eq!(verdict(&p, &req("[fd00::5]", 443)), Verdict::Allow);
    assert_eq!(verdict(&p, &req("[fc00::5]", 443)), Verdict::Deny);
}

#[test]
fn dns_rebinding_guard_and_resolved_ip_allow() {
    let y = "version: 1\nresolved_ip_allow: [10.20.0.0/16]\negress_allowlist: [github.com, internal.corp]\n";
    let p = compile(y);
    let ctx = MemoryContext::new();
    let mut r = req("github.com", 443).ip("140.82.121.4");
    assert_eq!(r.eval(&p, &ctx).verdict, Verdict::Allow);
    for bad in [
        "127.0.0.1",
        "169.254.169.254",
        "::ffff:127.0.0.1",
        "10.21.0.1",
    ] {
        let e = req("github.com", 443).ip(bad).eval(&p, &ctx);
        assert_eq!(
            (e.verdict, e.reason.as_str()),
            (Verdict::Deny, "dns_rebinding"),
            "{bad}"
        );
    }
    // Any one special address among the resolved set is enough to deny.
    r.resolved = vec![
        "140.82.121.4".parse().unwrap(),
        "192.168.1.1".parse().unwrap(),
    ];
    assert_eq!(r.eval(&p, &ctx).reason, "dns_rebinding");
    // resolved_ip_allow covers internal names...
    let e = req("internal.corp", 443).ip("10.20.3.4").eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Allow);
    // ...but never makes the IP literal itself allowed.
    assert_eq!(verdict(&p, &req("10.20.3.4", 443)), Verdict::Deny);
}

#[test]
fn original_dst_cidr_and_dns_learned() {
    let p = compile(BASE);
    let mut ctx = MemoryContext::new();
    let od = |ip: &str| req("", 443).source(HostSource::OriginalDst).ip(ip);
    let e = od("93.184.216.34").eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Allow, "rule:nets")
    );
    assert_eq!(e.cache_scope, CacheScope::Workload);
    assert_eq!(e.normalized_host.as_deref(), Some("93.184.216.34"));
    let e = od("140.82.121.4").eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "original_dst_unmatched")
    );
    // Not cacheable: a DNS answer learned later must let it through.
    assert_eq!(e.cache_scope, CacheScope::None);
    ctx.add_dns(W, "140.82.121.4".parse().unwrap(), "GitHub.com.");
    let e = od("140.82.121.4").eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Allow, "{e:?}");
    assert!(
        e.reason.starts_with("dns_learned:github.com:"),
        "{}",
        e.reason
    );
    assert!(e.context_dependent);
    assert_eq!(e.cache_scope, CacheScope::None);
    // Learned by another workload: not ours.
    let e = od("140.82.121.4").workload("agent-2").eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Deny);
    // A name learned for a special IP is still a rebinding.
    ctx.add_dns(W, "127.0.0.1".parse().unwrap(), "github.com");
    let e = od("127.0.0.1").eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Deny);
    // A learned name the policy does not allow.
    ctx.add_dns(W, "1.2.3.4".parse().unwrap(), "evil.example");
    assert_eq!(od("1.2.3.4").eval(&p, &ctx).verdict, Verdict::Deny);
    // No host and no IP: malformed.
    let e = req("", 443).source(HostSource::OriginalDst).eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Deny);
}

const TAINT: &str = r#"
version: 1
egress_allowlist: [github.com]
rules:
  - id: tainted-after-credential-read
    action: deny
    when:
      process_or_ancestor_opened: ["**/.env", "**/.aws/credentials", "**/.ssh/id_*"]
      within: 10m
"#;

#[test]
fn taint_inside_and_outside_window() {
    let p = compile(TAINT);
    assert_eq!(p.max_taint_window(), Some(Duration::from_secs(600)));
    let r = req("github.com", 443);
    let mut ctx = MemoryContext::new();
    let clean = r.eval(&p, &ctx);
    assert_eq!(clean.verdict, Verdict::Allow);
    assert!(clean.context_dependent);
    assert_eq!(clean.cache_scope, CacheScope::Process);

    ctx.add_open(W, P, "/home/u/.aws/credentials", Duration::from_millis(200));
    let e = r.eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.reason, "tainted:tainted-after-credential-read");
    assert_eq!(e.rule_id.as_deref(), Some("tainted-after-credential-read"));
    assert!(e.context_dependent);
    assert_eq!(e.cache_scope, CacheScope::None);

    // Outside the window.
    let mut old = MemoryContext::new();
    old.add_open(W, P, "/home/u/.env", Duration::from_secs(601));
    assert_eq!(r.eval(&p, &old).verdict, Verdict::Allow);
    old.add_open(W, P, "/home/u/.env", Duration::from_secs(599));
    assert_eq!(r.eval(&p, &old).verdict, Verdict::Deny);

    // A non-matching path.
    let mut other = MemoryContext::new();
    other.add_open(W, P, "/home/u/.bashrc", Duration::ZERO);
    assert_eq!(r.eval(&p, &other).verdict, Verdict::Allow);
}

#[test]
fn taint_pid_reuse_ancestors_and_workload_isolation() {
    let p = compile(TAINT);
    let r = req("github.com", 443);
    // Same pid, different start time: a different (earlier) process.
    let mut ctx = MemoryContext::new();
    ctx.add_open(
        W,
        ProcKey {
            pid: P.pid,
            start_time: P.start_time - 1,
        },
        "/x/.env",
        Duration::ZERO,
    );
    assert_eq!(r.eval(&p, &ctx).verdict, Verdict::Allow);
    // Taint of another workload's process with the same key.
    ctx.add_open("agent-2", P, "/x/.env", Duration::ZERO);
    assert_eq!(r.eval(&p, &ctx).verdict, Verdict::Allow);
    // An ancestor opened it: the child is tainted.
    ctx.add_open(W, PARENT, "/root/.ssh/id_ed25519", Duration::from_secs(1));
    let e = r.eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(e.reason.starts_with("tainted:"));
    // A sibling (not in the chain) is not affected.
    let mut sib = r.clone();
    sib.ancestors = vec![ProcKey {
        pid: 51,
        start_time: 1,
    }];
    assert_eq!(sib.eval(&p, &ctx).verdict, Verdict::Allow);
}

#[test]
fn unattributed_process_fails_closed_on_taint_rules() {
    let p = compile(TAINT);
    let e = req("github.com", 443)
        .process(None)
        .eval(&p, &MemoryContext::new());
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "fail_closed:unattributed")
    );
    // Without taint rules, unattributed traffic is judged on the destination.
    let p = compile(BASE);
    let e = req("github.com", 443)
        .process(None)
        .eval(&p, &MemoryContext::new());
    assert_eq!(e.verdict, Verdict::Allow);
}

#[test]
fn workloads_and_processes_filters() {
    let y = r#"
version: 1
rules:
  - id: ci-db
    action: allow
    workloads: ["agent-*"]
    processes: ["/usr/bin/psql"]
    destinations:
      - cidr: 10.20.0.0/16
        ports: [5432]
      - host: db.example.com
        ports: [5432]
"#;
    let p = compile(y);
    let base = req("db.example.com", 5432).exe("/usr/bin/psql");
    let e = base.eval(&p, &MemoryContext::new());
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.cache_scope, CacheScope::Process);
    assert!(e.context_dependent);
    assert_eq!(
        verdict(&p, &base.clone().exe("/usr/bin/curl")),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&p, &base.clone().exe("/tmp/usr/bin/psql")),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&p, &base.clone().workload("batch-1")),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&p, &req("10.20.0.9", 5432).exe("/usr/bin/psql")),
        Verdict::Allow
    );
    // Real globs (not only literal paths) in `processes`.
    let g = compile(
        "version: 1\nrules:\n  - id: tools\n    action: allow\n    processes: [\"/opt/*/bin/tool\", \"/usr/lib/**/helper-?\"]\n    destinations: [{host: t.example}]\n",
    );
    for (exe, want) in [
        ("/opt/acme/bin/tool", Verdict::Allow),
        ("/opt/a/b/bin/tool", Verdict::Deny),
        ("/usr/lib/x/y/helper-1", Verdict::Allow),
        ("/usr/lib/helper-12", Verdict::Deny),
    ] {
        assert_eq!(verdict(&g, &req("t.example", 443).exe(exe)), want, "{exe}");
    }
    // Allow rules need a positively identified exe.
    assert_eq!(verdict(&p, &base.clone().process(None)), Verdict::Deny);
    assert_eq!(verdict(&p, &base.clone().exe("")), Verdict::Deny);
}

#[test]
fn escalation_approve_deny_and_default_escalate() {
    let y = r#"
version: 1
default: escalate
rules:
  - id: ask
    action: escalate
    destinations: [{host: paste.example, ports: [443]}]
  - id: block
    action: deny
    destinations: [{host: evil.example}]
"#;
    let p = compile(y);
    let mut ctx = MemoryContext::new();
    let r = req("PASTE.example.", 443);
    let e = r.eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Escalate);
    assert_eq!(e.normalized_host.as_deref(), Some("paste.example"));
    assert_eq!(e.cache_scope, CacheScope::None);
    ctx.resolve(W, "paste.example", 443, true);
    let e = r.eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Allow, "escalation_approved")
    );
    assert_eq!(e.rule_id.as_deref(), Some("ask"));
    assert_eq!(e.cache_scope, CacheScope::None);
    ctx.resolve(W, "paste.example", 443, false);
    let e = r.eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "escalation_denied")
    );

    // default: escalate consults the resolution too.
    let other = req("unknown.example", 443);
    let e = other.eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Escalate, "default_escalate")
    );
    ctx.resolve(W, "unknown.example", 443, true);
    assert_eq!(other.eval(&p, &ctx).verdict, Verdict::Allow);
    // A deny rule is never escalated nor approved away.
    ctx.resolve(W, "evil.example", 443, true);
    assert_eq!(
        req("evil.example", 443).eval(&p, &ctx).verdict,
        Verdict::Deny
    );
}

#[test]
fn report_mode_allows_but_flags() {
    let y = format!("{}\nmode: report\n", TAINT.trim_end());
    let p = compile(&y);
    assert_eq!(p.mode(), Mode::Report);
    let mut ctx = MemoryContext::new();
    ctx.add_open(W, P, "/a/.env", Duration::ZERO);
    let e = req("github.com", 443).eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Allow);
    assert!(e.would_deny);
    assert!(e.reason.starts_with("tainted:"));
    assert_eq!(e.cache_scope, CacheScope::None);
    let e = req("other.example", 443).eval(&p, &MemoryContext::new());
    assert_eq!(
        (e.verdict, e.would_deny, e.reason.as_str()),
        (Verdict::Allow, true, "default_deny")
    );
    // A plain allow is not flagged.
    let e = req("github.com", 443).eval(&p, &MemoryContext::new());
    assert!(!e.would_deny);
    // Malformed input stays denied even in report mode.
    let e = req("bad host", 443).eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Deny);
}

#[test]
fn require_sensor_fails_closed() {
    let y = format!("{}\nrequire_sensor: true\n", BASE.trim_end());
    let p = compile(&y);
    assert!(p.requires_sensor());
    let mut ctx = MemoryContext::new();
    let e = req("github.com", 443).eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "fail_closed:sensor_unavailable")
    );
    assert_eq!(e.cache_scope, CacheScope::None);
    ctx.set_sensor_alive(W);
    let e = req("github.com", 443).eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Allow);
    assert!(e.context_dependent);
    assert!(!compile(BASE).requires_sensor());
}

#[test]
fn dns_query_ignores_ports() {
    let p = compile(BASE);
    // pypi.org is only allowed on 443, but the name must resolve.
    let e = req("pypi.org", 53)
        .source(HostSource::DnsQuery)
        .eval(&p, &MemoryContext::new());
    assert_eq!(e.verdict, Verdict::Allow);
    let e = req("nope.example", 53)
        .source(HostSource::DnsQuery)
        .eval(&p, &MemoryContext::new());
    assert_eq!(e.verdict, Verdict::Deny);
    let e = req("github.com", 443)
        .source(HostSource::Unspecified)
        .eval(&p, &MemoryContext::new());
    assert_eq!(e.verdict, Verdict::Deny);
    // Port 0 is malformed for connections (even with an all-ports rule).
    let e = req("github.com", 0).eval(&p, &MemoryContext::new());
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "invalid_request:port")
    );
    let all = compile(
        "version: 1\nrules:\n  - id: any\n    action: allow\n    destinations: [{host: a.example}, {cidr: 1.2.3.0/24}]\n",
    );
    assert_eq!(verdict(&all, &req("a.example", 1)), Verdict::Allow);
    assert_eq!(verdict(&all, &req("a.example", 65535)), Verdict::Allow);
    assert_eq!(verdict(&all, &req("a.example", 0)), Verdict::Deny);
    assert_eq!(verdict(&all, &req("1.2.3.4", 0)), Verdict::Deny);
}

#[test]
fn bare_star_and_bad_patterns_refused() {
    for y in [
        "version: 1\negress_allowlist: [\"*\"]\n",
        "version: 1\nrules:\n  - id: a\n    action: allow\n    destinations: [{host: \"*\"}]\n",
    ] {
        let e = errors(y);
        assert!(e[0].message.contains("bare `*`"), "{e:?}");
    }
    for pat in [
        "\"a.*.example\"",
        "\"*example.com\"",
        "\"**.example.com\"",
        "\"*.\"",
    ] {
        let y = format!("version: 1\negress_allowlist: [{pat}]\n");
        assert!(Policy::compile(&y).is_err(), "{pat}");
    }
}

#[test]
fn errors_are_all_located() {
    let y = r#"version: 1
mode: enforced
default: allow
colour: blue
rules:
  - id: good
    action: allow
    destinations: [{host: ok.example}]
  - id: bad-ports
    action: allow
    destinations:
      - host: api.example.com
        ports: [443, "9000-8000", 70000]
  - action: deny
    destinations: [{cidr: 10.0.0.1/8}]
  - id: good
    action: allow
    destinations: [{host: dup.example}]
  - id: taint
    action: deny
    when:
      process_or_ancestor_opened: ["**/.env"]
      within: 10 minutes
    extra: 1
  - id: no-dest
    action: allow
"#;
    let errs = errors(y);
    let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
    let find = |needle: &str| {
        errs.iter()
            .find(|e| e.message.contains(needle))
            .unwrap_or_else(|| {
                panic!(
                    "no error containing {needle:?} in:\n{}",
                    rendered.join("\n")
                )
            })
    };
    let e = find("invalid mode");
    assert_eq!((e.line, e.column, e.rule_id.as_deref()), (2, 7, None));
    assert_eq!(e.path, "mode");
    let e = find("invalid default");
    assert_eq!((e.line, e.column), (3, 10));
    let e = find("unknown key `colour`");
    assert_eq!((e.line, e.column), (4, 1));
    let e = find("reversed");
    assert_eq!(
        (e.line, e.column, e.rule_id.as_deref()),
        (13, 22, Some("bad-ports"))
    );
    assert_eq!(e.path, "rules[1].destinations[0].ports[1]");
    let e = find("invalid port `70000`");
    assert_eq!((e.line, e.column), (13, 35));
    let e = find("missing required key `id`");
    assert_eq!((e.line, e.rule_id.as_deref()), (14, None));
    let e = find("host bits set");
    assert_eq!((e.line, e.column), (15, 27));
    let e = find("duplicate rule id");
    assert_eq!(
        (e.line, e.column, e.rule_id.as_deref()),
        (16, 9, Some("good"))
    );
    let e = find("invalid duration");
    assert_eq!(
        (e.line, e.column, e.rule_id.as_deref()),
        (23, 15, Some("taint"))
    );
    let e = find("unknown key `extra`");
    assert_eq!(
        (e.line, e.column, e.rule_id.as_deref()),
        (24, 5, Some("taint"))
    );
    let e = find("must list `destinations`");
    assert_eq!((e.line, e.rule_id.as_deref()), (25, Some("no-dest")));
    assert_eq!(errs.len(), 11, "{}", rendered.join("\n"));
    // Display format: "line:col: [rule id] path: message".
    assert!(
        rendered
            .iter()
            .any(|s| s.starts_with("13:22: [rule bad-ports] rules[1].destinations[0].ports[1]: ")),
        "{rendered:?}"
    );
}

#[test]
fn version_and_shape_errors() {
    assert!(errors("mode: enforce\n")[0].message.contains("version"));
    assert!(errors("version: 2\n")[0].message.contains("version"));
    assert!(errors("version: \"1\"\n")[0].message.contains("version"));
    assert!(errors("")[0].message.contains("empty"));
    assert!(errors("- a\n- b\n")[0].message.contains("mapping"));
    let e = errors("version: 1\nversion: 1\n");
    assert_eq!((e[0].line, e[0].column), (2, 1));
    let e = errors("version: 1\nrules: [\n");
    assert!(e[0].message.contains("YAML syntax error"));
    let e = errors(
        "version: 1\nrules:\n  - id: a\n    action: maybe\n    destinations: [{host: a.example, cidr: 1.2.3.0/24}]\n",
    );
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e.iter().all(|e| e.rule_id.as_deref() == Some("a")));
    let e = errors("version: 1\nrules:\n  - id: a\n    action: deny\n    workloads: [\"a[\"]\n");
    assert_eq!((e[0].line, e[0].column), (5, 17));
    // Reserved id.
    assert!(!errors("version: 1\nrules:\n  - id: egress_allowlist\n    action: deny\n").is_empty());
}

#[test]
fn source_and_accessors() {
    let p = compile(TAINT);
    assert_eq!(p.source(), TAINT);
    assert_eq!(p.rule_count(), 2);
    assert_eq!(compile(BASE).max_taint_window(), None);
    let y = "version: 1\nrules:\n  - id: a\n    action: deny\n    when: {process_or_ancestor_opened: [\"**/x\"], within: 200ms}\n  - id: b\n    action: deny\n    when: {process_or_ancestor_opened: [\"**/y\"], within: 1h30m}\n";
    assert_eq!(
        compile(y).max_taint_window(),
        Some(Duration::from_secs(5400))
    );
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
}

#[test]
fn destination_less_rules_restrict_ip_destinations() {
    let y = r#"
version: 1
rules:
  - id: ask-when-tainted
    action: escalate
    when:
      process_or_ancestor_opened: ["**/.env"]
      within: 1m
  - id: deny-after-ssh-key
    action: deny
    when:
      process_or_ancestor_opened: ["**/.ssh/id_*"]
      within: 1m
  - id: nets
    action: allow
    destinations: [{cidr: 93.184.216.0/24}]
"#;
    let p = compile(y);
    let mut ctx = MemoryContext::new();
    assert_eq!(
        req("93.184.216.34", 443).eval(&p, &ctx).verdict,
        Verdict::Allow
    );
    ctx.add_open(W, P, "/w/.env", Duration::from_secs(1));
    let e = req("93.184.216.34", 443).eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Escalate, "tainted:ask-when-tainted")
    );
    // Approved: the cidr allow rule makes the IP reachable.
    ctx.resolve(W, "93.184.216.34", 443, true);
    assert_eq!(
        req("93.184.216.34", 443).eval(&p, &ctx).verdict,
        Verdict::Allow
    );
    // Approval alone never makes an IP without a cidr allow rule reachable.
    ctx.resolve(W, "8.8.8.8", 443, true);
    let e = req("8.8.8.8", 443).eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "ip_literal_no_cidr")
    );
    // A destination-less deny rule denies IP destinations too.
    ctx.add_open(W, PARENT, "/root/.ssh/id_rsa", Duration::from_secs(1));
    let e = req("93.184.216.34", 443).eval(&p, &ctx);
    assert_eq!(
        (e.verdict, e.reason.as_str()),
        (Verdict::Deny, "tainted:deny-after-ssh-key")
    );
    let e = req("", 443)
        .source(HostSource::OriginalDst)
        .ip("93.184.216.34")
        .eval(&p, &ctx);
    assert_eq!(e.verdict, Verdict::Deny);
}

#[test]
fn host_may_match_prefilter() {
    use secureops_policy::policy::DefaultAction;
    let p = compile(BASE);
    assert_eq!(p.default_action(), DefaultAction::Deny);
    assert!(p.host_may_match("github.com", 443));
    assert!(!p.host_may_match("github.com", 22));
    assert!(p.host_may_match("a.b.githubusercontent.com", 443));
    assert!(!p.host_may_match("githubusercontent.com", 443));
    assert!(p.host_may_match("api.example.com", 8050));
    // Only deny rules match: nothing could allow it.
    assert!(!p.host_may_match("x.evil.example", 443));
    assert!(!p.host_may_match("unknown.example", 443));
    // With `default: escalate` every name may end up allowed.
    let p = compile("version: 1\ndefault: escalate\n");
    assert_eq!(p.default_action(), DefaultAction::Escalate);
    assert!(p.host_may_match("unknown.example", 443));
}
