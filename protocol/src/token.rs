//! Join tokens as users paste them: `qm1_<ca sha256 hex>_<secret hex>`.
//!
//! The secret is 256 random bits; the coordinator stores only its hash. The CA fingerprint
//! lets a node authenticate the coordinator on first contact.

use std::fmt;
use std::str::FromStr;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the mesh CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
    /// The secret, 32 bytes.
    pub secret: [u8; 32],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why a token string is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token must look like qm1_<64 hex>_<64 hex>")]
    Shape,
    #[error("join token has a bad {0} part (expected 64 hex characters)")]
    Hex(&'static str),
}

fn hex32(s: &str, part: &'static str) -> Result<[u8; 32], TokenError> {
    if s.len() != 64 {
        return Err(TokenError::Hex(part));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let b = s.get(i * 2..i * 2 + 2).ok_or(TokenError::Hex(part))?;
        *o = u8::from_str_radix(b, 16).map_err(|_| TokenError::Hex(part))?;
    }
    Ok(out)
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl JoinToken {
    /// The secret as hex (what the coordinator hashes).
    pub fn secret_hex(&self) -> String {
        to_hex(&self.secret)
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        let mut parts = s.trim().split('_');
        let (Some("qm1"), Some(fp), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Shape);
        };
        Ok(Self {
            ca_fingerprint: hex32(fp, "ca fingerprint")?,
            secret: hex32(secret, "secret")?,
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "qm1_{}_{}",
            to_hex(&self.ca_fingerprint),
            to_hex(&self.secret)
        )
    }
}

/// When to renew a certificate valid over `[not_before, not_after]` (Unix seconds):
/// at two thirds of its life, moved earlier by `jitter` (0.0..=1.0) times a tenth of it.
pub fn renew_at(not_before: i64, not_after: i64, jitter: f64) -> i64 {
    let life = (not_after - not_before).max(0);
    let jitter = jitter.clamp(0.0, 1.0);
    not_before + life * 2 / 3 - ((life as f64 / 10.0) * jitter) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_refuses_garbage() {
        let t = JoinToken {
            ca_fingerprint: [0xab; 32],
            secret: [7; 32],
        };
        let s = t.to_string();
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert_eq!("nope".parse::<JoinToken>(), Err(TokenError::Shape));
        assert_eq!(
            "qm1_00_11".parse::<JoinToken>(),
            Err(TokenError::Hex("ca fingerprint"))
        );
        let bad = format!("qm1_{}_{}", "a".repeat(64), "g".repeat(64));
        assert_eq!(bad.parse::<JoinToken>(), Err(TokenError::Hex("secret")));
        assert!(!format!("{t:?}").contains("0707"));
    }

    #[test]
    fn renewal_is_at_two_thirds_minus_jitter() {
        assert_eq!(renew_at(0, 300, 0.0), 200);
        assert_eq!(renew_at(0, 300, 1.0), 170);
        assert_eq!(renew_at(100, 100, 0.5), 100);
    }
}
