//! Registration: joining, creating and moving session members, the ACKs and peer notices
//! they earn (never longer than their request), and the stateless cookies that verify an
//! address.

use super::*;

impl Relay {
    /// Queues `reply` to `dst`, shortened or suppressed so that it is never longer than the
    /// request that caused it (PROTOCOL.md §4.3).
    pub(super) fn queue(&mut self, dst: PeerAddr, reply: Reply, request_len: usize) -> bool {
        let mut payload = reply.encode();
        if let Reply::Ack {
            observed,
            peer,
            cookie,
            peer_alt,
        } = reply
        {
            // A registration padded for less than the whole ACK: first the peer's alternate
            // address goes, then the cookie (an older client, padded for addresses only, gets
            // its addresses but no cookie, and so stays unverified).
            if peer_alt.is_some() && payload.as_bytes().len() > request_len {
                payload = Reply::Ack {
                    observed,
                    peer,
                    cookie,
                    peer_alt: None,
                }
                .encode();
            }
            if cookie.is_some() && payload.as_bytes().len() > request_len {
                payload = Reply::Ack {
                    observed,
                    peer,
                    cookie: None,
                    peer_alt: None,
                }
                .encode();
            }
        }
        // The no-amplification rule: never answer with more bytes than were sent.
        if payload.as_bytes().len() > request_len {
            self.stats.replies_suppressed += 1;
            return false;
        }
        self.transmits.push_back(Transmit { dst, payload });
        true
    }

    pub(super) fn refuse(&mut self, src: PeerAddr, reason: ErrReason, request_len: usize) {
        self.count(RegResult::Refused(reason));
        self.queue(src, Reply::Err(Some(reason)), request_len);
    }

    /// The ACK for the member in `slot` of session `i`.
    fn ack_for(&self, i: usize, slot: usize) -> Reply {
        let s = &self.sessions[i];
        let me = s.slots[slot];
        if !me.extended() {
            return Reply::Ack {
                observed: None,
                peer: None,
                cookie: None,
                peer_alt: None,
            };
        }
        let other = s.slots[1 - slot];
        Reply::Ack {
            observed: Some(me.addr().to_socket_addr()),
            peer: other.used().then(|| other.addr().to_socket_addr()),
            cookie: (!me.verified()).then(|| self.cookie(s.id, me.addr(), self.cookie_epoch())),
            peer_alt: self.peer_alt_for(i, slot, me.flags),
        }
    }

    /// The alternate address of the member other than `slot` in session `i`, for a
    /// registrant with `flags` that reads it.
    fn peer_alt_for(&self, i: usize, slot: usize, flags: SlotFlags) -> Option<SocketAddr> {
        if !flags.contains(SlotFlags::ALT_AWARE) || !self.sessions[i].slots[1 - slot].used() {
            return None;
        }
        let other = MemberRef::new(i as u32, 1 - slot).0;
        self.alts.get(&other).map(|a| a.to_socket_addr())
    }

    /// An alternate registration (`alt=1`, PROTOCOL.md §3.3): `src` becomes the alternate
    /// address of the member with peer id `p`. It is no member address: it never rebinds or
    /// joins, nothing is forwarded to or from it; the relay only reports it to the other
    /// member, which may probe it for a direct path.
    fn register_alt(&mut self, src: PeerAddr, reg: &Registration, p: u64, request_len: usize) {
        let member = self.by_id.get(&reg.session).and_then(|&idx| {
            let s = &self.sessions[idx as usize];
            (0..2)
                .find(|&k| s.slots[k].used() && s.slots[k].peer_id() == Some(p))
                .map(|k| (idx as usize, k))
        });
        let Some((i, k)) = member else {
            return self.refuse(src, ErrReason::NoMember, request_len);
        };
        if self.sessions[i].slots[k].addr() == src {
            // Its own member address is no alternate.
            return self.refuse(src, ErrReason::Malformed, request_len);
        }
        let key = MemberRef::new(i as u32, k).0;
        let changed = self.alts.insert(key, src) != Some(src);
        self.count(RegResult::Alt);
        if changed {
            debug!(session = %reg.session, peer = %self.sessions[i].slots[k].addr(), alt = %src, "alternate address");
        }
        let other = self.sessions[i].slots[1 - k];
        let ack = Reply::Ack {
            observed: Some(src.to_socket_addr()),
            peer: other.used().then(|| other.addr().to_socket_addr()),
            cookie: None,
            peer_alt: self.peer_alt_for(i, k, SlotFlags::ALT_AWARE),
        };
        self.queue(src, ack, request_len);
        if changed && other.flags.contains(SlotFlags::ALT_AWARE) {
            self.notify_other(i, k, request_len);
        }
    }

    /// The current cookie period's number (cookies of this one and the previous are accepted).
    fn cookie_epoch(&self) -> u64 {
        self.clock.1 / crate::defaults::COOKIE_PERIOD.as_micros().max(1) as u64
    }

    /// The cookie for `addr` in `session` during period `epoch`: a keyed hash, so the relay
    /// keeps no state per cookie, and only whoever receives the ACK at `addr` learns it.
    fn cookie(&self, session: Uuid, addr: PeerAddr, epoch: u64) -> proto::Cookie {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.cfg.cookie_key)
            .expect("HMAC accepts keys of any length");
        mac.update(session.as_bytes());
        mac.update(&addr.ip);
        mac.update(&addr.port.to_be_bytes());
        mac.update(&[addr.tcp]);
        mac.update(&epoch.to_be_bytes());
        let out = mac.finalize().into_bytes();
        proto::Cookie(u64::from_be_bytes(
            out[..8].try_into().expect("SHA-256 is 32 bytes"),
        ))
    }

    /// Whether `c` is the cookie of `addr` in `session` for this period or the previous one.
    /// (A wrong guess is rejected with probability 1 - 2^-63.)
    fn cookie_ok(&self, session: Uuid, addr: PeerAddr, c: proto::Cookie) -> bool {
        let epoch = self.cookie_epoch();
        self.cookie(session, addr, epoch) == c
            || (epoch > 0 && self.cookie(session, addr, epoch - 1) == c)
    }

    /// Tells an extended other member of session `i` about a new or moved peer in `slot`.
    fn notify_other(&mut self, i: usize, slot: usize, request_len: usize) {
        let other = self.sessions[i].slots[1 - slot];
        if other.used() && other.extended() {
            let reply = self.ack_for(i, 1 - slot);
            self.queue(other.addr(), reply, request_len);
        }
    }

    pub(super) fn register(
        &mut self,
        now: Instant,
        src: PeerAddr,
        reg: &Registration,
        request_len: usize,
    ) {
        if !self.rate_allows(now, src.ip) {
            return self.refuse(src, ErrReason::Rate, request_len);
        }
        let ext = reg.extended.as_ref();
        if !self.cfg.secrets.is_empty() {
            let verdict = match ext.and_then(|e| e.token.as_ref()) {
                None => Err(TokenError::BadMac),
                Some(t) => t.verify(&self.cfg.secrets, reg.session, self.unix_now),
            };
            match verdict {
                Ok(()) => {}
                Err(TokenError::Expired) => {
                    return self.refuse(src, ErrReason::Expired, request_len)
                }
                Err(_) => return self.refuse(src, ErrReason::Auth, request_len),
            }
        }
        let peer_id = ext.and_then(|e| e.peer).map(|PeerId(p)| p);
        if let (Some(p), true) = (peer_id, ext.is_some_and(|e| e.alt)) {
            return self.register_alt(src, reg, p, request_len);
        }
        if self.draining && !self.by_id.contains_key(&reg.session) {
            // No new sessions while draining (PROTOCOL.md §5.2); members of existing ones
            // keep refreshing, and a peer may still join one.
            return self.refuse(src, ErrReason::Moved, request_len);
        }
        let t = self.secs(now);
        let mut flags = SlotFlags::USED;
        if ext.is_some() {
            flags |= SlotFlags::EXTENDED;
        }
        if ext.is_some_and(|e| e.alt_aware) {
            flags |= SlotFlags::ALT_AWARE;
        }
        if peer_id.is_some() {
            flags |= SlotFlags::HAS_PEER_ID;
        }
        // A TCP connection's handshake proved its address; a UDP member proves it by echoing
        // the cookie the relay sent there.
        if src.is_tcp() {
            flags |= SlotFlags::VERIFIED;
        } else if let Some(c) = ext.and_then(|e| e.cookie) {
            if self.cookie_ok(reg.session, src, c) {
                flags |= SlotFlags::VERIFIED;
            } else {
                self.stats.cookies_rejected += 1;
            }
        }
        let slot_value = Slot {
            ip: src.ip,
            port: src.port,
            flags,
            tcp: src.tcp,
            last_heard: t,
            peer_id: peer_id.unwrap_or(0),
        };
        let current = self.by_addr.get(&src).copied();

        let Some(&idx) = self.by_id.get(&reg.session) else {
            return self.create(now, src, reg.session, slot_value, current, request_len);
        };
        let i = idx as usize;

        // (a) Already a member at this very address: keepalive.
        if let Some(m) = current.filter(|m| m.session() == i) {
            let other = self.sessions[i].slots[1 - m.slot()];
            if peer_id.is_some() && other.used() && other.peer_id() == peer_id {
                // The other member already goes by this peer id: two peers cannot share one.
                return self.refuse(src, ErrReason::Full, request_len);
            }
            let s = &mut self.sessions[i];
            // Same address: a proof given before still holds.
            let kept = s.slots[m.slot()].flags & SlotFlags::VERIFIED;
            s.slots[m.slot()] = Slot {
                flags: slot_value.flags | kept | SlotFlags::CONFIRMED,
                ..slot_value
            };
            s.last_active = t;
            self.count(RegResult::Refresh);
            let ack = self.ack_for(i, m.slot());
            self.queue(src, ack, request_len);
            return;
        }

        // (b) A member that moved: same peer id, or (original form) same IP as a member that
        // has no peer id. Rebinding happens only here, on a registration, never on data.
        let s = &self.sessions[i];
        let moving = match peer_id {
            Some(p) => (0..2).find(|&k| s.slots[k].used() && s.slots[k].peer_id() == Some(p)),
            None => {
                // Only between UDP addresses: a TCP member without a peer id never moves (it
                // leaves when its connection closes), and no REG over TCP takes a UDP member's
                // slot by IP alone: a TCP connection acts only for itself.
                let candidates = (0..2).filter(|&k| {
                    let m = s.slots[k];
                    m.used()
                        && m.peer_id().is_none()
                        && m.ip == src.ip
                        && !m.is_tcp()
                        && !src.is_tcp()
                });
                // Both members behind this IP: the one heard from least recently is the one whose
                // NAT mapping went away.
                candidates.min_by_key(|&k| s.slots[k].last_heard)
            }
        };
        // An address leaving another session for this one does not count twice against its IP.
        let held = u32::from(current.is_some());
        if let Some(k) = moving {
            let old = s.slots[k].addr();
            if ip_limit_key(old.ip) != ip_limit_key(src.ip)
                && self.ip_count(&src.ip) - held >= self.cfg.limits.max_sessions_per_ip
            {
                return self.refuse(src, ErrReason::IpLimit, request_len);
            }
            if let Some(m) = current {
                self.remove_member(m.session(), m.slot());
            }
            self.by_addr.remove(&old);
            self.dec_ip(old.ip);
            self.seat(src, idx, k, slot_value, t);
            self.count(RegResult::Rebind);
            debug!(session = %reg.session, from = %old, to = %src, "member rebound");
            let ack = self.ack_for(i, k);
            self.queue(src, ack, request_len);
            self.notify_other(i, k, request_len);
            return;
        }

        // (c) A free slot: the second peer arrives. A member silent for the unpaired timeout
        // (no registration, no data) is gone: a peer that crashed must not lock its session
        // until the other side gives up too.
        let stale_after = self.cfg.unpaired_timeout.as_secs().min(u32::MAX as u64) as u32;
        let slots = self.sessions[i].slots;
        let free = (0..2).find(|&k| !slots[k].used());
        let stale = (0..2)
            .filter(|&k| t.saturating_sub(slots[k].last_heard) >= stale_after)
            .min_by_key(|&k| slots[k].last_heard);
        let Some(k) = free.or(stale) else {
            return self.refuse(src, ErrReason::Full, request_len);
        };
        if self.ip_count(&src.ip) - held >= self.cfg.limits.max_sessions_per_ip {
            return self.refuse(src, ErrReason::IpLimit, request_len);
        }
        if free.is_none() {
            debug!(session = %reg.session, stale = %slots[k].addr(), peer = %src, "replacing a silent member");
            self.remove_member(i, k);
            self.stats.stale_replaced += 1;
        }
        if let Some(m) = current {
            self.remove_member(m.session(), m.slot());
        }
        self.seat(src, idx, k, slot_value, t);
        self.sessions[i].slots[1 - k].flags |= SlotFlags::CONFIRMED;
        self.stats.sessions_unpaired -= 1;
        self.stats.sessions_paired += 1;
        self.count(RegResult::Join);
        debug!(session = %reg.session, peer = %src, "session paired");
        let ack = self.ack_for(i, k);
        self.queue(src, ack, request_len);
        self.notify_other(i, k, request_len);
    }

    /// Puts `src` into slot `k` of session `idx`, confirmed, found by its address and counted
    /// against its IP: a rebind or the second peer joining (the caller has let go of what the
    /// slot and the address held before).
    fn seat(&mut self, src: PeerAddr, idx: u32, k: usize, slot_value: Slot, t: u32) {
        self.inc_ip(src.ip);
        self.by_addr.insert(src, MemberRef::new(idx, k));
        let s = &mut self.sessions[idx as usize];
        s.slots[k] = Slot {
            flags: slot_value.flags | SlotFlags::CONFIRMED,
            ..slot_value
        };
        s.last_active = t;
    }

    fn create(
        &mut self,
        now: Instant,
        src: PeerAddr,
        id: Uuid,
        slot_value: Slot,
        current: Option<MemberRef>,
        request_len: usize,
    ) {
        let held = u32::from(current.is_some());
        if self.ip_count(&src.ip) - held >= self.cfg.limits.max_sessions_per_ip {
            return self.refuse(src, ErrReason::IpLimit, request_len);
        }
        let mut current = current;
        if self.by_id.len() >= self.cfg.limits.max_sessions as usize {
            if !self.evict_unconfirmed() {
                return self.refuse(src, ErrReason::Capacity, request_len);
            }
            // The evicted session may have been the one this address was a member of.
            current = self.by_addr.get(&src).copied();
        }
        if let Some(m) = current {
            self.remove_member(m.session(), m.slot());
        }
        let t = self.secs(now);
        let born = self.born;
        self.born = self.born.wrapping_add(1);
        let record = Session {
            id,
            slots: [slot_value, EMPTY_SLOT],
            last_active: t,
            born,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.sessions[i as usize] = record;
                i
            }
            None => {
                self.sessions.push(record);
                (self.sessions.len() - 1) as u32
            }
        };
        self.by_id.insert(id, idx);
        if self.young.len() >= self.young_cap() {
            // Stale entries pile up behind a live one at the front: compact. Live entries are
            // fewer than max_sessions, so this leaves at least half the room free.
            let sessions = &self.sessions;
            self.young.retain(|&e| evictable(sessions, e));
        }
        self.young.push_back((idx, born));
        self.by_addr.insert(src, MemberRef::new(idx, 0));
        self.inc_ip(src.ip);
        self.stats.sessions_unpaired += 1;
        self.count(RegResult::New);
        debug!(session = %id, peer = %src, "session created");
        let ack = self.ack_for(idx as usize, 0);
        self.queue(src, ack, request_len);
    }
}
