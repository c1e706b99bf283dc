//! Reading the identity of the opener from `/proc`: `(pid, start_time)`,
//! executable and a bounded ancestor chain.
//!
//! Why `(pid, start_time)`: PIDs are reused; the start time (field 22 of
//! `/proc/PID/stat`, clock ticks since boot) disambiguates, and it is what the
//! PEPs send in `ProcessInfo`, so the PDP's taint key matches exactly.

use secureops_proto::v1::ProcessRef;

/// Ancestors reported with each event (nearest first). Bounded so a
/// pathological process tree cannot make an event unboundedly expensive.
pub const MAX_ANCESTORS: usize = 32;

/// Errors reading `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading /proc/{pid}/stat: {source}")]
    Read {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed /proc/{pid}/stat")]
    Malformed { pid: u32 },
}

/// The fields of `/proc/PID/stat` the sensor needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 4.
    pub ppid: u32,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
}

/// Parse the content of `/proc/PID/stat`.
///
/// `comm` (field 2) is an arbitrary 16-byte name in parentheses that may
/// itself contain spaces and `)`, so the fields are split after the *last*
/// `)` of the line.
pub fn parse_stat(content: &str) -> Option<Stat> {
    let close = content.rfind(')')?;
    let rest = content.get(close + 1..)?;
    // rest = " S ppid pgrp ..." : field 3 (state) is index 0.
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(Stat { ppid, start_time })
}

/// Read and parse `/proc/PID/stat`.
pub fn read_stat(pid: u32) -> Result<Stat, ProcError> {
    let content = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| ProcError::Read { pid, source })?;
    parse_stat(&content).ok_or(ProcError::Malformed { pid })
}

/// Absolute path of the executable, empty when unreadable (kernel threads,
/// processes that exited).
pub fn read_exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `ProcessRef` of `pid` plus its ancestors (nearest first, at most
/// [`MAX_ANCESTORS`], stopping below PID 1's parent).
///
/// If the opener's own stat cannot be read (it exited), the start time is 0
/// and no ancestors are returned: the event is still reported with the PID.
pub fn describe(pid: u32) -> (ProcessRef, Vec<ProcessRef>) {
    let stat = read_stat(pid).ok();
    let me = ProcessRef {
        pid,
        start_time: stat.map(|s| s.start_time).unwrap_or(0),
        exe: read_exe(pid),
    };
    let mut ancestors = Vec::new();
    let mut next = stat.map(|s| s.ppid).unwrap_or(0);
    while next != 0 && ancestors.len() < MAX_ANCESTORS {
        let Ok(s) = read_stat(next) else { break };
        ancestors.push(ProcessRef {
            pid: next,
            start_time: s.start_time,
            exe: read_exe(next),
        });
        if s.ppid == next {
            break;
        }
        next = s.ppid;
    }
    (me, ancestors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_hostile_comm() {
        let line = "4242 (evil) 1 2 3 (x) y) S 77 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615";
        // After the last ')': "S 77 ..." => ppid 77, field 22 = 987654.
        let s = parse_stat(line).unwrap();
        assert_eq!(s.ppid, 77);
        assert_eq!(s.start_time, 987654);
        assert_eq!(parse_stat("12 (a) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn describes_self_and_ancestors() {
        let me = std::process::id();
        let (p, anc) = describe(me);
        assert_eq!(p.pid, me);
        assert!(p.start_time > 0);
        assert!(!p.exe.is_empty());
        let parent = nix::unistd::getppid().as_raw() as u32;
        assert_eq!(anc.first().map(|a| a.pid), Some(parent));
        assert!(anc.len() <= MAX_ANCESTORS);
        // Start times never increase going up the tree.
        let mut prev = p.start_time;
        for a in &anc {
            assert!(a.start_time <= prev, "{a:?}");
            prev = a.start_time;
        }
    }
}
