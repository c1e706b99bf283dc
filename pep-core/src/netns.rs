//! The host's processes grouped by network namespace, for attributing
//! clients that live in another netns than the PEP (see
//! [`crate::attribution`]).
//!
//! Building the map costs one `readlink(/proc/<pid>/ns/net)` per process
//! (sub-millisecond for a few hundred processes), so it is cached for
//! [`TTL`] and rebuilt at most every [`MIN_REBUILD`] when a lookup misses
//! (a namespace created since the snapshot).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a snapshot is used without rebuilding.
pub(crate) const TTL: Duration = Duration::from_secs(2);
/// A snapshot younger than this is never rebuilt (bounds rebuild storms
/// when many lookups miss at once).
pub(crate) const MIN_REBUILD: Duration = Duration::from_millis(50);
/// Most `/proc` entries examined per build.
const MAX_PROCS: usize = 100_000;

/// One network namespace and its member processes (thread-group leaders).
#[derive(Debug)]
pub(crate) struct Ns {
    pub inode: u64,
    pub pids: Arc<[u32]>,
}

#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Our own netns inode (0 if unreadable).
    #[cfg_attr(not(test), allow(dead_code))]
    pub own: u64,
    /// Every other namespace, in `/proc` order.
    pub spaces: Vec<Ns>,
}

impl Snapshot {
    /// Foreign namespaces, `preferred` (the last one that matched) first.
    pub fn foreign(&self, preferred: u64) -> impl Iterator<Item = &Ns> {
        let first = self.spaces.iter().filter(move |n| n.inode == preferred);
        let rest = self.spaces.iter().filter(move |n| n.inode != preferred);
        first.chain(rest)
    }
}

#[derive(Debug)]
pub(crate) struct NetnsMap {
    proc_root: PathBuf,
    cached: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    preferred: AtomicU64,
}

impl NetnsMap {
    pub fn new(proc_root: PathBuf) -> Self {
        NetnsMap {
            proc_root,
            cached: Mutex::new(None),
            preferred: AtomicU64::new(0),
        }
    }

    /// The current snapshot, and whether it is too young to be rebuilt.
    pub fn snapshot(&self) -> (Arc<Snapshot>, bool) {
        if let Some((at, s)) = &*self.cached.lock() {
            let age = at.elapsed();
            if age < TTL {
                return (s.clone(), age < MIN_REBUILD);
            }
        }
        (self.rebuild(), true)
    }

    /// A fresh snapshot (unless one younger than [`MIN_REBUILD`] exists).
    /// Builds are serialised: concurrent callers share one.
    pub fn rebuild(&self) -> Arc<Snapshot> {
        let mut cached = self.cached.lock();
        if let Some((at, s)) = &*cached
            && at.elapsed() < MIN_REBUILD
        {
            return s.clone();
        }
        let s = Arc::new(build(&self.proc_root));
        *cached = Some((Instant::now(), s.clone()));
        s
    }

    pub fn preferred(&self) -> u64 {
        self.preferred.load(Ordering::Relaxed)
    }

    pub fn prefer(&self, inode: u64) {
        self.preferred.store(inode, Ordering::Relaxed);
    }
}

/// `net:[4026531840]` → 4026531840.
fn ns_inode(link: &Path) -> Option<u64> {
    let l = fs::read_link(link).ok()?;
    let s = l.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

fn build(proc_root: &Path) -> Snapshot {
    let own = ns_inode(&proc_root.join("self/ns/net")).unwrap_or(0);
    let mut groups: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut order: Vec<u64> = Vec::new();
    let Ok(dir) = fs::read_dir(proc_root) else {
        return Snapshot {
            own,
            spaces: Vec::new(),
        };
    };
    for ent in dir.take(MAX_PROCS) {
        let Ok(ent) = ent else { continue };
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // Unreadable (exited, or another user's without privilege): skip.
        let Some(ino) = ns_inode(&ent.path().join("ns/net")) else {
            continue;
        };
        if ino == own {
            continue;
        }
        groups
            .entry(ino)
            .or_insert_with(|| {
                order.push(ino);
                Vec::new()
            })
            .push(pid);
    }
    let spaces = order
        .into_iter()
        .filter_map(|ino| {
            let pids = groups.remove(&ino)?;
            Some(Ns {
                inode: ino,
                pids: pids.into(),
            })
        })
        .collect();
    Snapshot { own, spaces }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_excluded_and_read() {
        let m = NetnsMap::new(PathBuf::from("/proc"));
        let (s, fresh) = m.snapshot();
        assert!(fresh);
        assert_ne!(s.own, 0, "/proc/self/ns/net readable");
        let me = std::process::id();
        assert!(s.spaces.iter().all(|n| n.inode != s.own));
        assert!(s.spaces.iter().all(|n| !n.pids.contains(&me)));
        // Cached: the same snapshot within the TTL.
        let (again, _) = m.snapshot();
        assert!(Arc::ptr_eq(&s, &again));
    }

    #[test]
    fn missing_proc_yields_empty() {
        let m = NetnsMap::new(PathBuf::from("/nonexistent-proc"));
        let (s, _) = m.snapshot();
        assert_eq!(s.own, 0);
        assert!(s.spaces.is_empty());
    }

    #[test]
    fn preferred_comes_first() {
        let s = Snapshot {
            own: 1,
            spaces: vec![
                Ns {
                    inode: 2,
                    pids: vec![10].into(),
                },
                Ns {
                    inode: 3,
                    pids: vec![11].into(),
                },
            ],
        };
        let order: Vec<u64> = s.foreign(3).map(|n| n.inode).collect();
        assert_eq!(order, vec![3, 2]);
        let order: Vec<u64> = s.foreign(0).map(|n| n.inode).collect();
        assert_eq!(order, vec![2, 3]);
    }
}
