//! WireGuard clients: stock WireGuard clients (laptops, phones, routers) enrolled here with
//! an identity and an overlay address, and served by gateway nodes.

use super::*;
use crate::store::WgClientRecord;
use quicmesh_protocol::wg::{WgClient, WgKey};

/// The longest a WireGuard client may be enrolled for at once.
pub const MAX_WG_TTL_SECS: i64 = 366 * 86400;

/// What `wg add` asks for.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WgRequest {
    pub name: String,
    pub service: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds from now until the client is refused; none: until revoked.
    #[serde(default)]
    pub ttl_secs: Option<i64>,
    /// The client's own public key (its private key never leaves the device); none: the
    /// coordinator makes a key pair and shows the private key once.
    #[serde(default)]
    pub public_key: Option<String>,
    /// The gateway nodes that serve the client (at least one).
    pub gateways: Vec<String>,
}

/// A client as `wg list` and the API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WgClientView {
    pub name: String,
    pub service: String,
    pub labels: BTreeMap<String, String>,
    pub public_key: String,
    pub addresses: Vec<IpAddr>,
    pub gateways: Vec<String>,
    pub created_at: i64,
    /// 0: never expires.
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

/// A client's traffic as its gateways report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WgClientStats {
    /// When its latest handshake with any gateway completed (Unix seconds).
    pub last_handshake: Option<i64>,
    /// Inner bytes sent to it and received from it.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// What `wg add` gives back.
#[derive(Debug, Clone, Serialize)]
pub struct WgAdded {
    pub client: WgClientView,
    /// The private key the coordinator made, shown this once and stored nowhere; none when
    /// the client brought its own public key.
    pub private_key: Option<String>,
}

impl Mesh {
    /// Enrolls a WireGuard client.
    pub fn wg_add(&self, req: &WgRequest) -> Result<WgAdded, MeshError> {
        self.wg_add_at(req, now())
    }

    /// [`Mesh::wg_add`] at time `t` (Unix seconds).
    pub fn wg_add_at(&self, req: &WgRequest, t: i64) -> Result<WgAdded, MeshError> {
        let invalid = |field: &'static str, reason: String| MeshError::Invalid { field, reason };
        let name = NodeName::new(req.name.as_str()).map_err(|e| invalid("name", e.to_string()))?;
        let service = ServiceName::new(req.service.as_str())
            .map_err(|e| invalid("service", e.to_string()))?;
        labels_from(&req.labels)?;
        let expires_at = match req.ttl_secs {
            None => 0,
            Some(s) if s > 0 && s <= MAX_WG_TTL_SECS => t + s,
            Some(_) => {
                return Err(invalid(
                    "ttl",
                    format!("must be between 1s and {}d", MAX_WG_TTL_SECS / 86400),
                ))
            }
        };
        if req.gateways.is_empty() {
            return Err(invalid(
                "gateways",
                "name at least one gateway node to serve the client".into(),
            ));
        }
        let mut gateways = Vec::new();
        for g in &req.gateways {
            let gw = NodeName::new(g.as_str()).map_err(|e| invalid("gateways", e.to_string()))?;
            match self.store.node(gw.as_str())? {
                Some(n) if n.revoked_at.is_none() => {}
                Some(_) => return Err(invalid("gateways", format!("{gw} is revoked"))),
                None => return Err(MeshError::NoSuchNode(gw.to_string())),
            }
            // The client's configuration is printed with the gateway's key and address:
            // without them, nothing is stored (no key made that no config carries).
            self.gateway_peer(gw.as_str())?;
            if !gateways.contains(&gw.to_string()) {
                gateways.push(gw.to_string());
            }
        }
        let (public_key, private_key) = match &req.public_key {
            Some(k) => (
                k.parse::<WgKey>()
                    .map_err(|e| invalid("public_key", e.to_string()))?,
                None,
            ),
            None => {
                let (secret, public) = quicmesh_node::wg::generate_key_pair();
                (public, Some(WgKey(secret).to_string()))
            }
        };
        let rec = WgClientRecord {
            name: name.to_string(),
            service: service.to_string(),
            labels: req.labels.clone(),
            public_key: public_key.to_string(),
            gateways,
            created_at: t,
            expires_at,
            revoked_at: None,
            overlay_index: None,
        };
        if !self.store.insert_wg_client(&rec)? {
            return Err(MeshError::WgClientExists(name.to_string()));
        }
        self.changed()?;
        let client = self
            .wg_clients()?
            .into_iter()
            .find(|c| c.name == rec.name)
            .ok_or_else(|| MeshError::NoSuchWgClient(rec.name.clone()))?;
        tracing::info!(client = %name, %service, key = %public_key, "WireGuard client added");
        Ok(WgAdded {
            client,
            private_key,
        })
    }

    /// Every WireGuard client, revoked ones included.
    pub fn wg_clients(&self) -> Result<Vec<WgClientView>, MeshError> {
        self.store
            .wg_clients()?
            .into_iter()
            .map(|r| {
                let addresses = match r.overlay_index {
                    Some(i) => self.pools.addresses(i).unwrap_or_default(),
                    None => Vec::new(),
                };
                Ok(WgClientView {
                    name: r.name,
                    service: r.service,
                    labels: r.labels,
                    public_key: r.public_key,
                    addresses,
                    gateways: r.gateways,
                    created_at: r.created_at,
                    expires_at: r.expires_at,
                    revoked_at: r.revoked_at,
                })
            })
            .collect()
    }

    /// Revokes a WireGuard client: it is left out of what nodes are told from now on
    /// ([`Mesh::wg_clients_for_nodes`]), published at once.
    pub fn wg_revoke(&self, name: &str) -> Result<(), MeshError> {
        if !self.store.revoke_wg_client(name, now())? {
            return Err(MeshError::NoSuchWgClient(name.to_string()));
        }
        self.changed_with(true)?;
        tracing::info!(client = name, "WireGuard client revoked");
        Ok(())
    }

    /// The clients nodes are told about at `t`: not revoked, not expired, with an address.
    /// A stored row that no longer parses is left out and logged, never sent half-read.
    pub fn wg_clients_for_nodes(&self, t: i64) -> Result<Vec<WgClient>, MeshError> {
        let mut out = Vec::new();
        for v in self.wg_clients()? {
            if v.revoked_at.is_some() || (v.expires_at != 0 && t >= v.expires_at) {
                continue;
            }
            let parsed = (|| -> Result<WgClient, String> {
                Ok(WgClient {
                    name: NodeName::new(v.name.as_str()).map_err(|e| e.to_string())?,
                    service: ServiceName::new(v.service.as_str()).map_err(|e| e.to_string())?,
                    labels: labels_from(&v.labels).map_err(|e| e.to_string())?,
                    addresses: v.addresses.clone(),
                    public_key: v
                        .public_key
                        .parse()
                        .map_err(|e: quicmesh_protocol::wg::WgKeyError| e.to_string())?,
                    expires_at: v.expires_at.max(0) as u64,
                    gateways: v
                        .gateways
                        .iter()
                        .map(|g| NodeName::new(g.as_str()).map_err(|e| e.to_string()))
                        .collect::<Result<_, _>>()?,
                })
            })();
            match parsed {
                Ok(c) if !c.addresses.is_empty() => out.push(c),
                Ok(_) => {
                    tracing::warn!(client = %v.name, "WireGuard client has no overlay address")
                }
                Err(e) => {
                    tracing::warn!(client = %v.name, error = %e, "WireGuard client row unreadable: left out")
                }
            }
        }
        Ok(out)
    }
}

impl Mesh {
    /// The clients nodes are told about at catalog version `version` (read from the store
    /// once per version; the sessions share it). Expiry is enforced by the nodes too.
    pub fn wg_clients_at_version(&self, version: u64) -> Result<Arc<Vec<WgClient>>, MeshError> {
        let mut cached = self.wg_published.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, list)) = cached.as_ref() {
            if *v == version {
                return Ok(list.clone());
            }
        }
        let list = Arc::new(self.wg_clients_for_nodes(now())?);
        *cached = Some((version, list.clone()));
        Ok(list)
    }

    /// Records what a gateway node reports of its WireGuard side. Only the clients that
    /// name this node as a gateway are kept (a node reports for itself only).
    pub fn report_gateway(&self, node: &str, mut report: quicmesh_protocol::wire::GatewayReport) {
        report
            .clients
            .truncate(quicmesh_protocol::wire::MAX_GATEWAY_REPORT_CLIENTS);
        if !report.clients.is_empty() {
            let served: std::collections::HashSet<String> = self
                .store
                .wg_clients()
                .unwrap_or_default()
                .into_iter()
                .filter(|c| c.revoked_at.is_none() && c.gateways.iter().any(|g| g == node))
                .map(|c| c.name)
                .collect();
            let mut seen = std::collections::HashSet::new();
            report
                .clients
                .retain(|(name, ..)| served.contains(name) && seen.insert(name.clone()));
        }
        self.gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), (report, now()));
    }

    /// Per client, what its gateways last reported: the latest handshake (Unix seconds)
    /// and the bytes to and from it, summed over its gateways.
    pub fn wg_client_stats(&self) -> HashMap<String, WgClientStats> {
        let mut out: HashMap<String, WgClientStats> = HashMap::new();
        let gateways = self.gateways.lock().unwrap_or_else(|p| p.into_inner());
        for (report, at) in gateways.values() {
            for (name, since, tx, rx) in &report.clients {
                let s = out.entry(name.clone()).or_default();
                let handshake = since.map(|d| at - i64::try_from(d).unwrap_or(i64::MAX).min(*at));
                s.last_handshake = s.last_handshake.max(handshake);
                s.tx_bytes = s.tx_bytes.saturating_add(*tx);
                s.rx_bytes = s.rx_bytes.saturating_add(*rx);
            }
        }
        out
    }

    /// A gateway's WireGuard key and the address clients reach it at (its node's address,
    /// its gateway's port); an error naming what is not known yet.
    /// Also whether it answers DNS for its clients.
    fn gateway_peer(&self, g: &str) -> Result<(WgKey, std::net::SocketAddr, bool), MeshError> {
        let report = self
            .gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(g)
            .map(|(r, _)| (r.public_key, r.port, r.dns));
        let Some((key, port, dns)) = report else {
            return Err(MeshError::Invalid {
                field: "gateways",
                reason: format!(
                    "{g} has not reported a WireGuard gateway (is [gateway.wireguard] set in its config, and is it connected?)"
                ),
            });
        };
        let rec = self
            .store
            .node(g)?
            .ok_or_else(|| MeshError::NoSuchNode(g.to_string()))?;
        if rec.revoked_at.is_some() {
            return Err(MeshError::Invalid {
                field: "gateways",
                reason: format!("{g} is revoked"),
            });
        }
        let host = rec
            .endpoint
            .as_deref()
            .and_then(|e| e.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .ok_or_else(|| MeshError::Invalid {
                field: "gateways",
                reason: format!("{g} has no known address yet"),
            })?;
        Ok((key, std::net::SocketAddr::new(host, port), dns))
    }

    /// The `wg-quick` configuration of `client`: its address, the gateways that reported
    /// their key as peers, the mesh's prefixes as `AllowedIPs`, and the first gateway's
    /// mesh address as `DNS`. `private_key` when the coordinator made it (else the
    /// client fills in its own). Errors name a gateway that has not reported yet.
    pub fn wg_config(
        &self,
        client: &WgClientView,
        private_key: Option<&str>,
    ) -> Result<String, MeshError> {
        let mut peers = String::new();
        let mut dns = None;
        for g in &client.gateways {
            let (public_key, endpoint, answers_dns) = self.gateway_peer(g)?;
            // The DNS of the gateway the client uses (the first), when it answers DNS.
            if peers.is_empty() && answers_dns {
                dns = self.overlay_addresses(g)?.into_iter().find(IpAddr::is_ipv4);
            }
            let allowed = [self.pools.v4.to_string(), self.pools.v6.to_string()].join(", ");
            let peer = format!(
                "[Peer]\nPublicKey = {public_key}\nEndpoint = {endpoint}\nAllowedIPs = {allowed}\nPersistentKeepalive = 25\n"
            );
            if peers.is_empty() {
                peers = format!("\n# gateway {g}\n{peer}");
            } else {
                // WireGuard gives a prefix to one peer only: the others are written out
                // for failing over by hand.
                peers.push_str(&format!(
                    "\n# gateway {g}, also serving this client: to use it instead, swap it with the peer above\n"
                ));
                for line in peer.lines() {
                    peers.push_str(&format!("# {line}\n"));
                }
            }
        }
        let addresses: Vec<String> = client
            .addresses
            .iter()
            .map(|a| match a {
                IpAddr::V4(_) => format!("{a}/32"),
                IpAddr::V6(_) => format!("{a}/128"),
            })
            .collect();
        let key = private_key.unwrap_or("<this device's private key>");
        let mut out = format!(
            "# quicmesh WireGuard client {} (service {})\n[Interface]\nPrivateKey = {key}\nAddress = {}\nMTU = 1280\n",
            client.name,
            client.service,
            addresses.join(", ")
        );
        if let Some(d) = dns {
            out.push_str(&format!("DNS = {d}\n"));
        }
        out.push_str(&peers);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> (tempfile::TempDir, Arc<Mesh>) {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), TrustDomain::new("t.test").unwrap()).unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        (dir, mesh)
    }

    /// A mesh with an enrolled gateway node `gw-1`.
    fn with_gateway() -> (tempfile::TempDir, Arc<Mesh>) {
        let (d, m) = mesh();
        let (token, _) = m
            .create_token(
                "gw-1",
                &["gateway".to_string()],
                &BTreeMap::new(),
                false,
                600,
            )
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let t: quicmesh_protocol::token::JoinToken = token.parse().unwrap();
        let req = quicmesh_protocol::wire::EnrollRequest {
            secret: t.secret_hex(),
            node: NodeName::new("gw-1").unwrap(),
            csr_der: quicmesh_node::control::csr("gw-1", &key).unwrap(),
            services: vec![ServiceName::new("gateway").unwrap()],
            labels: Labels::default(),
        };
        assert!(matches!(
            m.enroll_at(&req, now()),
            quicmesh_protocol::wire::ControlDown::Enrolled(_)
        ));
        m.store
            .node_hello("gw-1", "198.18.0.5:7800", "0.1.0", now())
            .unwrap();
        m.report_gateway(
            "gw-1",
            quicmesh_protocol::wire::GatewayReport {
                public_key: quicmesh_node::wg::generate_key_pair().1,
                port: 51820,
                clients: vec![],
                dns: true,
            },
        );
        (d, m)
    }

    fn request(name: &str) -> WgRequest {
        WgRequest {
            name: name.into(),
            service: "laptop".into(),
            labels: [("team".to_string(), "ops".to_string())].into(),
            ttl_secs: Some(30 * 86400),
            public_key: None,
            gateways: vec!["gw-1".into()],
        }
    }

    #[test]
    fn a_client_gets_an_address_of_its_own_and_a_key_shown_once() {
        let (_d, m) = with_gateway();
        let t = 1_900_000_000;
        let added = m.wg_add_at(&request("alice-laptop"), t).unwrap();
        let private: WgKey = added.private_key.as_deref().unwrap().parse().unwrap();
        let public: WgKey = added.client.public_key.parse().unwrap();
        assert_eq!(quicmesh_node::wg::public_of(private.0), public);
        assert_eq!(added.client.expires_at, t + 30 * 86400);
        let gw_addrs = m.overlay_addresses("gw-1").unwrap();
        assert!(!added.client.addresses.is_empty());
        assert!(
            added.client.addresses.iter().all(|a| !gw_addrs.contains(a)),
            "{:?} vs {gw_addrs:?}",
            added.client.addresses
        );
        // Its own key: nothing private is made or shown.
        let own = m
            .wg_add_at(
                &WgRequest {
                    public_key: Some("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into()),
                    ..request("bob-phone")
                },
                t,
            )
            .unwrap();
        assert_eq!(own.private_key, None);
        assert_ne!(own.client.addresses, added.client.addresses);
        // Nodes are told about both, with what policy needs.
        let pushed = m.wg_clients_for_nodes(t + 1).unwrap();
        assert_eq!(pushed.len(), 2);
        assert_eq!(pushed[0].service.as_str(), "laptop");
        assert_eq!(pushed[0].gateways[0].as_str(), "gw-1");
    }

    #[test]
    fn the_printed_configuration_names_the_gateway_and_the_mesh_and_waits_for_its_report() {
        let (_d, m) = mesh();
        let (token, _) = m
            .create_token("gw-1", &[], &BTreeMap::new(), false, 600)
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let t: quicmesh_protocol::token::JoinToken = token.parse().unwrap();
        let req = quicmesh_protocol::wire::EnrollRequest {
            secret: t.secret_hex(),
            node: NodeName::new("gw-1").unwrap(),
            csr_der: quicmesh_node::control::csr("gw-1", &key).unwrap(),
            services: vec![],
            labels: Labels::default(),
        };
        m.enroll_at(&req, now());
        // Denied twin first: the gateway has not reported its WireGuard side yet, so no
        // client is made for it (no key that no configuration carries).
        let err = m.wg_add(&request("alice")).unwrap_err();
        assert!(err.to_string().contains("gw-1 has not reported"), "{err}");
        assert!(m.wg_clients().unwrap().is_empty());
        m.store
            .node_hello("gw-1", "198.18.0.5:7800", "0.1.0", now())
            .unwrap();
        let gw_key = quicmesh_node::wg::generate_key_pair().1;
        m.report_gateway(
            "gw-1",
            quicmesh_protocol::wire::GatewayReport {
                public_key: gw_key,
                port: 51820,
                clients: vec![
                    ("alice".into(), None, 0, 0),
                    ("someone-else".into(), None, 0, 0),
                ],
                dns: true,
            },
        );
        let added = m.wg_add(&request("alice")).unwrap();
        m.report_gateway(
            "gw-1",
            quicmesh_protocol::wire::GatewayReport {
                public_key: gw_key,
                port: 51820,
                clients: vec![
                    ("alice".into(), None, 0, 0),
                    ("someone-else".into(), None, 0, 0),
                ],
                dns: true,
            },
        );
        let text = m
            .wg_config(&added.client, added.private_key.as_deref())
            .unwrap();
        let private = added.private_key.clone().unwrap();
        let addr = added
            .client
            .addresses
            .iter()
            .map(|a| match a {
                IpAddr::V4(_) => format!("{a}/32"),
                IpAddr::V6(_) => format!("{a}/128"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let dns = m.overlay_addresses("gw-1").unwrap()[0];
        for line in [
            format!("PrivateKey = {private}"),
            format!("Address = {addr}"),
            format!("PublicKey = {gw_key}"),
            "Endpoint = 198.18.0.5:51820".to_string(),
            format!("AllowedIPs = {}, {}", m.pools.v4, m.pools.v6),
            format!("DNS = {dns}"),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        // A gateway's report keeps only the clients that name it.
        let kept = m.gateways.lock().unwrap()["gw-1"].0.clients.clone();
        assert_eq!(kept, [("alice".to_string(), None, 0, 0)]);
        // A gateway that answers no DNS for its clients is not named as their resolver.
        m.report_gateway(
            "gw-1",
            quicmesh_protocol::wire::GatewayReport {
                public_key: gw_key,
                port: 51820,
                clients: vec![],
                dns: false,
            },
        );
        let text = m.wg_config(&added.client, None).unwrap();
        assert!(!text.contains("DNS ="), "{text}");
        assert!(
            text.contains("PrivateKey = <this device's private key>"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_request_is_refused_and_stores_nothing() {
        let (_d, m) = with_gateway();
        let bad = [
            WgRequest {
                name: "Alice Laptop".into(),
                ..request("x")
            },
            WgRequest {
                service: "".into(),
                ..request("x")
            },
            WgRequest {
                ttl_secs: Some(0),
                ..request("x")
            },
            WgRequest {
                ttl_secs: Some(MAX_WG_TTL_SECS + 1),
                ..request("x")
            },
            WgRequest {
                public_key: Some("not-a-key".into()),
                ..request("x")
            },
            WgRequest {
                gateways: vec![],
                ..request("x")
            },
            WgRequest {
                gateways: vec!["nowhere".into()],
                ..request("x")
            },
        ];
        for r in &bad {
            assert!(m.wg_add(r).is_err(), "{r:?}");
        }
        assert!(m.wg_clients().unwrap().is_empty());
        // Its allowed twin, then the same name again: refused as existing.
        m.wg_add(&request("x")).unwrap();
        assert!(matches!(
            m.wg_add(&request("x")),
            Err(MeshError::WgClientExists(_))
        ));
    }

    #[test]
    fn a_revoked_or_expired_client_is_no_longer_pushed() {
        let (_d, m) = with_gateway();
        let t = now();
        m.wg_add_at(&request("alice"), t).unwrap();
        m.wg_add_at(
            &WgRequest {
                ttl_secs: Some(60),
                ..request("brief")
            },
            t,
        )
        .unwrap();
        let names = |at| -> Vec<String> {
            m.wg_clients_for_nodes(at)
                .unwrap()
                .into_iter()
                .map(|c| c.name.to_string())
                .collect()
        };
        assert_eq!(names(t), ["alice", "brief"]);
        assert_eq!(names(t + 60), ["alice"], "expired at its last second");
        m.wg_revoke("alice").unwrap();
        assert!(names(t).iter().all(|n| n != "alice"));
        assert!(matches!(
            m.wg_revoke("alice"),
            Err(MeshError::NoSuchWgClient(_))
        ));
        // Still listed, as revoked.
        assert!(m.wg_clients().unwrap()[0].revoked_at.is_some());
    }
}
