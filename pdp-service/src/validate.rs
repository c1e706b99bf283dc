//! Input validation for every RPC that takes client data.
//!
//! Bad input is answered with `INVALID_ARGUMENT` and a message naming the
//! field — never a panic and never an allow. (Messages larger than the
//! transport limit are refused by tonic before they reach this code.)

use std::net::IpAddr;

use secureops_proto::v1::{
    CheckRequest, HostSource, ProcessEvent, Transport, process_event::Event,
};
use tonic::Status;

use crate::policy::{ProcKey, normalize_host, parse_ip_literal};

/// Field limits (bytes / counts).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `request_id`, `pep_id`, `sensor_id`.
    pub max_id: usize,
    /// `workload_id`.
    pub max_workload: usize,
    /// Executable paths and file paths.
    pub max_path: usize,
    /// argv entries.
    pub max_argv: usize,
    /// Total argv bytes.
    pub max_argv_bytes: usize,
    /// Ancestor chain depth.
    pub max_ancestors: usize,
    /// `destination.host`.
    pub max_host: usize,
    /// `destination.resolved_ips` / DNS answer addresses.
    pub max_ips: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_id: 128,
            max_workload: 253,
            max_path: 4096,
            max_argv: 256,
            max_argv_bytes: 32 * 1024,
            max_ancestors: 64,
            max_host: 255,
            max_ips: 64,
        }
    }
}

/// A validated Check request (borrowing the strings of the request).
#[derive(Debug)]
pub struct ValidCheck {
    /// How the host was learned.
    pub host_source: HostSource,
    /// Destination port.
    pub port: u16,
    /// Parsed `destination.ip`.
    pub ip: Option<IpAddr>,
    /// Parsed `destination.resolved_ips`.
    pub resolved_ips: Vec<IpAddr>,
    /// The process (`None` when unattributed, pid 0).
    pub process: Option<ProcKey>,
    /// Ancestors, nearest first.
    pub ancestors: Vec<ProcKey>,
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn check_text(field: &str, v: &str, max: usize, required: bool) -> Result<(), Status> {
    if required && v.is_empty() {
        return Err(invalid(format!("{field}: must not be empty")));
    }
    if v.len() > max {
        return Err(invalid(format!(
            "{field}: {} bytes exceeds the limit of {max}",
            v.len()
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(format!("{field}: contains control characters")));
    }
    Ok(())
}

/// Validate a workload id: non-empty, bounded, no whitespace or controls.
pub fn check_workload(field: &str, v: &str, lim: &Limits) -> Result<(), Status> {
    check_text(field, v, lim.max_workload, true)?;
    if v.chars().any(char::is_whitespace) {
        return Err(invalid(format!("{field}: contains whitespace")));
    }
    Ok(())
}

/// Parse a textual IP (optionally bracketed IPv6).
fn parse_ip(field: &str, v: &str) -> Result<IpAddr, Status> {
    let t = v
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(v);
    t.parse::<IpAddr>()
        .map_err(|_| invalid(format!("{field}: {v:?} is not an IP address")))
}

fn proc_key(
    field: &str,
    pid: u32,
    start_time: u64,
    exe: &str,
    lim: &Limits,
) -> Result<ProcKey, Status> {
    if pid == 0 {
        return Err(invalid(format!("{field}.pid: must not be 0")));
    }
    check_text(&format!("{field}.exe"), exe, lim.max_path, false)?;
    Ok(ProcKey { pid, start_time })
}

/// Validate a Check request.
pub fn check_request(r: &CheckRequest, lim: &Limits) -> Result<ValidCheck, Status> {
    check_text("request_id", &r.request_id, lim.max_id, false)?;
    check_text("pep_id", &r.pep_id, lim.max_id, false)?;
    check_workload("workload_id", &r.workload_id, lim)?;
    let host_source = match HostSource::try_from(r.host_source) {
        Ok(HostSource::Unspecified) => {
            return Err(invalid(
                "host_source: HOST_SOURCE_UNSPECIFIED is not accepted",
            ));
        }
        Ok(s) => s,
        Err(_) => {
            return Err(invalid(format!(
                "host_source: unknown value {}",
                r.host_source
            )));
        }
    };
    if Transport::try_from(r.transport).is_err() {
        return Err(invalid(format!("transport: unknown value {}", r.transport)));
    }
    let Some(dest) = &r.destination else {
        return Err(invalid("destination: missing"));
    };
    let port = match u16::try_from(dest.port) {
        Ok(0) | Err(_) => {
            return Err(invalid(format!(
                "destination.port: {} is not in 1..=65535",
                dest.port
            )));
        }
        Ok(p) => p,
    };
    check_text("destination.host", &dest.host, lim.max_host, false)?;
    let ip = if dest.ip.is_empty() {
        None
    } else {
        Some(parse_ip("destination.ip", &dest.ip)?)
    };
    if dest.host.is_empty() {
        if host_source != HostSource::OriginalDst {
            return Err(invalid(format!(
                "destination.host: must not be empty for {}",
                host_source.as_str_name()
            )));
        }
        if ip.is_none() {
            return Err(invalid(
                "destination: ORIGINAL_DST needs destination.ip when host is empty",
            ));
        }
    } else if parse_ip_literal(&dest.host).is_none()
        && let Err(e) = normalize_host(&dest.host)
    {
        return Err(invalid(format!("destination.host: {:?}: {e}", dest.host)));
    }
    if dest.resolved_ips.len() > lim.max_ips {
        return Err(invalid(format!(
            "destination.resolved_ips: {} entries exceeds the limit of {}",
            dest.resolved_ips.len(),
            lim.max_ips
        )));
    }
    let resolved_ips = dest
        .resolved_ips
        .iter()
        .map(|s| parse_ip("destination.resolved_ips", s))
        .collect::<Result<Vec<_>, _>>()?;
    let (process, ancestors) = match &r.process {
        None => (None, Vec::new()),
        Some(p) => {
            check_text("process.exe", &p.exe, lim.max_path, false)?;
            if p.argv.len() > lim.max_argv {
                return Err(invalid(format!(
                    "process.argv: {} entries exceeds the limit of {}",
                    p.argv.len(),
                    lim.max_argv
                )));
            }
            let argv_bytes: usize = p.argv.iter().map(String::len).sum();
            if argv_bytes > lim.max_argv_bytes {
                return Err(invalid(format!(
                    "process.argv: {argv_bytes} bytes exceeds the limit of {}",
                    lim.max_argv_bytes
                )));
            }
            if p.ancestors.len() > lim.max_ancestors {
                return Err(invalid(format!(
                    "process.ancestors: {} entries exceeds the limit of {}",
                    p.ancestors.len(),
                    lim.max_ancestors
                )));
            }
            let ancestors = p
                .ancestors
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    proc_key(
                        &format!("process.ancestors[{i}]"),
                        a.pid,
                        a.start_time,
                        &a.exe,
                        lim,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            if p.pid == 0 {
                // Unattributed: no process context can apply.
                (None, Vec::new())
            } else {
                (
                    Some(ProcKey {
                        pid: p.pid,
                        start_time: p.start_time,
                    }),
                    ancestors,
                )
            }
        }
    };
    Ok(ValidCheck {
        host_source,
        port,
        ip,
        resolved_ips,
        process,
        ancestors,
    })
}

/// A validated context event.
#[derive(Debug)]
pub enum ValidEvent {
    /// A sensitive file was opened.
    FileOpened {
        /// The opener.
        process: ProcKey,
        /// Its nearest ancestor, if reported.
        parent: Option<ProcKey>,
        /// The path.
        path: String,
    },
    /// A process exec'd.
    Exec {
        /// The process.
        process: ProcKey,
        /// Its parent, if known.
        parent: Option<ProcKey>,
    },
    /// A process exited.
    Exit {
        /// The process.
        process: ProcKey,
    },
    /// A DNS answer.
    Dns {
        /// Normalised name.
        name: String,
        /// Addresses.
        ips: Vec<IpAddr>,
        /// TTL (the store clamps it).
        ttl: std::time::Duration,
    },
    /// A sensor heartbeat.
    Heartbeat {
        /// Promised interval.
        interval: std::time::Duration,
    },
}

impl ValidEvent {
    /// Metric label of the event kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ValidEvent::FileOpened { .. } => "file_opened",
            ValidEvent::Exec { .. } => "exec",
            ValidEvent::Exit { .. } => "exit",
            ValidEvent::Dns { .. } => "dns_answer",
            ValidEvent::Heartbeat { .. } => "heartbeat",
        }
    }
}

/// Maximum promised heartbeat interval (1 h).
const MAX_HEARTBEAT_MS: u32 = 3_600_000;

/// Validate a context event; `Err` carries the reason for the EventAck.
pub fn process_event(e: &ProcessEvent, lim: &Limits) -> Result<ValidEvent, Status> {
    check_workload("workload_id", &e.workload_id, lim)?;
    check_text("sensor_id", &e.sensor_id, lim.max_id, false)?;
    let Some(ev) = &e.event else {
        return Err(invalid("event: missing"));
    };
    let opt_ref = |field: &str,
                   r: &Option<secureops_proto::v1::ProcessRef>|
     -> Result<Option<ProcKey>, Status> {
        match r {
            None => Ok(None),
            Some(r) if r.pid == 0 => Ok(None),
            Some(r) => proc_key(field, r.pid, r.start_time, &r.exe, lim).map(Some),
        }
    };
    let req_ref =
        |field: &str, r: &Option<secureops_proto::v1::ProcessRef>| -> Result<ProcKey, Status> {
            match r {
                None => Err(invalid(format!("{field}: missing"))),
                Some(r) => proc_key(field, r.pid, r.start_time, &r.exe, lim),
            }
        };
    Ok(match ev {
        Event::FileOpened(f) => {
            let process = req_ref("file_opened.process", &f.process)?;
            check_text("file_opened.path", &f.path, lim.max_path, true)?;
            if !f.path.starts_with('/') {
                return Err(invalid("file_opened.path: must be absolute"));
            }
            if f.ancestors.len() > lim.max_ancestors {
                return Err(invalid("file_opened.ancestors: too many entries"));
            }
            let parent = match f.ancestors.first() {
                Some(a) => Some(proc_key(
                    "file_opened.ancestors[0]",
                    a.pid,
                    a.start_time,
                    &a.exe,
                    lim,
                )?),
                None => None,
            };
            ValidEvent::FileOpened {
                process,
                parent,
                path: f.path.clone(),
            }
        }
        Event::Exec(x) => {
            if x.argv.len() > lim.max_argv {
                return Err(invalid("exec.argv: too many entries"));
            }
            ValidEvent::Exec {
                process: req_ref("exec.process", &x.process)?,
                parent: opt_ref("exec.parent", &x.parent)?,
            }
        }
        Event::Exit(x) => ValidEvent::Exit {
            process: req_ref("exit.process", &x.process)?,
        },
        Event::DnsAnswer(d) => {
            let name = normalize_host(&d.name)
                .map_err(|e| invalid(format!("dns_answer.name: {:?}: {e}", d.name)))?;
            if d.ips.is_empty() {
                return Err(invalid("dns_answer.ips: must not be empty"));
            }
            if d.ips.len() > lim.max_ips {
                return Err(invalid("dns_answer.ips: too many entries"));
            }
            let ips = d
                .ips
                .iter()
                .map(|s| parse_ip("dns_answer.ips", s))
                .collect::<Result<Vec<_>, _>>()?;
            ValidEvent::Dns {
                name,
                ips,
                ttl: std::time::Duration::from_secs(u64::from(d.ttl_seconds)),
            }
        }
        Event::Heartbeat(h) => {
            if h.interval_ms == 0 || h.interval_ms > MAX_HEARTBEAT_MS {
                return Err(invalid(format!(
                    "heartbeat.interval_ms: {} is not in 1..={MAX_HEARTBEAT_MS}",
                    h.interval_ms
                )));
            }
            ValidEvent::Heartbeat {
                interval: std::time::Duration::from_millis(u64::from(h.interval_ms)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secureops_proto::v1::{Destination, ProcessInfo};

    fn req() -> CheckRequest {
        CheckRequest {
            request_id: "r1".into(),
            workload_id: "agent-1".into(),
            process: Some(ProcessInfo {
                pid: 42,
                start_time: 7,
                exe: "/usr/bin/curl".into(),
                ..ProcessInfo::default()
            }),
            destination: Some(Destination {
                host: "example.com".into(),
                port: 443,
                ..Destination::default()
            }),
            host_source: HostSource::Connect as i32,
            transport: Transport::Tcp as i32,
            pep_id: "p".into(),
        }
    }

    fn err(r: &CheckRequest) -> String {
        match check_request(r, &Limits::default()) {
            Ok(_) => "ok".into(),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::InvalidArgument);
                s.message().to_owned()
            }
        }
    }

    #[test]
    fn good_request_passes() {
        let v = check_request(&req(), &Limits::default());
        assert!(v.is_ok());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut r = req();
        r.workload_id.clear();
        assert!(err(&r).starts_with("workload_id"));
        let mut r = req();
        r.host_source = 0;
        assert!(err(&r).starts_with("host_source"));
        r.host_source = 99;
        assert!(err(&r).contains("unknown value 99"));
        let mut r = req();
        r.transport = 7;
        assert!(err(&r).starts_with("transport"));
        let mut r = req();
        if let Some(d) = r.destination.as_mut() {
            d.port = 0;
        }
        assert!(err(&r).starts_with("destination.port"));
        if let Some(d) = r.destination.as_mut() {
            d.port = 70_000;
        }
        assert!(err(&r).starts_with("destination.port"));
        let mut r = req();
        r.destination = None;
        assert!(err(&r).starts_with("destination"));
        let mut r = req();
        if let Some(d) = r.destination.as_mut() {
            d.host = "a".repeat(300);
        }
        assert!(err(&r).contains("exceeds the limit"));
        let mut r = req();
        if let Some(d) = r.destination.as_mut() {
            d.ip = "not-an-ip".into();
        }
        assert!(err(&r).starts_with("destination.ip"));
        let mut r = req();
        if let Some(p) = r.process.as_mut() {
            p.argv = vec!["x".repeat(1000); 100];
        }
        assert!(err(&r).starts_with("process.argv"));
        let mut r = req();
        if let Some(d) = r.destination.as_mut() {
            d.host = String::new();
        }
        assert!(err(&r).starts_with("destination.host"));
        r.host_source = HostSource::OriginalDst as i32;
        assert!(err(&r).contains("ORIGINAL_DST"));
        if let Some(d) = r.destination.as_mut() {
            d.ip = "10.0.0.1".into();
        }
        assert_eq!(err(&r), "ok");
    }
}
