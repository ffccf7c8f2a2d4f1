//! Identity newtypes and SPIFFE-style identifiers.
//!
//! Every name that crosses a module boundary is one of these checked types; they are
//! parsed once (config, wire, certificate) and never re-validated downstream.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} characters")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} {value:?} has invalid character {ch:?} (allowed: a-z, 0-9{extra})")]
    BadChar {
        kind: &'static str,
        value: String,
        ch: char,
        extra: &'static str,
    },
    #[error("{kind} {value:?} must start and end with a letter or digit")]
    BadEdge { kind: &'static str, value: String },
}

fn check_label_like(
    kind: &'static str,
    value: &str,
    max: usize,
    extra: &'static str,
) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if value.len() > max {
        return Err(NameError::TooLong { kind, max });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(*c)))
    {
        return Err(NameError::BadChar {
            kind,
            value: value.to_string(),
            ch,
            extra,
        });
    }
    let first = value.chars().next().unwrap_or('-');
    let last = value.chars().last().unwrap_or('-');
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err(NameError::BadEdge {
            kind,
            value: value.to_string(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$m:meta])* $ty:ident, $kind:literal, $max:expr, $extra:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Checks `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_label_like($kind, &value, $max, $extra)?;
                Ok(Self(value))
            }
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(v: String) -> Result<Self, NameError> {
                Self::new(v)
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0
            }
        }
        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The mesh's trust domain, e.g. `quicmesh.local` (DNS-like, lower case).
    TrustDomain, "trust domain", 253, ".-"
);
name_type!(
    /// A node's name, unique in the mesh (a DNS label).
    NodeName, "node name", 63, "-"
);
name_type!(
    /// A service's name (a DNS label).
    ServiceName, "service name", 63, "-"
);
name_type!(
    /// A label key such as `datacenter`.
    LabelKey, "label key", 63, "-_."
);

/// Node labels (`datacenter = "dc1"`): at most [`Labels::MAX`] entries, values up to 255 bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<LabelKey, String>",
    into = "BTreeMap<LabelKey, String>"
)]
pub struct Labels(BTreeMap<LabelKey, String>);

/// Why a label set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelsError {
    #[error("too many labels ({0}, at most 32)")]
    TooMany(usize),
    #[error("label {key} value is longer than 255 bytes")]
    ValueTooLong { key: String },
    #[error("label {key} value contains a control character")]
    ValueControl { key: String },
    #[error(transparent)]
    Key(#[from] NameError),
}

impl Labels {
    /// Most labels a node may carry.
    pub const MAX: usize = 32;

    /// Checks and wraps a map of labels.
    pub fn new(map: BTreeMap<LabelKey, String>) -> Result<Self, LabelsError> {
        if map.len() > Self::MAX {
            return Err(LabelsError::TooMany(map.len()));
        }
        for (k, v) in &map {
            if v.len() > 255 {
                return Err(LabelsError::ValueTooLong { key: k.to_string() });
            }
            if v.chars().any(char::is_control) {
                return Err(LabelsError::ValueControl { key: k.to_string() });
            }
        }
        Ok(Self(map))
    }

    /// Builds labels from string pairs, checking every key.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, LabelsError> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            map.insert(LabelKey::new(k)?, v.to_string());
        }
        Self::new(map)
    }

    /// The value of label `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.as_str())
    }

    /// All labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&LabelKey, &String)> {
        self.0.iter()
    }
}

impl TryFrom<BTreeMap<LabelKey, String>> for Labels {
    type Error = LabelsError;
    fn try_from(m: BTreeMap<LabelKey, String>) -> Result<Self, LabelsError> {
        Self::new(m)
    }
}
impl From<Labels> for BTreeMap<LabelKey, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}

/// A SPIFFE-style identity carried as a URI SAN in mesh certificates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SpiffeId {
    /// `spiffe://<td>/node/<name>`
    Node(TrustDomain, NodeName),
    /// `spiffe://<td>/svc/<service>`
    Service(TrustDomain, ServiceName),
    /// `spiffe://<td>/coordinator`
    Coordinator(TrustDomain),
}

/// Why a URI is not a mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("uri {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error(
        "uri {0:?} has an unknown path (expected /node/<name>, /svc/<service> or /coordinator)"
    )]
    Path(String),
    #[error("uri {uri:?}: {source}")]
    Name { uri: String, source: NameError },
}

impl SpiffeId {
    /// The trust domain the identity belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        match self {
            SpiffeId::Node(td, _) | SpiffeId::Service(td, _) | SpiffeId::Coordinator(td) => td,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpiffeId::Node(td, n) => write!(f, "spiffe://{td}/node/{n}"),
            SpiffeId::Service(td, s) => write!(f, "spiffe://{td}/svc/{s}"),
            SpiffeId::Coordinator(td) => write!(f, "spiffe://{td}/coordinator"),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(uri: &str) -> Result<Self, SpiffeError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(uri.to_string()))?;
        let name_err = |source| SpiffeError::Name {
            uri: uri.to_string(),
            source,
        };
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeError::Path(uri.to_string()))?;
        let td = TrustDomain::new(td).map_err(name_err)?;
        match path.split_once('/') {
            Some(("node", n)) => Ok(SpiffeId::Node(td, NodeName::new(n).map_err(name_err)?)),
            Some(("svc", s)) => Ok(SpiffeId::Service(
                td,
                ServiceName::new(s).map_err(name_err)?,
            )),
            None if path == "coordinator" => Ok(SpiffeId::Coordinator(td)),
            _ => Err(SpiffeError::Path(uri.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_dns_labels_and_refuse_the_rest() {
        assert!(NodeName::new("web-1").is_ok());
        assert_eq!(
            NodeName::new("").unwrap_err(),
            NameError::Empty { kind: "node name" }
        );
        assert!(matches!(
            ServiceName::new("Web").unwrap_err(),
            NameError::BadChar { ch: 'W', .. }
        ));
        assert!(matches!(
            ServiceName::new("-web").unwrap_err(),
            NameError::BadEdge { .. }
        ));
        assert!(matches!(
            NodeName::new("a".repeat(64)).unwrap_err(),
            NameError::TooLong { max: 63, .. }
        ));
        assert!(TrustDomain::new("quicmesh.local").is_ok());
        assert!(NodeName::new("a.b").is_err());
    }

    #[test]
    fn spiffe_ids_round_trip() {
        for s in [
            "spiffe://quicmesh.local/node/web-1",
            "spiffe://quicmesh.local/svc/db",
            "spiffe://td/coordinator",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
        assert!(matches!(
            "http://x/node/a".parse::<SpiffeId>(),
            Err(SpiffeError::Scheme(_))
        ));
        assert!(matches!(
            "spiffe://x/user/a".parse::<SpiffeId>(),
            Err(SpiffeError::Path(_))
        ));
        assert!(matches!(
            "spiffe://x/node/A".parse::<SpiffeId>(),
            Err(SpiffeError::Name { .. })
        ));
    }

    #[test]
    fn labels_are_bounded() {
        let l = Labels::from_pairs([("datacenter", "dc1")]).unwrap();
        assert_eq!(l.get("datacenter"), Some("dc1"));
        let big = Labels::from_pairs([("k", &*"v".repeat(256))]);
        assert!(matches!(big, Err(LabelsError::ValueTooLong { .. })));
    }
}
