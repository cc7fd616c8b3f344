//! Unit tests of the wire format: byte snapshots of every accepted and refused registration,
//! every reply and the token MAC, plus proptest round trips and robustness checks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;

use super::*;

/// The session most tests name, and its textual forms.
const UUID_LOWER: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";
const UUID_UPPER: &str = "67E55044-10B1-426F-9247-BB680E5FE0C8";
const UUID_SIMPLE: &str = "67e5504410b1426f9247bb680e5fe0c8";

/// A MAC that is valid hex but belongs to no secret.
const MAC_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn u() -> Uuid {
    Uuid::from_u128(0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8)
}

fn ext(peer: Option<u64>, token: Option<Token>) -> Registration {
    Registration {
        session: u(),
        extended: Some(Extended {
            cookie: None,
            peer: peer.map(PeerId),
            token,
            alt_aware: false,
            alt: false,
        }),
    }
}

/// `REG:<uuid> <params>` padded with `pad=` to exactly `len` bytes (newline included), so that a
/// test of one parameter is not refused for being short.
fn padded_to(params: &str, len: usize) -> Vec<u8> {
    let mut s = format!("REG:{UUID_LOWER} {params} pad=");
    assert!(s.len() < len, "{params:?} does not fit in {len} bytes");
    s.extend(std::iter::repeat_n('0', len - s.len() - 1));
    s.push('\n');
    assert_eq!(s.len(), len);
    s.into_bytes()
}

/// `REG:<uuid> <params>`, padded to the minimum length an extended registration needs.
fn padded(params: &str) -> Vec<u8> {
    padded_to(
        params,
        (format!("REG:{UUID_LOWER} {params} pad=").len() + 1).max(MAX_REPLY_LEN),
    )
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test addresses are valid")
}

// ---------------------------------------------------------------------------------------------
// Original form
// ---------------------------------------------------------------------------------------------

#[test]
fn original_form_variants_parse_to_the_same_session() {
    let cases: &[&[u8]] = &[
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8\n",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8",
        b"REG:67E55044-10B1-426F-9247-BB680E5FE0C8\n",
        b"REG:67e5504410b1426f9247bb680e5fe0c8\n",
        b"REG:67e5504410b1426f9247bb680e5fe0c8",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8\r\n",
        b"REG: \t67e55044-10b1-426f-9247-bb680e5fe0c8 \t\r\n",
        b"REG:\n67e55044-10b1-426f-9247-bb680e5fe0c8\n\n",
    ];
    for &dgram in cases {
        assert_eq!(
            parse_registration(dgram),
            Ok(Registration::original(u())),
            "{:?}",
            String::from_utf8_lossy(dgram)
        );
        assert!(is_registration(dgram));
    }
}

#[test]
fn original_form_encodes_as_the_original_relay_expects() {
    let bytes = Registration::original(u()).encode();
    assert_eq!(bytes, b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8\n");
    assert_eq!(bytes.len(), 41);
    // Uppercase input is canonicalised to lowercase on the way out.
    let reg = parse_registration(format!("REG:{UUID_UPPER}").as_bytes()).expect("valid");
    assert_eq!(reg.encode(), bytes);
    let reg = parse_registration(format!("REG:{UUID_SIMPLE}").as_bytes()).expect("valid");
    assert_eq!(reg.encode(), bytes);
}

// ---------------------------------------------------------------------------------------------
// Extended form
// ---------------------------------------------------------------------------------------------

#[test]
fn extended_with_peer_is_padded_to_exactly_max_cookie_reply_len() {
    let reg = ext(Some(0x1122_3344_5566_7788), None);
    let expected = concat!(
        "REG:67e55044-10b1-426f-9247-bb680e5fe0c8",
        " p=1122334455667788",
        " pad=000000000000000000000000000000000000000000000000000000",
        "\n"
    );
    assert_eq!(String::from_utf8_lossy(&reg.encode()), expected);
    assert_eq!(reg.encode().len(), MAX_COOKIE_REPLY_LEN);
    assert_eq!(parse_registration(expected.as_bytes()), Ok(reg));
}

#[test]
fn extended_without_parameters_is_padded() {
    let reg = ext(None, None);
    let expected = concat!(
        "REG:67e55044-10b1-426f-9247-bb680e5fe0c8",
        " pad=0000000000000000000000000000000000000000000000000000000000000000000000000",
        "\n"
    );
    assert_eq!(String::from_utf8_lossy(&reg.encode()), expected);
    assert_eq!(reg.encode().len(), MAX_COOKIE_REPLY_LEN);
    assert_eq!(parse_registration(expected.as_bytes()), Ok(reg));
}

#[test]
fn extended_with_peer_and_token_needs_no_padding() {
    let token = Token::mint(b"relay-secret", u(), 1_700_000_000);
    let reg = ext(Some(1), Some(token));
    let expected = concat!(
        "REG:67e55044-10b1-426f-9247-bb680e5fe0c8",
        " p=0000000000000001",
        " t=1700000000:7700d767281d695f3cf825bb788ac9dd80229e6205974406ca9c260a619bf9ce",
        "\n"
    );
    assert_eq!(String::from_utf8_lossy(&reg.encode()), expected);
    assert_eq!(reg.encode().len(), 138);
    assert_eq!(parse_registration(expected.as_bytes()), Ok(reg));
}

#[test]
fn extended_with_token_only() {
    let token = Token {
        expiry: 0,
        mac: [0; 32],
    };
    let reg = ext(None, Some(token));
    let expected = concat!(
        "REG:67e55044-10b1-426f-9247-bb680e5fe0c8",
        " t=0:0000000000000000000000000000000000000000000000000000000000000000",
        " pad=0000",
        "\n"
    );
    assert_eq!(String::from_utf8_lossy(&reg.encode()), expected);
    assert_eq!(parse_registration(expected.as_bytes()), Ok(reg));
}

#[test]
fn extended_accepts_tabs_uppercase_hex_and_extreme_values() {
    let dgram = padded(&format!(
        "p=FFFFFFFFFFFFFFFF\tt=18446744073709551615:{}",
        MAC_HEX.to_uppercase()
    ));
    let mut mac = [0u8; 32];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = i as u8;
    }
    let token = Token {
        expiry: u64::MAX,
        mac,
    };
    assert_eq!(
        parse_registration(&dgram),
        Ok(ext(Some(u64::MAX), Some(token)))
    );
    // Short peer ids need no leading zeros.
    assert_eq!(parse_registration(&padded("p=a")), Ok(ext(Some(10), None)));
}

#[test]
fn unknown_parameters_are_ignored_but_make_the_registration_extended() {
    let dgram = padded("future=1 x-2=a=b empty= abcdefghijklmnop=16-char-key x=1 x=1");
    assert_eq!(parse_registration(&dgram), Ok(ext(None, None)));
    let dgram = padded("p=2 pad=1 pad=2 zz=9");
    assert_eq!(parse_registration(&dgram), Ok(ext(Some(2), None)));
    // An unknown parameter alone is enough to be held to the extended form's length rule.
    assert_eq!(
        parse_registration(format!("REG:{UUID_LOWER} future=1\n").as_bytes()),
        Err(ParseError::TooShortForReply)
    );
}

// ---------------------------------------------------------------------------------------------
// Every ParseError
// ---------------------------------------------------------------------------------------------

#[test]
fn not_registration() {
    let long = [b'R'; 1000];
    let cases: &[&[u8]] = &[
        b"",
        b"REG",
        b"reg:67e55044-10b1-426f-9247-bb680e5fe0c8\n",
        b" REG:67e55044-10b1-426f-9247-bb680e5fe0c8\n",
        b"ACK\n",
        &[0x40, 0x00, 0x01],
        &long,
    ];
    for &dgram in cases {
        assert!(!is_registration(dgram));
        assert_eq!(
            parse_registration(dgram),
            Err(ParseError::NotRegistration),
            "{dgram:?}"
        );
    }
}

#[test]
fn too_long_above_max_reg_len() {
    let at_limit = padded_to("p=1", MAX_REG_LEN);
    assert_eq!(parse_registration(&at_limit), Ok(ext(Some(1), None)));
    let over = padded_to("p=1", MAX_REG_LEN + 1);
    assert_eq!(parse_registration(&over), Err(ParseError::TooLong));
    // Length is checked before content.
    let mut junk = b"REG:".to_vec();
    junk.resize(MAX_REG_LEN + 1, 0xff);
    assert_eq!(parse_registration(&junk), Err(ParseError::TooLong));
}

#[test]
fn not_ascii() {
    let cases: &[&[u8]] = &[
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8\xff\n",
        b"REG:\xc3\xa9",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8\0",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8\x7f",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8\x0c",
        b"REG:\x80",
    ];
    for &dgram in cases {
        assert_eq!(
            parse_registration(dgram),
            Err(ParseError::NotAscii),
            "{dgram:?}"
        );
    }
}

#[test]
fn bad_uuid() {
    let cases: &[&[u8]] = &[
        b"REG:",
        b"REG:xyz",
        b"REG:\n",
        b"REG:  \r\n",
        b"REG:p=1",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c\n",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c88\n",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0cg\n",
        b"REG:67e55044_10b1_426f_9247_bb680e5fe0c8\n",
    ];
    for &dgram in cases {
        assert_eq!(
            parse_registration(dgram),
            Err(ParseError::BadUuid),
            "{:?}",
            String::from_utf8_lossy(dgram)
        );
    }
}

#[test]
fn bad_param() {
    let mac63 = &MAC_HEX[..63];
    let cases = [
        // Peer ids: nonzero hex, at most 16 digits, nothing else.
        "p=0".to_string(),
        "p=0000000000000000".into(),
        "p=zz".into(),
        "p=".into(),
        "p=11111111111111111".into(),
        "p=+1".into(),
        "p=-1".into(),
        "p=1=2".into(),
        // Tokens: `<decimal u64>:<64 hex digits>`.
        "t=1700000000".into(),
        format!("t=1700000000{MAC_HEX}"),
        format!("t=:{MAC_HEX}"),
        format!("t=123456789012345678901:{MAC_HEX}"),
        format!("t=18446744073709551616:{MAC_HEX}"),
        format!("t=+1:{MAC_HEX}"),
        format!("t=0x1:{MAC_HEX}"),
        format!("t=1:{mac63}"),
        format!("t=1:{mac63}g"),
        format!("t=1:{MAC_HEX}00"),
        "t=1:".into(),
        // Keys: 1 to 16 of [a-z0-9-].
        "P=1".into(),
        "Pad=0".into(),
        "=1".into(),
        "abcdefghijklmnopq=1".into(),
        "k_y=1".into(),
        "foo".into(),
    ];
    for params in cases {
        assert_eq!(
            parse_registration(&padded(&params)),
            Err(ParseError::BadParam),
            "{params}"
        );
    }
}

#[test]
fn duplicate_param() {
    let t = format!("t=1:{MAC_HEX}");
    let cases = [
        "p=1 p=2".to_string(),
        "p=1 p=1".into(),
        "p=1\tpad=0\tp=1".into(),
        format!("{t} {t}"),
        format!("{t} p=1 t=2:{MAC_HEX}"),
    ];
    for params in cases {
        assert_eq!(
            parse_registration(&padded(&params)),
            Err(ParseError::DuplicateParam),
            "{params}"
        );
    }
}

#[test]
fn too_short_for_reply_below_max_reply_len() {
    assert_eq!(
        parse_registration(format!("REG:{UUID_LOWER} p=1\n").as_bytes()),
        Err(ParseError::TooShortForReply)
    );
    assert_eq!(
        parse_registration(&padded_to("p=1", MAX_REPLY_LEN - 1)),
        Err(ParseError::TooShortForReply)
    );
    assert_eq!(
        parse_registration(&padded_to("p=1", MAX_REPLY_LEN)),
        Ok(ext(Some(1), None))
    );
}

#[test]
fn parse_error_messages() {
    assert_eq!(
        ParseError::TooLong.to_string(),
        format!("registration longer than {MAX_REG_LEN} bytes")
    );
    assert_eq!(
        ParseError::TooShortForReply.to_string(),
        format!("extended registration shorter than {MAX_REPLY_LEN} bytes")
    );
}

// ---------------------------------------------------------------------------------------------
// Leave requests
// ---------------------------------------------------------------------------------------------

#[test]
fn bye_snapshots_and_parse_back() {
    let cases: [(Bye, &[u8]); 2] = [
        (
            Bye {
                session: u(),
                peer: None,
            },
            b"BYE:67e55044-10b1-426f-9247-bb680e5fe0c8\n",
        ),
        (
            Bye {
                session: u(),
                peer: Some(PeerId(1)),
            },
            b"BYE:67e55044-10b1-426f-9247-bb680e5fe0c8 p=0000000000000001\n",
        ),
    ];
    for (bye, bytes) in cases {
        assert_eq!(bye.encode(), bytes);
        assert_eq!(Bye::parse(bytes), Ok(bye));
        assert!(is_bye(bytes) && !is_registration(bytes));
    }
}

#[test]
fn bye_accepts_the_registration_grammar_without_a_length_floor() {
    let bye = Bye {
        session: u(),
        peer: Some(PeerId(0xab)),
    };
    let cases = [
        format!("BYE:{UUID_UPPER} p=AB"),
        format!("BYE: {UUID_SIMPLE}\tp=ab future=1\r\n"),
        format!("BYE:{UUID_LOWER} t=1:{MAC_HEX} p=00000000000000ab\n"),
    ];
    for dgram in cases {
        assert_eq!(Bye::parse(dgram.as_bytes()), Ok(bye), "{dgram}");
    }
}

#[test]
fn bye_errors() {
    let long = format!("BYE:{UUID_LOWER} pad={}", "0".repeat(MAX_REG_LEN));
    let cases = [
        (format!("REG:{UUID_LOWER}\n"), ParseError::NotRegistration),
        ("bye:x".into(), ParseError::NotRegistration),
        ("BYE:".into(), ParseError::BadUuid),
        ("BYE:xyz\n".into(), ParseError::BadUuid),
        (format!("BYE:{UUID_LOWER} p=0"), ParseError::BadParam),
        (format!("BYE:{UUID_LOWER} p"), ParseError::BadParam),
        (format!("BYE:{UUID_LOWER} t=1"), ParseError::BadParam),
        (
            format!("BYE:{UUID_LOWER} p=1 p=2"),
            ParseError::DuplicateParam,
        ),
        (format!("BYE:{UUID_LOWER}\u{7f}"), ParseError::NotAscii),
        (long, ParseError::TooLong),
    ];
    for (dgram, err) in cases {
        assert_eq!(Bye::parse(dgram.as_bytes()), Err(err), "{dgram}");
    }
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

#[test]
fn reply_snapshots_and_parse_back() {
    let v4_mapped = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped()),
        4433,
    );
    let cases: Vec<(Reply, &[u8])> = vec![
        (
            Reply::Ack {
                cookie: None,
                observed: None,
                peer: None,
                peer_alt: None,
            },
            b"ACK\n",
        ),
        (
            Reply::Ack {
                cookie: None,
                observed: Some(sa("198.18.0.1:4433")),
                peer: None,
                peer_alt: None,
            },
            b"ACK 198.18.0.1:4433\n",
        ),
        (
            Reply::Ack {
                cookie: None,
                observed: Some(sa("[2001:db8::1]:1")),
                peer: Some(sa("198.18.0.2:2")),
                peer_alt: None,
            },
            b"ACK [2001:db8::1]:1 198.18.0.2:2\n",
        ),
        (
            Reply::Ack {
                cookie: None,
                observed: Some(sa("198.18.0.2:65535")),
                peer: Some(sa("[2001:db8::1]:0")),
                peer_alt: None,
            },
            b"ACK 198.18.0.2:65535 [2001:db8::1]:0\n",
        ),
        (
            Reply::Ack {
                cookie: Some(Cookie(0x0123_4567_89ab_cdef)),
                observed: Some(sa("198.18.0.2:7")),
                peer: None,
                peer_alt: None,
            },
            b"ACK 198.18.0.2:7 c=0123456789abcdef\n",
        ),
        (
            Reply::Ack {
                cookie: Some(Cookie(1)),
                observed: Some(sa("198.18.0.2:7")),
                peer: Some(sa("198.18.0.3:8")),
                peer_alt: None,
            },
            b"ACK 198.18.0.2:7 198.18.0.3:8 c=0000000000000001\n",
        ),
        (Reply::Err(None), b"ERR unknown\n"),
    ];
    for (reply, bytes) in cases {
        assert_eq!(
            reply.encode().as_bytes(),
            bytes,
            "{}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(Reply::parse(bytes), Some(reply));
    }
    assert_eq!(ACK, b"ACK\n");

    // IPv4-mapped addresses are shown as the IPv4 address they are.
    let mapped = Reply::Ack {
        cookie: None,
        observed: Some(v4_mapped),
        peer: Some(sa("[::ffff:10.0.0.1]:5")),
        peer_alt: None,
    };
    assert_eq!(
        mapped.encode().as_bytes(),
        b"ACK 198.18.0.1:4433 10.0.0.1:5\n"
    );
    assert_eq!(
        Reply::parse(mapped.encode().as_bytes()),
        Some(Reply::Ack {
            cookie: None,
            observed: Some(sa("198.18.0.1:4433")),
            peer: Some(sa("10.0.0.1:5")),
            peer_alt: None,
        })
    );
}

#[test]
fn longest_reply_fits_max_reply_len_exactly() {
    let big = sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
    let reply = Reply::Ack {
        cookie: None,
        observed: Some(big),
        peer: Some(big),
        peer_alt: None,
    };
    let bytes = reply.encode();
    assert_eq!(bytes.as_bytes().len(), MAX_REPLY_LEN);
    assert_eq!(Reply::parse(bytes.as_bytes()), Some(reply));
    // With a cookie it fits MAX_COOKIE_REPLY_LEN exactly, the length extended registrations
    // are padded to.
    let reply = Reply::Ack {
        cookie: Some(Cookie(u64::MAX)),
        observed: Some(big),
        peer: Some(big),
        peer_alt: None,
    };
    let bytes = reply.encode();
    assert_eq!(bytes.as_bytes().len(), MAX_COOKIE_REPLY_LEN);
    assert_eq!(Reply::parse(bytes.as_bytes()), Some(reply));
}

#[test]
fn cookies_round_trip_in_registrations_and_malformed_ones_are_refused() {
    let reg = Registration {
        session: u(),
        extended: Some(Extended {
            peer: Some(PeerId(5)),
            token: None,
            cookie: Some(Cookie(0xfeed_0000_0000_beef)),
            alt_aware: false,
            alt: false,
        }),
    };
    let bytes = reg.encode();
    assert!(String::from_utf8_lossy(&bytes).contains(" c=feed00000000beef "));
    assert_eq!(bytes.len(), MAX_COOKIE_REPLY_LEN);
    assert_eq!(parse_registration(&bytes), Ok(reg));
    for bad in ["c=", "c=xyz", "c=00000000000000000"] {
        assert_eq!(
            parse_registration(&padded(bad)),
            Err(ParseError::BadParam),
            "{bad}"
        );
    }
    assert_eq!(
        parse_registration(&padded("c=1 c=2")),
        Err(ParseError::DuplicateParam)
    );
    // An ACK with anything but a well-formed cookie after the addresses is no reply.
    for bad in [
        &b"ACK 1.2.3.4:5 c=12\n"[..],
        b"ACK 1.2.3.4:5 c=0123456789abcdef x\n",
        b"ACK 1.2.3.4:5 1.2.3.4:6 d=0123456789abcdef\n",
    ] {
        assert_eq!(Reply::parse(bad), None, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn err_reply_snapshots() {
    let expected: [(ErrReason, &[u8]); 10] = [
        (ErrReason::Malformed, b"ERR malformed\n"),
        (ErrReason::Short, b"ERR short\n"),
        (ErrReason::Full, b"ERR full\n"),
        (ErrReason::Capacity, b"ERR capacity\n"),
        (ErrReason::IpLimit, b"ERR ip-limit\n"),
        (ErrReason::Rate, b"ERR rate\n"),
        (ErrReason::Auth, b"ERR auth\n"),
        (ErrReason::Expired, b"ERR expired\n"),
        (ErrReason::NoMember, b"ERR no-member\n"),
        (ErrReason::Moved, b"ERR moved\n"),
    ];
    assert_eq!(
        expected.map(|(r, _)| r),
        ErrReason::ALL,
        "a reason is missing from this table"
    );
    for (reason, bytes) in expected {
        assert_eq!(Reply::Err(Some(reason)).encode().as_bytes(), bytes);
        assert_eq!(Reply::parse(bytes), Some(Reply::Err(Some(reason))));
    }
}

#[test]
fn every_err_reply_is_at_most_14_bytes() {
    // The shortest datagram the relay answers with an error must be able to carry one.
    for reason in ErrReason::ALL.map(Some).into_iter().chain([None]) {
        let len = Reply::Err(reason).encode().as_bytes().len();
        assert!(len <= 14, "{reason:?}: {len} bytes");
    }
}

#[test]
fn unknown_err_word_parses_as_unknown_reason() {
    assert_eq!(Reply::parse(b"ERR teapot\n"), Some(Reply::Err(None)));
    assert_eq!(Reply::parse(b"ERR \n"), Some(Reply::Err(None)));
}

#[test]
fn garbage_is_not_a_reply() {
    let cases: &[&[u8]] = &[
        b"",
        b"\n",
        b"ACK",
        b"ACK\r\n",
        b"ack\n",
        b"ACK \n",
        b"ACK  198.18.0.1:1\n",
        b"ACK 198.18.0.1\n",
        b"ACK 198.18.0.1:1 \n",
        b"ACK 198.18.0.1:1  198.18.0.2:2\n",
        b"ACK 198.18.0.1:1 198.18.0.2:2 198.18.0.3:3\n",
        b"ACK 198.18.0.1:1\n\n",
        b"ACK 198.18.0.1:70000\n",
        b"ACK 2001:db8::1:1\n",
        b"ACK \xff\n",
        b"ERR\n",
        b"ERR full",
        b"REG:67e55044-10b1-426f-9247-bb680e5fe0c8\n",
        &[0xc0, 0x00, 0x00, 0x00, 0x01, 0x08],
    ];
    for &dgram in cases {
        assert_eq!(Reply::parse(dgram), None, "{dgram:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[test]
fn token_mac_known_answer() {
    // HMAC-SHA256("relay-secret", "67e55044-10b1-426f-9247-bb680e5fe0c8:1700000000"), computed
    // independently (Python's hmac module).
    let t = Token::mint(b"relay-secret", u(), 1_700_000_000);
    assert_eq!(
        hex::encode(t.mac),
        "7700d767281d695f3cf825bb788ac9dd80229e6205974406ca9c260a619bf9ce"
    );
    assert_eq!(t.expiry, 1_700_000_000);
}

#[test]
fn token_accepted_until_expiry_inclusive() {
    let t = Token::mint(b"s", u(), 1000);
    assert_eq!(t.verify(&[b"s"], u(), 0), Ok(()));
    assert_eq!(t.verify(&[b"s"], u(), 1000), Ok(()));
    assert_eq!(t.verify(&[b"s"], u(), 1001), Err(TokenError::Expired));
}

#[test]
fn token_bad_mac() {
    let t = Token::mint(b"s", u(), 1000);
    assert_eq!(t.verify(&[b"other"], u(), 0), Err(TokenError::BadMac));
    let no_secrets: [&[u8]; 0] = [];
    assert_eq!(t.verify(&no_secrets, u(), 0), Err(TokenError::BadMac));
    // The MAC binds the session and the expiry.
    assert_eq!(
        t.verify(&[b"s"], Uuid::from_u128(1), 0),
        Err(TokenError::BadMac)
    );
    let extended = Token { expiry: 2000, ..t };
    assert_eq!(extended.verify(&[b"s"], u(), 0), Err(TokenError::BadMac));
    let mut flipped = t;
    flipped.mac[31] ^= 1;
    assert_eq!(flipped.verify(&[b"s"], u(), 0), Err(TokenError::BadMac));
    // A forged token learns nothing about expiry: the MAC is checked first.
    assert_eq!(t.verify(&[b"other"], u(), 5000), Err(TokenError::BadMac));
}

#[test]
fn token_rotation_accepts_any_listed_secret() {
    let old = Token::mint(b"old", u(), 1000);
    let new = Token::mint(b"new", u(), 1000);
    let secrets = [b"old".to_vec(), b"new".to_vec()];
    assert_eq!(old.verify(&secrets, u(), 0), Ok(()));
    assert_eq!(new.verify(&secrets, u(), 0), Ok(()));
    assert_eq!(new.verify(&secrets[..1], u(), 0), Err(TokenError::BadMac));
}

#[test]
fn token_mac_uses_the_canonical_uuid_form() {
    // Whatever form the client wrote the UUID in, the MAC is over the lowercase hyphenated one,
    // so a backend minting for "67E5..." and one minting for "67e5..." agree.
    let secret = b"relay-secret";
    let mut macs = Vec::new();
    for form in [UUID_LOWER, UUID_UPPER, UUID_SIMPLE] {
        let reg = parse_registration(format!("REG:{form}").as_bytes()).expect("valid");
        macs.push(Token::mint(secret, reg.session, 1_700_000_000).mac);
    }
    assert!(macs.iter().all(|m| *m == macs[0]));
    assert_eq!(
        hex::encode(macs[0]),
        "7700d767281d695f3cf825bb788ac9dd80229e6205974406ca9c260a619bf9ce"
    );
    // And the token a client sends for the uppercase form verifies.
    let t = Token::mint(secret, u(), 1_700_000_000);
    let wire = padded(&format!("t={}:{}", t.expiry, hex::encode(t.mac)));
    let wire = String::from_utf8(wire)
        .expect("ascii")
        .replace(UUID_LOWER, UUID_UPPER);
    let reg = parse_registration(wire.as_bytes()).expect("valid");
    let token = reg.extended.and_then(|e| e.token).expect("has token");
    assert_eq!(token.verify(&[secret], reg.session, 0), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

fn arb_token() -> impl Strategy<Value = Token> {
    (any::<u64>(), any::<[u8; 32]>()).prop_map(|(expiry, mac)| Token { expiry, mac })
}

fn arb_registration() -> impl Strategy<Value = Registration> {
    let extended = prop::option::of(
        (
            prop::option::of(1..=u64::MAX),
            prop::option::of(arb_token()),
            prop::option::of(any::<u64>()),
        )
            .prop_map(|(peer, token, cookie)| Extended {
                cookie: cookie.map(Cookie),
                peer: peer.map(PeerId),
                token,
                alt_aware: false,
                alt: false,
            }),
    );
    (any::<u128>(), extended).prop_map(|(id, extended)| Registration {
        session: Uuid::from_u128(id),
        extended,
    })
}

/// Datagrams that look like registrations: a valid or broken UUID and a mix of parameters.
fn arb_reg_like() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        Just("p=1".to_string()),
        "p=[0-9a-fA-F]{0,17}",
        "t=[0-9]{0,21}:[0-9a-f]{0,66}",
        "t=[0-9]{1,3}:[0-9a-f]{64}",
        "pad=0{0,80}",
        "[a-z-]{1,17}=[ -~]{0,5}",
        "[ -~]{0,8}",
        Just("\r\n".to_string()),
    ];
    let uuid = prop_oneof![
        any::<u128>().prop_map(|n| Uuid::from_u128(n).hyphenated().to_string()),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).simple().to_string().to_uppercase()),
        "[0-9a-f-]{0,40}",
    ];
    let sep = prop_oneof![Just(" "), Just("\t"), Just("  "), Just("\n")];
    (uuid, prop::collection::vec((sep, word), 0..8)).prop_map(|(uuid, words)| {
        let mut s = format!("REG:{uuid}");
        for (sep, w) in words {
            s.push_str(sep);
            s.push_str(&w);
        }
        s.into_bytes()
    })
}

/// Any socket address as the relay reports it: IPv4, or IPv6 that is not IPv4-mapped, with no
/// flow info or scope (which replies do not carry).
fn arb_canonical_addr() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| Ipv6Addr::from(o).to_canonical()),
        // Zero runs exercise the `::` compression.
        (any::<u16>(), any::<u16>(), 0usize..8).prop_map(|(a, b, at)| {
            let mut seg = [0u16; 8];
            seg[at] = a;
            seg[7 - at] = b;
            Ipv6Addr::from(seg).to_canonical()
        }),
    ];
    (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// Checks what must hold for whatever `parse_registration` makes of `dgram`.
fn check_parse(dgram: &[u8]) -> Result<(), TestCaseError> {
    match parse_registration(dgram) {
        Ok(reg) => {
            prop_assert!(is_registration(dgram));
            prop_assert!(dgram.len() <= MAX_REG_LEN);
            if reg.extended.is_some() {
                prop_assert!(dgram.len() >= MAX_REPLY_LEN);
            }
            let again = reg.encode();
            prop_assert_eq!(parse_registration(&again), Ok(reg));
        }
        Err(ParseError::NotRegistration) => prop_assert!(!is_registration(dgram)),
        Err(_) => prop_assert!(is_registration(dgram)),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `Display` writes what `FromStr` reads: the one text form of a token (`t=`, `--relay-token`).
    #[test]
    fn token_text_round_trips(t in arb_token()) {
        let text = t.to_string();
        prop_assert_eq!(text.len(), text.find(':').expect("colon") + 1 + 64);
        prop_assert_eq!(text.parse::<Token>(), Ok(t));
    }

    #[test]
    fn token_from_str_never_panics(s in ".{0,100}") {
        let _ = s.parse::<Token>();
    }

    #[test]
    fn registration_round_trips(reg in arb_registration()) {
        let bytes = reg.encode();
        prop_assert!(bytes.len() <= MAX_REG_LEN);
        if reg.extended.is_some() {
            prop_assert!(bytes.len() >= MAX_REPLY_LEN);
        }
        prop_assert_eq!(parse_registration(&bytes), Ok(reg));
    }

    #[test]
    fn parse_arbitrary_bytes(dgram in prop::collection::vec(any::<u8>(), 0..600)) {
        check_parse(&dgram)?;
    }

    #[test]
    fn parse_reg_prefixed_bytes(tail in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut dgram = REG_PREFIX.to_vec();
        dgram.extend(tail);
        check_parse(&dgram)?;
    }

    #[test]
    fn parse_reg_like_datagrams(dgram in arb_reg_like()) {
        check_parse(&dgram)?;
    }

    #[test]
    fn bye_round_trips(id in any::<u128>(), peer in prop::option::of(1..=u64::MAX)) {
        let bye = Bye { session: Uuid::from_u128(id), peer: peer.map(PeerId) };
        prop_assert_eq!(Bye::parse(&bye.encode()), Ok(bye));
    }

    #[test]
    fn bye_parse_arbitrary_tails(tail in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut dgram = BYE_PREFIX.to_vec();
        dgram.extend(tail);
        if let Ok(bye) = Bye::parse(&dgram) {
            prop_assert!(dgram.len() <= MAX_REG_LEN);
            prop_assert_eq!(Bye::parse(&bye.encode()), Ok(bye));
        }
    }

    #[test]
    fn bye_has_the_registration_grammar(reg_like in arb_reg_like()) {
        // A BYE parses exactly when the same bytes behind `REG:` would, bar the length floor.
        let mut dgram = reg_like.clone();
        dgram[..4].copy_from_slice(BYE_PREFIX);
        let expected = match parse_registration(&reg_like) {
            Err(ParseError::TooShortForReply) => {
                let mut padded = reg_like.clone();
                padded.extend(b" pad=".iter().chain(&[b'0'; MAX_REPLY_LEN]));
                parse_registration(&padded)
            }
            other => other,
        };
        let expected = expected.map(|r| Bye {
            session: r.session,
            peer: r.extended.and_then(|e| e.peer),
        });
        prop_assert_eq!(Bye::parse(&dgram), expected);
    }

    #[test]
    fn reply_round_trips(
        observed in prop::option::of(arb_canonical_addr()),
        peer in prop::option::of(arb_canonical_addr()),
        cookie in prop::option::of(any::<u64>()),
        peer_alt in prop::option::of(arb_canonical_addr()),
    ) {
        // `peer` or a cookie without `observed` encodes as the original ACK; the relay never
        // sends that.
        let peer = peer.filter(|_| observed.is_some());
        let cookie = cookie.filter(|_| observed.is_some()).map(Cookie);
        let peer_alt = peer_alt.filter(|_| observed.is_some());
        let reply = Reply::Ack { cookie, observed, peer, peer_alt };
        let bytes = reply.encode();
        prop_assert!(bytes.as_bytes().len() <= MAX_ALT_REPLY_LEN);
        if peer_alt.is_none() {
            prop_assert!(bytes.as_bytes().len() <= MAX_COOKIE_REPLY_LEN);
        }
        if cookie.is_none() && peer_alt.is_none() {
            prop_assert!(bytes.as_bytes().len() <= MAX_REPLY_LEN);
        }
        prop_assert_eq!(Reply::parse(bytes.as_bytes()), Some(reply));
    }

    #[test]
    fn reply_parse_arbitrary_bytes(dgram in prop::collection::vec(any::<u8>(), 0..120)) {
        match Reply::parse(&dgram) {
            None => {}
            Some(Reply::Err(_)) => prop_assert!(dgram.starts_with(b"ERR ")),
            Some(Reply::Ack { .. }) => prop_assert!(dgram.starts_with(b"ACK")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fast parser against the obvious one
// ---------------------------------------------------------------------------------------------

/// The registration grammar written the obvious way (the relay's first parser): the relay's
/// parser scans words eight bytes at a time and must accept and refuse exactly the same.
fn reference_parse(datagram: &[u8], needs_reply_room: bool) -> Result<Registration, ParseError> {
    let rest = &datagram[REG_PREFIX.len()..];
    if datagram.len() > MAX_REG_LEN {
        return Err(ParseError::TooLong);
    }
    if !rest.iter().all(|&b| b.is_ascii_graphic() || is_space(b)) {
        return Err(ParseError::NotAscii);
    }
    let mut words = rest.split(|&b| is_space(b)).filter(|w| !w.is_empty());
    let session = words
        .next()
        .and_then(|w| Uuid::try_parse_ascii(w).ok())
        .ok_or(ParseError::BadUuid)?;
    let mut ext: Option<Extended> = None;
    for word in words {
        let eq = word
            .iter()
            .position(|&b| b == b'=')
            .ok_or(ParseError::BadParam)?;
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        if key.is_empty()
            || key.len() > MAX_KEY_LEN
            || !key
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ParseError::BadParam);
        }
        let e = ext.get_or_insert_with(Extended::default);
        match key {
            b"p" => {
                if e.peer.is_some() {
                    return Err(ParseError::DuplicateParam);
                }
                e.peer = Some(parse_peer_id(value)?);
            }
            b"t" => {
                if e.token.is_some() {
                    return Err(ParseError::DuplicateParam);
                }
                e.token = Some(parse_token(value)?);
            }
            b"c" => {
                if e.cookie.is_some() {
                    return Err(ParseError::DuplicateParam);
                }
                // One to sixteen hex digits, as for `p=`.
                if value.is_empty() || value.len() > 16 {
                    return Err(ParseError::BadParam);
                }
                let mut c = 0u64;
                for &b in value {
                    let d = char::from(b).to_digit(16).ok_or(ParseError::BadParam)?;
                    c = c << 4 | u64::from(d);
                }
                e.cookie = Some(Cookie(c));
            }
            _ => {}
        }
    }
    if needs_reply_room && ext.is_some() && datagram.len() < MAX_REPLY_LEN {
        return Err(ParseError::TooShortForReply);
    }
    Ok(Registration {
        session,
        extended: ext,
    })
}

/// Registration bodies built from the bytes that matter to the parser: every kind of space,
/// hex digits, `=`, `-`, `:`, and now and then a control or non-ASCII byte.
fn arb_body_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => prop::sample::select(b" \t\r\n".to_vec()),
        20 => prop::sample::select(b"0123456789abcdefABCDEF".to_vec()),
        4 => prop::sample::select(b"=-:ptz{}".to_vec()),
        1 => prop::sample::select(vec![0u8, 0x08, 0x0b, 0x0c, 0x1f, b'!', b'~', 0x7f, 0x80, 0xa0, 0xff]),
    ];
    prop::collection::vec(byte, 0..140)
}

#[test]
fn find_space_finds_every_kind_of_space_at_every_position() {
    for len in 0..40 {
        let word = vec![b'a'; len];
        assert_eq!(find_space(&word), len, "no space in {len} bytes");
        for at in 0..len {
            for space in [b' ', b'\t', b'\r', b'\n'] {
                let mut w = word.clone();
                w[at] = space;
                // A second space later must not win over the first.
                if at + 1 < len {
                    w[len - 1] = b' ';
                }
                assert_eq!(find_space(&w), at, "{:?}", String::from_utf8_lossy(&w));
            }
        }
    }
    // The bytes on either side of a space's value are no spaces.
    assert_eq!(find_space(b"!!!!!!!!~~~~~~~~!"), 17);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn parser_agrees_with_the_reference(body in arb_body_bytes(), reply_room in any::<bool>()) {
        let mut dgram = REG_PREFIX.to_vec();
        dgram.extend(&body);
        prop_assert_eq!(parse_body(&dgram, reply_room), reference_parse(&dgram, reply_room));
    }

    #[test]
    fn parser_agrees_with_the_reference_on_reg_like_datagrams(dgram in arb_reg_like()) {
        prop_assert_eq!(parse_body(&dgram, true), reference_parse(&dgram, true));
        prop_assert_eq!(parse_body(&dgram, false), reference_parse(&dgram, false));
    }

    #[test]
    fn parser_agrees_with_the_reference_on_any_bytes(
        tail in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut dgram = REG_PREFIX.to_vec();
        dgram.extend(&tail);
        prop_assert_eq!(parse_body(&dgram, true), reference_parse(&dgram, true));
    }
}

#[test]
fn original_ack_is_the_original_bytes() {
    let ack = Reply::Ack {
        cookie: None,
        observed: None,
        peer: None,
        peer_alt: None,
    };
    assert_eq!(ack.encode().as_bytes(), b"ACK\n");
    // A peer without an observed address is still the original form.
    let ack = Reply::Ack {
        cookie: None,
        observed: None,
        peer: Some(sa("198.18.0.1:1")),
        peer_alt: None,
    };
    assert_eq!(ack.encode().as_bytes(), b"ACK\n");
}

#[test]
fn alternate_address_parameters_parse_encode_and_pad() {
    let session = Uuid::from_u128(0x1f);
    let reg = |alt_aware, alt| Registration {
        session,
        extended: Some(Extended {
            peer: Some(PeerId(0x1f)),
            alt_aware,
            alt,
            ..Default::default()
        }),
    };
    for (r, param) in [(reg(true, false), " ax=1 "), (reg(true, true), " alt=1 ")] {
        let bytes = r.encode();
        assert_eq!(bytes.len(), MAX_ALT_REPLY_LEN, "padded for the longest ACK");
        assert!(String::from_utf8_lossy(&bytes).contains(param));
        assert_eq!(parse_registration(&bytes), Ok(r));
    }
    // alt=1 implies ax=1; it needs a peer id; values other than 1 and repeats are refused.
    let pad = "0".repeat(100);
    let p = |s: &str| parse_registration(format!("REG:{session} {s} pad={pad}\n").as_bytes());
    assert!(matches!(
        p("p=1f alt=1"),
        Ok(Registration {
            extended: Some(Extended {
                alt_aware: true,
                alt: true,
                ..
            }),
            ..
        })
    ));
    assert_eq!(p("alt=1"), Err(ParseError::BadParam));
    assert_eq!(p("p=1f ax=2"), Err(ParseError::BadParam));
    assert_eq!(p("p=1f ax=1 ax=1"), Err(ParseError::DuplicateParam));
    // Without them: the classic length, no `ax`.
    assert_eq!(reg(false, false).encode().len(), MAX_COOKIE_REPLY_LEN);
}

#[test]
fn ack_with_the_peers_alternate_address_snapshot_and_parse() {
    let reply = Reply::Ack {
        observed: Some(sa("198.18.1.1:5000")),
        peer: Some(sa("198.18.2.1:6000")),
        cookie: Some(Cookie(0x8f41d2c07a5e9b13)),
        peer_alt: Some(sa("[2001:db8:2:1::2]:6000")),
    };
    let bytes = reply.encode();
    assert_eq!(
        bytes.as_bytes(),
        b"ACK 198.18.1.1:5000 198.18.2.1:6000 c=8f41d2c07a5e9b13 pa=[2001:db8:2:1::2]:6000\n"
    );
    assert_eq!(Reply::parse(bytes.as_bytes()), Some(reply));
    // `pa=` without a cookie; and the longest ACK fits MAX_ALT_REPLY_LEN exactly.
    assert_eq!(
        Reply::parse(b"ACK 198.18.1.1:5000 198.18.2.1:6000 pa=[2001:db8::1]:1\n"),
        Some(Reply::Ack {
            observed: Some(sa("198.18.1.1:5000")),
            peer: Some(sa("198.18.2.1:6000")),
            cookie: None,
            peer_alt: Some(sa("[2001:db8::1]:1")),
        })
    );
    let big = sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
    let longest = Reply::Ack {
        observed: Some(big),
        peer: Some(big),
        cookie: Some(Cookie(u64::MAX)),
        peer_alt: Some(big),
    };
    assert_eq!(longest.encode().as_bytes().len(), MAX_ALT_REPLY_LEN);
    assert_eq!(Reply::parse(b"ACK 198.18.1.1:5000 pa=nonsense\n"), None);
}
