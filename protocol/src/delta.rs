//! Snapshot deltas: what a node needs to go from the snapshot it holds to a newer one.
//! A mesh of N nodes changes one node at a time (a join, a move, a revocation); sending
//! every node the whole catalog on every change costs O(N) bytes per node per change, a
//! delta costs what changed. Peers are kept sorted by node name, so applying a delta
//! gives exactly the snapshot the coordinator would have sent whole.

use crate::ident::NodeName;
use crate::wire::{PeerInfo, Snapshot, SnapshotDelta};

/// Why a delta cannot be applied to the snapshot held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta is for node {got}, this is {have}")]
    WrongNode { got: String, have: String },
    #[error("delta starts from version {base}, the node holds {have}")]
    BaseMismatch { base: u64, have: u64 },
    #[error("delta goes from version {base} to {version}, which is not forward")]
    NotForward { base: u64, version: u64 },
    #[error("peer {0} is both upserted and removed")]
    UpsertAndRemove(String),
    #[error("peer {0} appears twice in the delta")]
    Duplicate(String),
    #[error("the delta lists the node itself ({0}) as a peer")]
    SelfAsPeer(String),
}

/// Sorts peers by node name (the order every snapshot keeps).
pub fn sort_peers(peers: &mut [PeerInfo]) {
    peers.sort_by(|a, b| a.node.cmp(&b.node));
}

/// Applies `d` to `base`, giving the newer snapshot. Nothing is changed on error.
pub fn apply(base: &Snapshot, d: &SnapshotDelta) -> Result<Snapshot, DeltaError> {
    if d.node != base.node {
        return Err(DeltaError::WrongNode {
            got: d.node.to_string(),
            have: base.node.to_string(),
        });
    }
    if d.base_version != base.version {
        return Err(DeltaError::BaseMismatch {
            base: d.base_version,
            have: base.version,
        });
    }
    if d.version <= d.base_version {
        return Err(DeltaError::NotForward {
            base: d.base_version,
            version: d.version,
        });
    }
    let mut touched = std::collections::BTreeSet::<&NodeName>::new();
    for n in d.upsert.iter().map(|p| &p.node).chain(d.remove.iter()) {
        if n == &base.node {
            return Err(DeltaError::SelfAsPeer(n.to_string()));
        }
        if !touched.insert(n) {
            return Err(
                if d.upsert.iter().any(|p| &p.node == n) && d.remove.contains(n) {
                    DeltaError::UpsertAndRemove(n.to_string())
                } else {
                    DeltaError::Duplicate(n.to_string())
                },
            );
        }
    }
    let mut peers: Vec<PeerInfo> = base
        .peers
        .iter()
        .filter(|p| !touched.contains(&p.node))
        .cloned()
        .collect();
    peers.extend(d.upsert.iter().cloned());
    sort_peers(&mut peers);
    Ok(Snapshot {
        version: d.version,
        node: base.node.clone(),
        trust_domain: base.trust_domain.clone(),
        labels: d.labels.clone().unwrap_or_else(|| base.labels.clone()),
        peers,
        policy_version: d.policy_version,
        policy: d.policy.clone().unwrap_or_else(|| base.policy.clone()),
        revoked: d.revoked.clone().unwrap_or_else(|| base.revoked.clone()),
        ca_bundle: d
            .ca_bundle
            .clone()
            .unwrap_or_else(|| base.ca_bundle.clone()),
        pools: d.pools.unwrap_or(base.pools),
    })
}

/// Changes between two sorted peer lists: (upserted or changed entries, removed names).
pub fn diff_peers(old: &[PeerInfo], new: &[PeerInfo]) -> (Vec<PeerInfo>, Vec<NodeName>) {
    use std::cmp::Ordering;
    let (mut upsert, mut remove) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => match a.node.cmp(&b.node) {
                Ordering::Less => {
                    remove.push(a.node.clone());
                    i += 1;
                }
                Ordering::Greater => {
                    upsert.push(b.clone());
                    j += 1;
                }
                Ordering::Equal => {
                    if a != b {
                        upsert.push(b.clone());
                    }
                    i += 1;
                    j += 1;
                }
            },
            (Some(a), None) => {
                remove.push(a.node.clone());
                i += 1;
            }
            (None, Some(b)) => {
                upsert.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    (upsert, remove)
}

/// The delta from `old` to `new` (two snapshots of one node, peers sorted by name).
pub fn diff(old: &Snapshot, new: &Snapshot) -> SnapshotDelta {
    let (upsert, remove) = diff_peers(&old.peers, &new.peers);
    SnapshotDelta {
        base_version: old.version,
        version: new.version,
        node: new.node.clone(),
        upsert,
        remove,
        labels: (old.labels != new.labels).then(|| new.labels.clone()),
        policy_version: new.policy_version,
        policy: (old.policy_version != new.policy_version || old.policy != new.policy)
            .then(|| new.policy.clone()),
        revoked: (old.revoked != new.revoked).then(|| new.revoked.clone()),
        ca_bundle: (old.ca_bundle != new.ca_bundle).then(|| new.ca_bundle.clone()),
        pools: (old.pools != new.pools).then_some(new.pools),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::{Labels, ServiceName, TrustDomain};
    use crate::policy::Policy;

    fn peer(n: &str) -> PeerInfo {
        PeerInfo {
            node: NodeName::new(n).unwrap(),
            endpoint: None,
            services: vec![ServiceName::new("db").unwrap()],
            labels: Labels::default(),
            overlay: vec![],
            online: true,
            critical: Vec::new(),
            candidates: Vec::new(),
            relay: false,
            nat: false,
        }
    }

    fn snap(version: u64, peers: &[&str]) -> Snapshot {
        Snapshot {
            version,
            node: NodeName::new("me").unwrap(),
            trust_domain: TrustDomain::new("mesh.test").unwrap(),
            labels: Labels::default(),
            peers: peers.iter().map(|p| peer(p)).collect(),
            policy_version: 1,
            policy: Policy::parse("").unwrap(),
            revoked: vec![],
            ca_bundle: vec![],
            pools: crate::overlay::Pools::default_for(&[0; 32]),
        }
    }

    #[test]
    fn a_join_is_one_upsert_and_nothing_else() {
        let (a, b) = (snap(3, &["a", "c"]), snap(4, &["a", "b", "c"]));
        let d = diff(&a, &b);
        assert_eq!(d.upsert, vec![peer("b")]);
        assert!(d.remove.is_empty() && d.policy.is_none() && d.revoked.is_none());
        assert_eq!(apply(&a, &d).unwrap(), b);
    }

    #[test]
    fn malformed_deltas_are_refused_with_the_reason() {
        let base = snap(3, &["a"]);
        let mut d = diff(&base, &snap(4, &["b"]));
        d.remove.push(NodeName::new("b").unwrap());
        assert_eq!(
            apply(&base, &d),
            Err(DeltaError::UpsertAndRemove("b".into()))
        );
        let mut d = diff(&base, &snap(4, &["a", "b"]));
        d.upsert.push(peer("b"));
        assert_eq!(apply(&base, &d), Err(DeltaError::Duplicate("b".into())));
        let mut d = diff(&base, &snap(4, &[]));
        d.upsert.push(peer("me"));
        assert_eq!(apply(&base, &d), Err(DeltaError::SelfAsPeer("me".into())));
        let d = diff(&base, &snap(3, &[]));
        assert_eq!(
            apply(&base, &d),
            Err(DeltaError::NotForward {
                base: 3,
                version: 3
            })
        );
        let mut d = diff(&base, &snap(4, &[]));
        d.node = NodeName::new("other").unwrap();
        assert!(matches!(
            apply(&base, &d),
            Err(DeltaError::WrongNode { .. })
        ));
    }
}
