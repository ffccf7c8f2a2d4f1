//! The node config file (`node.toml`), parsed and checked before anything binds.
//!
//! Every error names the key and the reason; `quicmesh-node` exits 64 on one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quicmesh_protocol::ident::{LabelKey, Labels, NodeName, ServiceName};
use quicmesh_protocol::packet::PortSpec;
use quicmesh_protocol::routing::Locality;
use serde::Deserialize;

mod http;
pub use http::{HttpUpstream, RateLimit};

/// A config error: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config {file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

/// `[telemetry]`: where spans go, how many traces to start, the access log.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector (`http://host:4318`); spans are made only when set.
    pub otlp_endpoint: Option<hyper::Uri>,
    /// Share of requests without a sampled `traceparent` that start a trace (0 to 1).
    pub sample_rate: f64,
    /// One log line per HTTP request (target `quicmesh::access`).
    pub access_log: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_rate: 1.0,
            access_log: false,
        }
    }
}

/// A local service offered to the mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: ServiceName,
    /// Where the node connects when an L4 flow for this service is accepted; `None` for a
    /// service reached only through the overlay.
    pub address: Option<SocketAddr>,
    /// What the service accepts through the overlay (`tcp/5432`, `udp/53`, `icmp`).
    pub ports: Vec<PortSpec>,
    /// The health check; a service without one is routable while its node is online.
    pub check: Option<CheckConfig>,
    /// What the service speaks: `tcp` (opaque bytes, the default) or `http` (HTTP/1.1 and
    /// HTTP/2: every request is judged by policy, normalised and forwarded).
    pub protocol: Protocol,
    /// Requests per second per source service (`http` services only).
    pub rate_limits: Vec<RateLimit>,
}

/// What a service or an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque bytes: L4, untouched.
    #[default]
    Tcp,
    /// HTTP/1.1 or HTTP/2 (gRPC included), told apart by the first bytes.
    Http,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(v: &str) -> Result<Self, String> {
        match v {
            "tcp" => Ok(Self::Tcp),
            "http" => Ok(Self::Http),
            _ => Err(format!("{v:?} is not a protocol: use \"tcp\" or \"http\"")),
        }
    }
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Passes when a TCP connection opens.
    Tcp(SocketAddr),
    /// Passes when `GET path` answers `status` (any 2xx when `None`).
    Http {
        addr: SocketAddr,
        path: String,
        status: Option<u16>,
    },
    /// Passes when the command exits 0 (run directly, no shell).
    Command(Vec<String>),
}

/// `[[service]] check = { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passes in a row that bring a critical service back.
    pub rise: u32,
    /// Failures in a row that make a passing service critical.
    pub fall: u32,
}

/// `[dns]`: the node's DNS server for mesh names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Loopback address the server listens on (UDP and TCP).
    pub listen: SocketAddr,
    /// Resolver that names outside the mesh are forwarded to; refused when `None`.
    pub forward: Option<SocketAddr>,
    /// TTL of mesh answers.
    pub ttl: Duration,
}

/// Default DNS listen address (Consul's port, on loopback).
pub const DEFAULT_DNS_LISTEN: &str = "127.0.0.1:8600";

/// Default interval of QUIC keepalives on tunnels and the control session: well below the
/// 30 s UDP timeout common NATs and cloud firewalls apply, so idle tunnels keep their
/// mappings.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);

/// `[overlay]`: a TUN device carrying IP packets to peers' overlay addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    /// The TUN device's name.
    pub device: String,
    /// The TUN device's MTU: the largest inner packet. Packets that do not fit the path
    /// to a peer are answered with ICMP "too big".
    pub mtu: u16,
    /// Most flows the overlay firewall tracks, and most any one peer may open.
    pub max_flows: usize,
    pub max_flows_per_peer: usize,
}

/// `[gateway.wireguard]`: serve stock WireGuard clients (needs `[overlay]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgGatewayConfig {
    /// The UDP address clients reach the gateway at (`0.0.0.0:51820`).
    pub listen: SocketAddr,
}

/// Default TUN device name.
pub const DEFAULT_OVERLAY_DEVICE: &str = "quicmesh0";
/// Default overlay MTU: fits a QUIC datagram on a 1500-byte underlay, IPv4 or IPv6.
pub const DEFAULT_OVERLAY_MTU: u16 = 1400;
/// Default bound on the overlay firewall's flow table (about 6 MB at most).
pub const DEFAULT_OVERLAY_MAX_FLOWS: usize = 65_536;
/// Default bound on the flows any one peer may open to this node through the overlay.
pub const DEFAULT_OVERLAY_MAX_FLOWS_PER_PEER: usize = 4_096;

/// A mesh service consumed by local apps through a local listener.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub service: ServiceName,
    pub bind: SocketAddr,
    /// The local service this traffic speaks for (must be one of this node's services).
    pub source: ServiceName,
    /// How instances are chosen by locality.
    pub locality: Locality,
    /// `expose = true`: the user chose a non-loopback `bind`, so other hosts reach the
    /// mesh service through this node (with this node's identity).
    pub expose: bool,
    /// `http`: the listener speaks HTTP, and every request rides its own tunnel stream to
    /// an instance chosen per request; `tcp`: one stream per client connection.
    pub protocol: Protocol,
    /// Routes, retries, timeouts, ejection (`http` upstreams).
    pub http: HttpUpstream,
}

/// Most coordinator addresses a node may list.
pub const MAX_COORDINATORS: usize = 16;

/// One coordinator address as configured: an IP address, or a DNS name resolved at every
/// connection attempt (a name may resolve to several replicas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::fmt::Display for CoordinatorAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(a) => write!(f, "{a}"),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl std::str::FromStr for CoordinatorAddr {
    type Err = String;
    fn from_str(v: &str) -> Result<Self, String> {
        if let Ok(a) = v.parse::<SocketAddr>() {
            return Ok(Self::Ip(a));
        }
        let bad = || format!("{v:?} is not an ip:port or host:port address");
        let (host, port) = v.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if port == 0 || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(Self::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// The coordinator replicas a node may talk to: never empty, no duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinators(Vec<CoordinatorAddr>);

impl Coordinators {
    /// Checks a configured list (`coordinator = "a:7700"` or `["a:7700", "b:7700"]`).
    pub fn parse(list: Vec<String>) -> Result<Self, String> {
        if list.is_empty() {
            return Err("lists no address".into());
        }
        if list.len() > MAX_COORDINATORS {
            return Err(format!(
                "lists {} addresses (at most {MAX_COORDINATORS})",
                list.len()
            ));
        }
        let mut out: Vec<CoordinatorAddr> = Vec::with_capacity(list.len());
        for v in &list {
            let a: CoordinatorAddr = v.parse()?;
            if out.contains(&a) {
                return Err(format!("{v:?} is listed twice"));
            }
            out.push(a);
        }
        Ok(Self(out))
    }

    /// One IP address (tests and tools).
    pub fn one(addr: SocketAddr) -> Self {
        Self(vec![CoordinatorAddr::Ip(addr)])
    }

    pub fn addrs(&self) -> &[CoordinatorAddr] {
        &self.0
    }
}

impl std::fmt::Display for Coordinators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

/// A value that is one string or a list of strings.
fn one_or_many(v: toml::Value) -> Result<Vec<String>, String> {
    let not = || "must be an address or a list of addresses".to_string();
    match v {
        toml::Value::String(s) => Ok(vec![s]),
        toml::Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                toml::Value::String(s) => Ok(s),
                _ => Err(not()),
            })
            .collect(),
        _ => Err(not()),
    }
}

/// `[tls] key_exchange`: which key exchanges the node's handshakes (tunnels and the
/// control session) may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyExchange {
    /// X25519MLKEM768 (post-quantum hybrid) preferred; classical X25519 only with a peer
    /// that cannot do the hybrid (a node from before it, during an upgrade).
    #[default]
    Hybrid,
    /// X25519MLKEM768 only: a classical handshake is refused, with the reason counted.
    HybridOnly,
    /// Classical groups only (X25519, P-256, P-384), as before the hybrid.
    Classical,
}

impl KeyExchange {
    pub const ALL: [KeyExchange; 3] = [Self::Hybrid, Self::HybridOnly, Self::Classical];

    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hybrid => "hybrid",
            Self::HybridOnly => "hybrid-only",
            Self::Classical => "classical",
        }
    }
}

impl std::str::FromStr for KeyExchange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not one of \"hybrid\", \"hybrid-only\", \"classical\"")
            })
    }
}

/// The checked node config.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: NodeName,
    /// The coordinator replicas' control addresses (at least one), in the config's order.
    pub coordinator: Coordinators,
    pub join_token: Option<String>,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub labels: Labels,
    pub services: Vec<ServiceConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    /// Overlay mode, when `[overlay] enabled = true`.
    pub overlay: Option<OverlayConfig>,
    /// A WireGuard gateway, when `[gateway.wireguard]` is set.
    pub wireguard: Option<WgGatewayConfig>,
    /// DNS server, when `[dns] enabled = true`.
    pub dns: Option<DnsConfig>,
    /// Spans and the access log of HTTP requests (`[telemetry]`).
    pub telemetry: TelemetryConfig,
    /// Prometheus metrics listener (loopback only); `None` turns metrics off.
    pub metrics: Option<SocketAddr>,
    /// Also check policy at the sending side, to fail fast (ingress always checks).
    pub check_egress: bool,
    /// A proxied flow with no bytes either way for this long is closed.
    pub flow_idle_timeout: Duration,
    /// How often the node reports status to the coordinator.
    pub status_interval: Duration,
    /// QUIC keepalive interval on tunnels and the control session (holds NAT mappings).
    pub keepalive: Duration,
    /// Relay for other nodes: forward opaque tunnel datagrams between nodes that cannot
    /// reach each other directly (the node needs an address every node can reach).
    pub relay: bool,
    /// Runtime threads: `None` = automatic (half the cores, at least one); `Some(1)` runs
    /// everything on one thread (fewer cross-thread wake-ups: lower latency on small
    /// hosts).
    pub worker_threads: Option<usize>,
    /// Key exchange on tunnels and the control session (`[tls] key_exchange`).
    pub key_exchange: KeyExchange,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<String>,
    /// One address or a list of them.
    coordinator: Option<toml::Value>,
    join_token: Option<String>,
    join_token_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    advertise: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    metrics: Option<String>,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    overlay: Option<RawOverlay>,
    gateway: Option<RawGateway>,
    dns: Option<RawDns>,
    telemetry: Option<RawTelemetry>,
    policy: Option<RawPolicy>,
    flow_idle_timeout: Option<String>,
    status_interval: Option<String>,
    keepalive: Option<String>,
    #[serde(default)]
    relay: bool,
    worker_threads: Option<i64>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    key_exchange: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    address: Option<String>,
    ports: Option<Vec<String>>,
    check: Option<RawCheck>,
    protocol: Option<String>,
    rate_limit: Option<BTreeMap<String, f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    tcp: Option<String>,
    http: Option<String>,
    command: Option<Vec<String>>,
    status: Option<i64>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<String>,
    sample_rate: Option<f64>,
    access_log: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    enabled: Option<bool>,
    listen: Option<String>,
    forward: Option<String>,
    ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    service: Option<String>,
    bind: Option<String>,
    source: Option<String>,
    locality: Option<String>,
    expose: Option<bool>,
    protocol: Option<String>,
    #[serde(default)]
    route: Vec<http::RawRoute>,
    retry_budget: Option<f64>,
    ejection: Option<http::RawEjection>,
    timeout: Option<String>,
    per_try_timeout: Option<String>,
    retries: Option<i64>,
    retry_on: Option<Vec<i64>>,
    retry_grpc: Option<Vec<toml::Value>>,
    fault: Option<http::RawFault>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverlay {
    enabled: Option<bool>,
    device: Option<String>,
    mtu: Option<i64>,
    max_flows: Option<i64>,
    max_flows_per_peer: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    wireguard: Option<RawWireGuard>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWireGuard {
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    check_egress: Option<bool>,
}

/// Default UDP port of the tunnel endpoint.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7800";

/// Parses an optional duration key, with its default.
type DurationKey<'a> = &'a dyn Fn(&str, Option<String>, Duration) -> Result<Duration, ConfigError>;

/// Checks `[[service]] check = { ... }`: exactly one of tcp, http, command.
fn parse_check(
    c: RawCheck,
    key: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
    dur: DurationKey,
) -> Result<CheckConfig, ConfigError> {
    let k = |f: &str| format!("{key}.{f}");
    let kind = match (c.tcp, c.http, c.command) {
        (Some(t), None, None) => CheckKind::Tcp(
            t.parse()
                .map_err(|_| err(&k("tcp"), format!("{t:?} is not an ip:port address")))?,
        ),
        (None, Some(h), None) => {
            let bad = || {
                err(
                    &k("http"),
                    format!("{h:?} is not an http://ip:port/path URL"),
                )
            };
            let rest = h.strip_prefix("http://").ok_or_else(bad)?;
            let (hostport, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let addr: SocketAddr = hostport.parse().map_err(|_| bad())?;
            if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad());
            }
            let status = match c.status {
                None => None,
                Some(s) if (100..=599).contains(&s) => Some(s as u16),
                Some(s) => {
                    return Err(err(&k("status"), format!("{s} is not an HTTP status")));
                }
            };
            CheckKind::Http {
                addr,
                path: path.to_string(),
                status,
            }
        }
        (None, None, Some(cmd)) => {
            if cmd.is_empty() || cmd[0].is_empty() {
                return Err(err(&k("command"), "needs at least the program".into()));
            }
            CheckKind::Command(cmd)
        }
        (None, None, None) => {
            return Err(err(key, "needs one of tcp, http or command".into()));
        }
        _ => {
            return Err(err(key, "set only one of tcp, http or command".into()));
        }
    };
    let interval = dur(&k("interval"), c.interval, Duration::from_secs(5))?;
    if interval < Duration::from_millis(100) {
        return Err(err(&k("interval"), "must be at least 100ms".into()));
    }
    let timeout = dur(
        &k("timeout"),
        c.timeout,
        interval.min(Duration::from_secs(2)),
    )?;
    if timeout.is_zero() || timeout > interval {
        return Err(err(
            &k("timeout"),
            "must be more than 0 and at most the interval".into(),
        ));
    }
    let count = |f: &str, v: Option<i64>, default: u32| match v {
        None => Ok(default),
        Some(n) if (1..=100).contains(&n) => Ok(n as u32),
        Some(n) => Err(err(&k(f), format!("{n} is not between 1 and 100"))),
    };
    Ok(CheckConfig {
        kind,
        interval,
        timeout,
        rise: count("rise", c.rise, 2)?,
        fall: count("fall", c.fall, 3)?,
    })
}

impl NodeConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &file, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and checks config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: file.to_string(),
            key: key.to_string(),
            reason,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            // toml names unknown keys in its message: surface them as the key.
            let key = msg
                .split('`')
                .nth(1)
                .filter(|_| msg.starts_with("unknown field"))
                .unwrap_or("(syntax)")
                .to_string();
            err(&key, msg)
        })?;
        let req = |key: &str, v: Option<String>| v.ok_or_else(|| err(key, "missing".into()));
        let addr = |key: &str, v: &str| -> Result<SocketAddr, ConfigError> {
            v.parse()
                .map_err(|_| err(key, format!("{v:?} is not an ip:port address")))
        };
        let dur =
            |key: &str, v: Option<String>, default: Duration| -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(s) => humantime::parse_duration(&s)
                        .map_err(|e| err(key, format!("{s:?} is not a duration: {e}"))),
                }
            };
        let name = NodeName::new(req("name", raw.name)?).map_err(|e| err("name", e.to_string()))?;
        let coordinator = Coordinators::parse(
            one_or_many(
                raw.coordinator
                    .ok_or_else(|| err("coordinator", "missing".into()))?,
            )
            .map_err(|e| err("coordinator", e))?,
        )
        .map_err(|e| err("coordinator", e))?;
        let join_token = match (raw.join_token, raw.join_token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "join_token_file",
                    "set either join_token or join_token_file, not both".into(),
                ))
            }
            (Some(t), None) => Some(t.trim().to_string()),
            (None, Some(p)) => {
                let p = base.join(p);
                Some(
                    std::fs::read_to_string(&p)
                        .map_err(|e| err("join_token_file", format!("{}: {e}", p.display())))?
                        .trim()
                        .to_string(),
                )
            }
            (None, None) => None,
        };
        let data_dir = base.join(
            raw.data_dir
                .ok_or_else(|| err("data_dir", "missing".into()))?,
        );
        let listen = addr("listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
        let advertise = raw.advertise.map(|a| addr("advertise", &a)).transpose()?;
        if advertise.is_some_and(|a| a.ip().is_unspecified() || a.port() == 0) {
            return Err(err("advertise", "must be a concrete ip and port".into()));
        }
        let mut labels = BTreeMap::new();
        for (k, v) in raw.labels {
            let key = LabelKey::new(&k).map_err(|e| err(&format!("labels.{k}"), e.to_string()))?;
            labels.insert(key, v);
        }
        let labels = Labels::new(labels).map_err(|e| err("labels", e.to_string()))?;
        let mut services: Vec<ServiceConfig> = Vec::new();
        for (i, s) in raw.service.into_iter().enumerate() {
            let k = |f: &str| format!("service[{i}].{f}");
            let name = ServiceName::new(req(&k("name"), s.name)?)
                .map_err(|e| err(&k("name"), e.to_string()))?;
            if services.iter().any(|o| o.name == name) {
                return Err(err(&k("name"), format!("service {name} is listed twice")));
            }
            let address = s.address.map(|a| addr(&k("address"), &a)).transpose()?;
            let mut ports = Vec::new();
            for (j, p) in s.ports.unwrap_or_default().iter().enumerate() {
                ports.push(
                    p.parse::<PortSpec>()
                        .map_err(|e| err(&format!("service[{i}].ports[{j}]"), e.to_string()))?,
                );
            }
            if address.is_none() && ports.is_empty() {
                return Err(err(
                    &k("address"),
                    "missing: a service needs an address (L4) or ports (overlay)".into(),
                ));
            }
            let check = s
                .check
                .map(|c| parse_check(c, &k("check"), &err, &dur))
                .transpose()?;
            let protocol = match s.protocol {
                None => Protocol::default(),
                Some(p) => p.parse().map_err(|e| err(&k("protocol"), e))?,
            };
            let rate_limits = match s.rate_limit {
                None => Vec::new(),
                Some(_) if protocol != Protocol::Http => {
                    return Err(err(
                        &k("rate_limit"),
                        "needs protocol = \"http\" (requests are what is limited)".into(),
                    ))
                }
                Some(r) => http::rate_limits(r, &k("rate_limit"), &err)?,
            };
            if protocol == Protocol::Http && address.is_none() {
                return Err(err(
                    &k("protocol"),
                    "\"http\" needs an address: requests are forwarded to it".into(),
                ));
            }
            services.push(ServiceConfig {
                name,
                address,
                ports,
                check,
                protocol,
                rate_limits,
            });
        }
        let mut upstreams: Vec<UpstreamConfig> = Vec::new();
        for (i, u) in raw.upstream.into_iter().enumerate() {
            let k = |f: &str| format!("upstream[{i}].{f}");
            let service = ServiceName::new(req(&k("service"), u.service)?)
                .map_err(|e| err(&k("service"), e.to_string()))?;
            let bind = addr(&k("bind"), &req(&k("bind"), u.bind)?)?;
            let expose = u.expose.unwrap_or(false);
            if !bind.ip().is_loopback() && !expose {
                return Err(err(
                    &k("bind"),
                    format!(
                        "{bind} is not a loopback address: anyone who reaches it would use the mesh as this node; set expose = true on this [[upstream]] if that is meant"
                    ),
                ));
            }
            if bind.port() != 0 && upstreams.iter().any(|o| o.bind == bind) {
                return Err(err(
                    &k("bind"),
                    format!("{bind} is used by another upstream"),
                ));
            }
            let source = match u.source {
                Some(s) => {
                    let s = ServiceName::new(s).map_err(|e| err(&k("source"), e.to_string()))?;
                    if !services.iter().any(|x| x.name == s) {
                        return Err(err(
                            &k("source"),
                            format!("{s} is not one of this node's [[service]] entries"),
                        ));
                    }
                    s
                }
                None => services.first().map(|s| s.name.clone()).ok_or_else(|| {
                    err(
                        &k("source"),
                        "this node has no [[service]]: name the service this upstream speaks for"
                            .into(),
                    )
                })?,
            };
            let locality = match u.locality {
                None => Locality::default(),
                Some(l) => l.parse().map_err(|e| err(&k("locality"), e))?,
            };
            let protocol = match u.protocol {
                None => Protocol::default(),
                Some(p) => p.parse().map_err(|e| err(&k("protocol"), e))?,
            };
            let raw_http = http::RawHttpUpstream {
                route: u.route,
                retry_budget: u.retry_budget,
                ejection: u.ejection,
                keys: http::RawRouteKeys {
                    timeout: u.timeout,
                    per_try_timeout: u.per_try_timeout,
                    retries: u.retries,
                    retry_on: u.retry_on,
                    retry_grpc: u.retry_grpc,
                    fault: u.fault,
                },
            };
            let http = match (protocol, raw_http.written()) {
                (Protocol::Tcp, Some(key)) => return Err(err(
                    &k(key),
                    "needs protocol = \"http\" (routes, retries and timeouts are about requests)"
                        .into(),
                )),
                (Protocol::Tcp, None) => HttpUpstream::default(),
                (Protocol::Http, _) => http::upstream(raw_http, &format!("upstream[{i}]"), &err)?,
            };
            upstreams.push(UpstreamConfig {
                service,
                bind,
                source,
                locality,
                expose,
                protocol,
                http,
            });
        }
        let overlay = match raw.overlay {
            Some(o) if o.enabled.unwrap_or(false) => {
                let device = o.device.unwrap_or_else(|| DEFAULT_OVERLAY_DEVICE.into());
                if device.is_empty()
                    || device.len() > 15
                    || !device
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(err(
                        "overlay.device",
                        format!("{device:?} is not an interface name (1-15 of a-z, 0-9, - and _)"),
                    ));
                }
                let mtu = match o.mtu {
                    None => DEFAULT_OVERLAY_MTU,
                    Some(m) if (1280..=9000).contains(&m) => m as u16,
                    Some(m) => {
                        return Err(err(
                            "overlay.mtu",
                            format!("{m} is not between 1280 and 9000"),
                        ))
                    }
                };
                let max_flows = match o.max_flows {
                    None => DEFAULT_OVERLAY_MAX_FLOWS,
                    Some(n) if (1024..=16_777_216).contains(&n) => n as usize,
                    Some(n) => {
                        return Err(err(
                            "overlay.max_flows",
                            format!("{n} is not between 1024 and 16777216"),
                        ))
                    }
                };
                let max_flows_per_peer = match o.max_flows_per_peer {
                    None => DEFAULT_OVERLAY_MAX_FLOWS_PER_PEER.min(max_flows / 4),
                    // One peer may hold at most a quarter of the table: it takes several
                    // peers to fill it, and the tracker keeps an eighth for this node's own.
                    Some(n) if n >= 1 && n as usize <= max_flows / 4 => n as usize,
                    Some(n) => {
                        return Err(err(
                            "overlay.max_flows_per_peer",
                            format!(
                                "{n} is not between 1 and a quarter of max_flows ({})",
                                max_flows / 4
                            ),
                        ))
                    }
                };
                Some(OverlayConfig {
                    device,
                    mtu,
                    max_flows,
                    max_flows_per_peer,
                })
            }
            _ => None,
        };
        let wireguard = match raw.gateway.and_then(|g| g.wireguard) {
            None => None,
            Some(w) => {
                let listen = w.listen.ok_or_else(|| {
                    err(
                        "gateway.wireguard.listen",
                        "missing: the UDP address WireGuard clients reach (\"0.0.0.0:51820\")"
                            .into(),
                    )
                })?;
                let listen = addr("gateway.wireguard.listen", &listen)?;
                if listen.port() == 0 {
                    return Err(err(
                        "gateway.wireguard.listen",
                        "needs a fixed port: clients' configurations name it".into(),
                    ));
                }
                if overlay.is_none() {
                    return Err(err(
                        "gateway.wireguard",
                        "needs [overlay] enabled = true: clients' packets travel the overlay"
                            .into(),
                    ));
                }
                Some(WgGatewayConfig { listen })
            }
        };
        if overlay.is_none() {
            if let Some(i) = services.iter().position(|s| s.address.is_none()) {
                return Err(err(
                    &format!("service[{i}].address"),
                    "missing: this service has only overlay ports but [overlay] is not enabled"
                        .into(),
                ));
            }
        }
        let telemetry = match raw.telemetry {
            None => TelemetryConfig::default(),
            Some(t) => {
                let otlp_endpoint = t
                    .otlp_endpoint
                    .map(|e| {
                        let bad = |why: &str| err("telemetry.otlp_endpoint", format!("{e:?} {why}"));
                        let u: hyper::Uri = e.parse().map_err(|_| bad("is not a URL"))?;
                        if u.scheme_str() != Some("http") || u.authority().is_none() {
                            return Err(bad("is not an http://host:port URL (OTLP/HTTP; put a local collector in front of a TLS one)"));
                        }
                        if u.path_and_query().is_some_and(|p| p.as_str() != "/") {
                            return Err(bad("has a path: give the collector's base URL (spans go to /v1/traces)"));
                        }
                        Ok(u)
                    })
                    .transpose()?;
                let sample_rate = t.sample_rate.unwrap_or(1.0);
                if !(0.0..=1.0).contains(&sample_rate) {
                    return Err(err(
                        "telemetry.sample_rate",
                        format!("{sample_rate} is not a share (0 to 1)"),
                    ));
                }
                TelemetryConfig {
                    otlp_endpoint,
                    sample_rate,
                    access_log: t.access_log.unwrap_or(false),
                }
            }
        };
        let dns = match raw.dns {
            Some(d) if d.enabled.unwrap_or(true) => {
                let listen = addr(
                    "dns.listen",
                    d.listen.as_deref().unwrap_or(DEFAULT_DNS_LISTEN),
                )?;
                if !listen.ip().is_loopback() {
                    return Err(err(
                        "dns.listen",
                        "must be a loopback address (the mesh's answers are for local apps)".into(),
                    ));
                }
                let forward = d.forward.map(|f| addr("dns.forward", &f)).transpose()?;
                let ttl = dur("dns.ttl", d.ttl, Duration::from_secs(5))?;
                if ttl > Duration::from_secs(3600) {
                    return Err(err("dns.ttl", "must be at most 1h".into()));
                }
                Some(DnsConfig {
                    listen,
                    forward,
                    ttl,
                })
            }
            _ => None,
        };
        let metrics = match raw.metrics.as_deref() {
            None => Some(addr("metrics", "127.0.0.1:9790")?),
            Some("off") | Some("") => None,
            Some(m) => Some(addr("metrics", m)?),
        };
        if metrics.is_some_and(|m| !m.ip().is_loopback()) {
            return Err(err(
                "metrics",
                "must be a loopback address (metrics are not authenticated)".into(),
            ));
        }
        Ok(Self {
            name,
            coordinator,
            join_token,
            data_dir,
            listen,
            advertise,
            labels,
            services,
            upstreams,
            overlay,
            wireguard,
            dns,
            telemetry,
            metrics,
            check_egress: raw.policy.and_then(|p| p.check_egress).unwrap_or(true),
            flow_idle_timeout: dur(
                "flow_idle_timeout",
                raw.flow_idle_timeout,
                Duration::from_secs(3600),
            )?,
            status_interval: dur(
                "status_interval",
                raw.status_interval,
                Duration::from_secs(10),
            )?,
            keepalive: {
                let k = dur("keepalive", raw.keepalive, DEFAULT_KEEPALIVE)?;
                if !(Duration::from_secs(1)..=Duration::from_secs(15)).contains(&k) {
                    return Err(err(
                        "keepalive",
                        "must be between 1s and 15s (tunnels idle out after 20s)".into(),
                    ));
                }
                k
            },
            relay: raw.relay,
            worker_threads: match raw.worker_threads {
                None | Some(0) => None,
                Some(n) if (1..=256).contains(&n) => Some(n as usize),
                Some(n) => {
                    return Err(err(
                        "worker_threads",
                        format!("{n} is not between 0 (automatic) and 256"),
                    ))
                }
            },
            key_exchange: match raw.tls.and_then(|t| t.key_exchange) {
                None => KeyExchange::default(),
                Some(s) => s.parse().map_err(|e| err("tls.key_exchange", e))?,
            },
        })
    }

    /// The local service named `name`, if this node hosts it.
    pub fn service(&self, name: &ServiceName) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| &s.name == name)
    }

    /// Names of the services this node hosts.
    pub fn service_names(&self) -> Vec<ServiceName> {
        self.services.iter().map(|s| s.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(t, "node.toml", Path::new("/tmp"))
    }

    const GOOD: &str = r#"
name = "web-1"
coordinator = "198.18.0.1:7700"
join_token = "x"
data_dir = "/var/lib/quicmesh"
labels = { datacenter = "dc1" }
[[service]]
name = "web"
address = "127.0.0.1:8080"
check = { tcp = "127.0.0.1:8080", interval = "2s" }
[[upstream]]
service = "db"
bind = "127.0.0.1:15432"
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.name.as_str(), "web-1");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstreams[0].source.as_str(), "web");
        assert!(c.check_egress);
        assert_eq!(c.labels.get("datacenter"), Some("dc1"));
        let check = c.services[0].check.as_ref().unwrap();
        assert_eq!(
            check.kind,
            CheckKind::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            (check.interval, check.timeout),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
        assert_eq!((check.rise, check.fall), (2, 3));
        assert_eq!(c.upstreams[0].locality, Locality::Prefer);
        assert_eq!(c.dns, None);
    }

    #[test]
    fn coordinator_is_one_address_a_list_or_names() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.coordinator,
            Coordinators::one("198.18.0.1:7700".parse().unwrap())
        );
        let list = GOOD.replace(
            "\"198.18.0.1:7700\"",
            "[\"198.18.0.1:7700\", \"198.18.0.2:7700\", \"Coord.Example.:7701\"]",
        );
        let c = parse(&list).unwrap();
        assert_eq!(
            c.coordinator.addrs(),
            &[
                CoordinatorAddr::Ip("198.18.0.1:7700".parse().unwrap()),
                CoordinatorAddr::Ip("198.18.0.2:7700".parse().unwrap()),
                CoordinatorAddr::Name {
                    host: "coord.example".into(),
                    port: 7701
                },
            ]
        );
        assert_eq!(
            c.coordinator.to_string(),
            "198.18.0.1:7700, 198.18.0.2:7700, coord.example:7701"
        );
        // Each bad shape is refused, naming the key and what was wrong.
        for (bad, says) in [
            ("[]", "lists no address"),
            ("[\"198.18.0.1:7700\", \"198.18.0.1:7700\"]", "listed twice"),
            ("\"coord.example\"", "not an ip:port or host:port"),
            ("\"coord.example:0\"", "not an ip:port or host:port"),
            ("\"coord_x.example:7700\"", "not an ip:port or host:port"),
            ("\"-coord.example:7700\"", "not an ip:port or host:port"),
            ("\"coord..example:7700\"", "not an ip:port or host:port"),
            ("7700", "coordinator"),
        ] {
            let e = parse(&GOOD.replace("\"198.18.0.1:7700\"", bad)).unwrap_err();
            assert_eq!(e.key, "coordinator", "{bad}: {e}");
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        let many: Vec<String> = (1..=MAX_COORDINATORS + 1)
            .map(|i| format!("\"198.18.0.{i}:7700\""))
            .collect();
        let e = parse(&GOOD.replace("\"198.18.0.1:7700\"", &format!("[{}]", many.join(","))))
            .unwrap_err();
        assert!(e.reason.contains("at most 16"), "{e}");
    }

    #[test]
    fn protocol_is_opt_in_per_service_and_upstream() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.services[0].protocol, Protocol::Tcp, "L4 by default");
        assert_eq!(c.upstreams[0].protocol, Protocol::Tcp);
        let http = GOOD
            .replace(
                "address = \"127.0.0.1:8080\"",
                "address = \"127.0.0.1:8080\"\nprotocol = \"http\"",
            )
            .replace(
                "bind = \"127.0.0.1:15432\"",
                "bind = \"127.0.0.1:15432\"\nprotocol = \"http\"",
            );
        let c = parse(&http).unwrap();
        assert_eq!(c.services[0].protocol, Protocol::Http);
        assert_eq!(c.upstreams[0].protocol, Protocol::Http);
        let e = parse(&http.replacen("\"http\"", "\"HTTP/2\"", 1)).unwrap_err();
        assert_eq!(e.key, "service[0].protocol");
        assert!(e.reason.contains("\"tcp\" or \"http\""), "{e}");
        let e = parse(&format!(
            "{GOOD}\n[[service]]\nname = \"db\"\nports = [\"tcp/80\"]\nprotocol = \"http\"\n[overlay]\nenabled = true\n"
        ))
        .unwrap_err();
        assert_eq!(
            e.key, "service[1].protocol",
            "an overlay-only service has no address to forward to"
        );
    }

    #[test]
    fn http_upstream_routes_parse_and_every_bad_key_is_named() {
        let http = GOOD.replace(
            "bind = \"127.0.0.1:15432\"",
            r#"bind = "127.0.0.1:15432"
protocol = "http"
retries = 2
per_try_timeout = "1s"
retry_grpc = ["unavailable", 8]
ejection = { consecutive_failures = 3, base = "5s" }
[[upstream.route]]
name = "canary"
headers = { X-Canary = "1" }
split = [{ labels = { version = "v2" }, weight = 10 }, { labels = { version = "v1" }, weight = 90 }]
[[upstream.route]]
name = "slow"
path_prefix = "/reports"
timeout = "30s"
retries = 0
fault = { delay = "100ms", delay_percent = 5 }"#,
        );
        let c = parse(&http).unwrap();
        let h = &c.upstreams[0].http;
        let names: Vec<&str> = h.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["canary", "slow", "default"],
            "the upstream's own route last"
        );
        assert_eq!(h.routes[0].retries, 2, "inherited from the upstream");
        assert_eq!(
            h.routes[0].matches.headers,
            [("x-canary".to_string(), "1".to_string())]
        );
        assert_eq!(h.routes[0].split[1].weight, 90);
        assert_eq!(h.routes[0].retry_grpc, [14, 8]);
        assert_eq!(h.routes[1].retries, 0, "overridden");
        assert_eq!(h.routes[1].timeout, Duration::from_secs(30));
        assert_eq!(h.routes[1].fault.as_ref().unwrap().delay_percent, 5.0);
        assert_eq!(h.ejection.unwrap().consecutive_failures, 3);
        for (from, to, key) in [
            ("retries = 2", "retries = 99", "upstream[0].retries"),
            (
                "name = \"canary\"",
                "name = \"Canary\"",
                "upstream[0].route[0].name",
            ),
            (
                "name = \"slow\"",
                "name = \"canary\"",
                "upstream[0].route[1].name",
            ),
            (
                "path_prefix = \"/reports\"",
                "path_prefix = \"/a/../reports\"",
                "upstream[0].route[1].path_prefix",
            ),
            (
                "weight = 10 }",
                "weight = -1 }",
                "upstream[0].route[0].split[0].weight",
            ),
            (
                "{ labels = { version = \"v2\" }, weight = 10 }",
                "{ weight = 10 }",
                "upstream[0].route[0].split[0].labels",
            ),
            (
                "delay_percent = 5",
                "delay_percent = 500",
                "upstream[0].route[1].fault.delay_percent",
            ),
            (
                "\"unavailable\", 8",
                "\"sometimes\"",
                "upstream[0].retry_grpc",
            ),
            (
                "base = \"5s\"",
                "base = \"0s\"",
                "upstream[0].ejection.base",
            ),
            (
                "timeout = \"30s\"",
                "timeout = \"soon\"",
                "upstream[0].route[1].timeout",
            ),
            (
                "per_try_timeout = \"1s\"",
                "per_try_timeout = \"1m\"",
                "upstream[0].per_try_timeout",
            ),
        ] {
            assert!(http.contains(from), "{from}");
            let e = parse(&http.replace(from, to)).unwrap_err();
            assert_eq!(e.key, key, "{to}: {e}");
        }
        // Routes are about requests: an L4 upstream refuses them.
        let e = parse(&http.replace("protocol = \"http\"\n", "")).unwrap_err();
        assert_eq!(e.key, "upstream[0].route");
        // Rate limits likewise, on services.
        let limited = GOOD.replace(
            "address = \"127.0.0.1:8080\"",
            "address = \"127.0.0.1:8080\"\nrate_limit = { web = 10, \"*\" = 100 }",
        );
        assert_eq!(parse(&limited).unwrap_err().key, "service[0].rate_limit");
        let c = parse(&limited.replace("rate_limit", "protocol = \"http\"\nrate_limit")).unwrap();
        assert_eq!(c.services[0].rate_limits.len(), 2);
        let e = parse(
            &limited
                .replace("rate_limit", "protocol = \"http\"\nrate_limit")
                .replace("web = 10", "web = 0"),
        )
        .unwrap_err();
        assert_eq!(e.key, "service[0].rate_limit.web");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&GOOD.replace("198.18.0.1:7700", "nowhere")).unwrap_err();
        assert_eq!(e.key, "coordinator");
        let e = parse(&GOOD.replace("name = \"web-1\"", "name = \"Web\"")).unwrap_err();
        assert_eq!(e.key, "name");
        let e = parse(&format!("{GOOD}\nbogus = 1\n")).unwrap_err();
        assert_eq!(e.key, "bogus", "{e}");
        let e = parse(&GOOD.replace("bind = \"127.0.0.1:15432\"", "")).unwrap_err();
        assert_eq!(e.key, "upstream[0].bind");
        // A non-loopback upstream bind needs the user to say so.
        for bind in ["0.0.0.0:15432", "198.18.0.10:15432", "[::]:15432"] {
            let open = GOOD.replace("127.0.0.1:15432", bind);
            let e = parse(&open).unwrap_err();
            assert_eq!(e.key, "upstream[0].bind", "{bind}");
            assert!(e.reason.contains("expose = true"), "{e}");
            let c = parse(&open.replace(
                &format!("\"{bind}\""),
                &format!("\"{bind}\"\nexpose = true"),
            ))
            .unwrap();
            assert!(c.upstreams[0].expose, "{bind}");
        }
        let c = parse(&GOOD.replace("127.0.0.1:15432", "[::1]:15432")).unwrap();
        assert!(!c.upstreams[0].expose, "loopback needs no expose");
        let e = parse(&format!("{GOOD}\nmetrics = \"0.0.0.0:9000\"\n")).unwrap_err();
        assert_eq!(e.key, "metrics");
        let e = parse(&format!("keepalive = \"30s\"\n{GOOD}")).unwrap_err();
        assert_eq!(e.key, "keepalive");
        // [tls] key_exchange: hybrid by default; each mode by its name; anything else named.
        assert_eq!(parse(GOOD).unwrap().key_exchange, KeyExchange::Hybrid);
        for k in KeyExchange::ALL {
            let c = parse(&format!(
                "{GOOD}\n[tls]\nkey_exchange = \"{}\"\n",
                k.as_str()
            ));
            assert_eq!(c.unwrap().key_exchange, k);
        }
        let e = parse(&format!("{GOOD}\n[tls]\nkey_exchange = \"kyber\"\n")).unwrap_err();
        assert_eq!(e.key, "tls.key_exchange");
        assert!(e.reason.contains("hybrid-only"), "{e}");
        assert!(parse(&format!("{GOOD}\n[tls]\ngroups = [\"x\"]\n")).is_err());
        let e = parse(&format!("worker_threads = 999\n{GOOD}")).unwrap_err();
        assert_eq!(e.key, "worker_threads");
        assert_eq!(
            parse(&format!("worker_threads = 1\n{GOOD}"))
                .unwrap()
                .worker_threads,
            Some(1)
        );
        let o = parse(&format!("{GOOD}\n[overlay]\nenabled = true\n")).unwrap();
        assert_eq!(
            o.overlay,
            Some(OverlayConfig {
                device: DEFAULT_OVERLAY_DEVICE.into(),
                mtu: DEFAULT_OVERLAY_MTU,
                max_flows: DEFAULT_OVERLAY_MAX_FLOWS,
                max_flows_per_peer: DEFAULT_OVERLAY_MAX_FLOWS_PER_PEER,
            })
        );
        let e = parse(&format!("{GOOD}\n[overlay]\nenabled = true\nmtu = 500\n")).unwrap_err();
        assert_eq!(e.key, "overlay.mtu");
        let e = parse(&format!(
            "{GOOD}\n[overlay]\nenabled = true\ndevice = \"a/b\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "overlay.device");
        let o = parse(&format!(
            "{GOOD}\n[overlay]\nenabled = true\nmax_flows = 2048\nmax_flows_per_peer = 100\n"
        ))
        .unwrap()
        .overlay
        .unwrap();
        assert_eq!((o.max_flows, o.max_flows_per_peer), (2048, 100));
        let e = parse(&format!(
            "{GOOD}\n[overlay]\nenabled = true\nmax_flows = 10\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "overlay.max_flows");
        let e = parse(&format!(
            "{GOOD}\n[overlay]\nenabled = true\nmax_flows = 2048\nmax_flows_per_peer = 4096\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "overlay.max_flows_per_peer");
        // Overlay ports: parsed, named on error, and only allowed without an address when
        // the overlay is on.
        let db = "[[service]]\nname = \"db\"\nports = [\"tcp/5432\", \"icmp\"]\n";
        let o = parse(&format!("{GOOD}\n{db}[overlay]\nenabled = true\n")).unwrap();
        assert_eq!(o.services[1].address, None);
        assert_eq!(o.services[1].ports.len(), 2);
        let e = parse(&format!("{GOOD}\n{db}")).unwrap_err();
        assert_eq!(e.key, "service[1].address");
        let e = parse(&format!(
            "{GOOD}\n{}[overlay]\nenabled = true\n",
            db.replace("tcp/5432", "tcp/99999")
        ))
        .unwrap_err();
        assert_eq!(e.key, "service[1].ports[0]");
        // Checks and DNS: each bad key named.
        let svc = |check: &str| {
            GOOD.replace(
                "check = { tcp = \"127.0.0.1:8080\", interval = \"2s\" }",
                check,
            )
        };
        let c = parse(&svc("check = { http = \"http://127.0.0.1:8080/healthz\", status = 204, interval = \"1s\", fall = 2 }")).unwrap();
        assert_eq!(
            c.services[0].check.as_ref().unwrap().kind,
            CheckKind::Http {
                addr: "127.0.0.1:8080".parse().unwrap(),
                path: "/healthz".into(),
                status: Some(204)
            }
        );
        for (check, key) in [
            ("check = { tcp = \"x\" }", "service[0].check.tcp"),
            (
                "check = { http = \"https://127.0.0.1:1/\" }",
                "service[0].check.http",
            ),
            (
                "check = { tcp = \"127.0.0.1:1\", command = [\"true\"] }",
                "service[0].check",
            ),
            ("check = { interval = \"1s\" }", "service[0].check"),
            ("check = { command = [] }", "service[0].check.command"),
            (
                "check = { tcp = \"127.0.0.1:1\", interval = \"1s\", timeout = \"2s\" }",
                "service[0].check.timeout",
            ),
            (
                "check = { tcp = \"127.0.0.1:1\", fall = 0 }",
                "service[0].check.fall",
            ),
            ("check = { tcp = \"127.0.0.1:1\", bogus = 1 }", "bogus"),
        ] {
            let e = parse(&svc(check)).unwrap_err();
            assert_eq!(e.key, key, "{check}: {e}");
        }
        let e = parse(&GOOD.replace(
            "bind = \"127.0.0.1:15432\"",
            "bind = \"127.0.0.1:15432\"\nlocality = \"near\"",
        ))
        .unwrap_err();
        assert_eq!(e.key, "upstream[0].locality");
        let d = parse(&format!("{GOOD}\n[dns]\nforward = \"127.0.0.1:53\"\n")).unwrap();
        assert_eq!(
            d.dns.as_ref().unwrap().listen.to_string(),
            DEFAULT_DNS_LISTEN
        );
        let e = parse(&format!("{GOOD}\n[dns]\nlisten = \"0.0.0.0:53\"\n")).unwrap_err();
        assert_eq!(e.key, "dns.listen");
        let e = parse(&GOOD.replace("data_dir = \"/var/lib/quicmesh\"", "")).unwrap_err();
        assert_eq!(e.to_string(), "config node.toml: data_dir: missing");
    }
    #[test]
    fn a_wireguard_gateway_needs_the_overlay_and_a_fixed_listen_address() {
        let ov = "[overlay]\nenabled = true\n";
        let c = parse(&format!(
            "{GOOD}\n{ov}[gateway.wireguard]\nlisten = \"0.0.0.0:51820\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.wireguard,
            Some(WgGatewayConfig {
                listen: "0.0.0.0:51820".parse().unwrap()
            })
        );
        assert_eq!(parse(&format!("{GOOD}\n{ov}")).unwrap().wireguard, None);
        for (text, key, says) in [
            (
                "[gateway.wireguard]\nlisten = \"0.0.0.0:51820\"\n",
                "gateway.wireguard",
                "needs [overlay]",
            ),
            (
                "[overlay]\nenabled = true\n[gateway.wireguard]\n",
                "gateway.wireguard.listen",
                "missing",
            ),
            (
                "[overlay]\nenabled = true\n[gateway.wireguard]\nlisten = \"0.0.0.0:0\"\n",
                "gateway.wireguard.listen",
                "fixed port",
            ),
            (
                "[overlay]\nenabled = true\n[gateway.wireguard]\nlisten = \"nowhere\"\n",
                "gateway.wireguard.listen",
                "",
            ),
            (
                "[overlay]\nenabled = true\n[gateway.wireguard]\nport = 51820\n",
                "",
                "unknown field",
            ),
        ] {
            let e = parse(&format!("{GOOD}\n{text}")).unwrap_err();
            assert!(e.key.starts_with(key), "{text}: {e}");
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
    }
}
