//! Who a request comes from: the connection's peer, or, for a request through one of the
//! `TRUSTED_PROXIES`, the client that proxy names in `X-Forwarded-For` (or `Forwarded`).
//!
//! Each proxy appends the address it got the request from, so only the right end of the header
//! can be believed: the client is the rightmost address that is not itself a trusted proxy.
//! Whatever a client writes into the header itself stays to the left of that and is ignored. A
//! header that cannot be read that far leaves the request with its peer's address.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use warp::http::HeaderMap;

/// The client's address, put on every request by the server: what the rate limit, the
/// per-address connection cap and the access log go by. Port 0 when a proxy named the client
/// without its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.port() == 0 {
            self.0.ip().fmt(f)
        } else {
            self.0.fmt(f)
        }
    }
}

/// One trusted address or network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    base: IpAddr,
    prefix: u8,
}

impl Network {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.base, ip) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => {
                mask(u128::from(ip.to_bits()), self.prefix, 32) == u128::from(base.to_bits())
            }
            (IpAddr::V6(base), IpAddr::V6(ip)) => {
                mask(ip.to_bits(), self.prefix, 128) == base.to_bits()
            }
            _ => false,
        }
    }
}

/// The first `prefix` of the `width` bits of `bits`.
fn mask(bits: u128, prefix: u8, width: u8) -> u128 {
    let host_bits = u32::from(width - prefix);
    bits.checked_shr(host_bits)
        .and_then(|network| network.checked_shl(host_bits))
        .unwrap_or(0)
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not an address or a network such as 10.0.0.0/8");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let base = address
            .parse::<IpAddr>()
            .map_err(|_| invalid())?
            .to_canonical();
        let width = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= width)
                .ok_or_else(invalid)?,
            None => width,
        };
        let base = match base {
            IpAddr::V4(v4) => IpAddr::V4((mask(v4.to_bits().into(), prefix, 32) as u32).into()),
            IpAddr::V6(v6) => IpAddr::V6(mask(v6.to_bits(), prefix, 128).into()),
        };
        Ok(Network { base, prefix })
    }
}

/// `TRUSTED_PROXIES`: the reverse proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Network>);

impl FromStr for TrustedProxies {
    type Err = String;

    /// Addresses or CIDR networks, separated by commas.
    fn from_str(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|network| network.contains(ip))
    }

    /// The client of a request that came over a connection from `peer` with `headers`.
    pub fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> ClientAddr {
        if !self.trusts(peer.ip()) {
            return ClientAddr(peer);
        }
        let forwarded = if headers.contains_key("x-forwarded-for") {
            self.rightmost_untrusted(headers, "x-forwarded-for", forwarded_for_hop)
        } else {
            self.rightmost_untrusted(headers, "forwarded", forwarded_hop)
        };
        ClientAddr(forwarded.unwrap_or(peer))
    }

    /// Walks the hops of header `name` from the right, reading each with `hop`, up to the first
    /// one that is not a trusted proxy (or the leftmost, when all are); `None` when a hop on
    /// the way cannot be read or there is none.
    fn rightmost_untrusted(
        &self,
        headers: &HeaderMap,
        name: &str,
        hop: fn(&str) -> Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        let lines = headers
            .get_all(name)
            .iter()
            .map(|value| value.to_str().ok())
            .collect::<Option<Vec<_>>>()?;
        let mut client = None;
        for text in lines.iter().rev().flat_map(|line| line.rsplit(',')) {
            let addr = hop(text)?;
            client = Some(addr);
            if !self.trusts(addr.ip()) {
                break;
            }
        }
        client
    }
}

/// One hop of `X-Forwarded-For`: an address, with a port or (IPv6) in brackets at times.
fn forwarded_for_hop(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .or_else(|_| text.parse::<SocketAddr>())
        .ok()
        .or_else(|| {
            let ip = text.strip_prefix('[')?.strip_suffix(']')?.parse().ok()?;
            Some(SocketAddr::new(ip, 0))
        })
}

/// One element of `Forwarded` (RFC 7239): its `for=` node, which may be quoted. `unknown` and
/// obfuscated names are not addresses.
fn forwarded_hop(element: &str) -> Option<SocketAddr> {
    let node = element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let node = node
        .strip_prefix('"')
        .and_then(|quoted| quoted.strip_suffix('"'))
        .unwrap_or(node);
    forwarded_for_hop(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::HeaderValue;

    fn proxies(list: &str) -> TrustedProxies {
        list.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for &(name, value) in pairs {
            map.append(name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    const PROXY: &str = "10.0.0.2:40000";

    fn client_of(list: &str, pairs: &[(&'static str, &str)]) -> String {
        proxies(list)
            .client(PROXY.parse().unwrap(), &headers(pairs))
            .to_string()
    }

    #[test]
    fn networks_and_addresses_are_read() {
        let list = proxies(" 10.0.0.0/8, 192.168.1.7 ,fd00::/8,");
        assert!(list.trusts("10.200.3.4".parse().unwrap()));
        assert!(list.trusts("::ffff:10.1.1.1".parse().unwrap()));
        assert!(list.trusts("192.168.1.7".parse().unwrap()));
        assert!(!list.trusts("192.168.1.8".parse().unwrap()));
        assert!(list.trusts("fd12::1".parse().unwrap()));
        assert!(!list.trusts("fe80::1".parse().unwrap()));
        assert!(proxies("0.0.0.0/0").trusts("8.8.8.8".parse().unwrap()));
        assert!(!proxies("0.0.0.0/0").trusts("::1".parse().unwrap()));
        assert_eq!(proxies(""), TrustedProxies::default());
        assert_eq!(proxies("10.1.2.3/8"), proxies("10.0.0.0/8"));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "proxy.local",
            "10.0.0.0/",
            "10.0.0/8",
        ] {
            assert!(bad.parse::<TrustedProxies>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let forwarded = [("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.7")];
        assert_eq!(client_of("10.0.0.0/8", &forwarded), "203.0.113.9");
        let lines = [
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.9,10.0.0.7"),
        ];
        assert_eq!(client_of("10.0.0.0/8", &lines), "203.0.113.9");
        let all_trusted = [("x-forwarded-for", "10.0.0.9, 10.0.0.7")];
        assert_eq!(client_of("10.0.0.0/8", &all_trusted), "10.0.0.9");
        let ported = [("x-forwarded-for", "[2001:db8::5]:4711, 203.0.113.9:80")];
        assert_eq!(client_of("10.0.0.0/8", &ported), "203.0.113.9:80");
        let bracketed = [("x-forwarded-for", "[2001:db8::5]")];
        assert_eq!(client_of("10.0.0.0/8", &bracketed), "2001:db8::5");
    }

    #[test]
    fn an_untrusted_peer_keeps_its_own_address() {
        let forwarded = [("x-forwarded-for", "203.0.113.9")];
        assert_eq!(client_of("", &forwarded), PROXY);
        assert_eq!(client_of("10.0.0.1", &forwarded), PROXY);
    }

    #[test]
    fn forwarded_is_read_when_x_forwarded_for_is_absent() {
        let forwarded = [(
            "forwarded",
            "for=1.1.1.1, For=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.7;by=10.0.0.2",
        )];
        assert_eq!(
            client_of("10.0.0.0/8", &forwarded),
            "[2001:db8:cafe::17]:4711"
        );
        let both = [
            ("forwarded", "for=198.51.100.1"),
            ("x-forwarded-for", "203.0.113.9"),
        ];
        assert_eq!(client_of("10.0.0.0/8", &both), "203.0.113.9");
    }

    #[test]
    fn unreadable_headers_leave_the_peer() {
        for value in [
            "",
            "garbage",
            "203.0.113.9, unknown",
            "999.1.1.1",
            "fe80::1%eth0",
            "203.0.113.9,",
        ] {
            assert_eq!(
                client_of("10.0.0.0/8", &[("x-forwarded-for", value)]),
                PROXY,
                "{value}"
            );
        }
        for value in ["for=unknown", "for=_hidden", "proto=https", "for=\"1.1.1.1"] {
            assert_eq!(
                client_of("10.0.0.0/8", &[("forwarded", value)]),
                PROXY,
                "{value}"
            );
        }
        let mut binary = HeaderMap::new();
        binary.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"203.0.113.9\xff").unwrap(),
        );
        let peer: SocketAddr = PROXY.parse().unwrap();
        assert_eq!(
            proxies("10.0.0.0/8").client(peer, &binary),
            ClientAddr(peer)
        );
    }

    #[test]
    fn garbage_left_of_the_client_is_never_read() {
        let forwarded = [("x-forwarded-for", "not an address, 203.0.113.9")];
        assert_eq!(client_of("10.0.0.0/8", &forwarded), "203.0.113.9");
    }
}
