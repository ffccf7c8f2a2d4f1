//! The certificate profile: which SANs a mesh certificate carries and how a peer's
//! identity is read back from a (verified) certificate.
//!
//! Chain verification is done by the TLS layer; this module only interprets a leaf that
//! the caller already verified. Nothing here reads the clock: validity is returned as
//! Unix seconds for the caller to compare with its own `now`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ident::{NodeName, ServiceName, SpiffeId, TrustDomain};

/// A certificate serial number (big-endian bytes as in the certificate).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct Serial(Vec<u8>);

/// Serials are at most 20 bytes (RFC 5280) and never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("serial must be 1 to 20 bytes, got {0}")]
pub struct SerialError(pub usize);

impl Serial {
    /// Wraps serial bytes; leading zero bytes are dropped so both encodings compare equal.
    pub fn new(bytes: Vec<u8>) -> Result<Self, SerialError> {
        let start = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        let trimmed = bytes.get(start..).unwrap_or_default().to_vec();
        if trimmed.is_empty() || trimmed.len() > 20 {
            return Err(SerialError(bytes.len()));
        }
        Ok(Self(trimmed))
    }
    /// The serial's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}
impl TryFrom<Vec<u8>> for Serial {
    type Error = SerialError;
    fn try_from(v: Vec<u8>) -> Result<Self, SerialError> {
        Self::new(v)
    }
}
impl From<Serial> for Vec<u8> {
    fn from(s: Serial) -> Vec<u8> {
        s.0
    }
}
impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The URI SANs a node leaf carries: its node id, then one per service it may host.
pub fn leaf_uris(td: &TrustDomain, node: &NodeName, services: &[ServiceName]) -> Vec<String> {
    let mut uris = vec![SpiffeId::Node(td.clone(), node.clone()).to_string()];
    uris.extend(
        services
            .iter()
            .map(|s| SpiffeId::Service(td.clone(), s.clone()).to_string()),
    );
    uris
}

/// Who a verified peer certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub trust_domain: TrustDomain,
    pub node: NodeName,
    pub services: BTreeSet<ServiceName>,
    /// Overlay addresses (IP SANs).
    pub ips: Vec<IpAddr>,
    pub serial: Serial,
    /// Validity window in Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Why a certificate does not carry a usable mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("certificate has no spiffe node uri")]
    NoNode,
    #[error("certificate has more than one spiffe node uri")]
    SeveralNodes,
    #[error("certificate belongs to trust domain {got}, expected {expected}")]
    ForeignTrustDomain { expected: String, got: String },
    #[error(transparent)]
    Serial(#[from] SerialError),
}

/// Every SPIFFE identity among a certificate's URI SANs (other URIs are ignored).
pub fn spiffe_ids(der: &[u8]) -> Result<Vec<SpiffeId>, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Ok(id) = uri.parse::<SpiffeId>() {
                    ids.push(id);
                }
            }
        }
    }
    Ok(ids)
}

impl PeerIdentity {
    /// Reads the identity from a leaf certificate (DER) that the caller has verified.
    pub fn from_der(der: &[u8], expected: &TrustDomain) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
        let mut node = None;
        let mut services = BTreeSet::new();
        for id in spiffe_ids(der)? {
            if id.trust_domain() != expected {
                return Err(IdentityError::ForeignTrustDomain {
                    expected: expected.to_string(),
                    got: id.trust_domain().to_string(),
                });
            }
            match id {
                SpiffeId::Node(_, n) => {
                    if node.replace(n).is_some() {
                        return Err(IdentityError::SeveralNodes);
                    }
                }
                SpiffeId::Service(_, s) => {
                    services.insert(s);
                }
                SpiffeId::Coordinator(_) => {}
            }
        }
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::IPAddress(b) = name {
                    match b.len() {
                        4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                        16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                        _ => {}
                    }
                }
            }
        }
        Ok(Self {
            trust_domain: expected.clone(),
            node: node.ok_or(IdentityError::NoNode)?,
            services,
            ips,
            serial: Serial::new(cert.raw_serial().to_vec())?,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// True when the certificate holds overlay address `ip` (packets from it are this
    /// node's, anything else from this peer is spoofed).
    pub fn owns_address(&self, ip: IpAddr) -> bool {
        self.ips.contains(&ip)
    }

    /// True when the certificate may speak for `service`.
    pub fn may_speak_for(&self, service: &ServiceName) -> bool {
        self.services.contains(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_trims_leading_zeros_and_is_bounded() {
        assert_eq!(Serial::new(vec![0, 0, 5]).unwrap().as_bytes(), &[5]);
        assert_eq!(Serial::new(vec![0]).unwrap().as_bytes(), &[0]);
        assert_eq!(Serial::new(vec![]).unwrap_err(), SerialError(0));
        assert!(Serial::new(vec![1; 21]).is_err());
        assert_eq!(Serial::new(vec![0xab, 1]).unwrap().to_string(), "ab01");
    }

    #[test]
    fn leaf_uris_name_node_then_services() {
        let td = TrustDomain::new("t.local").unwrap();
        let uris = leaf_uris(
            &td,
            &NodeName::new("n1").unwrap(),
            &[ServiceName::new("web").unwrap()],
        );
        assert_eq!(
            uris,
            ["spiffe://t.local/node/n1", "spiffe://t.local/svc/web"]
        );
    }

    #[test]
    fn garbage_is_a_parse_error() {
        let td = TrustDomain::new("t").unwrap();
        assert!(matches!(
            PeerIdentity::from_der(b"nope", &td),
            Err(IdentityError::Parse(_))
        ));
    }
}
