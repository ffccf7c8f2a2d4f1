//! Instance choice for an upstream: healthy instances only, nearest locality first,
//! power of two choices on outstanding requests within a locality. Pure: the load of each
//! instance and the random draws are passed in.

use serde::{Deserialize, Serialize};

use crate::ident::{Labels, NodeName};

/// Label naming a node's datacenter.
pub const DATACENTER: &str = "datacenter";
/// Label naming a node's cloud.
pub const CLOUD: &str = "cloud";

/// How an upstream weighs locality (`locality = "prefer" | "only" | "off"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Locality {
    /// Same datacenter first, then same cloud, then anywhere.
    #[default]
    Prefer,
    /// Same datacenter only.
    Only,
    /// Every healthy instance alike.
    Off,
}

impl std::str::FromStr for Locality {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefer" => Ok(Locality::Prefer),
            "only" => Ok(Locality::Only),
            "off" => Ok(Locality::Off),
            other => Err(format!(
                "{other:?} is not a locality (expected \"prefer\", \"only\" or \"off\")"
            )),
        }
    }
}

/// How near an instance is: 0 same datacenter, 1 same cloud, 2 elsewhere.
pub fn tier(local: &Labels, remote: &Labels) -> u8 {
    let same = |key: &str| {
        let (a, b) = (local.get(key), remote.get(key));
        a.is_some() && a == b
    };
    if same(DATACENTER) {
        0
    } else if same(CLOUD) {
        1
    } else {
        2
    }
}

/// An instance the caller may route to (already filtered to healthy ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub node: &'a NodeName,
    pub labels: &'a Labels,
    /// Requests in flight to it from this node.
    pub outstanding: usize,
}

/// The order in which to try instances: the nearest locality that has any, the power of
/// two choices' winner first (of two instances drawn with `draws`), then the rest of that
/// locality by load, then farther localities (unless `mode` is `Only`). A connection
/// failure moves to the next in this order.
pub fn order<'a>(
    local: &Labels,
    candidates: &[Candidate<'a>],
    mode: Locality,
    draws: (u64, u64),
) -> Vec<&'a NodeName> {
    let mut tiers: [Vec<&Candidate<'a>>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for c in candidates {
        let t = match mode {
            Locality::Off => 0,
            _ => tier(local, c.labels),
        };
        if mode == Locality::Only && t != 0 {
            continue;
        }
        tiers[usize::from(t)].push(c);
    }
    let mut out = Vec::with_capacity(candidates.len());
    for t in tiers.iter_mut() {
        if t.is_empty() {
            continue;
        }
        // Name order first, so the draws alone decide (inputs may come in any order).
        t.sort_by(|a, b| a.node.cmp(b.node));
        let n = t.len() as u64;
        let a = (draws.0 % n) as usize;
        let mut b = (draws.1 % n) as usize;
        if n > 1 && a == b {
            b = (b + 1) % t.len();
        }
        let first = if t[b].outstanding < t[a].outstanding {
            b
        } else {
            a
        };
        let winner = t.remove(first);
        out.push(winner.node);
        t.sort_by_key(|c| c.outstanding);
        out.extend(t.iter().map(|c| c.node));
    }
    out
}

/// Relays in the order a node uses them: same datacenter, then same cloud, then the
/// rest, by name within a tier (so both ends of a tunnel tend to pick the same one).
pub fn relay_order<'a>(local: &Labels, relays: &[(&'a NodeName, &'a Labels)]) -> Vec<&'a NodeName> {
    let mut v: Vec<(u8, &NodeName)> = relays.iter().map(|(n, l)| (tier(local, l), *n)).collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_nearest_first_then_by_name() {
        let me = labels("dc1", "aws");
        let (a, b, c, d) = (
            NodeName::new("relay-a").unwrap(),
            NodeName::new("relay-b").unwrap(),
            NodeName::new("relay-c").unwrap(),
            NodeName::new("relay-d").unwrap(),
        );
        let (elsewhere, same_cloud, same_dc) = (
            labels("dc9", "gcp"),
            labels("dc2", "aws"),
            labels("dc1", "aws"),
        );
        let order = relay_order(
            &me,
            &[
                (&a, &elsewhere),
                (&b, &same_cloud),
                (&d, &same_dc),
                (&c, &same_dc),
            ],
        );
        assert_eq!(order, vec![&c, &d, &b, &a]);
        // Without labels every relay is as near: by name.
        let order = relay_order(&Labels::default(), &[(&b, &same_dc), (&a, &elsewhere)]);
        assert_eq!(order, vec![&a, &b]);
    }

    fn labels(dc: &str, cloud: &str) -> Labels {
        Labels::from_pairs([(DATACENTER, dc), (CLOUD, cloud)]).unwrap()
    }

    #[test]
    fn nearest_locality_first_then_farther() {
        let here = labels("dc1", "aws");
        let (a, b, c) = (
            NodeName::new("a").unwrap(),
            NodeName::new("b").unwrap(),
            NodeName::new("c").unwrap(),
        );
        let (la, lb, lc) = (
            labels("dc2", "gcp"),
            labels("dc1", "aws"),
            labels("dc3", "aws"),
        );
        let cands = [
            Candidate {
                node: &a,
                labels: &la,
                outstanding: 0,
            },
            Candidate {
                node: &b,
                labels: &lb,
                outstanding: 9,
            },
            Candidate {
                node: &c,
                labels: &lc,
                outstanding: 0,
            },
        ];
        // Same datacenter wins even when busier; then same cloud; then elsewhere.
        assert_eq!(
            order(&here, &cands, Locality::Prefer, (0, 1)),
            vec![&b, &c, &a]
        );
        // Only: nothing outside the datacenter.
        assert_eq!(order(&here, &cands, Locality::Only, (0, 1)), vec![&b]);
        // Off: one pool, least loaded of the two drawn first.
        let off = order(&here, &cands, Locality::Off, (0, 1));
        assert_eq!(off[0], &a, "a (idle) beats b (9 in flight)");
        assert_eq!(off.len(), 3);
        // Denied twin: no instance in the datacenter and `only` -> nothing to try.
        let far = [Candidate {
            node: &a,
            labels: &la,
            outstanding: 0,
        }];
        assert!(order(&here, &far, Locality::Only, (0, 0)).is_empty());
    }

    #[test]
    fn two_choices_pick_the_less_loaded_of_the_two_drawn() {
        let here = labels("dc1", "aws");
        let names: Vec<NodeName> = (0..4)
            .map(|i| NodeName::new(format!("n{i}")).unwrap())
            .collect();
        let l = labels("dc1", "aws");
        let loads = [5, 1, 7, 0];
        let cands: Vec<Candidate> = names
            .iter()
            .zip(loads)
            .map(|(n, o)| Candidate {
                node: n,
                labels: &l,
                outstanding: o,
            })
            .collect();
        // Draws n0 (5) and n1 (1): n1 first, then the rest by load.
        let o = order(&here, &cands, Locality::Prefer, (0, 1));
        assert_eq!(o, vec![&names[1], &names[3], &names[0], &names[2]]);
        // Same index drawn twice still compares two instances.
        let o = order(&here, &cands, Locality::Prefer, (2, 2));
        assert_eq!(o[0], &names[3], "n2 (7) vs n3 (0)");
    }
}
