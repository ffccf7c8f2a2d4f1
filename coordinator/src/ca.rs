//! The mesh certificate authority: the root made at `init`, leaf certificates signed from
//! node CSRs with the SPIFFE SANs of the certificate profile, and the coordinator's own
//! server certificate.

use std::path::Path;

use quicmesh_protocol::cert::{leaf_uris, Serial};
use quicmesh_protocol::ident::{NodeName, ServiceName, SpiffeId, TrustDomain};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// CA errors.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("certificate signing request: {0}")]
    BadCsr(String),
    #[error("signing: {0}")]
    Sign(String),
}

/// The loaded CA.
pub struct Ca {
    pub trust_domain: TrustDomain,
    pub cert_der: Vec<u8>,
    key: KeyPair,
    issuer: rcgen::Certificate,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub der: Vec<u8>,
    pub serial: Serial,
    pub not_after: i64,
}

fn ts(secs: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| CaError::Sign(e.to_string()))
}

fn random_serial() -> Result<(SerialNumber, Serial), CaError> {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte, so both encodings agree
    let serial = Serial::new(b.to_vec()).map_err(|e| CaError::Sign(e.to_string()))?;
    Ok((SerialNumber::from_slice(&b), serial))
}

impl Ca {
    /// Makes a new root for `trust_domain`, valid for ten years from `now`.
    pub fn generate(trust_domain: TrustDomain, now: i64) -> Result<(Self, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, format!("quicmesh CA {trust_domain}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = ts(now - 3600)?;
        p.not_after = ts(now + 10 * 365 * 86400)?;
        p.serial_number = Some(random_serial()?.0);
        let cert = p
            .self_signed(&key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let key_pem = key.serialize_pem();
        let ca = Self::from_parts(trust_domain, cert.der().to_vec(), key)?;
        Ok((ca, key_pem))
    }

    fn from_parts(
        trust_domain: TrustDomain,
        cert_der: Vec<u8>,
        key: KeyPair,
    ) -> Result<Self, CaError> {
        let params = CertificateParams::from_ca_cert_der(&cert_der.clone().into())
            .map_err(|e| CaError::Sign(format!("ca certificate: {e}")))?;
        let issuer = params
            .self_signed(&key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Self {
            trust_domain,
            cert_der,
            key,
            issuer,
        })
    }

    /// Loads the CA from `ca.crt` and `ca.key` in `dir`.
    pub fn load(dir: &Path, trust_domain: TrustDomain) -> Result<Self, CaError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| CaError::File {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let cert_pem = read("ca.crt")?;
        let key_pem = read("ca.key")?;
        let cert_der = pem::parse(&cert_pem)
            .map_err(|e| CaError::File {
                path: "ca.crt".into(),
                reason: e.to_string(),
            })?
            .into_contents();
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::File {
            path: "ca.key".into(),
            reason: e.to_string(),
        })?;
        Self::from_parts(trust_domain, cert_der, key)
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.cert_der.clone()))
    }

    /// SHA-256 of the CA certificate: what join tokens pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        quicmesh_node::tls::fingerprint(&self.cert_der)
    }

    fn sign(
        &self,
        mut p: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        now: i64,
        ttl_secs: i64,
    ) -> Result<Leaf, CaError> {
        let (serial_number, serial) = random_serial()?;
        p.serial_number = Some(serial_number);
        // Slack for clocks that run slightly behind ours: a minute, but never a large part
        // of a short lifetime, so renewal at 2/3 of the validity stays meaningful.
        p.not_before = ts(now - (ttl_secs / 4).clamp(0, 60))?;
        let not_after = now + ttl_secs;
        p.not_after = ts(not_after)?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(public_key, &self.issuer, &self.key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Leaf {
            der: cert.der().to_vec(),
            serial,
            not_after,
        })
    }

    fn uri_sans(uris: Vec<String>) -> Result<Vec<SanType>, CaError> {
        uris.into_iter()
            .map(|u| {
                rcgen::Ia5String::try_from(u)
                    .map(SanType::URI)
                    .map_err(|e| CaError::Sign(e.to_string()))
            })
            .collect()
    }

    /// Signs a node's CSR. The CSR proves the key; names and lifetime are ours.
    pub fn sign_node(
        &self,
        csr_der: &[u8],
        node: &NodeName,
        services: &[ServiceName],
        ips: &[std::net::IpAddr],
        now: i64,
        ttl_secs: i64,
    ) -> Result<Leaf, CaError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, node.as_str());
        p.subject_alt_names = Self::uri_sans(leaf_uris(&self.trust_domain, node, services))?;
        p.subject_alt_names
            .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        self.sign(p, &csr.public_key, now, ttl_secs)
    }

    /// SHA-256 (hex) of a CSR's public key: what a join token remembers it enrolled.
    pub fn csr_key_id(csr_der: &[u8]) -> Result<String, CaError> {
        use rcgen::PublicKeyData;
        use sha2::Digest;
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        Ok(hex::encode(sha2::Sha256::digest(
            csr.public_key.der_bytes(),
        )))
    }

    /// Issues the coordinator's own server certificate and key.
    pub fn coordinator_leaf(&self, now: i64, ttl_secs: i64) -> Result<(Leaf, KeyPair), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "quicmesh coordinator");
        p.subject_alt_names =
            Self::uri_sans(vec![
                SpiffeId::Coordinator(self.trust_domain.clone()).to_string()
            ])?;
        let leaf = self.sign(p, &key, now, ttl_secs)?;
        Ok((leaf, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_node::tls::{Refusal, Trust};
    use quicmesh_protocol::cert::PeerIdentity;
    use rustls::pki_types::{CertificateDer, UnixTime};

    fn at(t: i64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t as u64))
    }

    #[test]
    fn signed_leaf_carries_the_profile_and_verifies_only_inside_its_window() {
        let now = 1_800_000_000;
        let td = TrustDomain::new("t.local").unwrap();
        let (ca, _) = Ca::generate(td.clone(), now).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = quicmesh_node::control::csr("web-1", &key).unwrap();
        let node = NodeName::new("web-1").unwrap();
        let leaf = ca
            .sign_node(
                &csr,
                &node,
                &[ServiceName::new("web").unwrap()],
                &["100.64.0.7".parse().unwrap()],
                now,
                600,
            )
            .unwrap();
        let id = PeerIdentity::from_der(&leaf.der, &td).unwrap();
        assert_eq!(id.node, node);
        assert!(id.may_speak_for(&ServiceName::new("web").unwrap()));
        assert!(!id.may_speak_for(&ServiceName::new("db").unwrap()));
        assert_eq!(id.serial, leaf.serial);
        assert_eq!(id.not_after, now + 600);
        // The overlay address is in the certificate: packets from it are this node's.
        assert!(id.owns_address("100.64.0.7".parse().unwrap()));
        assert!(!id.owns_address("100.64.0.8".parse().unwrap()));

        let trust = Trust::new(td.clone(), std::slice::from_ref(&ca.cert_der), []).unwrap();
        let der = CertificateDer::from(leaf.der.clone());
        let usage = webpki::KeyUsage::client_auth();
        assert!(trust.verify_node(&der, &[], at(now + 10), usage).is_ok());
        assert_eq!(
            trust
                .verify_node(&der, &[], at(now + 601), usage)
                .unwrap_err(),
            Refusal::Expired
        );
        assert_eq!(
            trust
                .verify_node(&der, &[], at(now - 3600), usage)
                .unwrap_err(),
            Refusal::NotYetValid
        );
        // Revoked twin.
        let revoked = Trust::new(
            td.clone(),
            std::slice::from_ref(&ca.cert_der),
            [leaf.serial.clone()],
        )
        .unwrap();
        assert_eq!(
            revoked
                .verify_node(&der, &[], at(now + 10), usage)
                .unwrap_err(),
            Refusal::Revoked
        );
        // Another CA's trust does not accept it.
        let (other, _) = Ca::generate(td.clone(), now).unwrap();
        let foreign = Trust::new(td, std::slice::from_ref(&other.cert_der), []).unwrap();
        assert_eq!(
            foreign
                .verify_node(&der, &[], at(now + 10), usage)
                .unwrap_err(),
            Refusal::UnknownCa
        );
    }

    #[test]
    fn garbage_csr_is_a_typed_error() {
        let (ca, _) = Ca::generate(TrustDomain::new("t").unwrap(), 1_800_000_000).unwrap();
        let err = ca
            .sign_node(
                b"not a csr",
                &NodeName::new("a").unwrap(),
                &[],
                &[],
                1_800_000_000,
                60,
            )
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    #[test]
    fn short_lifetimes_keep_little_backdating() {
        let now = 1_800_000_000;
        let td = TrustDomain::new("t").unwrap();
        let (ca, _) = Ca::generate(td.clone(), now).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = quicmesh_node::control::csr("a", &key).unwrap();
        let leaf = ca
            .sign_node(&csr, &NodeName::new("a").unwrap(), &[], &[], now, 8)
            .unwrap();
        let id = PeerIdentity::from_der(&leaf.der, &td).unwrap();
        assert_eq!(id.not_before, now - 2);
        // Renewal lands before expiry.
        let renew = quicmesh_protocol::token::renew_at(id.not_before, id.not_after, 1.0);
        assert!(renew > now && renew < id.not_after, "{renew}");
    }
}
