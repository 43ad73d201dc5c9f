//! SSRF guard: which addresses a webhook may be delivered to.
//!
//! Unless the operator allows private addresses, only *public* unicast addresses are used:
//! never loopback, private (RFC 1918, IPv6 unique-local), link-local (where cloud metadata
//! services live: 169.254.169.254, fd00:ec2::254 is unique-local), shared (CGNAT),
//! unspecified, broadcast, multicast, documentation or reserved ranges, nor an IPv6 address
//! that embeds one of those (IPv4-mapped, NAT64, 6to4). The check is made on the host of a URL
//! at registration, and at delivery on every address DNS gives ([`PublicOnly`] is the HTTP
//! client's resolver), so a name that points somewhere else later is still refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether `ip` is a public unicast address a webhook may reach.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // shared address space (CGNAT), 100.64.0.0/10
        || (a == 100 && (b & 0xc0) == 64)
        // IETF protocol assignments, 192.0.0.0/24
        || (a == 192 && b == 0 && c == 0)
        // benchmarking, 198.18.0.0/15
        || (a == 198 && (b & 0xfe) == 18)
        // reserved, 240.0.0.0/4
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return is_public_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    // 6to4 (2002::/16) carries one in bits 16..48
    if s[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // unique local, fc00::/7
        || (s[0] & 0xfe00) == 0xfc00
        // link-local, fe80::/10
        || (s[0] & 0xffc0) == 0xfe80
        // documentation, 2001:db8::/32
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        // IPv4-compatible (deprecated) and other ::/96 forms
        || s[..6] == [0, 0, 0, 0, 0, 0])
}

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host} is not a public address (private, loopback and link-local addresses are refused)")]
pub struct Refused {
    pub host: String,
}

/// Checks the host of an endpoint URL when it is registered: an IP literal must be public; a
/// name must not be `localhost` and must not resolve to a non-public address. A name that
/// does not resolve (yet) is accepted: every delivery checks again after resolution.
///
/// # Errors
/// The host is not public.
pub async fn check_host(url: &reqwest::Url) -> Result<(), Refused> {
    let refused = || Refused {
        host: url.host_str().unwrap_or_default().to_owned(),
    };
    match url.host() {
        None => Err(refused()),
        Some(url::Host::Ipv4(ip)) => is_public_v4(ip).then_some(()).ok_or_else(refused),
        Some(url::Host::Ipv6(ip)) => is_public_v6(ip).then_some(()).ok_or_else(refused),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                return Err(refused());
            }
            let lookup = tokio::net::lookup_host((name.as_str(), 0));
            match tokio::time::timeout(Duration::from_secs(3), lookup).await {
                Ok(Ok(addrs)) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    if addrs.iter().any(|a| !is_public(a.ip())) {
                        Err(refused())
                    } else {
                        Ok(())
                    }
                }
                // unresolvable now: checked again at every delivery
                Ok(Err(_)) | Err(_) => Ok(()),
            }
        }
    }
}

/// Whether a URL whose host is an IP literal may be reached (the resolver never sees those).
pub fn literal_host_allowed(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => is_public_v4(ip),
        Some(url::Host::Ipv6(ip)) => is_public_v6(ip),
        Some(url::Host::Domain(_)) => true,
        None => false,
    }
}

/// The delivery client's resolver: the system's answers, without the non-public addresses;
/// a name with only those fails to resolve.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        type BoxError = Box<dyn std::error::Error + Send + Sync>;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(found) => found,
                Err(e) => return Err::<Addrs, BoxError>(Box::new(e)),
            };
            let addrs: Vec<SocketAddr> = found.filter(|a| is_public(a.ip())).collect();
            if addrs.is_empty() {
                return Err(Box::new(Refused { host }) as BoxError);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_unicast_addresses_pass() {
        for private in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.170",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(private)), "{private} must be refused");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "169.255.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip(public)), "{public} must be allowed");
        }
    }

    #[tokio::test]
    async fn registration_refuses_private_hosts() {
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost:9/x",
            "http://api.localhost/x",
            "http://10.0.0.5/x",
        ] {
            let url = reqwest::Url::parse(url).unwrap();
            assert!(check_host(&url).await.is_err(), "{url}");
            assert!(url.host_str().is_some());
        }
        let public = reqwest::Url::parse("https://93.184.215.14/hook").unwrap();
        assert!(check_host(&public).await.is_ok());
        assert!(literal_host_allowed(&public));
        assert!(!literal_host_allowed(
            &reqwest::Url::parse("http://192.168.0.1/").unwrap()
        ));
    }

    #[tokio::test]
    async fn the_resolver_drops_private_answers() {
        let name: Name = "localhost".parse().unwrap();
        assert!(PublicOnly.resolve(name).await.is_err());
    }
}
