//! Key exchange: which groups a handshake may use (`[tls] key_exchange`), and which one
//! each QUIC connection really negotiated, read from the handshake itself.
//!
//! Neither quinn nor rustls hands the negotiated group of a QUIC connection to the
//! application, so the provider's groups are wrapped: whichever one completes a key
//! exchange writes its name to a thread-local cell, and a wrapper around quinn's rustls
//! session reads that cell around each call that can run the key exchange (rustls runs it
//! synchronously inside `start_session` and `read_handshake`, on the calling thread). The
//! name then comes back from `quinn::Connection::handshake_data` as a [`Handshake`].

use std::any::Any;
use std::cell::Cell;
use std::sync::Arc;

use quinn::crypto::{self, rustls::HandshakeData};
use quinn::{ConnectError, ConnectionId};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::TransportError;
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{NamedGroup, ProtocolVersion};

pub use crate::config::KeyExchange;

use super::{CertSlot, Refusal, RefusalHook};

thread_local! {
    /// The group the key exchange that just completed on this thread used.
    static COMPLETED: Cell<Option<NamedGroup>> = const { Cell::new(None) };
}

fn record(g: NamedGroup) {
    COMPLETED.with(|c| c.set(Some(g)));
}

/// A provider's group that records its completions (see the module doc).
#[derive(Debug)]
struct Recorded(&'static dyn SupportedKxGroup);

static HYBRID: Recorded = Recorded(kx_group::X25519MLKEM768);
static X25519: Recorded = Recorded(kx_group::X25519);
static SECP256R1: Recorded = Recorded(kx_group::SECP256R1);
static SECP384R1: Recorded = Recorded(kx_group::SECP384R1);

impl SupportedKxGroup for Recorded {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(RecordedActive(self.0.start()?)))
    }
    fn start_and_complete(&self, peer: &[u8]) -> Result<CompletedKeyExchange, rustls::Error> {
        let done = self.0.start_and_complete(peer)?;
        record(done.group);
        Ok(done)
    }
    fn name(&self) -> NamedGroup {
        self.0.name()
    }
    fn fips(&self) -> bool {
        self.0.fips()
    }
    fn usable_for_version(&self, v: ProtocolVersion) -> bool {
        self.0.usable_for_version(v)
    }
}

struct RecordedActive(Box<dyn ActiveKeyExchange>);

impl ActiveKeyExchange for RecordedActive {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let g = self.0.group();
        let s = self.0.complete(peer)?;
        record(g);
        Ok(s)
    }
    // The hybrid's X25519 half, offered beside it so a classical server needs no retry.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        self.0.hybrid_component()
    }
    fn complete_hybrid_component(
        self: Box<Self>,
        peer: &[u8],
    ) -> Result<SharedSecret, rustls::Error> {
        let g = self.0.hybrid_component().map(|(g, _)| g);
        let s = self.0.complete_hybrid_component(peer)?;
        if let Some(g) = g {
            record(g);
        }
        Ok(s)
    }
    fn pub_key(&self) -> &[u8] {
        self.0.pub_key()
    }
    fn group(&self) -> NamedGroup {
        self.0.group()
    }
}

/// The groups a mode offers and accepts, most preferred first.
pub(super) fn groups(mode: KeyExchange) -> Vec<&'static dyn SupportedKxGroup> {
    match mode {
        KeyExchange::Hybrid => vec![&HYBRID, &X25519, &SECP256R1, &SECP384R1],
        KeyExchange::HybridOnly => vec![&HYBRID],
        // What a node from before the hybrid offered (ring's groups).
        KeyExchange::Classical => vec![&X25519, &SECP256R1, &SECP384R1],
    }
}

/// The names [`group_name`] gives the groups any mode offers.
pub const GROUP_NAMES: [&str; 4] = ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"];

/// A group's name as status, the dashboard and metric labels show it.
pub fn group_name(g: NamedGroup) -> &'static str {
    match g {
        NamedGroup::X25519MLKEM768 => "X25519MLKEM768",
        NamedGroup::X25519 => "X25519",
        NamedGroup::secp256r1 => "secp256r1",
        NamedGroup::secp384r1 => "secp384r1",
        _ => "other",
    }
}

/// What a finished handshake negotiated: `quinn::Connection::handshake_data` of every
/// connection made with this module's configs downcasts to it.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// The key exchange group, as the handshake completed it.
    pub group: Option<NamedGroup>,
    pub alpn: Option<Vec<u8>>,
    pub server_name: Option<String>,
}

/// The name of `conn`'s negotiated group ([`group_name`]), once its handshake has got
/// that far.
pub fn negotiated(conn: &quinn::Connection) -> Option<&'static str> {
    conn.handshake_data()?
        .downcast::<Handshake>()
        .ok()?
        .group
        .map(group_name)
}

/// Runs `f`, returning what it returned and the group a key exchange inside it completed.
fn watched<T>(f: impl FnOnce() -> T) -> (T, Option<NamedGroup>) {
    COMPLETED.with(|c| c.set(None));
    let out = f();
    (out, COMPLETED.with(|c| c.take()))
}

/// quinn's rustls session, with the group its key exchange completed.
struct Session {
    inner: Box<dyn crypto::Session>,
    group: Option<NamedGroup>,
}

impl Session {
    fn new((inner, group): (Box<dyn crypto::Session>, Option<NamedGroup>)) -> Box<Self> {
        Box::new(Self { inner, group })
    }
}

impl crypto::Session for Session {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: quinn::Side) -> crypto::Keys {
        self.inner.initial_keys(dst_cid, side)
    }
    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        let inner = self.inner.handshake_data()?;
        let (alpn, server_name) = match inner.downcast::<HandshakeData>() {
            Ok(d) => (d.protocol, d.server_name),
            Err(_) => (None, None),
        };
        Some(Box::new(Handshake {
            group: self.group,
            alpn,
            server_name,
        }))
    }
    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_identity()
    }
    fn early_crypto(&self) -> Option<(Box<dyn crypto::HeaderKey>, Box<dyn crypto::PacketKey>)> {
        self.inner.early_crypto()
    }
    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }
    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }
    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let (r, g) = watched(|| self.inner.read_handshake(buf));
        if g.is_some() {
            self.group = g;
        }
        r
    }
    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        self.inner.transport_parameters()
    }
    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<crypto::Keys> {
        self.inner.write_handshake(buf)
    }
    fn next_1rtt_keys(&mut self) -> Option<crypto::KeyPair<Box<dyn crypto::PacketKey>>> {
        self.inner.next_1rtt_keys()
    }
    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }
    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), crypto::ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}

/// quinn's rustls server config, making [`Session`]s.
pub(super) struct ServerConfig(pub(super) Arc<quinn::crypto::rustls::QuicServerConfig>);

impl crypto::ServerConfig for ServerConfig {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<crypto::Keys, crypto::UnsupportedVersion> {
        self.0.initial_keys(version, dst_cid)
    }
    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.0.retry_tag(version, orig_dst_cid, packet)
    }
    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        let inner = self.0.clone();
        Session::new(watched(|| inner.start_session(version, params)))
    }
}

/// quinn's rustls client config, making [`Session`]s.
pub(super) struct ClientConfig(pub(super) Arc<quinn::crypto::rustls::QuicClientConfig>);

impl crypto::ClientConfig for ClientConfig {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &TransportParameters,
    ) -> Result<Box<dyn crypto::Session>, ConnectError> {
        let inner = self.0.clone();
        let (s, g) = watched(|| inner.start_session(version, server_name, params));
        Ok(Session::new((s?, g)))
    }
}

/// A hybrid-only server's certificate: given only to a client that offers the hybrid
/// group, so a classical handshake is refused (and counted) before any key is exchanged.
pub(super) struct HybridOnly {
    pub(super) slot: Arc<CertSlot>,
    pub(super) on_refuse: RefusalHook,
}

impl std::fmt::Debug for HybridOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridOnly").finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for HybridOnly {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let offered = hello
            .named_groups()
            .is_some_and(|g| g.contains(&NamedGroup::X25519MLKEM768));
        if !offered {
            (self.on_refuse)(Refusal::ClassicalKeyExchange);
            return None;
        }
        rustls::server::ResolvesServerCert::resolve(&*self.slot, hello)
    }
}
