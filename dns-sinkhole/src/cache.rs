//! Answer cache for allowed names.
//!
//! Only *answers* are cached, never decisions: every query still goes
//! through the PDP (and its pep-core decision cache), the exfiltration guard
//! and the audit spool; a hit only saves the upstream round trip. Entries
//! live for the smallest TTL in the answer (RFC 2308 SOA minimum for
//! negative answers), capped by `max_ttl`; served records carry the
//! remaining TTL.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use parking_lot::Mutex;

use crate::wire::WireSections;

/// Cache key: normalised name, then qtype, qclass (big endian) and the DO
/// bit as a last byte (see [`cache_key`]). Bytes, so a lookup can borrow a
/// reused buffer instead of allocating.
pub type CacheKey = Box<[u8]>;

/// Write the cache key of (`host`, `qtype`, `qclass`, `dnssec_ok`) into
/// `out` (cleared first).
pub fn write_cache_key(out: &mut Vec<u8>, host: &str, qtype: u16, qclass: u16, dnssec_ok: bool) {
    out.clear();
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&qclass.to_be_bytes());
    out.push(u8::from(dnssec_ok));
}

/// The owned cache key of (`host`, `qtype`, `qclass`, `dnssec_ok`).
pub fn cache_key(host: &str, qtype: u16, qclass: u16, dnssec_ok: bool) -> CacheKey {
    let mut k = Vec::with_capacity(host.len() + 5);
    write_cache_key(&mut k, host, qtype, qclass, dnssec_ok);
    k.into()
}

/// One cached upstream answer.
#[derive(Debug)]
pub struct CachedAnswer {
    pub response_code: ResponseCode,
    pub authentic_data: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The same sections in upstream wire form, for the UDP fast path
    /// (`None` when the upstream message had an unexpected shape).
    pub wire: Option<WireSections>,
    stored: Instant,
    ttl: Duration,
}

impl CachedAnswer {
    /// How long an upstream answer may be cached: `None` when it must not
    /// be (truncated, an error rcode, TTL 0, a negative answer without SOA).
    pub fn cacheable_ttl(msg: &Message, max_ttl: u32) -> Option<u32> {
        if msg.metadata.truncation {
            return None;
        }
        let ttl = match msg.metadata.response_code {
            ResponseCode::NoError if !msg.answers.is_empty() => msg
                .answers
                .iter()
                .chain(msg.authorities.iter())
                .map(|r| r.ttl)
                .min()?,
            ResponseCode::NoError | ResponseCode::NXDomain => {
                // Negative answer: bounded by the SOA (RFC 2308 §5).
                msg.authorities.iter().find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })?
            }
            _ => return None,
        };
        let ttl = ttl.min(max_ttl);
        (ttl > 0).then_some(ttl)
    }

    /// Keep the parts of an upstream answer we serve (OPT is ours to set).
    pub fn new(msg: &Message, ttl: u32, now: Instant) -> Self {
        CachedAnswer {
            response_code: msg.metadata.response_code,
            authentic_data: msg.metadata.authentic_data,
            answers: msg.answers.clone(),
            authorities: msg.authorities.clone(),
            additionals: msg
                .additionals
                .iter()
                .filter(|r| r.record_type() != RecordType::OPT)
                .cloned()
                .collect(),
            wire: None,
            stored: now,
            ttl: Duration::from_secs(u64::from(ttl)),
        }
    }

    /// Attach the wire form of the upstream answer `raw` whose question is
    /// `question_len` bytes long (see [`WireSections::from_upstream`]).
    pub fn with_wire(mut self, raw: &[u8], question_len: usize) -> Self {
        self.wire = WireSections::from_upstream(raw, question_len);
        self
    }

    /// [`Self::cacheable_ttl`] + [`Self::new`].
    pub fn from_message(msg: &Message, max_ttl: u32, now: Instant) -> Option<Self> {
        Self::cacheable_ttl(msg, max_ttl).map(|ttl| Self::new(msg, ttl, now))
    }

    /// Seconds since the answer was stored (to decrement record TTLs).
    pub fn age_secs(&self, now: Instant) -> u32 {
        u32::try_from(now.duration_since(self.stored).as_secs()).unwrap_or(u32::MAX)
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.stored) >= self.ttl
    }
}

const SHARDS: usize = 16;

/// Sharded, size-bounded TTL cache.
#[derive(Debug)]
pub struct AnswerCache {
    hasher: RandomState,
    per_shard: usize,
    pub max_ttl: u32,
    shards: Vec<Mutex<HashMap<CacheKey, Arc<CachedAnswer>>>>,
}

impl AnswerCache {
    /// `capacity` 0 disables the cache.
    pub fn new(capacity: usize, max_ttl: u32) -> Self {
        AnswerCache {
            hasher: RandomState::new(),
            per_shard: capacity.div_ceil(SHARDS),
            max_ttl,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &[u8]) -> &Mutex<HashMap<CacheKey, Arc<CachedAnswer>>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    pub fn get(&self, key: &[u8], now: Instant) -> Option<Arc<CachedAnswer>> {
        if self.per_shard == 0 {
            return None;
        }
        let mut shard = self.shard(key).lock();
        match shard.get(key) {
            Some(a) if !a.expired(now) => Some(a.clone()),
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, key: CacheKey, answer: CachedAnswer, now: Instant) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(&key[..]).lock();
        if shard.len() >= self.per_shard {
            shard.retain(|_, a| !a.expired(now));
            if shard.len() >= self.per_shard {
                // Still full of live entries: drop an arbitrary one. Cheap
                // and bounded; a cache miss only costs an upstream query.
                if let Some(k) = shard.keys().next().cloned() {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(key, Arc::new(answer));
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::A;

    fn answer(ttl: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answer(Record::from_rdata(
            Name::from_ascii("a.example.").unwrap(),
            ttl,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m
    }

    #[test]
    fn ttl_is_respected() {
        let c = AnswerCache::new(100, 3600);
        let t0 = Instant::now();
        let key = cache_key("a.example", 1, 1, false);
        c.insert(
            key.clone(),
            CachedAnswer::from_message(&answer(2), 3600, t0).unwrap(),
            t0,
        );
        let hit = c.get(&key, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(hit.age_secs(t0 + Duration::from_secs(1)), 1);
        assert!(c.get(&key, t0 + Duration::from_secs(2)).is_none());
        assert!(CachedAnswer::from_message(&answer(0), 3600, t0).is_none());
        let capped = CachedAnswer::from_message(&answer(100_000), 5, t0).unwrap();
        assert_eq!(capped.ttl, Duration::from_secs(5));
    }

    #[test]
    fn bounded() {
        let c = AnswerCache::new(32, 3600);
        let t0 = Instant::now();
        for i in 0..1000 {
            let key = cache_key(&format!("h{i}.example"), 1, 1, false);
            c.insert(
                key,
                CachedAnswer::from_message(&answer(60), 3600, t0).unwrap(),
                t0,
            );
        }
        assert!(c.len() <= 32);
    }
}
