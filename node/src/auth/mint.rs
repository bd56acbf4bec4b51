//! Client tokens signed with the node's own HS256 secret (`weft-node token`).
//!
//! For operators, not for production issuance: a Kubernetes install generates the HMAC
//! secret, so `kubectl exec <node pod> -- weft-node token --sub alice ...` is the
//! shortest way to a working client token (the pod's environment names the secret's
//! file). Real deployments mint tokens in their own backend with the same secret, or
//! use an identity provider (`auth.public_keys`, `auth.jwks`).
//!
//! The claims are the ones [`super::jwt`] verifies: `sub`, `iat`, `exp`, optional
//! `iss`/`aud`, and `weft: {sub, pub, presence}`. Patterns are checked here so a typo
//! fails now rather than as a 403 later.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use weft_proto::Pattern;

/// What the token grants.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    pub subject: String,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
    pub presence: bool,
    pub ttl: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("{0}")]
    Invalid(String),
    #[error("signing: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The secret as the node reads `auth.hmac_secret_file`: surrounding whitespace
/// trimmed, at least 32 bytes.
pub fn secret_from_file(bytes: &[u8]) -> Result<&[u8], MintError> {
    let secret = bytes.trim_ascii();
    if secret.len() < 32 {
        return Err(MintError::Invalid(
            "the HMAC secret must be at least 32 bytes".into(),
        ));
    }
    Ok(secret)
}

/// An HS256 token for `spec`, issued at `now`.
pub fn mint_hs256(secret: &[u8], spec: &TokenSpec, now: SystemTime) -> Result<String, MintError> {
    if spec.subject.is_empty() || spec.subject.len() > 255 {
        return Err(MintError::Invalid(
            "--subject must be 1 to 255 bytes".into(),
        ));
    }
    if spec.ttl.is_zero() {
        return Err(MintError::Invalid("--ttl-s must be above 0".into()));
    }
    for p in spec.subscribe.iter().chain(&spec.publish) {
        let expanded = p.replace("{sub}", "x");
        Pattern::parse(&expanded).map_err(|e| MintError::Invalid(format!("pattern `{p}`: {e}")))?;
    }
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| MintError::Invalid("the clock is before 1970".into()))?
        .as_secs();
    let mut claims = serde_json::json!({
        "sub": spec.subject,
        "iat": iat,
        "exp": iat + spec.ttl.as_secs().max(1),
        "weft": {"sub": spec.subscribe, "pub": spec.publish, "presence": spec.presence},
    });
    if let Some(iss) = &spec.issuer {
        claims["iss"] = iss.as_str().into();
    }
    if let Some(aud) = &spec.audience {
        claims["aud"] = aud.as_str().into();
    }
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, Secret};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[tokio::test]
    async fn a_minted_token_verifies_with_the_rights_it_names() {
        let spec = TokenSpec {
            subject: "alice".into(),
            subscribe: vec!["chat.>".into(), "user.{sub}".into()],
            publish: vec!["chat.lobby".into()],
            ttl: Duration::from_secs(600),
            audience: Some("weft".into()),
            ..Default::default()
        };
        let token = mint_hs256(SECRET.as_bytes(), &spec, SystemTime::now()).unwrap();
        let verifier = super::super::jwt::Verifier::new(&AuthConfig {
            hmac_secret: Secret::new(SECRET),
            audience: Some("weft".into()),
            ..Default::default()
        })
        .unwrap();
        let user = verifier.verify(&token).await.unwrap();
        assert_eq!(&*user.sub, "alice");
        let any = |ps: &[Pattern], t: &str| ps.iter().any(|p| p.matches(t));
        assert!(any(&user.subscribe, "chat.room1") && any(&user.subscribe, "user.alice"));
        assert!(any(&user.publish, "chat.lobby") && !any(&user.publish, "chat.other"));
    }

    #[test]
    fn bad_specs_and_short_secrets_are_refused() {
        let ok = TokenSpec {
            subject: "a".into(),
            ttl: Duration::from_secs(1),
            ..Default::default()
        };
        let bad_pattern = TokenSpec {
            subscribe: vec!["a..b".into()],
            ..ok.clone()
        };
        assert!(mint_hs256(SECRET.as_bytes(), &bad_pattern, SystemTime::now()).is_err());
        let no_sub = TokenSpec {
            subject: String::new(),
            ..ok.clone()
        };
        assert!(mint_hs256(SECRET.as_bytes(), &no_sub, SystemTime::now()).is_err());
        assert!(secret_from_file(b"short\n").is_err());
        assert_eq!(
            secret_from_file(format!("{SECRET}\n").as_bytes()).unwrap(),
            SECRET.as_bytes()
        );
    }
}
