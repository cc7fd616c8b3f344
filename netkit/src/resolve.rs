//! Choosing one address among those a name resolves to: IPv4 first, as the common case for a
//! relay or server and what an IPv4-only host can reach; otherwise the first one given.

use std::net::SocketAddr;

/// The first IPv4 address of `addrs`, else the first address, else `None`.
pub fn ipv4_first(addrs: impl IntoIterator<Item = SocketAddr>) -> Option<SocketAddr> {
    let mut first = None;
    for a in addrs {
        if a.is_ipv4() {
            return Some(a);
        }
        first.get_or_insert(a);
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_ipv4_then_the_first() {
        let v6: SocketAddr = "[2001:db8::1]:1".parse().expect("literal");
        let v6b: SocketAddr = "[2001:db8::2]:1".parse().expect("literal");
        let v4: SocketAddr = "198.18.0.1:1".parse().expect("literal");
        assert_eq!(ipv4_first([v6, v4]), Some(v4));
        assert_eq!(ipv4_first([v6, v6b]), Some(v6));
        assert_eq!(ipv4_first([]), None);
    }
}
