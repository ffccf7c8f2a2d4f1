//! The catalog and what each node is sent from it. Pure: the catalog is a function of typed
//! records (the store's node rows, the health book, the pools), a node's snapshot and delta
//! are functions of catalogs and the policy. [`Catalogs`] keeps the one built last, the
//! peer steps sessions share, and the version published to the sessions.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quicmesh_protocol::cert::Serial;
use quicmesh_protocol::delta;
use quicmesh_protocol::ident::{Labels, NodeName, ServiceName, TrustDomain};
use quicmesh_protocol::overlay::Pools;
use quicmesh_protocol::policy::{Policy, PolicyWire};
use quicmesh_protocol::wire::{DeltaRef, DownRef, Except, PeerInfo, SnapshotRef};
use tokio::sync::watch;

use crate::health::HealthBook;
use crate::mesh::{labels_from, MeshError};
use crate::store::NodeRecord;

/// The catalog as of one mesh version, as every snapshot sees it: each live node as a
/// peer entry (sorted by name; a node's own entry gives its labels), and the revoked
/// serials. Built once per published version and shared by every session.
#[derive(Debug)]
pub struct Catalog {
    pub version: u64,
    pub peers: Vec<PeerInfo>,
    pub revoked: Vec<Serial>,
}

impl Catalog {
    /// The catalog at `version` from the node rows (revoked nodes left out), each node's
    /// liveness, reach and health from `health`, overlay addresses from `pools`.
    pub fn build(
        version: u64,
        nodes: Vec<NodeRecord>,
        health: &HealthBook,
        pools: &Pools,
        revoked: Vec<Serial>,
    ) -> Result<Self, MeshError> {
        let mut peers = Vec::with_capacity(nodes.len());
        for n in nodes {
            if n.revoked_at.is_some() {
                continue;
            }
            let Ok(name) = NodeName::new(n.name.as_str()) else {
                continue;
            };
            let reach = health.reach(&n.name);
            peers.push(PeerInfo {
                candidates: reach.map(|r| r.candidates.clone()).unwrap_or_default(),
                // Only a node its token made a relay is advertised as one, whatever its
                // config says.
                relay: n.relay && reach.is_some_and(|r| r.relay),
                nat: reach.is_some_and(|r| r.nat),
                online: !health.is_offline(&n.name),
                critical: health
                    .critical(&n.name)
                    .into_iter()
                    .filter_map(|s| ServiceName::new(s).ok())
                    .collect(),
                node: name,
                endpoint: n
                    .endpoint
                    .as_deref()
                    .and_then(|e| e.parse::<SocketAddr>().ok()),
                services: n
                    .services
                    .iter()
                    .filter_map(|s| ServiceName::new(s.as_str()).ok())
                    .collect(),
                labels: labels_from(&n.labels)?,
                overlay: n
                    .overlay_index
                    .and_then(|i| pools.addresses(i))
                    .unwrap_or_default(),
            });
        }
        delta::sort_peers(&mut peers);
        Ok(Self {
            version,
            peers,
            revoked,
        })
    }
}

/// What a session last sent a node: the catalog and policy version it was built from.
/// The next push is a delta from it.
#[derive(Debug, Clone)]
pub struct Sent {
    catalog: Arc<Catalog>,
    policy_version: u64,
}

impl Sent {
    pub fn version(&self) -> u64 {
        self.catalog.version
    }
}

/// What does not come from the catalog in a whole snapshot.
#[derive(Debug, Clone, Copy)]
pub struct MeshFacts<'a> {
    pub trust_domain: &'a TrustDomain,
    pub ca_der: &'a [u8],
    pub pools: Pools,
}

/// `node`'s whole snapshot of `catalog` under `policy`, as the frame to send: every other
/// node of the catalog and its own labels, encoded from the shared catalog without a copy
/// of it ([`DownRef`]).
pub fn whole(
    node: &NodeName,
    catalog: Arc<Catalog>,
    policy: &(u64, Policy),
    facts: MeshFacts<'_>,
    layout_2: bool,
) -> (Vec<u8>, Sent) {
    let no_labels = Labels::default();
    let labels = catalog
        .peers
        .iter()
        .find(|p| &p.node == node)
        .map_or(&no_labels, |p| &p.labels);
    let frame = DownRef::Snapshot(SnapshotRef {
        version: catalog.version,
        node,
        trust_domain: facts.trust_domain,
        labels,
        peers: Except {
            items: &catalog.peers,
            except: node,
        },
        policy_version: policy.0,
        policy: PolicyWire {
            policy: &policy.1,
            layout_2,
        },
        revoked: &catalog.revoked,
        ca_bundle: &[facts.ca_der],
        pools: facts.pools,
    })
    .encode_frame();
    let sent = Sent {
        catalog,
        policy_version: policy.0,
    };
    (frame, sent)
}

/// `node`'s delta from what it was sent last to `catalog` under `policy`, as the frame to
/// send; `step` is the peer change between the two catalogs ([`Catalogs::step`]).
pub fn delta_from(
    node: &NodeName,
    last: &Sent,
    catalog: Arc<Catalog>,
    step: &(Vec<PeerInfo>, Vec<NodeName>),
    policy: &(u64, Policy),
    layout_2: bool,
) -> (Vec<u8>, Sent) {
    let frame = DownRef::Delta(DeltaRef {
        base_version: last.catalog.version,
        version: catalog.version,
        node,
        upsert: Except {
            items: &step.0,
            except: node,
        },
        remove: Except {
            items: &step.1,
            except: node,
        },
        labels: step.0.iter().find(|p| &p.node == node).map(|p| &p.labels),
        policy_version: policy.0,
        policy: (policy.0 != last.policy_version).then_some(PolicyWire {
            policy: &policy.1,
            layout_2,
        }),
        revoked: (catalog.revoked != last.catalog.revoked).then_some(&catalog.revoked[..]),
        ca_bundle: None,
        pools: None,
    })
    .encode_frame();
    let sent = Sent {
        catalog,
        policy_version: policy.0,
    };
    (frame, sent)
}

/// Peer changes from one catalog to another, shared by every session making that step.
/// Keyed by the catalogs themselves (held, so their identity is unique), not by version
/// numbers.
type PeerStep = (
    Arc<Catalog>,
    Arc<Catalog>,
    Arc<(Vec<PeerInfo>, Vec<NodeName>)>,
);
/// How many catalog steps are remembered (sessions mostly make the same step).
const STEP_CACHE: usize = 16;

/// The least time between two published catalogs, given the sessions this replica holds
/// and the nodes in the catalog: 20 ms plus 200 us per node of the mesh (or per session,
/// if more), at most 2 s. A change after a quiet spell is published at once; a stream of
/// changes (a join storm) is published once per interval, so a replica pushes at most
/// about 5,000 times a second (a push, its frame, its packets and the node's ack cost
/// the coordinator 100-200 us: measured, a 10,000-node join storm spent most of its time
/// pushing at 100 us per session), building catalogs (a read of every node row, about
/// 5 us a node) takes a few percent of a core, and a node hears of a change as soon on
/// any replica as on a single coordinator. Counting only a replica's own sessions made
/// three replicas on 10,000 nodes push three times as often in all as one coordinator,
/// and their nodes ack three times as much.
pub fn interval(sessions: usize, nodes: usize) -> Duration {
    let us = 20_000 + 200 * sessions.max(nodes) as u64;
    Duration::from_micros(us.min(2_000_000))
}

/// The catalog built last, the steps sessions took from it, and the version published.
#[derive(Debug)]
pub struct Catalogs {
    last: Mutex<Option<Arc<Catalog>>>,
    /// Peers in the catalog built last (read without waiting for a build).
    size: std::sync::atomic::AtomicUsize,
    /// The catalog published last.
    published_catalog: Mutex<Option<Arc<Catalog>>>,
    steps: Mutex<VecDeque<PeerStep>>,
    published: watch::Sender<u64>,
    /// A revocation is waiting: the next catalog is published without waiting out the
    /// interval (the deny list reaches every node at once, whatever the churn).
    urgent: tokio::sync::Notify,
}

impl Default for Catalogs {
    fn default() -> Self {
        Self {
            last: Mutex::new(None),
            size: std::sync::atomic::AtomicUsize::new(0),
            published_catalog: Mutex::new(None),
            steps: Mutex::new(VecDeque::new()),
            published: watch::channel(0).0,
            urgent: tokio::sync::Notify::new(),
        }
    }
}

impl Catalogs {
    /// The catalog built last if it is at least `version`, else `build()`'s (which must be
    /// at least `version`), kept as the last.
    pub fn at_least(
        &self,
        version: u64,
        build: impl FnOnce() -> Result<Catalog, MeshError>,
    ) -> Result<Arc<Catalog>, MeshError> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // A newer catalog than asked for is as good (a change raced this call).
        if let Some(c) = last.as_ref().filter(|c| c.version >= version) {
            return Ok(c.clone());
        }
        let c = Arc::new(build()?);
        self.size
            .store(c.peers.len(), std::sync::atomic::Ordering::Relaxed);
        *last = Some(c.clone());
        Ok(c)
    }

    /// Peers in the catalog built last.
    pub fn size(&self) -> usize {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The peer changes from catalog `a` to `b`, computed once per step.
    pub fn step(&self, a: &Arc<Catalog>, b: &Arc<Catalog>) -> Arc<(Vec<PeerInfo>, Vec<NodeName>)> {
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, d)) = steps
            .iter()
            .find(|(x, y, _)| Arc::ptr_eq(x, a) && Arc::ptr_eq(y, b))
        {
            return d.clone();
        }
        let d = Arc::new(delta::diff_peers(&a.peers, &b.peers));
        if steps.len() >= STEP_CACHE {
            steps.pop_front();
        }
        steps.push_back((a.clone(), b.clone(), d.clone()));
        d
    }

    /// The step from what `last` was built from to `catalog`.
    pub fn step_from(
        &self,
        last: &Sent,
        catalog: &Arc<Catalog>,
    ) -> Arc<(Vec<PeerInfo>, Vec<NodeName>)> {
        self.step(&last.catalog, catalog)
    }

    /// Tells the sessions `catalog`'s version is built (never backwards).
    pub fn publish(&self, catalog: &Arc<Catalog>) {
        let version = catalog.version;
        {
            let mut last = self
                .published_catalog
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.as_ref().is_none_or(|c| c.version <= version) {
                *last = Some(catalog.clone());
            }
        }
        self.published.send_if_modified(|cur| {
            let newer = version > *cur;
            if newer {
                *cur = version;
            }
            newer
        });
    }

    /// Subscribes to published versions: a session pushes when this moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Asks for the next catalog to be published at once (kept until the publisher
    /// looks, when it is not waiting now).
    pub fn urge(&self) {
        self.urgent.notify_one();
    }

    /// Resolves when [`Catalogs::urge`] was called.
    pub async fn urged(&self) {
        self.urgent.notified().await
    }

    /// True when `revoked` is not the deny list of the catalog published last (a
    /// revocation is not published yet). Compared with what was published, not what was
    /// built: a catalog built for one session (a node that moved here holding a newer
    /// version) may hold the revocation while the other sessions have not been sent it.
    pub fn revoked_differs(&self, revoked: &[Serial]) -> bool {
        let last = self
            .published_catalog
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        last.as_ref().map_or(&[][..], |c| &c.revoked[..]) != revoked
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::health::HealthBook;
    use quicmesh_protocol::wire::ControlDown;
    use std::collections::BTreeMap;

    /// The message a frame carries, as a node decodes it.
    pub(crate) fn decode_frame(frame: &[u8]) -> ControlDown {
        quicmesh_protocol::wire::decode(&frame[quicmesh_protocol::wire::FRAME_HEADER_LEN..])
            .unwrap()
    }

    fn node(name: &str, service: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            services: vec![service.into()],
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            ..NodeRecord::default()
        }
    }

    fn catalog(version: u64, nodes: Vec<NodeRecord>) -> Arc<Catalog> {
        let book = HealthBook::new("r", Duration::from_secs(15), 0);
        Arc::new(
            Catalog::build(
                version,
                nodes,
                &book,
                &Pools::default_for(&[7; 32]),
                Vec::new(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn the_catalog_leaves_out_revoked_nodes_and_is_sorted_by_name() {
        let mut gone = node("c", "db");
        gone.revoked_at = Some(1);
        let c = catalog(3, vec![node("b", "web"), gone, node("a", "db")]);
        let names: Vec<&str> = c.peers.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(c.peers[1].services, [ServiceName::new("web").unwrap()]);
    }

    #[test]
    fn a_node_gets_every_other_node_and_its_own_labels_then_only_what_changed() {
        let policy = (1, Policy::default());
        let td = TrustDomain::new("t.internal").unwrap();
        let facts = MeshFacts {
            trust_domain: &td,
            ca_der: b"ca",
            pools: Pools::default_for(&[7; 32]),
        };
        let me = NodeName::new("a").unwrap();
        let c1 = catalog(1, vec![node("a", "db"), node("b", "web")]);
        let (frame, sent) = whole(&me, c1.clone(), &policy, facts, true);
        let ControlDown::Snapshot(snap) = decode_frame(&frame) else {
            panic!("a whole snapshot")
        };
        assert_eq!(snap.peers.len(), 1, "not itself");
        assert_eq!(snap.labels.get("zone"), Some("a"));
        let cats = Catalogs::default();
        let c2 = catalog(2, vec![node("a", "db"), node("c", "web")]);
        let step = cats.step_from(&sent, &c2);
        let (frame, sent2) = delta_from(&me, &sent, c2.clone(), &step, &policy, true);
        let ControlDown::Delta(d) = decode_frame(&frame) else {
            panic!("a delta")
        };
        assert_eq!((d.base_version, d.version), (1, 2));
        assert_eq!(d.upsert.len(), 1);
        assert_eq!(d.upsert[0].node.as_str(), "c");
        assert_eq!(d.remove, vec![NodeName::new("b").unwrap()]);
        assert!(d.policy.is_none(), "the policy did not change");
        assert_eq!(sent2.version(), 2);
        // The same step for another session is the same shared computation.
        assert!(Arc::ptr_eq(&step, &cats.step(&c1, &c2)));
    }

    /// A catalog built for one session (a node that moved here with a newer version) may
    /// hold a revocation the other sessions were not sent: the revocation stays pending,
    /// and so urges the publisher, until a catalog holding it is published.
    #[test]
    fn a_revocation_is_pending_until_a_catalog_holding_it_is_published() {
        let cats = Catalogs::default();
        let revoked = vec![Serial::new(vec![9]).unwrap()];
        let c = cats
            .at_least(5, || {
                Ok(Catalog {
                    version: 5,
                    peers: Vec::new(),
                    revoked: revoked.clone(),
                })
            })
            .unwrap();
        assert!(cats.revoked_differs(&revoked), "built, not published");
        cats.publish(&c);
        assert!(!cats.revoked_differs(&revoked), "published");
        assert!(cats.revoked_differs(&[]), "the deny list shrank");
    }

    #[test]
    fn the_publishing_interval_grows_with_sessions_and_is_capped() {
        assert_eq!(interval(0, 0), Duration::from_millis(20));
        assert_eq!(interval(1_000, 1_000), Duration::from_millis(220));
        // Three replicas sharing 6,000 nodes publish as often as one coordinator.
        assert_eq!(interval(2_000, 6_000), interval(6_000, 6_000));
        assert_eq!(interval(2_000, 6_000), Duration::from_millis(1_220));
        // Sessions before the first catalog is built.
        assert_eq!(interval(5_000, 0), Duration::from_millis(1_020));
        assert_eq!(interval(10_000, 10_000), Duration::from_secs(2));
        assert_eq!(interval(1_000_000, 0), Duration::from_secs(2));
    }
}
