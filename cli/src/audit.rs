//! `secureops audit verify|tail|prove`: offline verification and live access
//! to the signed audit log (library: `secureops_audit`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use secureops_audit::NoteVerifier;
use secureops_proto::v1 as pb;
use serde_json::json;

use crate::Endpoints;
use crate::admin::{EXIT_REFUSED, FindingJson};
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Verify a log directory offline: chain, Merkle roots, signatures,
    /// consistency with a trusted checkpoint. Exit 3 naming the first bad
    /// index on any tampering.
    Verify {
        #[arg(long)]
        dir: PathBuf,
        /// The log's public key (vkey file, `name+hash+base64`).
        #[arg(long)]
        pubkey: PathBuf,
        /// A checkpoint note saved earlier, trusted.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Print entries from the running audit service.
    Tail {
        /// First index.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Keep following new entries.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Fetch and verify the inclusion proof of entry SEQ.
    Prove {
        seq: u64,
        /// Check the checkpoint signature with this public key.
        #[arg(long)]
        pubkey: Option<PathBuf>,
    },
}

pub async fn audit(cmd: AuditCmd, ep: &Endpoints, out: &Output) -> Result<u8> {
    match cmd {
        AuditCmd::Verify {
            dir,
            pubkey,
            checkpoint,
        } => verify(&dir, &pubkey, checkpoint.as_deref(), out).await,
        AuditCmd::Tail { from, follow } => {
            let mut stream = secureops_audit::tail(&ep.audit, from, follow)
                .await
                .context("opening the audit Tail stream")?;
            while let Some(e) = stream
                .message()
                .await
                .context("reading the audit Tail stream")?
            {
                print_entry(&e, out);
            }
            Ok(0)
        }
        AuditCmd::Prove { seq, pubkey } => {
            let key = match pubkey {
                Some(p) => Some(
                    NoteVerifier::from_file(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            match secureops_audit::prove(&ep.audit, seq, key.as_ref(), Duration::from_secs(3)).await
            {
                Ok(p) => {
                    out.value(
                        &format!(
                            "entry {} is included in the tree of size {} (root {}){}\nsource {} seq {}\n{}",
                            p.index,
                            p.tree_size,
                            p.root,
                            if p.signature_verified { ", checkpoint signature verified" } else { "" },
                            p.source_id,
                            p.source_seq,
                            p.finding
                        ),
                        &serde_json::to_value(&p).unwrap_or_default(),
                    );
                    Ok(0)
                }
                Err(secureops_audit::client::ClientError::BadProof(why)) => {
                    eprintln!("proof of entry {seq} does NOT verify: {why}");
                    Ok(EXIT_REFUSED)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

async fn verify(dir: &Path, pubkey: &Path, checkpoint: Option<&Path>, out: &Output) -> Result<u8> {
    let key =
        NoteVerifier::from_file(pubkey).with_context(|| format!("reading {}", pubkey.display()))?;
    let trusted = match checkpoint {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let dir = dir.to_path_buf();
    let work = tokio::task::spawn_blocking(move || {
        secureops_audit::verify_dir(&dir, &key, trusted.as_deref())
    });
    // A progress indicator for large logs (people only, on stderr).
    let show_progress = !out.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let spinner = tokio::spawn(async move {
        if !show_progress {
            return;
        }
        let frames = ['|', '/', '-', '\\'];
        let start = std::time::Instant::now();
        for i in 0usize.. {
            tokio::time::sleep(Duration::from_millis(120)).await;
            eprint!(
                "\rverifying {} {:.1}s",
                frames[i % 4],
                start.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    });
    let res = work.await.context("verifier task")?;
    spinner.abort();
    if show_progress {
        eprint!("\r\x1b[K");
    }
    match res {
        Ok(s) => {
            out.value(
                &format!(
                    "OK: {} entries, {} checkpoints verified, root {}",
                    s.entries,
                    s.checkpoints,
                    hex::encode(s.root)
                ),
                &serde_json::to_value(&s).unwrap_or_default(),
            );
            Ok(0)
        }
        Err(e) => {
            if out.json {
                println!(
                    "{}",
                    json!({"ok": false, "index": e.index, "error": e.to_string()})
                );
            } else {
                eprintln!("FAILED at index {}: {e}", e.index);
            }
            Ok(EXIT_REFUSED)
        }
    }
}

fn verdict(v: i32) -> &'static str {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Allow) => "allow",
        Ok(pb::Verdict::Escalate) => "escalate",
        _ => "deny",
    }
}

fn host_source(v: i32) -> &'static str {
    match pb::HostSource::try_from(v) {
        Ok(pb::HostSource::Connect) => "connect",
        Ok(pb::HostSource::Sni) => "sni",
        Ok(pb::HostSource::HttpHost) => "http_host",
        Ok(pb::HostSource::DnsQuery) => "dns_query",
        Ok(pb::HostSource::OriginalDst) => "original_dst",
        _ => "unspecified",
    }
}

/// JSON shape of one finding (read back by `secureops policy test --findings`).
pub fn finding_json(index: u64, source: &str, seq: u64, f: &pb::AuditFinding) -> serde_json::Value {
    json!({"index": index, "source_id": source, "source_seq": seq,
           "timestamp_unix_nanos": f.timestamp_unix_nanos, "pep": f.pep_kind,
           "workload": f.workload_id, "pid": f.pid, "exe": f.exe, "uid": f.uid,
           "host": f.host, "host_source": host_source(f.host_source), "port": f.port,
           "dialled_ip": f.dialled_ip, "decision": verdict(f.decision), "reason": f.reason,
           "rule_id": f.rule_id, "policy_version": f.policy_version,
           "fail_closed_cause": f.fail_closed_cause, "escalation_id": f.escalation_id,
           "would_deny": f.would_deny})
}

/// One line for people: `#idx decision host:port (reason) pid exe`.
pub fn finding_line(index: u64, f: &pb::AuditFinding) -> String {
    format!(
        "#{index} {:<8} {}:{} via {} ({}) workload={} pid={} exe={}",
        verdict(f.decision).to_uppercase(),
        if f.host.is_empty() {
            f.dialled_ip.as_str()
        } else {
            f.host.as_str()
        },
        f.port,
        host_source(f.host_source),
        f.reason,
        f.workload_id,
        f.pid,
        if f.exe.is_empty() {
            "?"
        } else {
            f.exe.as_str()
        }
    )
}

fn print_entry(e: &pb::TailEntry, out: &Output) {
    let Some(f) = &e.finding else { return };
    if out.json {
        println!("{}", finding_json(e.index, &e.source_id, e.source_seq, f));
    } else {
        println!("{}", finding_line(e.index, f));
    }
}

/// Read every finding of a log directory offline (for `policy test`).
pub fn read_findings(dir: &Path) -> Result<Vec<FindingJson>> {
    let mut out = Vec::new();
    for (_, path) in
        secureops_audit::storage::list_segments(dir).context("listing audit segments")?
    {
        let buf = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if buf.len() < secureops_audit::storage::SEGMENT_HEADER_LEN
            || &buf[..8] != secureops_audit::storage::SEGMENT_MAGIC
        {
            anyhow::bail!("{} is not an audit segment", path.display());
        }
        let mut pos = secureops_audit::storage::SEGMENT_HEADER_LEN;
        while let Ok(Some((frame, next))) = secureops_audit::storage::next_frame(&buf, pos) {
            pos = next;
            let Ok(entry) = secureops_audit::encoding::decode_entry(frame) else {
                continue;
            };
            let v = finding_json(
                entry.index,
                &entry.source_id,
                entry.source_seq,
                &entry.finding,
            );
            if let Ok(f) = serde_json::from_value::<FindingJson>(v) {
                out.push(f);
            }
        }
    }
    Ok(out)
}
