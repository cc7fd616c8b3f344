//! The address index (`member address -> slot`) with a one-entry cache in front of it for the
//! forwarding path.
//!
//! A flow's datagrams come from one address one after another (a GRO buffer is a burst of
//! one source, judged segment by segment; a bulk transfer sends runs), so the forwarding path
//! remembers its last lookup: comparing an address costs a few instructions where hashing and
//! probing cost about forty. Every change of the index forgets it, so a hit is always what the
//! map holds.

use hashbrown::HashMap;

use super::{MemberRef, PeerAddr};

pub(super) struct AddrIndex {
    map: HashMap<PeerAddr, MemberRef>,
    /// The last address [`AddrIndex::lookup`] found and its member; `None` after any change.
    last: Option<(PeerAddr, MemberRef)>,
}

impl AddrIndex {
    pub(super) fn new() -> Self {
        AddrIndex {
            map: HashMap::new(),
            last: None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(super) fn get(&self, addr: &PeerAddr) -> Option<&MemberRef> {
        self.map.get(addr)
    }

    pub(super) fn contains_key(&self, addr: &PeerAddr) -> bool {
        self.map.contains_key(addr)
    }

    pub(super) fn insert(&mut self, addr: PeerAddr, m: MemberRef) {
        self.last = None;
        self.map.insert(addr, m);
    }

    pub(super) fn remove(&mut self, addr: &PeerAddr) {
        self.last = None;
        self.map.remove(addr);
    }

    /// [`AddrIndex::get`] through the cache, for the forwarding path.
    #[inline(always)]
    pub(super) fn lookup(&mut self, addr: PeerAddr) -> Option<MemberRef> {
        if let Some((a, m)) = self.last {
            if a == addr {
                return Some(m);
            }
        }
        let m = *self.map.get(&addr)?;
        self.last = Some((addr, m));
        Some(m)
    }

    /// Whether the cache agrees with the map (for the invariant checks).
    pub(super) fn cache_consistent(&self) -> bool {
        self.last.is_none_or(|(a, m)| self.map.get(&a) == Some(&m))
    }
}
