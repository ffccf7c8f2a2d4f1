//! WireGuard clients of the mesh (laptops, phones, routers that run a stock WireGuard
//! client instead of a node): their keys, and what a gateway is told about each.
//!
//! A client is enrolled on the coordinator (`quicmesh-coordinator wg add`), gets an overlay
//! address from the mesh's pools, and is pushed to the gateway nodes that serve it. At a
//! destination, policy sees the client's service and labels, exactly as for a node.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::ident::{Labels, NodeName, ServiceName};

/// A Curve25519 public key, written as `wg` writes it (standard base64, 44 characters).
/// Keys of small order are refused wherever one is read: with such a key the handshake's
/// static Diffie-Hellman is all zeros, and anyone could pass for its holder.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "[u8; 32]", into = "[u8; 32]")]
pub struct WgKey(pub [u8; 32]);

/// The points of small order on Curve25519 (their canonical encodings; the top bit is
/// ignored when comparing, as X25519 ignores it), as libsodium lists them.
const SMALL_ORDER: [[u8; 32]; 7] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

impl TryFrom<[u8; 32]> for WgKey {
    type Error = WgKeyError;
    fn try_from(k: [u8; 32]) -> Result<Self, WgKeyError> {
        let mut masked = k;
        masked[31] &= 0x7f;
        if SMALL_ORDER.contains(&masked) {
            return Err(WgKeyError::SmallOrder);
        }
        Ok(Self(k))
    }
}

impl From<WgKey> for [u8; 32] {
    fn from(k: WgKey) -> [u8; 32] {
        k.0
    }
}

/// Why text is not a WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WgKeyError {
    #[error("a WireGuard key is 44 characters of base64, got {0}")]
    Length(usize),
    #[error("a WireGuard key is base64 ({0})")]
    Base64(String),
    #[error("a key of small order is no public key (anyone could pass for its holder)")]
    SmallOrder,
}

impl FromStr for WgKey {
    type Err = WgKeyError;
    fn from_str(s: &str) -> Result<Self, WgKeyError> {
        let s = s.trim();
        if s.len() != 44 {
            return Err(WgKeyError::Length(s.len()));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| WgKeyError::Base64(e.to_string()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| WgKeyError::Length(b.len()))?;
        Self::try_from(key)
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

/// One WireGuard client as gateways and destinations know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgClient {
    /// Unique among clients (`alice-laptop`); a DNS label like a node's name.
    pub name: NodeName,
    /// What policy sees as the client's source service.
    pub service: ServiceName,
    pub labels: Labels,
    /// The client's overlay addresses: the only inner sources accepted from it.
    pub addresses: Vec<IpAddr>,
    pub public_key: WgKey,
    /// Unix seconds after which the client is refused (0: no expiry).
    pub expires_at: u64,
    /// The gateway nodes that serve it.
    pub gateways: Vec<NodeName>,
}

impl WgClient {
    /// Whether the client may send at `now` (unix seconds).
    pub fn live_at(&self, now: u64) -> bool {
        self.expires_at == 0 || now < self.expires_at
    }

    /// Whether `addr` is one of the client's own addresses.
    pub fn owns(&self, addr: IpAddr) -> bool {
        self.addresses.contains(&addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_and_write_as_wg_does_and_bad_text_is_named() {
        // `wg pubkey` output for a known private key.
        let text = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let k: WgKey = text.parse().unwrap();
        assert_eq!(k.to_string(), text);
        assert_eq!(
            "abc".parse::<WgKey>(),
            Err(WgKeyError::Length(3)),
            "too short"
        );
        assert!(matches!(
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=".parse::<WgKey>(),
            Err(WgKeyError::Base64(_))
        ));
        assert_eq!(
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".parse::<WgKey>(),
            Err(WgKeyError::SmallOrder)
        );
        // Every small-order point, with the top bit either way, in text and on the wire.
        for p in SMALL_ORDER {
            for top in [0u8, 0x80] {
                let mut k = p;
                k[31] |= top;
                assert_eq!(WgKey::try_from(k), Err(WgKeyError::SmallOrder));
                let text = base64::engine::general_purpose::STANDARD.encode(k);
                assert_eq!(text.parse::<WgKey>(), Err(WgKeyError::SmallOrder));
                let wire = postcard::to_allocvec(&k).unwrap();
                assert!(postcard::from_bytes::<WgKey>(&wire).is_err());
            }
        }
        // 33 bytes of base64 in 44 characters.
        assert!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            .parse::<WgKey>()
            .is_err());
    }

    #[test]
    fn a_client_owns_only_its_addresses_and_lives_until_its_expiry() {
        let c = WgClient {
            name: NodeName::new("alice-laptop").unwrap(),
            service: ServiceName::new("laptop").unwrap(),
            labels: Labels::default(),
            addresses: vec!["100.64.0.9".parse().unwrap()],
            public_key: WgKey([7; 32]),
            expires_at: 1000,
            gateways: vec![NodeName::new("gw-1").unwrap()],
        };
        assert!(c.owns("100.64.0.9".parse().unwrap()));
        assert!(!c.owns("100.64.0.10".parse().unwrap()));
        assert!(c.live_at(999));
        assert!(!c.live_at(1000), "expired at its last second");
        let forever = WgClient {
            expires_at: 0,
            ..c.clone()
        };
        assert!(forever.live_at(u64::MAX));
        let bytes = postcard::to_allocvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<WgClient>(&bytes).unwrap(), c);
    }
}
