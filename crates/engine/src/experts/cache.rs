//! The RAM expert cache: (layer, expert) → buffer, bounded by bytes, least-recently-used eviction.
//! (The policy is a separate choice from the store; LRU is what routing traces of real models
//! favour first: strong temporal locality, no stable hot set. See docs/performance.md.)

use super::buffer::AlignedBuf;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub type ExpertKey = (u32, u32);

pub struct LruCache {
    budget: u64,
    used: u64,
    tick: u64,
    entries: HashMap<ExpertKey, (Arc<AlignedBuf>, u64)>,
    by_age: BTreeMap<u64, ExpertKey>,
}

impl LruCache {
    pub fn new(budget: u64) -> Self {
        LruCache { budget, used: 0, tick: 0, entries: HashMap::new(), by_age: BTreeMap::new() }
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

    /// Whether `key` is cached, without counting as a use.
    pub fn contains(&self, key: ExpertKey) -> bool {
        self.entries.contains_key(&key)
    }

    pub fn get(&mut self, key: ExpertKey) -> Option<Arc<AlignedBuf>> {
        self.tick += 1;
        let tick = self.tick;
        let (buf, age) = self.entries.get_mut(&key)?;
        self.by_age.remove(age);
        *age = tick;
        self.by_age.insert(tick, key);
        Some(buf.clone())
    }

    /// Inserts, evicting the least recently used entries until it fits. A buffer larger than the
    /// whole budget is not cached.
    pub fn insert(&mut self, key: ExpertKey, buf: Arc<AlignedBuf>) {
        let size = buf.len() as u64;
        if size > self.budget || self.entries.contains_key(&key) {
            return;
        }
        while self.used + size > self.budget {
            let Some((_, old)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((b, _)) = self.entries.remove(&old) {
                self.used -= b.len() as u64;
            }
        }
        self.tick += 1;
        self.by_age.insert(self.tick, key);
        self.entries.insert(key, (buf, self.tick));
        self.used += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let b = || Arc::new(AlignedBuf::zeroed(100));
        let mut c = LruCache::new(300);
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
}
