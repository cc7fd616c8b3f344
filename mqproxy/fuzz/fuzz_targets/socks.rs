//! SOCKS5 and HTTP CONNECT parsers on raw bytes: never panic, never claim more bytes than
//! given, and UDP headers re-encode to the bytes they came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqproxy::proto::TargetAddr;
use mqproxy::socks;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, n))) = socks::parse_greeting(data) {
        assert!(n <= data.len());
    }
    if let Ok(Some((_, n))) = socks::parse_userpass(data) {
        assert!(n <= data.len());
    }
    if let Ok(Some((req, n))) = socks::parse_request(data) {
        assert!(n <= data.len());
        assert_eq!(socks::encode_request(req.command, &req.addr), &data[..n]);
    }
    if let Ok(p) = socks::parse_udp(data) {
        let h = socks::encode_udp_header(&p.addr);
        assert_eq!(&h[3..], &data[3..data.len() - p.payload.len()]);
    }
    if let Ok(Some((_, n))) = socks::parse_http_connect(data) {
        assert!(n <= data.len());
    }
    if let Ok(Some((a, n))) = TargetAddr::decode(data) {
        assert_eq!(a.encoded_len(), n);
    }
});
