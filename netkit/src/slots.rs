//! Counted places per key (a client's address, say) under a cap per key and a cap in total,
//! each given back when its holder drops it: the relay's TCP connections per IP and mqproxy's
//! UDP sessions per client use it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Why [`Slots::acquire`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every place of the total is held.
    Total,
    /// Every place of this key is held.
    Key,
}

/// Places counted per key. An entry goes when its count reaches zero, so the map never holds
/// more keys than places are held (at most `max_total`).
#[derive(Debug)]
pub struct Slots<K> {
    max_total: usize,
    max_per_key: usize,
    /// (places held in total, places held per key).
    state: Mutex<(usize, HashMap<K, usize>)>,
}

/// One held place of a [`Slots`], given back on drop.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash + Copy> {
    slots: Arc<Slots<K>>,
    key: K,
}

impl<K: Eq + Hash + Copy> Slots<K> {
    /// `max_total` places, at most `max_per_key` of them for one key.
    pub fn new(max_total: usize, max_per_key: usize) -> Self {
        Slots {
            max_total,
            max_per_key,
            state: Mutex::new((0, HashMap::new())),
        }
    }

    /// The cap in total.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Places held now.
    pub fn in_use(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Keys with a place held now.
    pub fn keys(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1.len()
    }

    /// A place for `key`, or which cap refused it.
    pub fn acquire(self: &Arc<Self>, key: K) -> Result<Slot<K>, Refusal> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0 >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = st.1.entry(key).or_insert(0);
        if *n >= self.max_per_key {
            if *n == 0 {
                st.1.remove(&key);
            }
            return Err(Refusal::Key);
        }
        *n += 1;
        st.0 += 1;
        Ok(Slot {
            slots: self.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash + Copy> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut st = self.slots.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 -= 1;
        if let Some(n) = st.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.1.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_key_and_gives_back() {
        let s = Arc::new(Slots::new(5, 3));
        let mut held: Vec<_> = (0..3).map(|_| s.acquire(1).expect("slot")).collect();
        assert_eq!(s.acquire(1).err(), Some(Refusal::Key));
        held.push(s.acquire(2).expect("other key"));
        held.push(s.acquire(2).expect("under its cap"));
        assert_eq!(s.acquire(3).err(), Some(Refusal::Total));
        assert_eq!((s.in_use(), s.keys()), (5, 2));
        held.clear();
        assert_eq!((s.in_use(), s.keys()), (0, 0), "entries go at zero");
        assert!(s.acquire(1).is_ok());
        let none = Arc::new(Slots::new(5, 0));
        assert_eq!(none.acquire(1).err(), Some(Refusal::Key));
        assert_eq!(none.keys(), 0, "a refused key leaves no entry");
    }
}
