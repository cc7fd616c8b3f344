//! The session table's internal invariants, checked by tests and fuzzing.

use super::*;

impl Relay {
    /// Checks every internal invariant; for tests and fuzzing. Panics with a description when
    /// one does not hold.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        for &k in self.alts.keys() {
            let m = MemberRef(k);
            let slot = self.sessions[m.session()].slots[m.slot()];
            assert!(
                slot.used() && slot.peer_id().is_some(),
                "an alternate address outlived its member"
            );
        }
        let mut members = 0;
        let mut paired = 0;
        let mut unpaired = 0;
        let mut per_ip: std::collections::HashMap<[u8; 16], u32> = Default::default();
        let free: std::collections::HashSet<u32> = self.free.iter().copied().collect();
        assert_eq!(
            free.len(),
            self.free.len(),
            "a record is on the free list twice"
        );
        for (i, s) in self.sessions.iter().enumerate() {
            if !s.live() {
                assert!(
                    self.free.contains(&(i as u32)),
                    "dead record {i} not on the free list"
                );
                continue;
            }
            assert_eq!(
                self.by_id.get(&s.id),
                Some(&(i as u32)),
                "by_id for {}",
                s.id
            );
            if s.paired() {
                paired += 1;
                assert_ne!(
                    s.slots[0].addr(),
                    s.slots[1].addr(),
                    "session {} paired with itself",
                    s.id
                );
                if let (Some(a), Some(b)) = (s.slots[0].peer_id(), s.slots[1].peer_id()) {
                    assert_ne!(a, b, "two members with one peer id");
                }
            } else {
                unpaired += 1;
            }
            for (k, slot) in s.slots.iter().enumerate() {
                if slot.used() {
                    members += 1;
                    *per_ip.entry(ip_limit_key(slot.addr().ip)).or_default() += 1;
                    assert!(
                        self.by_addr.get(&slot.addr()) == Some(&MemberRef::new(i as u32, k)),
                        "by_addr for {}",
                        slot.addr()
                    );
                }
            }
        }
        assert_eq!(members, self.by_addr.len(), "address index size");
        assert!(self.by_addr.cache_consistent(), "address cache stale");
        assert_eq!(paired + unpaired, self.by_id.len(), "session index size");
        assert_eq!(self.stats.sessions_paired, paired as u64, "paired gauge");
        assert_eq!(
            self.stats.sessions_unpaired, unpaired as u64,
            "unpaired gauge"
        );
        assert_eq!(per_ip.len(), self.per_ip.len(), "per-IP table size");
        for (ip, n) in per_ip {
            assert_eq!(self.per_ip.get(&ip), Some(&n), "per-IP count");
        }
        assert!(
            self.young.len() <= self.young_cap(),
            "eviction queue over its cap"
        );
        assert!(
            self.rate.len() <= MAX_RATE_ENTRIES,
            "rate table over its cap"
        );
        assert!(
            self.by_id.len() <= self.cfg.limits.max_sessions as usize,
            "over max sessions"
        );
    }
}
