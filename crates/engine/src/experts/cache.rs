//! The RAM expert cache: (layer, expert) → buffer, bounded by bytes. Two eviction policies, chosen
//! between by replaying routing traces (`flashmoe routing-stats --policies`, docs/performance.md):
//! LRU, and LFU with aging (an exponentially decayed use count, history kept across evictions).

use super::buffer::AlignedBuf;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

pub type ExpertKey = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CachePolicy {
    Lru,
    /// Evict the lowest decayed use count; counts halve every `half_life` tokens.
    LfuAging {
        half_life: f64,
    },
}

impl std::str::FromStr for CachePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(CachePolicy::Lru),
            "lfu" => Ok(CachePolicy::LfuAging { half_life: 32.0 }),
            o => match o.strip_prefix("lfu:").map(str::parse::<f64>) {
                Some(Ok(h)) if h > 0.0 => Ok(CachePolicy::LfuAging { half_life: h }),
                _ => Err(format!("`{o}`: expected lru, lfu or lfu:HALF_LIFE_TOKENS")),
            },
        }
    }
}

impl CachePolicy {
    pub fn name(&self) -> String {
        match self {
            CachePolicy::Lru => "lru".into(),
            CachePolicy::LfuAging { half_life } => format!("lfu(half-life {half_life} tokens)"),
        }
    }
}

/// What a cache holds per expert: a RAM buffer, or (GPU tier) a slot of device memory.
pub trait CacheValue: Clone {
    fn bytes(&self) -> u64;
}

impl CacheValue for Arc<AlignedBuf> {
    fn bytes(&self) -> u64 {
        self.len() as u64
    }
}

pub struct ExpertCache<V: CacheValue = Arc<AlignedBuf>> {
    policy: CachePolicy,
    budget: u64,
    used: u64,
    tick: u64,
    /// Token clock for aging, advanced by the store.
    clock: f64,
    entries: HashMap<ExpertKey, (V, u64)>,
    order: BTreeSet<(u64, ExpertKey)>,
    /// log2 of each expert's decayed count referred to clock 0 (LFU), kept after eviction.
    lfu_log: HashMap<ExpertKey, f64>,
}

/// The old name, kept for callers that only want LRU.
pub type LruCache = ExpertCache;

impl ExpertCache {
    pub fn new(budget: u64) -> Self {
        Self::with_policy(budget, CachePolicy::Lru)
    }
}

impl<V: CacheValue> ExpertCache<V> {
    pub fn with_policy(budget: u64, policy: CachePolicy) -> Self {
        ExpertCache {
            policy,
            budget,
            used: 0,
            tick: 0,
            clock: 0.0,
            entries: HashMap::new(),
            order: BTreeSet::new(),
            lfu_log: HashMap::new(),
        }
    }

    pub fn policy(&self) -> CachePolicy {
        self.policy
    }
    pub fn budget(&self) -> u64 {
        self.budget
    }
    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets the token clock (LFU aging).
    pub fn set_clock(&mut self, tokens: f64) {
        self.clock = tokens;
    }

    /// Records a use of `key` and returns its new eviction score (lowest is evicted first).
    fn touch(&mut self, key: ExpertKey) -> u64 {
        self.tick += 1;
        match self.policy {
            CachePolicy::Lru => self.tick,
            CachePolicy::LfuAging { half_life } => {
                // count(t) = count(t₀)·2^(−(t−t₀)/h) + 1, kept as L = log2(count·2^(t/h)).
                let now = self.clock / half_life;
                let l = match self.lfu_log.get(&key) {
                    None => now,
                    Some(&old) => {
                        let m = old.max(now);
                        m + ((old - m).exp2() + (now - m).exp2()).log2()
                    }
                };
                self.lfu_log.insert(key, l);
                // Non-negative, so the bit pattern orders like the value.
                l.max(0.0).to_bits()
            }
        }
    }

    /// Up to `max` entries whose value satisfies `pred` (no use counted).
    pub fn entries_where(&self, pred: impl Fn(&V) -> bool, max: usize) -> Vec<(ExpertKey, V)> {
        self.entries.iter().filter(|(_, (v, _))| pred(v)).take(max).map(|(k, (v, _))| (*k, v.clone())).collect()
    }

    /// Replaces the value of `key` by `new` (same score) when it is cached and `same` holds
    /// for its current value. Returns whether it did.
    pub fn replace_if(&mut self, key: ExpertKey, new: V, same: impl Fn(&V) -> bool) -> bool {
        let Some((v, _)) = self.entries.get_mut(&key) else { return false };
        if !same(v) {
            return false;
        }
        self.used = self.used - v.bytes() + new.bytes();
        *v = new;
        true
    }

    /// Whether `key` is cached, without counting as a use.
    pub fn contains(&self, key: ExpertKey) -> bool {
        self.entries.contains_key(&key)
    }

    pub fn get(&mut self, key: ExpertKey) -> Option<V> {
        let (buf, old) = self.entries.get(&key).map(|(b, s)| (b.clone(), *s))?;
        let score = self.touch(key);
        self.order.remove(&(old, key));
        self.order.insert((score, key));
        self.entries.get_mut(&key).expect("present").1 = score;
        Some(buf)
    }

    /// Inserts (a miss that was just read), evicting the lowest-scored entries until it fits. A
    /// buffer larger than the whole budget is not cached.
    pub fn insert(&mut self, key: ExpertKey, buf: V) {
        let _ = self.insert_protecting(key, buf, |_| false);
    }

    /// Inserts `key` as if it had been used at `rate` uses per token for a long time (LFU: its
    /// decayed count starts at the steady state of that rate, `rate · half_life / ln 2`),
    /// evicting only entries that score lower. How a pre-warm from a routing profile places an
    /// expert: a hot one is not pushed out by the first one-off miss, and a cold one does not
    /// push out what the run uses. LRU: inserted only into free room. Returns the value when it
    /// did not go in.
    pub fn insert_seeded(&mut self, key: ExpertKey, value: V, rate: f64) -> std::result::Result<(), V> {
        let CachePolicy::LfuAging { half_life } = self.policy else {
            return self.insert_protecting(key, value, |_| true).map(|_| ());
        };
        let size = value.bytes();
        if size > self.budget || self.entries.contains_key(&key) {
            return Err(value);
        }
        let uses = (rate * half_life / std::f64::consts::LN_2).max(1.0);
        let mut l = self.clock / half_life + uses.log2();
        if let Some(&old) = self.lfu_log.get(&key) {
            let m = old.max(l);
            l = m + ((old - m).exp2() + (l - m).exp2()).log2();
        }
        let score = l.max(0.0).to_bits();
        let mut victims = Vec::new();
        let mut freed = 0;
        for &(s, k) in &self.order {
            if self.used - freed + size <= self.budget {
                break;
            }
            if s >= score {
                return Err(value);
            }
            victims.push((s, k));
            freed += self.entries[&k].0.bytes();
        }
        if self.used - freed + size > self.budget {
            return Err(value);
        }
        for (s, k) in victims {
            self.order.remove(&(s, k));
            if let Some((v, _)) = self.entries.remove(&k) {
                self.used -= v.bytes();
            }
        }
        self.lfu_log.insert(key, l);
        self.order.insert((score, key));
        self.entries.insert(key, (value, score));
        self.used += size;
        Ok(())
    }

    /// Removes `key` (it moves to another tier), keeping its use history. Counts as a use.
    pub fn remove(&mut self, key: ExpertKey) -> Option<V> {
        let (v, score) = self.entries.remove(&key)?;
        self.order.remove(&(score, key));
        self.used -= v.bytes();
        self.touch(key);
        Some(v)
    }

    /// Removes and returns the lowest-scored entry that `protected` does not name.
    pub fn evict_lowest(&mut self, protected: impl Fn(ExpertKey) -> bool) -> Option<(ExpertKey, V)> {
        let (score, key) = *self.order.iter().find(|(_, k)| !protected(*k))?;
        self.order.remove(&(score, key));
        let (v, _) = self.entries.remove(&key)?;
        self.used -= v.bytes();
        Some((key, v))
    }

    /// Inserts `key`, evicting the lowest-scored entries that `protected` does not name, and
    /// returns what was evicted. When the unprotected entries cannot make room, nothing changes
    /// and the value comes back as the error.
    pub fn insert_protecting(
        &mut self,
        key: ExpertKey,
        value: V,
        protected: impl Fn(ExpertKey) -> bool,
    ) -> std::result::Result<Vec<(ExpertKey, V)>, V> {
        let size = value.bytes();
        if size > self.budget || self.entries.contains_key(&key) {
            return Err(value);
        }
        let mut victims = Vec::new();
        let mut freed = 0;
        for &(score, k) in &self.order {
            if self.used - freed + size <= self.budget {
                break;
            }
            if !protected(k) {
                victims.push((score, k));
                freed += self.entries[&k].0.bytes();
            }
        }
        if self.used - freed + size > self.budget {
            return Err(value);
        }
        let mut evicted = Vec::with_capacity(victims.len());
        for (score, k) in victims {
            self.order.remove(&(score, k));
            if let Some((v, _)) = self.entries.remove(&k) {
                self.used -= v.bytes();
                evicted.push((k, v));
            }
        }
        let score = self.touch(key);
        self.order.insert((score, key));
        self.entries.insert(key, (value, score));
        self.used += size;
        Ok(evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Arc<AlignedBuf> {
        Arc::new(AlignedBuf::zeroed(100))
    }

    #[test]
    fn lru_evicts_least_recently_used_within_budget() {
        let mut c = ExpertCache::new(300);
        c.insert((0, 1), b());
        c.insert((0, 2), b());
        c.insert((0, 3), b());
        assert!(c.get((0, 1)).is_some()); // 1 is now the most recent
        c.insert((0, 4), b()); // evicts 2
        assert!(c.get((0, 2)).is_none());
        assert!(c.get((0, 1)).is_some() && c.get((0, 3)).is_some() && c.get((0, 4)).is_some());
        assert_eq!(c.used(), 300);
        c.insert((1, 0), Arc::new(AlignedBuf::zeroed(1000))); // larger than the budget: skipped
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn lfu_keeps_the_frequent_expert_and_ages_counts() {
        let mut c = ExpertCache::with_policy(200, CachePolicy::LfuAging { half_life: 2.0 });
        c.insert((0, 1), b());
        for t in 1..4 {
            c.set_clock(t as f64);
            assert!(c.get((0, 1)).is_some());
        }
        c.set_clock(4.0);
        c.insert((0, 2), b());
        c.set_clock(5.0);
        c.insert((0, 3), b()); // evicts 2 (used once) rather than 1 (used four times)
        assert!(c.contains((0, 1)) && c.contains((0, 3)) && !c.contains((0, 2)));
        // Much later, old counts have decayed: a fresh expert used twice outranks 1.
        c.set_clock(100.0);
        c.get((0, 3));
        c.set_clock(101.0);
        c.get((0, 3));
        c.insert((0, 4), b()); // evicts 1, whose four uses are ~48 half-lives old
        assert!(!c.contains((0, 1)) && c.contains((0, 3)) && c.contains((0, 4)));
    }

    #[test]
    fn seeded_entries_outrank_one_off_uses_and_evict_only_lower_scores() {
        let mut c = ExpertCache::with_policy(200, CachePolicy::LfuAging { half_life: 32.0 });
        c.insert((0, 1), b()); // one use
        assert!(c.insert_seeded((0, 2), b(), 0.5).is_ok()); // ≈ 23 uses: fits in free room
        assert!(c.insert_seeded((0, 3), b(), 0.25).is_ok()); // evicts (0, 1), not (0, 2)
        assert!(!c.contains((0, 1)) && c.contains((0, 2)) && c.contains((0, 3)));
        // A colder seed cannot push out hotter entries.
        assert!(c.insert_seeded((0, 4), b(), 0.01).is_err());
        // A one-off miss evicts the colder of the two seeded entries.
        c.insert((0, 5), b());
        assert!(c.contains((0, 2)) && !c.contains((0, 3)) && c.contains((0, 5)));
    }

    #[test]
    fn policies_parse() {
        assert_eq!("lru".parse::<CachePolicy>().unwrap(), CachePolicy::Lru);
        assert_eq!("lfu:16".parse::<CachePolicy>().unwrap(), CachePolicy::LfuAging { half_life: 16.0 });
        assert!("mru".parse::<CachePolicy>().is_err());
    }
}
