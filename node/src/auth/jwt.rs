//! Client tokens: JWT verification with the `jsonwebtoken` crate.
//!
//! Keys come from three places, all optional: an HS256 secret (`auth.hmac_secret` or
//! `auth.hmac_secret_file`), PEM public keys (RS256 / ES256 / EdDSA, the family read
//! from the file), and a JWKS (`auth.jwks`, a file or an `http(s)://` URL). A token
//! names its key by `kid` (JWKS) or is tried against the static keys of its `alg`'s
//! family, so an RSA public key can never be used as an HMAC secret (algorithm
//! confusion) and `alg: none` does not parse at all.
//!
//! The JWKS is cached. It is refetched every `auth.jwks_refresh_s`, and at once when a
//! token names an unknown `kid` — at most once per [`UNKNOWN_KID_REFETCH`], so random
//! `kid`s cannot turn the node into a fetch amplifier. A failed fetch keeps the last
//! good set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{compile_patterns, User};
use crate::config::AuthConfig;

/// Least time between two fetches caused by unknown `kid`s.
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(1);
/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

#[derive(Debug)]
pub enum JwtError {
    Expired,
    /// Why, in words safe to show the client (never the token).
    Invalid(&'static str),
}

/// Whether a credential has the shape of a JWS compact token.
pub fn looks_like_jwt(s: &str) -> bool {
    s.len() > 10 && s.bytes().filter(|b| *b == b'.').count() == 2
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    weft: WeftClaims,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WeftClaims {
    sub: Vec<String>,
    #[serde(rename = "pub")]
    publish: Vec<String>,
    presence: bool,
}

#[derive(Clone)]
enum JwksSource {
    File(PathBuf),
    Url(String),
}

struct Jwks {
    source: JwksSource,
    keys: RwLock<HashMap<String, (DecodingKey, Algorithm)>>,
    refresh: Duration,
    /// Serialises fetches and remembers the last one caused by an unknown `kid`.
    fetch: tokio::sync::Mutex<Option<Instant>>,
}

pub struct Verifier {
    /// Keys without a `kid`: the HMAC secret and the PEM files.
    fixed: Vec<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
    validation_base: Validation,
}

impl Verifier {
    pub fn new(a: &AuthConfig) -> Result<Self, String> {
        let mut fixed = Vec::new();
        if !a.hmac_secret.is_empty() {
            fixed.push(DecodingKey::from_secret(a.hmac_secret.expose().as_bytes()));
        }
        if let Some(path) = &a.hmac_secret_file {
            let secret = std::fs::read(path)
                .map_err(|e| format!("auth.hmac_secret_file {}: {e}", path.display()))?;
            let secret = secret.trim_ascii();
            if secret.len() < 32 {
                return Err(format!(
                    "auth.hmac_secret_file {}: the secret must be at least 32 bytes",
                    path.display()
                ));
            }
            fixed.push(DecodingKey::from_secret(secret));
        }
        for path in &a.public_keys {
            let pem = std::fs::read(path)
                .map_err(|e| format!("auth.public_keys {}: {e}", path.display()))?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|_| {
                    format!(
                        "auth.public_keys {}: not an RSA, EC (P-256) or Ed25519 public key in PEM",
                        path.display()
                    )
                })?;
            fixed.push(key);
        }
        let jwks = match &a.jwks {
            None => None,
            Some(src) => {
                let source = if src.starts_with("http://") || src.starts_with("https://") {
                    JwksSource::Url(src.clone())
                } else {
                    JwksSource::File(PathBuf::from(src))
                };
                let jwks = Jwks {
                    source,
                    keys: RwLock::new(HashMap::new()),
                    refresh: Duration::from_secs(a.jwks_refresh_s),
                    fetch: tokio::sync::Mutex::new(None),
                };
                // A file is read now, so a broken one fails at start; a URL is fetched
                // by the refresher (the IdP may not be up yet).
                if let JwksSource::File(_) = jwks.source {
                    let set = jwks.load_blocking()?;
                    jwks.install(set);
                }
                Some(Arc::new(jwks))
            }
        };
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = a.leeway_s;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &a.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &a.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        Ok(Self {
            fixed,
            jwks,
            validation_base: v,
        })
    }

    /// Whether any key is configured, so tokens can verify at all.
    pub fn is_enabled(&self) -> bool {
        !self.fixed.is_empty() || self.jwks.is_some()
    }

    pub fn spawn_refresh(&self) {
        let Some(jwks) = self.jwks.clone() else {
            return;
        };
        tokio::spawn(async move {
            loop {
                if let Err(e) = jwks.fetch_now().await {
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good keys");
                }
                tokio::time::sleep(jwks.refresh).await;
            }
        });
    }

    /// Verifies a token's signature and claims and returns its user.
    pub async fn verify(&self, token: &str) -> Result<User, JwtError> {
        let header =
            decode_header(token).map_err(|_| JwtError::Invalid("malformed token header"))?;
        let mut validation = self.validation_base.clone();
        validation.algorithms = vec![header.alg];
        let result = match (&header.kid, &self.jwks) {
            (Some(kid), Some(jwks)) => {
                let key = match jwks.get(kid) {
                    Some(k) => Some(k),
                    None => {
                        jwks.fetch_for_unknown_kid().await;
                        jwks.get(kid)
                    }
                };
                let Some((key, alg)) = key else {
                    return Err(JwtError::Invalid("unknown key id"));
                };
                if alg != header.alg {
                    return Err(JwtError::Invalid("algorithm does not match the key"));
                }
                decode::<Claims>(token, &key, &validation)
            }
            _ => {
                let mut last = Err(JwtError::Invalid("no key for this algorithm"));
                for key in self
                    .fixed
                    .iter()
                    .filter(|k| k.family() == header.alg.family())
                {
                    match decode::<Claims>(token, key, &validation) {
                        Ok(data) => {
                            last = Ok(data);
                            break;
                        }
                        Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                            last = Err(JwtError::Invalid("bad signature"))
                        }
                        Err(e) => {
                            last = Err(map_error(e.kind()));
                            break;
                        }
                    }
                }
                return last.and_then(into_user);
            }
        };
        result.map_err(|e| map_error(e.kind())).and_then(into_user)
    }
}

fn into_user(data: jsonwebtoken::TokenData<Claims>) -> Result<User, JwtError> {
    let c = data.claims;
    if c.sub.is_empty() || c.sub.len() > 256 {
        return Err(JwtError::Invalid("`sub` must be 1-256 characters"));
    }
    let expires = UNIX_EPOCH
        .checked_add(Duration::from_secs(c.exp))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(User {
        subscribe: compile_patterns(&c.weft.sub, Some(&c.sub)),
        publish: compile_patterns(&c.weft.publish, Some(&c.sub)),
        presence: c.weft.presence,
        jti: c.jti,
        sub: c.sub.into(),
        expires,
    })
}

fn map_error(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::Invalid("token not valid yet (nbf)"),
        ErrorKind::InvalidIssuer => JwtError::Invalid("wrong issuer"),
        ErrorKind::InvalidAudience => JwtError::Invalid("wrong audience"),
        ErrorKind::InvalidSignature => JwtError::Invalid("bad signature"),
        ErrorKind::InvalidAlgorithm => JwtError::Invalid("algorithm does not match the key"),
        ErrorKind::MissingRequiredClaim(_) => JwtError::Invalid("a required claim is missing"),
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => {
            JwtError::Invalid("malformed claims")
        }
        _ => JwtError::Invalid("malformed token"),
    }
}

impl Jwks {
    fn get(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    fn install(&self, set: JwkSet) {
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Ok(key)) = (&jwk.common.key_id, DecodingKey::from_jwk(jwk)) else {
                continue;
            };
            let alg = match jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok())
            {
                Some(alg) if alg.family() == key.family() => alg,
                Some(_) => continue,
                None => match key.family() {
                    jsonwebtoken::AlgorithmFamily::Rsa => Algorithm::RS256,
                    jsonwebtoken::AlgorithmFamily::Ec => Algorithm::ES256,
                    jsonwebtoken::AlgorithmFamily::Ed => Algorithm::EdDSA,
                    // A symmetric key in a JWKS would let anyone who reads the JWKS
                    // sign tokens: never accepted.
                    jsonwebtoken::AlgorithmFamily::Hmac => continue,
                },
            };
            if alg.family() == jsonwebtoken::AlgorithmFamily::Hmac {
                continue;
            }
            keys.insert(kid.clone(), (key, alg));
        }
        tracing::info!(keys = keys.len(), "JWKS loaded");
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    fn load_blocking(&self) -> Result<JwkSet, String> {
        let JwksSource::File(path) = &self.source else {
            return Err("not a file".into());
        };
        let bytes =
            std::fs::read(path).map_err(|e| format!("auth.jwks {}: {e}", path.display()))?;
        parse_set(&bytes).map_err(|e| format!("auth.jwks {}: {e}", path.display()))
    }

    async fn fetch_now(&self) -> Result<(), String> {
        let _one = self.fetch.lock().await;
        let set = self.load().await?;
        self.install(set);
        Ok(())
    }

    async fn fetch_for_unknown_kid(&self) {
        let mut last = self.fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFETCH) {
            return;
        }
        *last = Some(Instant::now());
        match self.load().await {
            Ok(set) => self.install(set),
            Err(e) => tracing::warn!(error = %e, "JWKS refetch for an unknown kid failed"),
        }
    }

    async fn load(&self) -> Result<JwkSet, String> {
        let bytes = match &self.source {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?,
            JwksSource::Url(url) => tokio::time::timeout(Duration::from_secs(5), http_get(url))
                .await
                .map_err(|_| format!("GET {url}: timed out"))?
                .map_err(|e| format!("GET {url}: {e}"))?,
        };
        parse_set(&bytes)
    }
}

/// One `GET` over HTTP/1.1, plain or TLS (the system's trusted roots), its body
/// capped at [`MAX_JWKS_BYTES`].
async fn http_get(url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("URL without a host")?.to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let request = axum::http::Request::get(path)
        .header(axum::http::header::HOST, &host)
        .header(axum::http::header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    async fn send<I>(
        io: I,
        request: axum::http::Request<http_body_util::Empty<bytes::Bytes>>,
    ) -> Result<Vec<u8>, String>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(body.to_bytes().to_vec())
    }
    if !https {
        return send(hyper_util::rt::TokioIo::new(tcp), request).await;
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    send(hyper_util::rt::TokioIo::new(tls), request).await
}

fn parse_set(bytes: &[u8]) -> Result<JwkSet, String> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(format!("JWKS larger than {MAX_JWKS_BYTES} bytes"));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn verifier(f: impl FnOnce(&mut AuthConfig)) -> Verifier {
        let mut a = AuthConfig {
            hmac_secret: crate::config::Secret::new(SECRET),
            leeway_s: 0,
            ..Default::default()
        };
        f(&mut a);
        Verifier::new(&a).unwrap()
    }

    #[tokio::test]
    async fn hs256_claims_and_time_checks() {
        let v = verifier(|a| {
            a.issuer = Some("https://idp.test/".into());
            a.audience = Some("weft".into());
        });
        let good = serde_json::json!({"sub":"alice","exp":now()+60,"iss":"https://idp.test/","aud":"weft","weft":{"sub":["user.{sub}.>"],"pub":["chat.*"],"presence":true}});
        let u = v.verify(&hs(good.clone())).await.unwrap();
        assert_eq!(&*u.sub, "alice");
        assert!(u.subscribe[0].matches("user.alice.inbox"));
        assert!(u.publish[0].matches("chat.lobby") && u.presence);
        let with = |k: &str, val: serde_json::Value| {
            let mut c = good.clone();
            c[k] = val;
            hs(c)
        };
        assert!(matches!(
            v.verify(&with("exp", (now() - 5).into())).await,
            Err(JwtError::Expired)
        ));
        assert!(v.verify(&with("nbf", (now() + 60).into())).await.is_err());
        assert!(v
            .verify(&with("iss", "https://evil/".into()))
            .await
            .is_err());
        assert!(v.verify(&with("aud", "other".into())).await.is_err());
        let mut no_aud = good.clone();
        no_aud.as_object_mut().unwrap().remove("aud");
        assert!(
            v.verify(&hs(no_aud)).await.is_err(),
            "aud is required once configured"
        );
        // Tampered payload, same signature.
        let t = hs(good);
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert!(v.verify(&parts.join(".")).await.is_err());
    }

    #[tokio::test]
    async fn alg_none_and_foreign_secret_are_refused() {
        let v = verifier(|_| {});
        // {"alg":"none","typ":"JWT"} . {"sub":"a","exp":9999999999} . (no signature)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(v.verify(none).await.is_err());
        let other = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub":"a","exp":now()+60}),
            &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
        )
        .unwrap();
        assert!(matches!(
            v.verify(&other).await,
            Err(JwtError::Invalid("bad signature"))
        ));
    }
}
