//! Hole-punching packets: the probes both peers send to each other's public addresses, and the
//! replies that prove a direct path works in both directions.
//!
//! ```text
//! magic "PSDK-PUNCH" 0x01 | kind u8 (1 probe, 2 reply) | sender peer id u64 | nonce u64 | mac [16]
//! mac = HMAC-SHA256(SHA-256("peer-sdk punch v1" | session uuid), kind | sender | nonce)[..16]
//! ```
//!
//! The MAC keys on the session UUID, which only the two peers (and the relay) know, so a
//! stranger spraying packets at a peer's port cannot make it move its traffic to the stranger.
//! 44 bytes: well below any path MTU, and a QUIC packet never starts with the magic.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const MAGIC: &[u8; 11] = b"PSDK-PUNCH\x01";
/// Length of every punch packet.
pub const LEN: usize = 11 + 1 + 8 + 8 + 16;

/// What a punch packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// "Can you hear me?": answered with a [`Kind::Reply`] to its source address.
    Probe,
    /// The answer: receiving it proves the path works both ways.
    Reply,
}

/// A decoded (not yet authenticated) punch packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PunchPacket {
    /// Probe or reply.
    pub kind: Kind,
    /// The sender's peer id (so a peer ignores its own packets reflected by a hairpinning NAT).
    pub sender: u64,
    /// Random per probe; echoed in the reply.
    pub nonce: u64,
    mac: [u8; 16],
}

/// The per-session key punch packets are authenticated with.
#[derive(Clone)]
pub struct PunchKey([u8; 32]);

impl std::fmt::Debug for PunchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PunchKey(..)")
    }
}

impl PunchKey {
    /// Derives the key for `session`.
    pub fn new(session: Uuid) -> Self {
        let mut h = Sha256::new();
        h.update(b"peer-sdk punch v1");
        h.update(session.as_bytes());
        PunchKey(h.finalize().into())
    }

    /// The key itself, for the other authenticated messages ([`crate::candidates`]).
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self, kind: Kind, sender: u64, nonce: u64) -> [u8; 16] {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(&[kind_byte(kind)]);
        m.update(&sender.to_be_bytes());
        m.update(&nonce.to_be_bytes());
        let full = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// Builds an authenticated packet.
    pub fn packet(&self, kind: Kind, sender: u64, nonce: u64) -> PunchPacket {
        PunchPacket {
            kind,
            sender,
            nonce,
            mac: self.mac(kind, sender, nonce),
        }
    }

    /// Checks a packet's MAC (constant-time).
    pub fn verify(&self, p: &PunchPacket) -> bool {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(&[kind_byte(p.kind)]);
        m.update(&p.sender.to_be_bytes());
        m.update(&p.nonce.to_be_bytes());
        m.verify_truncated_left(&p.mac).is_ok()
    }
}

fn kind_byte(k: Kind) -> u8 {
    match k {
        Kind::Probe => 1,
        Kind::Reply => 2,
    }
}

impl PunchPacket {
    /// Encodes the packet.
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..11].copy_from_slice(MAGIC);
        out[11] = kind_byte(self.kind);
        out[12..20].copy_from_slice(&self.sender.to_be_bytes());
        out[20..28].copy_from_slice(&self.nonce.to_be_bytes());
        out[28..].copy_from_slice(&self.mac);
        out
    }

    /// Decodes a datagram that has exactly the punch packet's shape; `None` for anything else
    /// (QUIC, garbage). Authenticate with [`PunchKey::verify`].
    pub fn decode(d: &[u8]) -> Option<PunchPacket> {
        if d.len() != LEN || !d.starts_with(MAGIC) {
            return None;
        }
        let kind = match d[11] {
            1 => Kind::Probe,
            2 => Kind::Reply,
            _ => return None,
        };
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&d[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let mut mac = [0u8; 16];
        mac.copy_from_slice(&d[28..]);
        Some(PunchPacket {
            kind,
            sender: u64_at(12),
            nonce: u64_at(20),
            mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_authentication() {
        let key = PunchKey::new(Uuid::from_u128(7));
        let p = key.packet(Kind::Probe, 42, 99);
        let bytes = p.encode();
        assert_eq!(&bytes[..11], b"PSDK-PUNCH\x01");
        let q = PunchPacket::decode(&bytes).expect("decodes");
        assert_eq!(q, p);
        assert!(key.verify(&q));
        assert!(
            !PunchKey::new(Uuid::from_u128(8)).verify(&q),
            "another session's key"
        );
        let mut forged = bytes;
        forged[20] ^= 1; // change the nonce
        assert!(!key.verify(&PunchPacket::decode(&forged).expect("shape is fine")));
    }

    #[test]
    fn quic_and_relay_bytes_are_not_punches() {
        assert_eq!(PunchPacket::decode(b"ACK\n"), None);
        assert_eq!(PunchPacket::decode(&[0xc3; LEN]), None);
        let mut wrong_kind = PunchKey::new(Uuid::nil())
            .packet(Kind::Reply, 1, 2)
            .encode();
        wrong_kind[11] = 3;
        assert_eq!(PunchPacket::decode(&wrong_kind), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(p) = PunchPacket::decode(&bytes) {
                let encoded = p.encode();
                prop_assert_eq!(encoded.as_slice(), bytes.as_slice());
            }
        }

        #[test]
        fn every_packet_round_trips(sender: u64, nonce: u64, probe: bool, session: u128) {
            let key = PunchKey::new(Uuid::from_u128(session));
            let kind = if probe { Kind::Probe } else { Kind::Reply };
            let p = key.packet(kind, sender, nonce);
            let q = PunchPacket::decode(&p.encode());
            prop_assert_eq!(q, Some(p));
            prop_assert!(key.verify(&p));
        }
    }
}
