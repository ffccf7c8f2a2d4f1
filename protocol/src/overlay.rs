//! Overlay address pools: the IPv4 and IPv6 prefixes the coordinator hands nodes their
//! overlay addresses from. A node's addresses are the pools' base plus its allocation
//! index, so the same index always gives the same addresses and an index is never reused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Default IPv4 pool: the shared address space (RFC 6598), as other meshes use.
pub const DEFAULT_V4: &str = "100.64.0.0/10";

/// An IPv4 or IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// A prefix that does not parse or is not usable as a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prefix {text:?}: {reason}")]
pub struct PrefixError {
    pub text: String,
    pub reason: &'static str,
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| PrefixError {
            text: s.to_string(),
            reason,
        };
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| err("expected ADDRESS/LENGTH"))?;
        let addr: IpAddr = a.parse().map_err(|_| err("not an IP address"))?;
        let len: u8 = l.parse().map_err(|_| err("length is not a number"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(err("length is longer than the address"));
        }
        let p = Prefix { addr, len };
        if p.network() != addr {
            return Err(err("host bits are set (write the network address)"));
        }
        Ok(p)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Prefix {
    fn bits(&self) -> u32 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// The prefix with host bits cleared.
    pub fn network(&self) -> IpAddr {
        let host = self.bits() - u32::from(self.len);
        match self.addr {
            IpAddr::V4(a) => {
                let m = if host >= 32 { 0 } else { u32::MAX << host };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
            }
            IpAddr::V6(a) => {
                let m = if host >= 128 { 0 } else { u128::MAX << host };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
            }
        }
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let p = Prefix {
            addr: ip,
            len: self.len,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && p.network() == self.addr
    }

    /// The `index`th host address (index 1 is the first after the network address);
    /// `None` past the end (the IPv4 broadcast address is never handed out).
    pub fn host(&self, index: u64) -> Option<IpAddr> {
        if index == 0 {
            return None;
        }
        let host = self.bits() - u32::from(self.len);
        match self.addr {
            IpAddr::V4(a) => {
                let size = 1u64 << host;
                (index < size - 1).then(|| IpAddr::V4(Ipv4Addr::from(u32::from(a) + index as u32)))
            }
            IpAddr::V6(a) => {
                let fits = host >= 64 || index < (1u64 << host);
                fits.then(|| IpAddr::V6(Ipv6Addr::from(u128::from(a) + u128::from(index))))
            }
        }
    }
}

/// The mesh's overlay pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pools {
    pub v4: Prefix,
    pub v6: Prefix,
}

impl Pools {
    /// Checks a pair of prefixes as pools: v4 then v6, each leaving room for nodes.
    pub fn new(v4: Prefix, v6: Prefix) -> Result<Self, PrefixError> {
        let err = |p: &Prefix, reason| PrefixError {
            text: p.to_string(),
            reason,
        };
        if !v4.addr.is_ipv4() || v4.len > 30 {
            return Err(err(
                &v4,
                "the IPv4 pool must be an IPv4 prefix of /30 or wider",
            ));
        }
        if v6.addr.is_ipv4() || v6.len > 120 {
            return Err(err(
                &v6,
                "the IPv6 pool must be an IPv6 prefix of /120 or wider",
            ));
        }
        Ok(Self { v4, v6 })
    }

    /// The default pools of a mesh: 100.64.0.0/10 and a ULA /48 (fd00::/8 with 40 bits
    /// from `seed`, as RFC 4193 asks: unlikely to collide with another mesh's).
    pub fn default_for(seed: &[u8; 32]) -> Self {
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        b[1..6].copy_from_slice(&seed[..5]);
        Self {
            v4: DEFAULT_V4.parse().unwrap_or(Prefix {
                addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)),
                len: 10,
            }),
            v6: Prefix {
                addr: IpAddr::V6(Ipv6Addr::from(b)),
                len: 48,
            },
        }
    }

    /// The addresses of allocation `index`.
    pub fn addresses(&self, index: u64) -> Option<Vec<IpAddr>> {
        Some(vec![self.v4.host(index)?, self.v6.host(index)?])
    }

    /// Whether `ip` is an overlay address of this mesh.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.v4.contains(ip) || self.v6.contains(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_strictly() {
        let p: Prefix = "100.64.0.0/10".parse().unwrap();
        assert!(p.contains("100.127.255.254".parse().unwrap()));
        assert!(!p.contains("100.128.0.1".parse().unwrap()));
        assert!(!p.contains("fd00::1".parse().unwrap()));
        for bad in [
            "100.64.0.1/10",
            "100.64.0.0",
            "100.64.0.0/33",
            "x/8",
            "fd00::/129",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        assert_eq!(p.to_string(), "100.64.0.0/10");
    }

    #[test]
    fn indexes_map_to_stable_addresses_inside_the_pools() {
        let pools = Pools::default_for(&[7; 32]);
        let a = pools.addresses(1).unwrap();
        assert_eq!(a[0], IpAddr::from([100, 64, 0, 1]));
        assert_eq!(a[1].to_string(), "fd07:707:707::1");
        assert!(a.iter().all(|ip| pools.contains(*ip)));
        assert_eq!(
            pools.addresses(300).unwrap()[0],
            IpAddr::from([100, 64, 1, 44])
        );
        let small = Pools::new("100.64.0.0/30".parse().unwrap(), pools.v6).unwrap();
        assert!(small.addresses(2).is_some());
        assert_eq!(
            small.addresses(3),
            None,
            "the broadcast address is not handed out"
        );
        assert_eq!(small.addresses(0), None);
        assert!(Pools::new(pools.v6, pools.v6).is_err());
    }
}
