//! In-process evaluation benchmark: a 10,000-rule policy (exact hosts,
//! `*.` wildcards, CIDRs, workload / exe filters, taint conditions), 1M
//! evaluations timed individually, p50 / p99 / p99.9 printed.
//!
//! `cargo run --release -p secureops-policy --example policy_bench [-- N]`

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use secureops_policy::policy::{ContextView, EvalRequest, HostSource, Policy, ProcKey, Verdict};

/// A context store shaped like the PDP's: opens keyed by process.
struct BenchCtx {
    opens: HashMap<ProcKey, Vec<(String, Duration)>>,
}

impl ContextView for BenchCtx {
    fn visit_opens(&self, _w: &str, p: ProcKey, f: &mut dyn FnMut(&str, Duration)) {
        if let Some(v) = self.opens.get(&p) {
            for (path, age) in v {
                f(path, *age);
            }
        }
    }
    fn dns_names_for(&self, _w: &str, _ip: IpAddr) -> Vec<String> {
        Vec::new()
    }
    fn sensor_alive(&self, _w: &str) -> bool {
        true
    }
    fn escalation_resolution(&self, _w: &str, _h: &str, _p: u16) -> Option<bool> {
        None
    }
}

fn build_policy(n_rules: usize) -> String {
    let mut y = String::with_capacity(n_rules * 160);
    y.push_str("version: 1\ndefault: deny\nresolved_ip_allow: [10.20.0.0/16]\n");
    y.push_str("egress_allowlist: [github.com, \"*.githubusercontent.com\", pypi.org:443]\n");
    y.push_str("rules:\n");
    // One global taint rule (checked on every request, like the DESIGN example).
    y.push_str(
        "  - id: tainted-after-credential-read\n    action: deny\n    when:\n      process_or_ancestor_opened: [\"**/.env\", \"**/.aws/credentials\", \"**/.ssh/id_*\"]\n      within: 10m\n",
    );
    let mut i = 0;
    while i < n_rules - 2 {
        let k = i % 10;
        let _ = match k {
            // 40 % exact hosts, two destinations each, port lists / ranges.
            0..=3 => write!(
                y,
                "  - id: exact-{i}\n    action: allow\n    destinations:\n      - host: svc{i}.example.com\n        ports: [443, \"8000-8100\"]\n      - host: api{i}.internal.example\n"
            ),
            // 30 % wildcards.
            4..=6 => write!(
                y,
                "  - id: wild-{i}\n    action: {}\n    destinations:\n      - host: \"*.tenant{i}.example.net\"\n",
                if i % 7 == 0 { "deny" } else { "allow" }
            ),
            // 20 % CIDRs, various prefix lengths, v4 and v6.
            7 | 8 => {
                let a = (i / 256) % 200 + 11;
                let b = i % 256;
                if i % 3 == 0 {
                    write!(
                        y,
                        "  - id: cidr-{i}\n    action: allow\n    destinations:\n      - cidr: \"2001:db8:{i:x}::/48\"\n        ports: [443]\n"
                    )
                } else {
                    let len = [16, 20, 24, 28][i % 4];
                    let net = match len {
                        16 => format!("{a}.{b}.0.0/16"),
                        20 => format!("{a}.{b}.{}.0/20", (i % 16) * 16),
                        24 => format!("{a}.{b}.{}.0/24", i % 256),
                        _ => format!("{a}.{b}.{}.{}/28", i % 256, (i % 16) * 16),
                    };
                    write!(
                        y,
                        "  - id: cidr-{i}\n    action: allow\n    workloads: [\"agent-*\"]\n    destinations:\n      - cidr: {net}\n        ports: [443, 5432]\n"
                    )
                }
            }
            // 10 % process / taint conditioned rules.
            _ => {
                if i % 20 == 9 {
                    write!(
                        y,
                        "  - id: taint-{i}\n    action: deny\n    when:\n      process_or_ancestor_opened: [\"**/secret{i}/**\"]\n      within: 5m\n    destinations:\n      - host: \"*.upload{i}.example.org\"\n"
                    )
                } else {
                    write!(
                        y,
                        "  - id: proc-{i}\n    action: allow\n    processes: [\"/usr/bin/psql\", \"/opt/tool{i}/bin/*\"]\n    destinations:\n      - host: db{i}.example.org\n        ports: [5432]\n"
                    )
                }
            }
        };
        i += 1;
    }
    y
}

struct Case {
    kind: usize,
    host: String,
    port: u16,
    ip: Option<IpAddr>,
    source: HostSource,
    exe: &'static str,
    process: ProcKey,
}

fn cases(n_rules: usize) -> Vec<Case> {
    let mut out = Vec::new();
    let clean = ProcKey {
        pid: 1000,
        start_time: 1,
    };
    let tainted = ProcKey {
        pid: 2000,
        start_time: 1,
    };
    for j in 0..1000usize {
        let i = (j * 7919) % (n_rules - 2);
        let (host, port, ip, exe): (String, u16, Option<IpAddr>, &str) = match j % 10 {
            0 | 1 => (
                format!("svc{}.example.com", i - i % 10),
                8042,
                None,
                "/usr/bin/curl",
            ),
            2 => (
                format!("a.b.tenant{}.example.net", i - i % 10 + 4),
                443,
                None,
                "/usr/bin/curl",
            ),
            3 => (
                "raw.githubusercontent.com".into(),
                443,
                None,
                "/usr/bin/git",
            ),
            4 => (
                "GitHub.com.".into(),
                443,
                Some("140.82.121.4".parse().unwrap_or(IpAddr::from([0u8; 4]))),
                "/usr/bin/git",
            ),
            5 => (
                format!("{}.{}.0.9", (i / 256) % 200 + 11, i % 256),
                443,
                None,
                "/usr/bin/curl",
            ),
            6 => (
                format!("db{}.example.org", i - i % 10 + 9),
                5432,
                None,
                "/usr/bin/psql",
            ),
            7 => (format!("unknown{j}.example.io"), 443, None, "/usr/bin/curl"),
            8 => ("169.254.169.254".into(), 80, None, "/usr/bin/curl"),
            _ => (
                format!("x.upload{}.example.org", i - i % 20 + 9),
                443,
                None,
                "/usr/bin/curl",
            ),
        };
        out.push(Case {
            kind: j % 10,
            host,
            port,
            ip,
            source: if j % 3 == 0 {
                HostSource::Sni
            } else {
                HostSource::Connect
            },
            exe,
            process: if j % 13 == 0 { tainted } else { clean },
        });
    }
    out
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let n_rules = 10_000;
    let yaml = build_policy(n_rules);
    let t0 = Instant::now();
    let policy = match Policy::compile(&yaml) {
        Ok(p) => p,
        Err(e) => {
            for x in e.iter().take(10) {
                eprintln!("{x}");
            }
            std::process::exit(1);
        }
    };
    let compile_time = t0.elapsed();
    let mut ctx = BenchCtx {
        opens: HashMap::new(),
    };
    ctx.opens.insert(
        ProcKey {
            pid: 1000,
            start_time: 1,
        },
        vec![("/home/u/.bashrc".into(), Duration::from_secs(1))],
    );
    ctx.opens.insert(
        ProcKey {
            pid: 2000,
            start_time: 1,
        },
        vec![("/home/u/project/.env".into(), Duration::from_secs(3))],
    );
    let ancestors = [
        ProcKey {
            pid: 900,
            start_time: 1,
        },
        ProcKey {
            pid: 1,
            start_time: 0,
        },
    ];
    let cases = cases(n_rules);
    let mut verdicts: HashMap<&'static str, usize> = HashMap::new();
    for c in &cases {
        let e = policy.evaluate(
            &EvalRequest {
                workload: "agent-1",
                exe: c.exe,
                host: &c.host,
                port: c.port,
                ip: c.ip,
                resolved_ips: &[],
                host_source: c.source,
                process: Some(c.process),
                ancestors: &ancestors,
            },
            &ctx,
        );
        let k = match e.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Escalate => "escalate",
        };
        *verdicts.entry(k).or_default() += 1;
    }
    // Warm-up.
    for c in cases.iter().cycle().take(100_000) {
        black_box(policy.evaluate(
            &EvalRequest {
                workload: "agent-1",
                exe: c.exe,
                host: &c.host,
                port: c.port,
                ip: c.ip,
                resolved_ips: &[],
                host_source: c.source,
                process: Some(c.process),
                ancestors: &ancestors,
            },
            &ctx,
        ));
    }
    let mut lat: Vec<u32> = Vec::with_capacity(iters);
    let mut by_kind: Vec<Vec<u32>> = vec![Vec::new(); 10];
    let wall = Instant::now();
    for c in cases.iter().cycle().take(iters) {
        let req = EvalRequest {
            workload: "agent-1",
            exe: c.exe,
            host: &c.host,
            port: c.port,
            ip: c.ip,
            resolved_ips: &[],
            host_source: c.source,
            process: Some(c.process),
            ancestors: &ancestors,
        };
        let t = Instant::now();
        let e = policy.evaluate(black_box(&req), &ctx);
        let d = t.elapsed();
        black_box(e);
        let ns = u32::try_from(d.as_nanos()).unwrap_or(u32::MAX);
        lat.push(ns);
        by_kind[c.kind].push(ns);
    }
    let wall = wall.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "rules={} compile={:.1}ms evaluations={} wall={:.2}s mix(allow/deny/escalate per 1000 cases)={}/{}/{}",
        policy.rule_count(),
        compile_time.as_secs_f64() * 1e3,
        lat.len(),
        wall.as_secs_f64(),
        verdicts.get("allow").copied().unwrap_or(0),
        verdicts.get("deny").copied().unwrap_or(0),
        verdicts.get("escalate").copied().unwrap_or(0),
    );
    println!(
        "latency_ns p50={} p90={} p99={} p99.9={} max={}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        lat[lat.len() - 1]
    );
    if std::env::var_os("BENCH_BY_KIND").is_some() {
        let names = [
            "exact",
            "exact",
            "wildcard",
            "allowlist-wild",
            "allowlist+ip",
            "ip-cidr",
            "exe-rule",
            "miss",
            "special-ip",
            "taint-rule",
        ];
        for (k, mut v) in by_kind.into_iter().enumerate() {
            v.sort_unstable();
            if v.is_empty() {
                continue;
            }
            let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
            println!("  kind {k} {:<15} p50={} p99={}", names[k], q(0.5), q(0.99));
        }
    }
}
