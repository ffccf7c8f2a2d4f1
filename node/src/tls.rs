//! TLS for tunnels and the control session: certificate verifiers bound to the mesh CA,
//! the revocation list and SPIFFE identities, and hot-swappable local certificates.
//!
//! Chain and validity checks are done by webpki against the mesh CA only (never the
//! system roots). The trust material is an `ArcSwap` so a new snapshot (CA bundle,
//! revocation list) applies to the next handshake without rebuilding endpoints.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use quicmesh_protocol::cert::{spiffe_ids, PeerIdentity, Serial};
use quicmesh_protocol::ident::{NodeName, SpiffeId, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

mod kx;
pub use kx::{group_name, negotiated, Handshake, KeyExchange, GROUP_NAMES};

/// Why a presented certificate was refused. Counted with these labels.
pub use crate::reason::HandshakeRefusal as Refusal;

/// The rustls error a refusal is reported to the peer as.
trait ToRustls {
    fn to_rustls(self) -> rustls::Error;
}

impl ToRustls for Refusal {
    fn to_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(match self {
            Refusal::UnknownCa => CertificateError::UnknownIssuer,
            Refusal::Expired => CertificateError::Expired,
            Refusal::NotYetValid => CertificateError::NotValidYet,
            Refusal::Revoked => CertificateError::Revoked,
            Refusal::BadCertificate => CertificateError::BadEncoding,
            Refusal::NoIdentity
            | Refusal::WrongPeer
            | Refusal::RelaySenderMismatch
            | Refusal::PeerUnknown => CertificateError::ApplicationVerificationFailure,
            // Refused by the certificate resolver, before any certificate is looked at;
            // never reported through a verifier.
            Refusal::ClassicalKeyExchange => {
                return rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::NoKxGroupsInCommon,
                )
            }
        })
    }
}

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("ca certificate is not usable as a trust anchor: {0}")]
    BadCa(String),
    #[error("private key is not usable: {0}")]
    BadKey(String),
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("quic crypto configuration: {0}")]
    Quic(String),
}

/// The mesh trust material: CA anchors, the trust domain and the revocation list.
#[derive(Debug)]
pub struct Trust {
    pub trust_domain: TrustDomain,
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    revoked: HashSet<Serial>,
}

impl Trust {
    /// The deny list, sorted.
    pub fn revoked_serials(&self) -> Vec<Serial> {
        let mut v: Vec<Serial> = self.revoked.iter().cloned().collect();
        v.sort();
        v
    }
}

/// Shared, swappable trust material.
pub type TrustHandle = Arc<ArcSwap<Trust>>;

/// Called with every refusal, for counting.
pub type RefusalHook = Arc<dyn Fn(Refusal) + Send + Sync>;

/// SHA-256 of a DER certificate: how join tokens pin the CA.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// aws-lc-rs, with the key exchange groups `mode` allows (most preferred first), and
/// ring's cipher suites. The suites are what protects every tunnel packet: ring's AES-GCM
/// (VAES with AVX2) sealed a 1350-byte datagram 1.6-1.9x faster than aws-lc's on the
/// bench's AMD EPYC (no AVX-512; `quicmesh-bench micro`), and with aws-lc's suites the
/// overlay lost 6-8 % of its throughput and spent 6 % more CPU per GB. The key exchange
/// (X25519MLKEM768, which ring lacks), signatures and certificates stay aws-lc-rs.
fn provider(mode: KeyExchange) -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.kx_groups = kx::groups(mode);
    p.cipher_suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    Arc::new(p)
}

fn algs() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

fn anchors_from(
    ca_ders: &[Vec<u8>],
) -> Result<Vec<rustls::pki_types::TrustAnchor<'static>>, TlsError> {
    ca_ders
        .iter()
        .map(|der| {
            let der = CertificateDer::from(der.as_slice());
            webpki::anchor_from_trusted_cert(&der)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::BadCa(format!("{e:?}")))
        })
        .collect()
}

impl Trust {
    /// Builds trust material from CA certificates (DER) and revoked serials.
    pub fn new(
        trust_domain: TrustDomain,
        ca_ders: &[Vec<u8>],
        revoked: impl IntoIterator<Item = Serial>,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            trust_domain,
            anchors: anchors_from(ca_ders)?,
            revoked: revoked.into_iter().collect(),
        })
    }

    /// True when `serial` is on the revocation list.
    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.revoked.contains(serial)
    }

    /// Verifies a leaf against the mesh CA at `now` and reads its node identity.
    pub fn verify_node(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<PeerIdentity, Refusal> {
        verify_chain(&self.anchors, end_entity, intermediates, now, usage)?;
        let id = PeerIdentity::from_der(end_entity, &self.trust_domain)
            .map_err(|_| Refusal::NoIdentity)?;
        if self.revoked.contains(&id.serial) {
            return Err(Refusal::Revoked);
        }
        Ok(id)
    }
}

fn verify_chain(
    anchors: &[rustls::pki_types::TrustAnchor<'_>],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), Refusal> {
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|_| Refusal::BadCertificate)?;
    let algs = algs();
    ee.verify_for_usage(algs.all, anchors, intermediates, now, usage, None, None)
        .map(|_| ())
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => Refusal::Expired,
            webpki::Error::CertNotValidYet { .. } => Refusal::NotYetValid,
            // Not issued by (or not signed by the key of) a mesh CA: a foreign CA that
            // copies our CA's name lands here, not in UnknownIssuer.
            webpki::Error::UnknownIssuer
            | webpki::Error::InvalidSignatureForPublicKey
            | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
            | webpki::Error::UnsupportedSignatureAlgorithmContext(_) => Refusal::UnknownCa,
            _ => Refusal::BadCertificate,
        })
}

/// The handshake-signature half of a verifier: the same for both roles (the chain half is
/// ours, the signature half is rustls's with the ring provider's algorithms).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algs())
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algs())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algs().supported_schemes()
        }
    };
}

/// Verifies client certificates at a server (tunnel ingress, coordinator control port).
pub struct MeshClientVerifier {
    trust: TrustHandle,
    mandatory: bool,
    on_refuse: RefusalHook,
    expired_grace_secs: u64,
}

impl fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClientVerifier")
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

impl MeshClientVerifier {
    /// `mandatory = false` lets certificate-less clients in (enrollment on the coordinator).
    pub fn new(trust: TrustHandle, mandatory: bool, on_refuse: RefusalHook) -> Arc<Self> {
        Arc::new(Self {
            trust,
            mandatory,
            on_refuse,
            expired_grace_secs: 0,
        })
    }

    /// Also accepts certificates expired for at most `secs` (and otherwise valid and not
    /// revoked). The coordinator's control port uses it so a node whose certificate ran
    /// out during a coordinator outage can still renew it.
    pub fn with_expired_grace(
        trust: TrustHandle,
        mandatory: bool,
        on_refuse: RefusalHook,
        secs: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            trust,
            mandatory,
            on_refuse,
            expired_grace_secs: secs,
        })
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let trust = self.trust.load();
        let usage = webpki::KeyUsage::client_auth();
        let mut result = trust.verify_node(end_entity, intermediates, now, usage);
        if result == Err(Refusal::Expired) && self.expired_grace_secs > 0 {
            if let Ok(id) = PeerIdentity::from_der(end_entity, &trust.trust_domain) {
                let late = now.as_secs() as i64 - id.not_after;
                if late >= 0 && late as u64 <= self.expired_grace_secs {
                    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                        id.not_after.max(1) as u64 - 1,
                    ));
                    result = trust.verify_node(end_entity, intermediates, at, usage);
                }
            }
        }
        match result {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(r) => {
                (self.on_refuse)(r);
                Err(r.to_rustls())
            }
        }
    }
    handshake_signatures!();
}

/// What a client expects the server to be.
#[derive(Debug, Clone)]
pub enum ServerExpect {
    /// A mesh node whose name is the TLS server name.
    Node,
    /// The coordinator, verified against the mesh trust.
    Coordinator,
    /// The coordinator at first contact: its chain must end in a CA with this SHA-256
    /// fingerprint (from the join token).
    PinnedCoordinator([u8; 32]),
}

/// Verifies server certificates at a client (peer tunnels, control session).
pub struct MeshServerVerifier {
    trust: Option<TrustHandle>,
    expect: ServerExpect,
    on_refuse: RefusalHook,
}

impl fmt::Debug for MeshServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerVerifier")
            .field("expect", &self.expect)
            .finish()
    }
}

impl MeshServerVerifier {
    /// A verifier; `trust` may be `None` only with [`ServerExpect::PinnedCoordinator`].
    pub fn new(
        trust: Option<TrustHandle>,
        expect: ServerExpect,
        on_refuse: RefusalHook,
    ) -> Arc<Self> {
        Arc::new(Self {
            trust,
            expect,
            on_refuse,
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<(), Refusal> {
        let usage = webpki::KeyUsage::server_auth();
        match &self.expect {
            ServerExpect::PinnedCoordinator(pin) => {
                let ca = intermediates
                    .iter()
                    .find(|c| fingerprint(c) == *pin)
                    .ok_or(Refusal::UnknownCa)?;
                let anchors = anchors_from(&[ca.to_vec()]).map_err(|_| Refusal::UnknownCa)?;
                verify_chain(&anchors, end_entity, &[], now, usage)?;
                let ids = spiffe_ids(end_entity).map_err(|_| Refusal::BadCertificate)?;
                if !ids.iter().any(|i| matches!(i, SpiffeId::Coordinator(_))) {
                    return Err(Refusal::WrongPeer);
                }
                Ok(())
            }
            ServerExpect::Coordinator => {
                let trust = self.trust.as_ref().ok_or(Refusal::UnknownCa)?.load();
                verify_chain(&trust.anchors, end_entity, intermediates, now, usage)?;
                let ids = spiffe_ids(end_entity).map_err(|_| Refusal::BadCertificate)?;
                if !ids.contains(&SpiffeId::Coordinator(trust.trust_domain.clone())) {
                    return Err(Refusal::WrongPeer);
                }
                Ok(())
            }
            ServerExpect::Node => {
                let trust = self.trust.as_ref().ok_or(Refusal::UnknownCa)?.load();
                let id = trust.verify_node(end_entity, intermediates, now, usage)?;
                let expected = match server_name {
                    ServerName::DnsName(n) => {
                        NodeName::new(n.as_ref()).map_err(|_| Refusal::WrongPeer)?
                    }
                    _ => return Err(Refusal::WrongPeer),
                };
                if id.node != expected {
                    return Err(Refusal::WrongPeer);
                }
                Ok(())
            }
        }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, server_name, now) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(r) => {
                (self.on_refuse)(r);
                Err(r.to_rustls())
            }
        }
    }
    handshake_signatures!();
}

/// The local certificate, swappable on renewal. Serves both TLS roles.
#[derive(Debug, Default)]
pub struct CertSlot(ArcSwap<Option<Arc<CertifiedKey>>>);

impl CertSlot {
    /// A slot holding `key` with `chain` (leaf first).
    pub fn with(chain: Vec<Vec<u8>>, key_der: &[u8]) -> Result<Arc<Self>, TlsError> {
        let slot = Arc::new(Self::default());
        slot.set(chain, key_der)?;
        Ok(slot)
    }
    /// Replaces the certificate; the next handshake uses it.
    pub fn set(&self, chain: Vec<Vec<u8>>, key_der: &[u8]) -> Result<(), TlsError> {
        let key = PrivateKeyDer::try_from(key_der.to_vec())
            .map_err(|e| TlsError::BadKey(e.to_string()))?;
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(|e| TlsError::BadKey(e.to_string()))?;
        let chain = chain.into_iter().map(CertificateDer::from).collect();
        self.0
            .store(Arc::new(Some(Arc::new(CertifiedKey::new(chain, signer)))));
        Ok(())
    }
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().clone()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// Streams (flows) a peer may have open at once on a new tunnel. quinn allocates the state
/// of every allowed stream when the connection is made, on both ends and inside the
/// handshake: 4,096 took 0.2-0.4 ms of each first flow (hash tables grown through a dozen
/// rehashes, fresh pages faulted in) and about 270 KiB per idle tunnel.
pub const STREAMS_INITIAL: u32 = 256;
/// The most streams a peer may have open at once on one tunnel: the limit grows to it as
/// the streams are used ([`stream_limit`]).
pub const STREAMS_MAX: u32 = 4096;

/// A tunnel's stream limit once `open` of the peer's streams are open under `limit`:
/// doubled when three quarters are in use (the peer hears of it within a round trip, so
/// a steady climb never waits), never over [`STREAMS_MAX`].
pub fn stream_limit(limit: u32, open: usize) -> u32 {
    if (open as u64).saturating_mul(4) >= u64::from(limit) * 3 {
        limit.saturating_mul(2).min(STREAMS_MAX).max(limit)
    } else {
        limit
    }
}

/// QUIC transport settings of tunnels.
pub fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(base_transport(STREAMS_INITIAL))
}

/// Transport for control connections: one stream each way is all a session uses, and
/// stream state is allocated per allowed stream, so a coordinator with thousands of
/// sessions allows few.
pub fn control_transport() -> Arc<quinn::TransportConfig> {
    let mut t = base_transport(4);
    // The nodes keep their sessions alive (and their NAT mappings open); the coordinator
    // sends nothing of its own to an idle session: thousands of sessions, no timers.
    t.keep_alive_interval(None);
    Arc::new(t)
}

/// How often a node's idle control session sends a packet. A coordinator restarted on
/// the same address answers it with a stateless reset, so the node notices the restart
/// within this interval (plus a round trip) and reconnects.
pub const CONTROL_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a node's control session lasts without hearing from its coordinator (which
/// acknowledges every keepalive): a replica that died is left this soon, so the node moves
/// to another one within about this time.
pub const CONTROL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// Transport for a node's control session (see [`CONTROL_KEEPALIVE`] and
/// [`CONTROL_IDLE_TIMEOUT`]; the lower idle timeout of the two ends is the one in force).
pub fn control_client_transport() -> Arc<quinn::TransportConfig> {
    let mut t = base_transport(4);
    t.keep_alive_interval(Some(CONTROL_KEEPALIVE));
    t.max_idle_timeout(Some(
        CONTROL_IDLE_TIMEOUT
            .try_into()
            .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(4_000))),
    ));
    Arc::new(t)
}

pub use crate::config::DEFAULT_KEEPALIVE;

static KEEPALIVE: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// Sets the keepalive interval of every connection this process makes or accepts (once,
/// at startup, from the node config).
pub fn set_keepalive(d: std::time::Duration) {
    let _ = KEEPALIVE.set(d);
}

/// The keepalive interval in force.
pub fn keepalive() -> std::time::Duration {
    *KEEPALIVE.get().unwrap_or(&DEFAULT_KEEPALIVE)
}

fn base_transport(streams: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(*KEEPALIVE.get().unwrap_or(&DEFAULT_KEEPALIVE)));
    t.max_idle_timeout(Some(
        std::time::Duration::from_secs(20)
            .try_into()
            .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(20_000))),
    ));
    // Start at the size a 1500-byte path carries, so overlay datagrams fit from the
    // first packet on; quinn falls back to 1200 (and probes upward) where a path is
    // smaller.
    t.initial_mtu(1452);
    // Overlay datagrams queue here between the TUN and the congestion window: a few 64 KB
    // TUN reads each way (8/4 MiB measured no faster on 2 vCPUs, and 30 MB more RSS).
    t.datagram_receive_buffer_size(Some(2 * 1024 * 1024));
    t.datagram_send_buffer_size(1024 * 1024);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(streams));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// A QUIC server config: our certificate, client certificates verified by `verifier`,
/// key exchange as `mode` allows (a classical client of a hybrid-only server is refused
/// and reported to the verifier's refusal hook).
pub fn server_config(
    cert: Arc<CertSlot>,
    verifier: Arc<MeshClientVerifier>,
    alpn: &[u8],
    mode: KeyExchange,
) -> Result<quinn::ServerConfig, TlsError> {
    let on_refuse = verifier.on_refuse.clone();
    let builder = rustls::ServerConfig::builder_with_provider(provider(mode))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier);
    let mut tls = match mode {
        KeyExchange::HybridOnly => builder.with_cert_resolver(Arc::new(kx::HybridOnly {
            slot: cert,
            on_refuse,
        })),
        _ => builder.with_cert_resolver(cert),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    // No session resumption: a resumed handshake skips the client certificate check, so a
    // revoked peer could come back on an old ticket. Every handshake verifies the chain,
    // expiry and the deny list.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(kx::ServerConfig(Arc::new(quic))));
    cfg.transport_config(transport());
    // A tunnel keeps the address it came up on; the path layer (authenticated probes)
    // decides where its datagrams really go, so QUIC must not move it on its own.
    cfg.migration(false);
    Ok(cfg)
}

/// The rustls half of [`client_config`], as rustls builds it (session resumption on).
pub fn rustls_client_config(
    cert: Option<Arc<CertSlot>>,
    verifier: Arc<MeshServerVerifier>,
    alpn: &[u8],
    mode: KeyExchange,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider(mode))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match cert {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A QUIC client config: `verifier` checks the server, `cert` (if any) is presented, the
/// key exchange groups are those `mode` allows (the hybrid, X25519MLKEM768, offered first
/// with an X25519 share beside it, so a classical server answers without a retry).
pub fn client_config(
    cert: Option<Arc<CertSlot>>,
    verifier: Arc<MeshServerVerifier>,
    alpn: &[u8],
    mode: KeyExchange,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls_client_config(cert, verifier, alpn, mode)?;
    // No resumption: a resumed handshake skips the server certificate check (see
    // `server_config`).
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(kx::ClientConfig(Arc::new(quic))));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// Reads the verified peer certificate chain of an established connection.
pub fn peer_leaf(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_limit_doubles_at_three_quarters_in_use_up_to_the_most() {
        assert_eq!(stream_limit(STREAMS_INITIAL, 0), STREAMS_INITIAL);
        assert_eq!(stream_limit(256, 191), 256, "under three quarters: kept");
        assert_eq!(stream_limit(256, 192), 512, "three quarters: doubled");
        assert_eq!(stream_limit(2048, 1536), STREAMS_MAX);
        assert_eq!(
            stream_limit(STREAMS_MAX, 4096),
            STREAMS_MAX,
            "never over the most"
        );
        assert_eq!(stream_limit(STREAMS_MAX, usize::MAX), STREAMS_MAX);
    }
}
