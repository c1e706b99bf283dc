//! `secureops run -- CMD`: run a command with its egress funnelled.
//!
//! Tier `Namespace` (Linux, root): a fresh network namespace whose only
//! route leads to a veth pair; on the host side of the pair every TCP
//! connection is redirected to the proxy's transparent listener and every
//! DNS packet to the sinkhole, and everything else is dropped. The command
//! also gets proxy variables, so proxy-aware clients use CONNECT.
//!
//! Tier `ProxyEnv` (elsewhere): proxy variables only. A program that ignores
//! them is NOT funnelled; we say so loudly instead of pretending.
//!
//! Addresses: the veth pair uses 198.18.0.0/15 (RFC 2544 benchmarking
//! range), which never leaves the machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::output::Output;
use crate::stack::{DEFAULT_POLICY, Stack, StackConfig, default_bin_dir, system_upstream_dns};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (default: the embedded default policy).
    #[arg(long, env = "SECUREOPS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Also allow HOST (repeatable; exact name or `*.suffix`, optional :PORT).
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// Resolve HOST to IP in the proxy (repeatable; HOST=IP).
    #[arg(long = "resolve")]
    pub resolve: Vec<String>,
    /// Workload id.
    #[arg(long, env = "SECUREOPS_WORKLOAD", default_value = "run")]
    pub workload: String,
    /// Data directory for this run's stack (default: a fresh temp dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Upstream DNS server of the sinkhole.
    #[arg(long)]
    pub upstream_dns: Option<SocketAddr>,
    /// Refuse to run unless the namespace tier is available.
    #[arg(long)]
    pub require_namespace: bool,
    /// Show the services' logs.
    #[arg(long)]
    pub verbose: bool,
    /// Directory holding the service binaries (default: next to `secureops`).
    #[arg(long, env = "SECUREOPS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// The enforcement tier a run got (mirrors `EnforcementTier`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunTier {
    /// Own network namespace + transparent redirect + proxy variables.
    Namespace,
    /// Rootless: own user + network namespace, only relays to the proxy and
    /// the sinkhole inside (no transparent redirect; everything else has no
    /// route).
    UserNamespace,
    /// Proxy variables only.
    ProxyEnv,
}

/// Add `--allow` hosts to a policy's `egress_allowlist`. The policy is read
/// as YAML and written back as JSON (which is valid YAML), so the PDP's
/// error locations refer to the generated file.
pub fn policy_with_allows(yaml: &str, allow: &[String]) -> Result<String> {
    if allow.is_empty() {
        return Ok(yaml.to_string());
    }
    let mut v: serde_json::Value =
        serde_saphyr::from_str(yaml).context("parsing the policy to add --allow hosts")?;
    let obj = v.as_object_mut().context("the policy is not a mapping")?;
    let list = obj
        .entry("egress_allowlist")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    let arr = list
        .as_array_mut()
        .context("egress_allowlist is not a list")?;
    for h in allow {
        arr.push(serde_json::Value::String(h.clone()));
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

struct Funnel {
    ns: String,
    host_if: String,
    rules: Vec<Vec<String>>,
}

fn sh(argv: &[&str]) -> Result<()> {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Funnel {
    /// Create the namespace and the veth pair; returns the host-side address.
    fn create(tag: u32) -> Result<(Funnel, Ipv4Addr, Ipv4Addr)> {
        let ns = format!("so-run-{tag}");
        let host_if = format!("sorh{tag}");
        let ns_if = format!("sorn{tag}");
        let n = tag % 16000;
        let host_ip = Ipv4Addr::new(198, 18, (n / 64) as u8, ((n % 64) * 4 + 1) as u8);
        let ns_ip = Ipv4Addr::new(198, 18, (n / 64) as u8, ((n % 64) * 4 + 2) as u8);
        sh(&["ip", "netns", "add", &ns])?;
        let f = Funnel {
            ns: ns.clone(),
            host_if: host_if.clone(),
            rules: Vec::new(),
        };
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        sh(&["ip", "link", "set", &ns_if, "netns", &ns])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        let e = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", ns.as_str()];
            v.extend_from_slice(args);
            sh(&v)
        };
        e(&["ip", "link", "set", "lo", "up"])?;
        e(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        e(&["ip", "link", "set", &ns_if, "up"])?;
        e(&["ip", "route", "add", "default", "via", &host_ip.to_string()])?;
        // No IPv6 inside: it could only bypass the funnel.
        let _ = e(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        Ok((f, host_ip, ns_ip))
    }

    /// Add one iptables rule, given as its words (`-t nat -A PREROUTING ...`),
    /// and remember how to delete it.
    fn rule(&mut self, spec: &str) -> Result<()> {
        let args: Vec<&str> = spec.split_whitespace().collect();
        let mut add = vec!["iptables", "-w"];
        add.extend_from_slice(&args);
        sh(&add)?;
        // The delete form: -I/-A become -D (no rule numbers are used).
        let del = args
            .iter()
            .map(|a| match *a {
                "-I" | "-A" => "-D".to_string(),
                other => other.to_string(),
            })
            .collect();
        self.rules.push(del);
        Ok(())
    }

    /// Host side: TCP → transparent proxy, DNS → sinkhole, nothing else in,
    /// nothing forwarded.
    fn install(
        &mut self,
        transparent: SocketAddr,
        dns: SocketAddr,
        explicit: SocketAddr,
    ) -> Result<()> {
        let i = self.host_if.clone();
        let (t, d, e, eip) = (
            transparent.port(),
            dns.port(),
            explicit.port(),
            explicit.ip(),
        );
        let pre = format!("-t nat -A PREROUTING -i {i}");
        // Explicit-proxy connections keep their destination (the proxy itself).
        self.rule(&format!(
            "-t nat -I PREROUTING -i {i} -p tcp --dport {e} -d {eip} -j ACCEPT"
        ))?;
        self.rule(&format!(
            "{pre} -p udp --dport 53 -j REDIRECT --to-ports {d}"
        ))?;
        self.rule(&format!(
            "{pre} -p tcp --dport 53 -j REDIRECT --to-ports {d}"
        ))?;
        self.rule(&format!("{pre} -p tcp -j REDIRECT --to-ports {t}"))?;
        self.rule(&format!("-I INPUT -i {i} -j DROP"))?;
        for (proto, port) in [("udp", d), ("tcp", d), ("tcp", t), ("tcp", e)] {
            self.rule(&format!(
                "-I INPUT -i {i} -p {proto} --dport {port} -j ACCEPT"
            ))?;
        }
        self.rule(&format!("-I FORWARD -i {i} -j DROP"))?;
        self.rule(&format!("-I FORWARD -o {i} -j DROP"))?;
        // resolv.conf inside the namespace (ip netns exec bind-mounts it).
        let etc = PathBuf::from("/etc/netns").join(&self.ns);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(
            etc.join("resolv.conf"),
            format!("nameserver {}\n", dns.ip()),
        )?;
        Ok(())
    }
}

impl Drop for Funnel {
    fn drop(&mut self) {
        for r in self.rules.iter().rev() {
            let mut v = vec!["iptables".to_string(), "-w".to_string()];
            v.extend(r.iter().cloned());
            let _ = std::process::Command::new(&v[0]).args(&v[1..]).output();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.ns));
    }
}

fn namespace_possible() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (network namespaces and redirect rules need CAP_NET_ADMIN)".into());
    }
    for c in ["ip", "iptables"] {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!("`{c}` is not installed"));
        }
    }
    Ok(())
}

pub async fn run(a: RunArgs, _out: &Output) -> Result<u8> {
    if a.verbose {
        let _ = secureops_pep::telemetry::init_tracing(
            "secureops",
            secureops_pep::telemetry::LogFormat::Text,
        );
    }
    let tier_check = namespace_possible();
    if a.require_namespace
        && let Err(why) = &tier_check
    {
        bail!("--require-namespace: {why}");
    }
    let tmp;
    let data_dir = match &a.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("secureops-run-{}", std::process::id()));
            tmp.clone()
        }
    };
    std::fs::create_dir_all(&data_dir)?;
    let base = match &a.policy {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => DEFAULT_POLICY.to_string(),
    };
    let policy_file = data_dir.join("run-policy.yaml");
    std::fs::write(&policy_file, policy_with_allows(&base, &a.allow)?)?;
    if let Err(errs) =
        secureops_policy::policy::Policy::compile(&std::fs::read_to_string(&policy_file)?)
    {
        for e in errs {
            eprintln!("{}:{e}", policy_file.display());
        }
        bail!("the policy is invalid");
    }

    let tag = std::process::id();
    let mut funnel = None;
    let mut bind_ip = std::net::IpAddr::from([127, 0, 0, 1]);
    if tier_check.is_ok() {
        match Funnel::create(tag) {
            Ok((f, host_ip, _)) => {
                bind_ip = host_ip.into();
                funnel = Some(f);
            }
            Err(e) => {
                if a.require_namespace {
                    return Err(e);
                }
                eprintln!(
                    "secureops: could not create a network namespace ({e:#}); falling back to proxy variables"
                );
            }
        }
    }
    let lo = SocketAddr::from(([127, 0, 0, 1], 0));
    let cfg = StackConfig {
        data_dir: data_dir.clone(),
        policy_file,
        workload: a.workload.clone(),
        upstream_dns: a.upstream_dns.unwrap_or_else(system_upstream_dns),
        sensor: false,
        bin_dir: a.bin_dir.clone().unwrap_or_else(default_bin_dir),
        pdp_listen: lo,
        admin_listen: lo,
        audit_listen: lo,
        proxy_listen: SocketAddr::new(bind_ip, 0),
        transparent_listen: funnel.as_ref().map(|_| SocketAddr::new(bind_ip, 0)),
        dns_listen: SocketAddr::new(bind_ip, 0),
        resolve: a.resolve.clone(),
        show_logs: a.verbose,
    };
    let stack = Stack::start(&cfg).await?;
    let (Some(proxy), Some(dns)) = (stack.addrs.proxy, stack.addrs.dns) else {
        bail!("the stack did not report its proxy and DNS addresses");
    };
    let userns = if funnel.is_none() {
        crate::userns::available()
    } else {
        Err("root tier".into())
    };
    let tier = match (&mut funnel, stack.addrs.transparent) {
        (Some(f), Some(t)) => {
            f.install(t, dns, proxy)?;
            RunTier::Namespace
        }
        _ if userns.is_ok() => RunTier::UserNamespace,
        _ => RunTier::ProxyEnv,
    };
    // Rootless tier: host-side relays the namespace reaches through Unix
    // sockets in the (private) data dir.
    let relay_dir = data_dir.join("relay");
    let mut relays = Vec::new();
    if tier == RunTier::UserNamespace {
        std::fs::create_dir_all(&relay_dir)?;
        relays.push(crate::userns::spawn_host_relay(
            &relay_dir.join("proxy.sock"),
            proxy,
        )?);
        relays.push(crate::userns::spawn_host_relay(
            &relay_dir.join("dns.sock"),
            dns,
        )?);
        std::fs::write(relay_dir.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
    }
    match tier {
        RunTier::Namespace => eprintln!(
            "secureops: EnforcementTier=Namespace: {:?} runs in its own network namespace; all TCP goes through the proxy, DNS through the sinkhole, everything else is dropped",
            a.cmd[0]
        ),
        RunTier::UserNamespace => eprintln!(
            "secureops: EnforcementTier=UserNamespace ({}): {:?} runs in its own user and network namespace where only the proxy (via proxy variables) and the DNS sinkhole are reachable; direct connections have no route",
            tier_check.err().unwrap_or_default(),
            a.cmd[0]
        ),
        RunTier::ProxyEnv => eprintln!(
            "secureops: EnforcementTier=ProxyEnv ({}; {}): only proxy variables are set — a program that ignores them is NOT funnelled",
            tier_check.err().unwrap_or_else(|| "no namespace".into()),
            userns.err().unwrap_or_default()
        ),
    }

    // Show blocked attempts as they happen.
    let audit_url = stack.addrs.audit.map(|a| format!("http://{a}"));
    let watcher = audit_url.map(|url| {
        tokio::spawn(async move {
            let Ok(mut s) = secureops_audit::tail(&url, 0, true).await else {
                return;
            };
            while let Ok(Some(e)) = s.message().await {
                if let Some(f) = &e.finding
                    && f.decision != secureops_proto::v1::Verdict::Allow as i32
                {
                    eprintln!(
                        "secureops: BLOCKED {}",
                        crate::audit::finding_line(e.index, f)
                    );
                }
            }
        })
    });

    let proxy_url = format!("http://{proxy}");
    let mut cmd = match tier {
        RunTier::Namespace => {
            let ns = funnel.as_ref().map(|f| f.ns.clone()).unwrap_or_default();
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", &ns]).args(&a.cmd);
            c
        }
        RunTier::UserNamespace => {
            let exe = std::env::current_exe().context("locating the secureops binary")?;
            let mut c = tokio::process::Command::new("unshare");
            c.args(["--user", "--map-root-user", "--net", "--mount", "--"])
                .arg(exe)
                .arg("__ns-shim")
                .arg("--proxy-sock")
                .arg(relay_dir.join("proxy.sock"))
                .arg("--dns-sock")
                .arg(relay_dir.join("dns.sock"))
                .arg("--resolv-conf")
                .arg(relay_dir.join("resolv.conf"))
                .arg("--")
                .args(&a.cmd);
            c
        }
        RunTier::ProxyEnv => {
            let mut c = tokio::process::Command::new(&a.cmd[0]);
            c.args(&a.cmd[1..]);
            c
        }
    };
    set_proxy_env(&mut cmd, &proxy_url);
    cmd.stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let status = cmd
        .status()
        .await
        .with_context(|| format!("running {:?}", a.cmd))?;
    // Let the last audit entries arrive before we stop the watcher.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(w) = watcher {
        w.abort();
    }
    for r in relays {
        r.abort();
    }
    stack.shutdown(Duration::from_secs(5)).await;
    drop(funnel);
    if a.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(exit_code(status))
}

/// A child's exit status as our exit code (128 + signal when killed).
pub fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .map(|c| u8::try_from(c).unwrap_or(1))
        .unwrap_or_else(|| 128u8.saturating_add(status.signal().map(|s| s as u8).unwrap_or(0)))
}

/// Point every proxy variable a client library reads at `url`, and drop the
/// bypass lists (a `NO_PROXY` inherited from the caller must not exempt
/// anything from the PEP).
pub(crate) fn set_proxy_env(cmd: &mut tokio::process::Command, url: &str) {
    for k in [
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "https_proxy",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env(k, url);
    }
    cmd.env_remove("NO_PROXY").env_remove("no_proxy");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_are_appended_and_policy_stays_valid() {
        let base = "version: 1\ndefault: deny\negress_allowlist:\n  - github.com\n";
        let out = policy_with_allows(base, &["example.test".into()]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["egress_allowlist"],
            serde_json::json!(["github.com", "example.test"])
        );
        assert!(secureops_policy::policy::Policy::compile(&out).is_ok());
    }

    #[test]
    fn no_allows_keeps_text() {
        let base = "version: 1\n";
        assert_eq!(policy_with_allows(base, &[]).unwrap(), base);
    }
}
