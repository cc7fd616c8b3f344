//! Time in the session table: expiry of idle sessions in slices, eviction of unconfirmed ones
//! under pressure, and the per-IP counts and registration rate limit they keep.

use super::*;

impl Relay {
    /// Expires idle sessions (a slice of the table per call, the whole table every second) and
    /// forgets idle rate-limiter entries.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        let t = self.secs(now);
        let paired_limit = self.cfg.session_timeout.as_secs().min(u32::MAX as u64) as u32;
        let unpaired_limit = self.cfg.unpaired_timeout.as_secs().min(u32::MAX as u64) as u32;
        let len = self.sessions.len();
        if len > 0 {
            let slice = len.div_ceil(SWEEP_SLICES).max(1024).min(len);
            for _ in 0..slice {
                if self.sweep_cursor >= len {
                    self.sweep_cursor = 0;
                }
                let i = self.sweep_cursor;
                self.sweep_cursor += 1;
                let s = &self.sessions[i];
                if !s.live() {
                    continue;
                }
                let limit = if s.paired() {
                    paired_limit
                } else {
                    unpaired_limit
                };
                if t.saturating_sub(s.last_active) >= limit {
                    self.expire(i);
                }
            }
        }
        let us = self.micros(now);
        if us >= self.next_rate_sweep {
            self.sweep_rate(us);
        }
        self.trim_young();
    }

    /// Drops stale entries from the front of `young`, so it does not hold every session ever
    /// created.
    fn trim_young(&mut self) {
        while let Some(&e) = self.young.front() {
            if evictable(&self.sessions, e) {
                break;
            }
            self.young.pop_front();
        }
        // One unpaired session at the front pins every stale entry behind it: compact when
        // stale entries dominate. Live entries are at most the unpaired sessions, so this runs
        // at most once per that many creations.
        let unpaired = self.stats.sessions_unpaired as usize;
        if self.young.len() > 2 * unpaired + 1024 {
            let sessions = &self.sessions;
            self.young.retain(|&e| evictable(sessions, e));
        }
        // After a burst of registrations that all paired, give the memory back: idle paired
        // sessions should cost what the table needs, not the peak of this queue.
        if self.young.capacity() > 4 * self.young.len() + 1024 {
            self.young.shrink_to(2 * self.young.len());
        }
    }

    /// Most entries `young` holds before it is compacted: twice the live ones it can name, so
    /// compaction (a pass over it) happens at most once per `max_sessions` creations.
    pub(super) fn young_cap(&self) -> usize {
        2 * self.cfg.limits.max_sessions as usize + 1
    }

    /// Removes the oldest unpaired session that never heard a second registration (PROTOCOL.md
    /// §7). Returns whether one was found. A flood of registrations for random sessions
    /// consists of exactly such sessions; a peer waiting for its partner re-registers and is
    /// confirmed, and a paired session never qualifies.
    pub(super) fn evict_unconfirmed(&mut self) -> bool {
        while let Some(e) = self.young.pop_front() {
            if evictable(&self.sessions, e) {
                let i = e.0 as usize;
                debug!(session = %self.sessions[i].id, "evicting an unconfirmed session to make room");
                for slot in 0..2 {
                    if self.sessions[i].slots[slot].used() {
                        self.remove_member(i, slot);
                    }
                }
                self.stats.evicted_unconfirmed += 1;
                return true;
            }
        }
        false
    }

    fn sweep_rate(&mut self, now_us: u64) {
        // An entry whose theoretical arrival time has passed has a full bucket: forget it.
        self.rate.retain(|_, tat| *tat > now_us);
        self.next_rate_sweep = now_us + 1_000_000;
    }

    fn expire(&mut self, i: usize) {
        let s = self.sessions[i];
        if s.paired() {
            self.stats.expired_paired += 1;
        } else {
            self.stats.expired_unpaired += 1;
        }
        debug!(session = %s.id, paired = s.paired(), "session expired");
        for slot in 0..2 {
            if s.slots[slot].used() {
                self.remove_member(i, slot);
            }
        }
    }

    /// Empties one slot, and frees the session when that was its last member.
    pub(super) fn remove_member(&mut self, i: usize, slot: usize) {
        let was_paired = self.sessions[i].paired();
        let addr = self.sessions[i].slots[slot].addr();
        self.by_addr.remove(&addr);
        self.dec_ip(addr.ip);
        self.sessions[i].slots[slot] = EMPTY_SLOT;
        self.alts.remove(&MemberRef::new(i as u32, slot).0);
        if was_paired {
            self.stats.sessions_paired -= 1;
            self.stats.sessions_unpaired += 1;
        }
        if !self.sessions[i].live() {
            self.stats.sessions_unpaired -= 1;
            let id = self.sessions[i].id;
            self.by_id.remove(&id);
            self.free.push(i as u32);
        }
    }

    pub(super) fn dec_ip(&mut self, ip: [u8; 16]) {
        if let hashbrown::hash_map::Entry::Occupied(mut e) = self.per_ip.entry(ip_limit_key(ip)) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    pub(super) fn inc_ip(&mut self, ip: [u8; 16]) {
        *self.per_ip.entry(ip_limit_key(ip)).or_insert(0) += 1;
    }

    pub(super) fn ip_count(&self, ip: &[u8; 16]) -> u32 {
        self.per_ip.get(&ip_limit_key(*ip)).copied().unwrap_or(0)
    }

    /// GCRA: allows `burst` registrations at once, then `rate` per second.
    pub(super) fn rate_allows(&mut self, now: Instant, ip: [u8; 16]) -> bool {
        let ip = ip_limit_key(ip);
        let l = &self.cfg.limits;
        if l.reg_rate_per_ip == 0 {
            return false;
        }
        let interval = 1_000_000 / u64::from(l.reg_rate_per_ip).max(1);
        let tolerance = interval * u64::from(l.reg_burst_per_ip.max(1) - 1);
        let now_us = self.micros(now);
        // The length first: the lookup is needed only when the table is full.
        if self.rate.len() >= MAX_RATE_ENTRIES && !self.rate.contains_key(&ip) {
            if now_us >= self.next_rate_sweep.saturating_sub(900_000) {
                self.sweep_rate(now_us);
            }
            if self.rate.len() >= MAX_RATE_ENTRIES {
                self.stats.rate_table_full += 1;
                return true;
            }
        }
        let tat = self.rate.entry(ip).or_insert(now_us);
        let start = (*tat).max(now_us);
        if start - now_us > tolerance {
            return false;
        }
        *tat = start + interval;
        true
    }
}
