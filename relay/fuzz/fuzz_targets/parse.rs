//! Fuzz target: the wire-format parsers (registrations, leave requests, replies) on raw bytes. Nothing may panic, and whatever parses must
//! survive an encode/parse round trip.

#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use quic_relay::proto::{
    self, Bye, ParseError, Reply, MAX_COOKIE_REPLY_LEN, MAX_REG_LEN, MAX_REPLY_LEN,
};

/// An address as a reply carries it: IPv4-mapped IPv6 as IPv4, no flow info or scope.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fuzz_target!(|data: &[u8]| {
    match proto::parse_registration(data) {
        Ok(reg) => {
            assert!(proto::is_registration(data));
            assert!(
                data.len() <= MAX_REG_LEN,
                "accepted an over-long registration"
            );
            if reg.extended.is_some() {
                assert!(
                    data.len() >= MAX_REPLY_LEN,
                    "accepted a short extended registration"
                );
            }
            let encoded = reg.encode();
            assert!(encoded.len() <= MAX_REG_LEN);
            assert_eq!(proto::parse_registration(&encoded), Ok(reg));
        }
        Err(ParseError::NotRegistration) => assert!(!proto::is_registration(data)),
        Err(_) => assert!(proto::is_registration(data)),
    }

    match Bye::parse(data) {
        Ok(bye) => {
            assert!(proto::is_bye(data));
            assert!(
                data.len() <= MAX_REG_LEN,
                "accepted an over-long leave request"
            );
            assert_eq!(Bye::parse(&bye.encode()), Ok(bye));
        }
        Err(ParseError::NotRegistration) => assert!(!proto::is_bye(data)),
        Err(_) => assert!(proto::is_bye(data)),
    }

    if let Some(reply) = Reply::parse(data) {
        let canon = match reply {
            Reply::Ack {
                observed,
                peer,
                cookie,
                peer_alt,
            } => Reply::Ack {
                observed: observed.map(canonical),
                peer: peer.map(canonical),
                cookie,
                peer_alt: peer_alt.map(canonical),
            },
            err => err,
        };
        let encoded = reply.encode();
        assert!(encoded.as_bytes().len() <= MAX_COOKIE_REPLY_LEN);
        assert_eq!(Reply::parse(encoded.as_bytes()), Some(canon));
    }
});
