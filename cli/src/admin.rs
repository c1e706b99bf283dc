//! `secureops policy|escalations|check`: the PDP's admin and decision APIs,
//! plus offline policy validation and testing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use secureops_policy::policy::{
    EvalRequest, HostSource, MemoryContext, Policy, PolicyError, ProcKey, Verdict,
};
use secureops_proto::v1 as pb;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::Endpoints;
use crate::output::Output;

/// Exit code for "refused / denied / did not verify".
pub const EXIT_REFUSED: u8 = 3;

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy file offline (exit 3 with located errors if invalid).
    Validate {
        file: PathBuf,
        /// Also ask the running PDP to validate it.
        #[arg(long)]
        remote: bool,
    },
    /// Push a policy file to the PDP (atomic; refused policies change nothing).
    Push {
        file: PathBuf,
        #[arg(long, default_value = "")]
        comment: String,
        /// Refuse unless this is the active version (optimistic concurrency).
        #[arg(long, default_value_t = 0)]
        expected_version: u64,
    },
    /// Print the active (or a given) policy version.
    Get {
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
    /// List stored policy versions, newest first.
    History {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Re-activate an older version (as a new version number).
    Rollback {
        version: u64,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Evaluate a policy file offline against destinations and/or recorded
    /// audit findings ("what would this policy have done to yesterday's
    /// traffic").
    Test(PolicyTestArgs),
}

#[derive(Debug, Args)]
pub struct PolicyTestArgs {
    /// The policy to test.
    pub file: PathBuf,
    /// Destinations to evaluate: HOST[:PORT] (port defaults to 443).
    #[arg(long = "dest")]
    pub dests: Vec<String>,
    /// Workload id of the simulated process.
    #[arg(long, default_value = "default")]
    pub workload: String,
    /// Executable of the simulated process.
    #[arg(long, default_value = "/usr/bin/curl")]
    pub exe: String,
    /// IP the destination resolves to (checked against special ranges).
    #[arg(long)]
    pub ip: Option<IpAddr>,
    /// The simulated process opened PATH (AGE ago, e.g. `~/.env@200ms`).
    #[arg(long = "opened")]
    pub opened: Vec<String>,
    /// JSON-lines audit findings (from `secureops audit tail --json`) to
    /// replay against the policy.
    #[arg(long)]
    pub findings: Option<PathBuf>,
    /// Audit log directory to replay (read offline).
    #[arg(long)]
    pub audit_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum EscalationCmd {
    /// List pending (or all) escalations.
    List {
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = "")]
        workload: String,
    },
    /// Approve an escalation for a while.
    Approve {
        id: String,
        /// How long the approval lasts, e.g. 30m, 1h, 3600s.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Approve every port of the host, not just the escalated one.
        #[arg(long)]
        all_ports: bool,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Deny an escalation.
    Deny {
        id: String,
        #[arg(long, default_value = "0s")]
        ttl: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// HOST[:PORT] (port defaults to 443).
    pub target: String,
    #[arg(long, default_value = "default")]
    pub workload: String,
    #[arg(long, default_value = "")]
    pub exe: String,
}

/// Adds `authorization: Bearer <token>` to every admin call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type AdminClient = pb::policy_admin_client::PolicyAdminClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

async fn channel(url: &str) -> Result<Channel> {
    Channel::from_shared(url.to_string())
        .with_context(|| format!("invalid endpoint {url}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

async fn admin_client(ep: &Endpoints) -> Result<AdminClient> {
    let token = std::fs::read_to_string(&ep.admin_token_file).with_context(|| {
        format!(
            "reading the admin token {} (set --admin-token-file / SECUREOPS_ADMIN_TOKEN_FILE)",
            ep.admin_token_file.display()
        )
    })?;
    let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map_err(|_| anyhow!("admin token contains characters not allowed in a header"))?;
    let ch = channel(&ep.admin).await?;
    Ok(pb::policy_admin_client::PolicyAdminClient::with_interceptor(ch, Bearer(value)))
}

fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

fn print_errors(file: &Path, errors: &[(u32, u32, String, String, String)], out: &Output) {
    if out.json {
        let v: Vec<_> = errors
            .iter()
            .map(|(l, c, r, p, m)| json!({"line": l, "column": c, "rule_id": r, "path": p, "message": m}))
            .collect();
        println!("{}", json!({"ok": false, "errors": v}));
        return;
    }
    for (l, c, r, p, m) in errors {
        let rule = if r.is_empty() {
            String::new()
        } else {
            format!(" [rule {r}]")
        };
        let path = if p.is_empty() {
            String::new()
        } else {
            format!(" {p}:")
        };
        eprintln!("{}:{l}:{c}:{rule}{path} {m}", file.display());
    }
}

fn local_errors(errs: &[PolicyError]) -> Vec<(u32, u32, String, String, String)> {
    errs.iter()
        .map(|e| {
            (
                e.line,
                e.column,
                e.rule_id.clone().unwrap_or_default(),
                e.path.clone(),
                e.message.clone(),
            )
        })
        .collect()
}

fn remote_errors(errs: &[pb::PolicyError]) -> Vec<(u32, u32, String, String, String)> {
    errs.iter()
        .map(|e| {
            (
                e.line,
                e.column,
                e.rule_id.clone(),
                e.path.clone(),
                e.message.clone(),
            )
        })
        .collect()
}

pub async fn policy(cmd: PolicyCmd, ep: &Endpoints, out: &Output) -> Result<u8> {
    match cmd {
        PolicyCmd::Validate { file, remote } => {
            let text = read(&file)?;
            match Policy::compile(&text) {
                Err(errs) => {
                    print_errors(&file, &local_errors(&errs), out);
                    return Ok(EXIT_REFUSED);
                }
                Ok(p) => {
                    if !remote {
                        out.value(
                            &format!("{}: ok ({} rules)", file.display(), p.rule_count()),
                            &json!({"ok": true, "rules": p.rule_count()}),
                        );
                        return Ok(0);
                    }
                }
            }
            let mut c = admin_client(ep).await?;
            let r = c
                .validate(pb::ValidateRequest { yaml: text })
                .await
                .context("Validate")?
                .into_inner();
            if r.ok {
                out.value(
                    &format!(
                        "{}: ok ({} rules, validated by the PDP)",
                        file.display(),
                        r.rule_count
                    ),
                    &json!({"ok": true, "rules": r.rule_count}),
                );
                Ok(0)
            } else {
                print_errors(&file, &remote_errors(&r.errors), out);
                Ok(EXIT_REFUSED)
            }
        }
        PolicyCmd::Push {
            file,
            comment,
            expected_version,
        } => {
            let text = read(&file)?;
            let mut c = admin_client(ep).await?;
            let author = std::env::var("USER").unwrap_or_else(|_| "secureops-cli".into());
            let r = c
                .put(pb::PutRequest {
                    yaml: text,
                    author,
                    comment,
                    expected_version,
                })
                .await
                .context("Put")?
                .into_inner();
            if r.accepted {
                out.value(
                    &format!("policy version {} is active", r.version),
                    &json!({"accepted": true, "version": r.version}),
                );
                Ok(0)
            } else {
                print_errors(&file, &remote_errors(&r.errors), out);
                if !out.json {
                    eprintln!("refused: version {} keeps serving", r.version);
                }
                Ok(EXIT_REFUSED)
            }
        }
        PolicyCmd::Get { version } => {
            let mut c = admin_client(ep).await?;
            let v = c
                .get(pb::GetRequest { version })
                .await
                .context("Get")?
                .into_inner();
            out.value(
                &v.yaml,
                &json!({"version": v.version, "yaml": v.yaml, "sha256": v.sha256,
                        "author": v.author, "comment": v.comment, "created_unix_ms": v.created_unix_ms,
                        "active": v.active}),
            );
            Ok(0)
        }
        PolicyCmd::History { limit } => {
            let mut c = admin_client(ep).await?;
            let h = c
                .history(pb::HistoryRequest { limit })
                .await
                .context("History")?
                .into_inner();
            let rows: Vec<Vec<String>> = h
                .versions
                .iter()
                .map(|v| {
                    vec![
                        format!("{}{}", v.version, if v.active { "*" } else { "" }),
                        fmt_ms(v.created_unix_ms),
                        v.author.clone(),
                        v.sha256.chars().take(12).collect(),
                        v.comment.clone(),
                    ]
                })
                .collect();
            let js: Vec<_> = h
                .versions
                .iter()
                .map(|v| json!({"version": v.version, "active": v.active, "created_unix_ms": v.created_unix_ms,
                               "author": v.author, "sha256": v.sha256, "comment": v.comment}))
                .collect();
            out.table(
                &["VERSION", "CREATED", "AUTHOR", "SHA256", "COMMENT"],
                &rows,
                &json!(js),
            );
            Ok(0)
        }
        PolicyCmd::Rollback { version, comment } => {
            let mut c = admin_client(ep).await?;
            let author = std::env::var("USER").unwrap_or_else(|_| "secureops-cli".into());
            let r = c
                .rollback(pb::RollbackRequest {
                    to_version: version,
                    author,
                    comment,
                })
                .await
                .context("Rollback")?
                .into_inner();
            if r.accepted {
                out.value(
                    &format!(
                        "rolled back to the text of version {version}: now version {}",
                        r.version
                    ),
                    &json!({"accepted": true, "version": r.version}),
                );
                Ok(0)
            } else {
                for e in &r.errors {
                    eprintln!("{}", e.message);
                }
                Ok(EXIT_REFUSED)
            }
        }
        PolicyCmd::Test(a) => policy_test(a, out),
    }
}

fn fmt_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(secs);
    let ago = (now - secs).max(0);
    match ago {
        0..60 => format!("{ago}s ago"),
        60..3600 => format!("{}m ago", ago / 60),
        3600..86400 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86400),
    }
}

/// Parse `30m`, `1h`, `200ms`, `45s`, `2d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        other => bail!("invalid duration unit {other:?} in {s:?} (ms, s, m, h, d)"),
    })
}

/// Split `HOST[:PORT]` (IPv6 literals in brackets), default port 443.
pub fn split_target(t: &str) -> Result<(String, u16)> {
    if let Some(rest) = t.strip_prefix('[') {
        let (h, p) = rest
            .split_once(']')
            .ok_or_else(|| anyhow!("unclosed [ in {t:?}"))?;
        let port = match p.strip_prefix(':') {
            Some(p) => p
                .parse()
                .with_context(|| format!("invalid port in {t:?}"))?,
            None => 443,
        };
        return Ok((format!("[{h}]"), port));
    }
    match t.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Ok((
            h.to_string(),
            p.parse()
                .with_context(|| format!("invalid port in {t:?}"))?,
        )),
        _ => Ok((t.to_string(), 443)),
    }
}

fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Escalate => "escalate",
    }
}

/// One recorded finding, in the JSON shape `secureops audit tail --json` prints.
#[derive(Debug, serde::Deserialize)]
pub struct FindingJson {
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub exe: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub host_source: String,
    #[serde(default)]
    pub dialled_ip: String,
    #[serde(default)]
    pub decision: String,
    #[serde(default)]
    pub reason: String,
}

fn host_source_from(s: &str) -> HostSource {
    match s {
        "connect" | "CONNECT" => HostSource::Connect,
        "sni" | "SNI" => HostSource::Sni,
        "http_host" | "HTTP_HOST" => HostSource::HttpHost,
        "dns_query" | "DNS_QUERY" => HostSource::DnsQuery,
        "original_dst" | "ORIGINAL_DST" => HostSource::OriginalDst,
        _ => HostSource::Connect,
    }
}

fn policy_test(a: PolicyTestArgs, out: &Output) -> Result<u8> {
    let text = read(&a.file)?;
    let policy = match Policy::compile(&text) {
        Ok(p) => p,
        Err(errs) => {
            print_errors(&a.file, &local_errors(&errs), out);
            return Ok(EXIT_REFUSED);
        }
    };
    // The simulated process is (pid 1, start 1); `--opened` taints it.
    let me = ProcKey {
        pid: 1,
        start_time: 1,
    };
    let mut ctx = MemoryContext::new();
    ctx.set_sensor_alive(&a.workload);
    for o in &a.opened {
        let (path, age) = match o.rsplit_once('@') {
            Some((p, age)) => (p.to_string(), parse_duration(age)?),
            None => (o.clone(), Duration::ZERO),
        };
        ctx.add_open(&a.workload, me, &path, age);
    }
    let mut rows = Vec::new();
    let mut js = Vec::new();
    let mut changed = 0usize;
    for d in &a.dests {
        let (host, port) = split_target(d)?;
        let ips: Vec<IpAddr> = a.ip.into_iter().collect();
        let req = EvalRequest {
            workload: &a.workload,
            exe: &a.exe,
            host: &host,
            port,
            ip: a.ip,
            resolved_ips: &ips,
            host_source: HostSource::Connect,
            process: Some(me),
            ancestors: &[],
        };
        let ev = policy.evaluate(&req, &ctx);
        rows.push(vec![
            format!("{host}:{port}"),
            verdict_str(ev.verdict).to_string(),
            ev.reason.clone(),
            ev.rule_id.clone().unwrap_or_default(),
        ]);
        js.push(
            json!({"destination": format!("{host}:{port}"), "decision": verdict_str(ev.verdict),
                       "reason": ev.reason, "rule_id": ev.rule_id, "would_deny": ev.would_deny}),
        );
    }
    let mut findings: Vec<FindingJson> = Vec::new();
    if let Some(f) = &a.findings {
        for (i, line) in read(f)?.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let fj: FindingJson = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a finding", f.display(), i + 1))?;
            findings.push(fj);
        }
    }
    if let Some(dir) = &a.audit_dir {
        findings.extend(crate::audit::read_findings(dir)?);
    }
    for f in &findings {
        let ip: Option<IpAddr> = f.dialled_ip.parse().ok();
        let ips: Vec<IpAddr> = ip.into_iter().collect();
        let req = EvalRequest {
            workload: &f.workload,
            exe: &f.exe,
            host: &f.host,
            port: f.port,
            ip,
            resolved_ips: &ips,
            host_source: host_source_from(&f.host_source),
            process: None,
            ancestors: &[],
        };
        let ev = policy.evaluate(&req, &ctx);
        let new = verdict_str(ev.verdict);
        let differs = !f.decision.is_empty() && !f.decision.eq_ignore_ascii_case(new);
        if differs {
            changed += 1;
        }
        rows.push(vec![
            format!("{}:{}", f.host, f.port),
            format!(
                "{new}{}",
                if differs {
                    format!(" (was {}: {})", f.decision, f.reason)
                } else {
                    String::new()
                }
            ),
            ev.reason.clone(),
            ev.rule_id.clone().unwrap_or_default(),
        ]);
        js.push(
            json!({"index": f.index, "destination": format!("{}:{}", f.host, f.port),
                       "decision": new, "recorded_decision": f.decision, "changed": differs,
                       "reason": ev.reason, "rule_id": ev.rule_id}),
        );
    }
    out.table(
        &["DESTINATION", "DECISION", "REASON", "RULE"],
        &rows,
        &json!(js),
    );
    if !out.json && !findings.is_empty() {
        println!(
            "{} of {} recorded decisions would change",
            changed,
            findings.len()
        );
    }
    Ok(0)
}

fn state_str(s: i32) -> &'static str {
    match pb::EscalationState::try_from(s) {
        Ok(pb::EscalationState::Pending) => "pending",
        Ok(pb::EscalationState::Approved) => "approved",
        Ok(pb::EscalationState::Denied) => "denied",
        Ok(pb::EscalationState::Expired) => "expired",
        _ => "unknown",
    }
}

fn escalation_json(e: &pb::Escalation) -> serde_json::Value {
    json!({"id": e.id, "workload": e.workload_id, "host": e.host, "port": e.port,
           "rule_id": e.rule_id, "state": state_str(e.state), "hits": e.hits,
           "created_unix_ms": e.created_unix_ms, "expires_unix_ms": e.expires_unix_ms,
           "exe": e.first_process.as_ref().map(|p| p.exe.clone()).unwrap_or_default()})
}

pub async fn escalations(cmd: EscalationCmd, ep: &Endpoints, out: &Output) -> Result<u8> {
    let mut c = admin_client(ep).await?;
    match cmd {
        EscalationCmd::List { all, workload } => {
            let r = c
                .list_escalations(pb::ListEscalationsRequest {
                    include_resolved: all,
                    workload_id: workload,
                })
                .await
                .context("ListEscalations")?
                .into_inner();
            let rows: Vec<Vec<String>> = r
                .escalations
                .iter()
                .map(|e| {
                    vec![
                        e.id.clone(),
                        state_str(e.state).to_string(),
                        e.workload_id.clone(),
                        format!("{}:{}", e.host, e.port),
                        e.first_process
                            .as_ref()
                            .map(|p| p.exe.clone())
                            .unwrap_or_default(),
                        e.hits.to_string(),
                        fmt_ms(e.created_unix_ms),
                    ]
                })
                .collect();
            let js: Vec<_> = r.escalations.iter().map(escalation_json).collect();
            out.table(
                &[
                    "ID",
                    "STATE",
                    "WORKLOAD",
                    "DESTINATION",
                    "EXE",
                    "HITS",
                    "CREATED",
                ],
                &rows,
                &json!(js),
            );
            Ok(0)
        }
        EscalationCmd::Approve {
            id,
            ttl,
            all_ports,
            comment,
        } => resolve(&mut c, out, id, true, &ttl, all_ports, comment).await,
        EscalationCmd::Deny { id, ttl, comment } => {
            resolve(&mut c, out, id, false, &ttl, false, comment).await
        }
    }
}

async fn resolve(
    c: &mut AdminClient,
    out: &Output,
    id: String,
    approve: bool,
    ttl: &str,
    all_ports: bool,
    comment: String,
) -> Result<u8> {
    let ttl = parse_duration(ttl)?;
    let e = c
        .resolve_escalation(pb::ResolveEscalationRequest {
            escalation_id: id,
            approve,
            ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
            all_ports,
            comment,
        })
        .await
        .context("ResolveEscalation")?
        .into_inner();
    let verb = if approve { "approved" } else { "denied" };
    out.value(
        &format!(
            "{verb} {} for {}:{} ({})",
            e.id, e.host, e.port, e.workload_id
        ),
        &escalation_json(&e),
    );
    Ok(0)
}

pub async fn check(a: CheckArgs, ep: &Endpoints, out: &Output) -> Result<u8> {
    let (host, port) = split_target(&a.target)?;
    let ch = channel(&ep.pdp).await?;
    let mut c = pb::policy_decision_client::PolicyDecisionClient::new(ch);
    let r = c
        .check(pb::CheckRequest {
            request_id: format!("cli-{}", std::process::id()),
            workload_id: a.workload,
            process: Some(pb::ProcessInfo {
                exe: a.exe,
                ..Default::default()
            }),
            destination: Some(pb::Destination {
                host: host.clone(),
                port: u32::from(port),
                ..Default::default()
            }),
            host_source: pb::HostSource::Connect as i32,
            transport: pb::Transport::Tcp as i32,
            pep_id: "secureops-cli".into(),
        })
        .await
        .context("Check")?
        .into_inner();
    let decision = match pb::Verdict::try_from(r.decision) {
        Ok(pb::Verdict::Allow) => "allow",
        Ok(pb::Verdict::Escalate) => "escalate",
        _ => "deny",
    };
    out.value(
        &format!(
            "{host}:{port}: {decision} ({}{}) policy v{}",
            r.reason,
            if r.rule_id.is_empty() {
                String::new()
            } else {
                format!(", rule {}", r.rule_id)
            },
            r.policy_version
        ),
        &json!({"host": host, "port": port, "decision": decision, "reason": r.reason,
                "rule_id": r.rule_id, "policy_version": r.policy_version,
                "escalation_id": r.escalation_id}),
    );
    Ok(if decision == "allow" { 0 } else { EXIT_REFUSED })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(
            split_target("github.com").unwrap(),
            ("github.com".into(), 443)
        );
        assert_eq!(
            split_target("github.com:80").unwrap(),
            ("github.com".into(), 80)
        );
        assert_eq!(split_target("[::1]:8443").unwrap(), ("[::1]".into(), 8443));
        assert_eq!(split_target("::1").unwrap(), ("::1".into(), 443));
        assert!(split_target("h:notaport").is_err());
    }
}
