//! DNS exfiltration guard.
//!
//! An allowed wildcard (`*.example.com`) lets a workload put arbitrary bytes
//! in the labels it queries (`<base32 of .env>.example.com`): every query
//! reaches the domain's authoritative server, which is all a DNS tunnel
//! needs. The PDP cannot see this (each name matches the wildcard), so the
//! sinkhole meters the *information* carried by the names it forwards, per
//! (workload, registered domain), in fixed windows:
//!
//! * a name already forwarded in the current window is free (repeated
//!   lookups carry no new information);
//! * a new name costs its estimated information content: length × Shannon
//!   entropy (bits per character) of the labels left of the registered
//!   domain. Names whose cost is below `cheap_bits` and whose labels are all
//!   at most `long_label` bytes (`www`, `api`, `raw`, `objects-origin`) are
//!   *cheap*: they count towards `max_unique_names` only. Every other new
//!   name spends `budget_bits`;
//! * past either limit, new names are denied with reason `dns_exfil_budget`;
//!   names seen earlier in the window and cheap names (until the unique-name
//!   limit) keep working, so normal traffic to the same domain is unaffected
//!   by a tunnel that burnt the bit budget.
//!
//! The guard applies to every allowed name with labels left of its
//! registered domain: for exact allowlist entries this is a no-op after the
//! first lookup (their names never change), so it is only ever binding for
//! wildcard matches. Denied names spend nothing (they are never forwarded).
//!
//! Defaults (flags in brackets): window 60 s [`--exfil-window-secs`],
//! 4096 bits per window ≈ 512 bytes/min [`--exfil-budget-bits`],
//! 300 unique names per window [`--exfil-max-unique`], cheap below 64 bits
//! [`--exfil-cheap-bits`] with labels ≤ 24 bytes [`--exfil-long-label`],
//! 10,000 tracked (workload, domain) pairs [`--exfil-max-domains`].

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::name::split_registered;

/// Tuning of the [`ExfilGuard`]; see the module documentation.
#[derive(Debug, Clone)]
pub struct ExfilConfig {
    pub enabled: bool,
    pub window: Duration,
    pub budget_bits: f64,
    pub max_unique_names: usize,
    pub cheap_bits: f64,
    pub long_label: usize,
    pub max_domains: usize,
}

impl Default for ExfilConfig {
    fn default() -> Self {
        ExfilConfig {
            enabled: true,
            window: Duration::from_secs(60),
            budget_bits: 4096.0,
            max_unique_names: 300,
            cheap_bits: 64.0,
            long_label: 24,
            max_domains: 10_000,
        }
    }
}

/// Why the guard refused a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExfilVerdict {
    /// Forward it.
    Ok,
    /// Over the information budget (bits) for this domain in this window.
    OverBits,
    /// Over the unique-name limit for this domain in this window.
    OverUnique,
    /// Too many (workload, domain) pairs tracked: refuse new ones.
    TooManyDomains,
}

impl ExfilVerdict {
    pub fn detail(self) -> &'static str {
        match self {
            ExfilVerdict::Ok => "",
            ExfilVerdict::OverBits => "information budget exhausted",
            ExfilVerdict::OverUnique => "unique-name limit reached",
            ExfilVerdict::TooManyDomains => "too many tracked domains",
        }
    }
}

#[derive(Debug)]
struct DomainBudget {
    window_start: Instant,
    bits_spent: f64,
    seen: HashSet<Box<str>>,
}

const SHARDS: usize = 16;

/// (workload, registered domain) → budget.
type BudgetMap = HashMap<(Box<str>, Box<str>), DomainBudget>;

/// Per-(workload, registered domain) information budget. Sharded so that
/// concurrent queries for different domains do not contend.
#[derive(Debug)]
pub struct ExfilGuard {
    cfg: ExfilConfig,
    hasher: RandomState,
    shards: Vec<Mutex<BudgetMap>>,
}

/// Estimated information content of `s` in bits: length × empirical Shannon
/// entropy per byte (dots excluded).
pub fn information_bits(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for b in s.bytes().filter(|&b| b != b'.') {
        counts[usize::from(b)] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let total = f64::from(n);
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / total;
            -p * p.log2()
        })
        .sum();
    h * total
}

impl ExfilGuard {
    pub fn new(cfg: ExfilConfig) -> Self {
        ExfilGuard {
            cfg,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    pub fn config(&self) -> &ExfilConfig {
        &self.cfg
    }

    /// Meter one allowed, normalised name. `Ok` means "forward it" and
    /// records the spend; anything else means deny (`dns_exfil_budget`).
    pub fn check(&self, workload: &str, name: &str) -> ExfilVerdict {
        self.check_at(workload, name, Instant::now())
    }

    fn check_at(&self, workload: &str, name: &str, now: Instant) -> ExfilVerdict {
        if !self.cfg.enabled {
            return ExfilVerdict::Ok;
        }
        let (sub, domain) = split_registered(name);
        if sub.is_empty() {
            return ExfilVerdict::Ok;
        }
        let shard = &self.shards[(self.hasher.hash_one((workload, domain)) as usize) % SHARDS];
        let mut map = shard.lock();
        let key = (Box::<str>::from(workload), Box::<str>::from(domain));
        if !map.contains_key(&key) {
            let per_shard = self.cfg.max_domains.div_ceil(SHARDS).max(1);
            if map.len() >= per_shard {
                let window = self.cfg.window;
                map.retain(|_, b| now.duration_since(b.window_start) < window);
            }
            if map.len() >= per_shard {
                return ExfilVerdict::TooManyDomains;
            }
        }
        let budget = map.entry(key).or_insert_with(|| DomainBudget {
            window_start: now,
            bits_spent: 0.0,
            seen: HashSet::new(),
        });
        if now.duration_since(budget.window_start) >= self.cfg.window {
            budget.window_start = now;
            budget.bits_spent = 0.0;
            budget.seen.clear();
        }
        if budget.seen.contains(sub) {
            return ExfilVerdict::Ok;
        }
        if budget.seen.len() >= self.cfg.max_unique_names {
            return ExfilVerdict::OverUnique;
        }
        let bits = information_bits(sub);
        let cheap =
            bits < self.cfg.cheap_bits && sub.split('.').all(|l| l.len() <= self.cfg.long_label);
        if !cheap {
            if budget.bits_spent + bits > self.cfg.budget_bits {
                return ExfilVerdict::OverBits;
            }
            budget.bits_spent += bits;
        }
        budget.seen.insert(sub.into());
        ExfilVerdict::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random_label(seed: u64, len: usize) -> String {
        const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ALPHA[(x % 32) as usize] as char
            })
            .collect()
    }

    #[test]
    fn entropy_estimate() {
        assert_eq!(information_bits("aaaa"), 0.0);
        assert!((information_bits("ab") - 2.0).abs() < 1e-9);
        assert!(information_bits(&pseudo_random_label(1, 60)) > 200.0);
        assert!(information_bits("www") < 1.0);
    }

    #[test]
    fn tunnel_is_cut_normal_names_survive() {
        let g = ExfilGuard::new(ExfilConfig::default());
        let t0 = Instant::now();
        for n in ["www", "api", "raw", "objects-origin", "cdn"] {
            assert_eq!(
                g.check_at("w", &format!("{n}.example.com"), t0),
                ExfilVerdict::Ok
            );
        }
        let mut denied_at = None;
        for i in 0..200u64 {
            let name = format!(
                "{}.{}.example.com",
                pseudo_random_label(i, 60),
                pseudo_random_label(i + 1000, 50)
            );
            if g.check_at("w", &name, t0) != ExfilVerdict::Ok {
                denied_at = Some(i);
                break;
            }
        }
        let at = denied_at.expect("tunnel never cut");
        assert!(at > 3 && at < 30, "cut after {at} names");
        // Seen and new cheap names to the same domain still work.
        assert_eq!(g.check_at("w", "www.example.com", t0), ExfilVerdict::Ok);
        assert_eq!(g.check_at("w", "static.example.com", t0), ExfilVerdict::Ok);
        // Other workloads and other domains are unaffected.
        let long = format!("{}.example.com", pseudo_random_label(7, 60));
        assert_eq!(g.check_at("other", &long, t0), ExfilVerdict::Ok);
        let long = format!("{}.example.org", pseudo_random_label(8, 60));
        assert_eq!(g.check_at("w", &long, t0), ExfilVerdict::Ok);
        // A new window restores the budget.
        let later = t0 + Duration::from_secs(61);
        let long = format!("{}.example.com", pseudo_random_label(9, 60));
        assert_eq!(g.check_at("w", &long, later), ExfilVerdict::Ok);
    }

    #[test]
    fn unique_name_limit() {
        let g = ExfilGuard::new(ExfilConfig {
            max_unique_names: 10,
            ..ExfilConfig::default()
        });
        let t0 = Instant::now();
        for i in 0..10 {
            assert_eq!(
                g.check_at("w", &format!("h{i}.example.com"), t0),
                ExfilVerdict::Ok
            );
        }
        assert_eq!(
            g.check_at("w", "h10.example.com", t0),
            ExfilVerdict::OverUnique
        );
        assert_eq!(g.check_at("w", "h3.example.com", t0), ExfilVerdict::Ok);
        assert_eq!(g.check_at("w", "example.com", t0), ExfilVerdict::Ok);
    }

    #[test]
    fn bounded_domains() {
        let g = ExfilGuard::new(ExfilConfig {
            max_domains: 16,
            ..ExfilConfig::default()
        });
        let t0 = Instant::now();
        let mut refused = 0;
        for i in 0..200 {
            if g.check_at("w", &format!("a.d{i}.com"), t0) == ExfilVerdict::TooManyDomains {
                refused += 1;
            }
        }
        assert!(refused > 0);
        let total: usize = g.shards.iter().map(|s| s.lock().len()).sum();
        assert!(total <= 16);
    }
}
