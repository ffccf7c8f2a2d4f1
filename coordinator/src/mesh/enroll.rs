//! Join tokens, enrollment and renewal: who gets a certificate, for what, until when. Each
//! takes the time as an argument (the `_at` forms), so expiry is tested without waiting;
//! the plain forms use the clock.

use std::collections::BTreeMap;
use std::net::IpAddr;

use quicmesh_protocol::ident::{NodeName, ServiceName};
use quicmesh_protocol::token::JoinToken;
use quicmesh_protocol::wire::{ControlDown, EnrollErrorCode, EnrollRequest, EnrollResponse};

use super::{
    hash_secret, labels_from, now, random_hex32, Mesh, MeshError, ENROLL_RETRY_WINDOW_SECS,
    MAX_TOKEN_TTL_SECS,
};
use crate::ca::Ca;
use crate::store::{NodeRecord, TokenProblem, TokenRecord};

impl Mesh {
    /// Creates a join token for `node`, allowed to claim `services`, carrying exactly
    /// `labels`, and granting the relay role when `relay`.
    pub fn create_token(
        &self,
        node: &str,
        services: &[String],
        labels: &BTreeMap<String, String>,
        relay: bool,
        ttl_secs: i64,
    ) -> Result<(String, i64), MeshError> {
        self.create_token_at(node, services, labels, relay, ttl_secs, now())
    }

    /// [`Mesh::create_token`] at time `t` (Unix seconds).
    pub fn create_token_at(
        &self,
        node: &str,
        services: &[String],
        labels: &BTreeMap<String, String>,
        relay: bool,
        ttl_secs: i64,
        t: i64,
    ) -> Result<(String, i64), MeshError> {
        let node = NodeName::new(node).map_err(|e| MeshError::Invalid {
            field: "node",
            reason: e.to_string(),
        })?;
        let services = services
            .iter()
            .map(|s| {
                ServiceName::new(s.as_str()).map_err(|e| MeshError::Invalid {
                    field: "service",
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        labels_from(labels)?;
        if ttl_secs <= 0 || ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(MeshError::Invalid {
                field: "ttl",
                reason: format!("must be between 1s and {}d", MAX_TOKEN_TTL_SECS / 86400),
            });
        }
        let token = JoinToken {
            ca_fingerprint: self.ca.fingerprint(),
            secret: random_hex32(),
        };
        self.store.insert_token(&TokenRecord {
            hash: hash_secret(&token.secret_hex()),
            node: node.to_string(),
            services: services.iter().map(ToString::to_string).collect(),
            labels: labels.clone(),
            created_at: t,
            expires_at: t + ttl_secs,
            used_at: None,
            used_key: None,
            relay,
            voided_at: None,
        })?;
        Ok((token.to_string(), t + ttl_secs))
    }

    /// Handles an enrollment request.
    pub fn enroll(&self, req: &EnrollRequest) -> ControlDown {
        self.enroll_at(req, now())
    }

    /// [`Mesh::enroll`] at time `t` (Unix seconds): token expiry and the certificate's
    /// validity are reckoned from it.
    pub fn enroll_at(&self, req: &EnrollRequest, t: i64) -> ControlDown {
        match self.try_enroll(req, t) {
            Ok(r) => {
                tracing::info!(node = %req.node, "node enrolled");
                ControlDown::Enrolled(r)
            }
            Err((code, detail)) => {
                tracing::warn!(node = %req.node, reason = code.as_str(), %detail, "enrollment refused");
                ControlDown::EnrollRefused { code, detail }
            }
        }
    }

    fn try_enroll(
        &self,
        req: &EnrollRequest,
        t: i64,
    ) -> Result<EnrollResponse, (EnrollErrorCode, String)> {
        let internal = |e: &dyn std::fmt::Display| (EnrollErrorCode::Internal, e.to_string());
        let hash = hash_secret(&req.secret);
        let tok = self
            .store
            .token(&hash)
            .map_err(|e| internal(&e))?
            .ok_or((EnrollErrorCode::TokenUnknown, String::new()))?;
        let key_id =
            Ca::csr_key_id(&req.csr_der).map_err(|e| (EnrollErrorCode::BadCsr, e.to_string()))?;
        if tok.voided_at.is_some() {
            // A revocation of the name since: no earlier grant survives it, the retry
            // window below included.
            return Err((
                EnrollErrorCode::NodeRevoked,
                format!(
                    "token voided: node {} was revoked after it was issued; create a new token",
                    tok.node
                ),
            ));
        }
        if let Some(used_at) = tok.used_at {
            // The same node proving the same key again soon after: its answer was lost on
            // the way (a busy or lossy path). It gets a certificate again; anyone else, or
            // later, does not.
            let same = tok.used_key.as_deref() == Some(key_id.as_str())
                && tok.node == req.node.as_str()
                && t - used_at <= ENROLL_RETRY_WINDOW_SECS;
            if !same {
                return Err((EnrollErrorCode::TokenUsed, String::new()));
            }
            let cert_der = self
                .renew_at(&req.node, &req.csr_der, t)
                .map_err(|e| (EnrollErrorCode::NodeRevoked, e.to_string()))?;
            tracing::info!(node = %req.node, "enrollment retried with the same key: certificate issued again");
            return Ok(EnrollResponse {
                trust_domain: self.ca.trust_domain.clone(),
                cert_der,
                ca_bundle: vec![self.ca.cert_der.clone()],
            });
        }
        if tok.expires_at <= t {
            return Err((
                EnrollErrorCode::TokenExpired,
                format!("expired {}s ago", t - tok.expires_at),
            ));
        }
        if tok.node != req.node.as_str() {
            return Err((
                EnrollErrorCode::NodeMismatch,
                format!("token is for {}, request is for {}", tok.node, req.node),
            ));
        }
        if let Some(s) = req
            .services
            .iter()
            .find(|s| !tok.services.iter().any(|a| a == s.as_str()))
        {
            return Err((EnrollErrorCode::ServiceNotAllowed, format!("service {s}")));
        }
        let allowed = labels_from(&tok.labels).map_err(|e| internal(&e))?;
        if let Some((k, v)) = req
            .labels
            .iter()
            .find(|(k, v)| allowed.get(k.as_str()) != Some(v.as_str()))
        {
            return Err((
                EnrollErrorCode::LabelNotAllowed,
                format!("label {k}={v} (create the token with --label {k}={v})"),
            ));
        }
        // The node carries exactly its token's labels: one it did not claim is assigned all
        // the same, or leaving a label out of the config would escape a `tag:` deny rule.
        let omitted: Vec<String> = allowed
            .iter()
            .filter(|(k, _)| req.labels.get(k.as_str()).is_none())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !omitted.is_empty() {
            tracing::info!(node = %req.node, labels = %omitted.join(","), "node did not claim every label of its token; it carries them all the same");
        }
        let ips = self
            .overlay_addresses(req.node.as_str())
            .map_err(|e| internal(&e))?;
        let leaf = self
            .ca
            .sign_node(
                &req.csr_der,
                &req.node,
                &req.services,
                &ips,
                t,
                self.cert_ttl_secs,
            )
            .map_err(|e| (EnrollErrorCode::BadCsr, e.to_string()))?;
        let record = NodeRecord {
            name: req.node.to_string(),
            services: req.services.iter().map(ToString::to_string).collect(),
            labels: tok.labels.clone(),
            endpoint: None,
            serial: Some(leaf.serial.to_string()),
            cert_not_after: Some(leaf.not_after),
            enrolled_at: t,
            last_seen: None,
            acked_version: 0,
            agent_version: None,
            revoked_at: None,
            overlay_index: None,
            relay: tok.relay,
        };
        match self
            .store
            .enroll(&hash, &record, leaf.not_after, t, &key_id)
            .map_err(|e| internal(&e))?
        {
            Ok(()) => {}
            Err(TokenProblem::Used) => return Err((EnrollErrorCode::TokenUsed, String::new())),
            Err(TokenProblem::Expired) => {
                return Err((EnrollErrorCode::TokenExpired, String::new()))
            }
            Err(TokenProblem::Unknown) => {
                return Err((EnrollErrorCode::TokenUnknown, String::new()))
            }
            Err(TokenProblem::Voided) => {
                return Err((
                    EnrollErrorCode::NodeRevoked,
                    "token voided by a revocation of the node".into(),
                ))
            }
        }
        self.changed().map_err(|e| internal(&e))?;
        Ok(EnrollResponse {
            trust_domain: self.ca.trust_domain.clone(),
            cert_der: leaf.der,
            ca_bundle: vec![self.ca.cert_der.clone()],
        })
    }

    /// The node's overlay addresses (allocated on first use; stable for the node's life).
    pub fn overlay_addresses(&self, node: &str) -> Result<Vec<IpAddr>, MeshError> {
        let idx = self.store.overlay_index(node)?;
        self.pools.addresses(idx).ok_or_else(|| MeshError::Invalid {
            field: "overlay pools",
            reason: format!(
                "exhausted: no address {idx} in {} / {}",
                self.pools.v4, self.pools.v6
            ),
        })
    }

    /// Signs a renewal CSR for an enrolled, unrevoked node.
    pub fn renew(&self, node: &NodeName, csr_der: &[u8]) -> Result<Vec<u8>, MeshError> {
        self.renew_at(node, csr_der, now())
    }

    /// [`Mesh::renew`] at time `t` (Unix seconds).
    pub fn renew_at(&self, node: &NodeName, csr_der: &[u8], t: i64) -> Result<Vec<u8>, MeshError> {
        let rec = self
            .store
            .node(node.as_str())?
            .ok_or_else(|| MeshError::NoSuchNode(node.to_string()))?;
        if rec.revoked_at.is_some() {
            return Err(MeshError::Invalid {
                field: "node",
                reason: "revoked".into(),
            });
        }
        let services = rec
            .services
            .iter()
            .filter_map(|s| ServiceName::new(s.as_str()).ok())
            .collect::<Vec<_>>();
        let leaf = self.ca.sign_node(
            csr_der,
            node,
            &services,
            &self.overlay_addresses(node.as_str())?,
            t,
            self.cert_ttl_secs,
        )?;
        self.store
            .record_cert(&leaf.serial.to_string(), node.as_str(), leaf.not_after, t)?;
        tracing::info!(%node, serial = %leaf.serial, "certificate renewed");
        Ok(leaf.der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicmesh_protocol::ident::{Labels, TrustDomain};
    use std::sync::Arc;

    fn mesh() -> (tempfile::TempDir, Arc<Mesh>) {
        let dir = tempfile::tempdir().unwrap();
        crate::mesh::init(dir.path(), TrustDomain::new("t.test").unwrap()).unwrap();
        let mesh = Mesh::open(dir.path(), 3600).unwrap();
        (dir, mesh)
    }

    fn request(name: &str, token: &str, key: &rcgen::KeyPair) -> EnrollRequest {
        let t: JoinToken = token.parse().unwrap();
        EnrollRequest {
            secret: t.secret_hex(),
            node: NodeName::new(name).unwrap(),
            csr_der: quicmesh_node::control::csr(name, key).unwrap(),
            services: vec![ServiceName::new("web").unwrap()],
            labels: Labels::default(),
        }
    }

    fn refusal(m: ControlDown) -> Option<EnrollErrorCode> {
        match m {
            ControlDown::Enrolled(_) => None,
            ControlDown::EnrollRefused { code, .. } => Some(code),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_token_enrolls_until_its_last_second_and_not_after() {
        let (_d, m) = mesh();
        let t0 = 1_900_000_000;
        let web = ["web".to_string()];
        let (late, expires) = m
            .create_token_at("web-1", &web, &BTreeMap::new(), false, 600, t0)
            .unwrap();
        assert_eq!(expires, t0 + 600);
        let key = rcgen::KeyPair::generate().unwrap();
        // Denied: one second past the token's life, without waiting ten minutes.
        assert_eq!(
            refusal(m.enroll_at(&request("web-1", &late, &key), t0 + 600)),
            Some(EnrollErrorCode::TokenExpired)
        );
        // Allowed twin: a token for another node, used in its last second.
        let (tok, _) = m
            .create_token_at("web-2", &web, &BTreeMap::new(), false, 600, t0)
            .unwrap();
        assert_eq!(
            refusal(m.enroll_at(&request("web-2", &tok, &key), t0 + 599)),
            None
        );
        // The certificate's validity starts at the enrollment's time and lasts the TTL.
        let rec = m.store.node("web-2").unwrap().unwrap();
        assert_eq!(rec.cert_not_after, Some(t0 + 599 + 3600));
        assert_eq!(rec.enrolled_at, t0 + 599);
    }
}
