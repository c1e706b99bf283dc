//! Shared helpers: spawn the real `secureops-audit` binary, append records.
#![allow(dead_code)]

use secureops_proto::v1::audit_client::AuditClient;
use secureops_proto::v1::{AppendAck, AuditFinding, AuditRecord};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_secureops-audit");

/// Token of source `pep-<i>`.
pub fn token(i: usize) -> String {
    format!("token-for-pep-{i}-0123456789abcdef")
}

/// Writes a tokens file for sources pep-0 .. pep-(n-1).
pub fn write_tokens(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("tokens");
    let mut s = String::from("# source_id token\n");
    for i in 0..n {
        s.push_str(&format!("pep-{i} {}\n", token(i)));
    }
    std::fs::write(&p, s).unwrap();
    p
}

pub struct Server {
    pub child: Option<Child>,
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub data: PathBuf,
}

impl Server {
    /// Spawns `secureops-audit serve` on 127.0.0.1:0 with the data dir and
    /// tokens given through SECUREOPS_* environment variables.
    pub fn spawn(data: &Path, tokens: &Path, extra: &[&str]) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("stderr.log"))
            .unwrap();
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("SECUREOPS_DATA_DIR", data)
            .env("SECUREOPS_TOKENS_FILE", tokens)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let want_metrics = extra.contains(&"--metrics-listen");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut grpc = None;
        let mut metrics = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while grpc.is_none() || (want_metrics && metrics.is_none()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let err = std::fs::read_to_string(data.with_extension("stderr.log"))
                        .unwrap_or_default();
                    panic!("server did not print LISTENING lines; stderr:\n{err}");
                }
            };
            if let Some(a) = line.strip_prefix("LISTENING grpc ") {
                grpc = Some(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("LISTENING metrics ") {
                metrics = Some(a.parse().unwrap());
            }
        }
        Server {
            child: Some(child),
            grpc: grpc.unwrap(),
            metrics,
            data: data.to_owned(),
        }
    }

    pub fn addr(&self) -> String {
        self.grpc.to_string()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn sigterm(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let pid = nix_pid(&c);
        send_signal(pid, "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("server did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn nix_pid(c: &Child) -> u32 {
    c.id()
}

/// Sends a signal with the `kill` utility (keeps tests free of unsafe code).
fn send_signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn client(addr: &str) -> AuditClient<Channel> {
    secureops_audit::client::connect(addr).await.unwrap()
}

pub fn finding(i: u64) -> AuditFinding {
    AuditFinding {
        timestamp_unix_nanos: 1_700_000_000_000_000_000 + i as i64,
        pep_kind: "proxy".into(),
        pep_id: "proxy-1".into(),
        workload_id: "agent-7".into(),
        pid: 4242,
        process_start_time: 99,
        exe: "/usr/bin/curl".into(),
        uid: 1000,
        host: format!("host{i}.example.com"),
        host_source: 1,
        port: 443,
        dialled_ip: "203.0.113.7".into(),
        transport: 1,
        decision: 2,
        reason: "default deny".into(),
        rule_id: String::new(),
        policy_version: 3,
        fail_closed_cause: String::new(),
        escalation_id: String::new(),
        request_id: format!("req-{i}"),
        would_deny: false,
        fail_mode: "closed".into(),
        trace_id: String::new(),
        detail: String::new(),
    }
}

pub fn record(source: &str, seq: u64) -> AuditRecord {
    AuditRecord {
        source_id: source.into(),
        source_seq: seq,
        finding: Some(finding(seq)),
        trace_parent: String::new(),
    }
}

/// An open Append stream: send records with `tx`, read acks from `acks`.
pub struct AppendStream {
    pub tx: mpsc::Sender<AuditRecord>,
    pub acks: tonic::Streaming<AppendAck>,
}

/// Opens an Append stream with an optional bearer token.
pub async fn open_append(addr: &str, token: Option<&str>) -> Result<AppendStream, tonic::Status> {
    let mut c = client(addr).await;
    let (tx, rx) = mpsc::channel::<AuditRecord>(1024);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let acks = c.append(req).await?.into_inner();
    Ok(AppendStream { tx, acks })
}

/// Sends `records` on a fresh stream and returns one ack per record.
pub async fn append_all(addr: &str, token: &str, records: Vec<AuditRecord>) -> Vec<AppendAck> {
    let mut s = open_append(addr, Some(token)).await.unwrap();
    let n = records.len();
    let tx = s.tx.clone();
    let sender = tokio::spawn(async move {
        for r in records {
            tx.send(r).await.unwrap();
        }
    });
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ack = tokio::time::timeout(Duration::from_secs(20), s.acks.message())
            .await
            .expect("ack timeout")
            .expect("stream error")
            .expect("stream ended early");
        out.push(ack);
    }
    sender.await.unwrap();
    out
}

/// Reads every entry with Tail (no follow).
pub async fn tail_all(addr: &str) -> Vec<secureops_proto::v1::TailEntry> {
    let mut s = secureops_audit::client::tail(addr, 0, false).await.unwrap();
    let mut out = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("tail timeout")
        .unwrap()
    {
        out.push(e);
    }
    out
}

/// Runs `secureops-audit verify`; returns (exit code, stdout).
pub fn verify_cli(dir: &Path, pubkey: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("verify")
        .arg("--dir")
        .arg(dir)
        .arg("--pubkey")
        .arg(pubkey)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
