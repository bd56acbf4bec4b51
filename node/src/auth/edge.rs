//! The HTTP edge of [`super::Auth`]: one middleware in front of every route that
//!
//! 1. applies the origin policy — a CORS preflight from an allowed origin gets `204`
//!    with the methods and headers Weft accepts; a request (preflight or not) from a
//!    disallowed origin gets `403` before any handler runs, so a cross-site form or a
//!    `no-cors` fetch changes nothing;
//! 2. resolves the request's credential into a [`Caller`] request extension, once;
//!    a credential that does not verify is `401` here. A request without one gets no
//!    extension when anonymous access is off: handlers then answer `401`, except the
//!    WebSocket upgrade, whose client may still send `connect {token}`;
//! 3. adds the CORS response headers for allowed cross-origin requests.
//!
//! Probes, metrics and the contract documents are public and skip steps 2 and 3.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{credentials, Caller, Credential, Op, Refusal};
use crate::error::ApiError;
use crate::node::Node;

/// Routes anyone may call: probes, metrics, the machine-readable contracts.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/v1/openapi.json" | "/v1/asyncapi.json"
    )
}

const ALLOW_METHODS: &str = "GET, POST, OPTIONS";
const ALLOW_HEADERS: &str =
    "Authorization, Content-Type, Idempotency-Key, Weft-Event-Type, Last-Event-ID";
const EXPOSE_HEADERS: &str = "Retry-After, Idempotent-Replayed, WWW-Authenticate";

pub async fn middleware(State(node): State<Arc<Node>>, mut req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let auth = &node.auth;
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("\u{0}").to_owned());
    if let Some(o) = &origin {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        if !auth.origins.allows(o, host) {
            auth.count(Refusal::Origin);
            return ApiError::Forbidden("origin not allowed".into()).into_response();
        }
        if req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            cors_headers(resp.headers_mut(), o, auth.cookie.is_some());
            let h = resp.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOW_METHODS),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            return resp;
        }
    }
    let found = credentials::from_request(req.headers(), req.uri(), auth.cookie.as_deref());
    let resolved = match found {
        Err(e) => Err((Refusal::Invalid, e)),
        // No credential: anonymous where allowed; otherwise the handler decides (the
        // cluster view may be public, a WebSocket may still `connect {token}`).
        Ok(None) => Ok(auth.anonymous_allowed().then_some(Caller::Anonymous)),
        Ok(Some(cred)) => auth.resolve(Credential::new(&cred)).await.map(Some),
    };
    let mut resp = match resolved {
        Ok(caller) => {
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            next.run(req).await
        }
        Err((reason, e)) => {
            auth.count(reason);
            e.into_response()
        }
    };
    if let Some(o) = &origin {
        cors_headers(resp.headers_mut(), o, auth.cookie.is_some());
    }
    resp
}

fn cors_headers(h: &mut HeaderMap, origin: &str, credentials: bool) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    if credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// The caller the middleware resolved, or `401` when there is none.
pub fn caller(node: &Node, ext: Option<&Caller>) -> Result<Caller, ApiError> {
    match ext {
        Some(c) => Ok(c.clone()),
        None => {
            let (reason, e) = super::missing();
            node.auth.count(reason);
            Err(e)
        }
    }
}

/// Asks [`super::Auth::check`] and counts a refusal.
pub fn require(
    node: &Node,
    caller: &Caller,
    op: Op<'_>,
    client_rule: bool,
) -> Result<(), ApiError> {
    node.auth
        .check(caller, op, client_rule)
        .map_err(|(reason, e)| {
            node.auth.count(reason);
            e
        })
}

/// Asks [`super::Auth::admit_subscribe`] (an API key's subscribe rate) and counts a
/// refusal. Called once per read opened, after [`require`] allowed it.
pub fn admit_subscribe(node: &Node, caller: &Caller) -> Result<(), ApiError> {
    node.auth.admit_subscribe(caller).map_err(|(reason, e)| {
        node.auth.count(reason);
        e
    })
}

/// Admin routes: an admin key (or, in development mode only, no credential), and never
/// from a web page. Browsers send `Origin` on every cross-site POST (`no-cors`
/// included) and a cross-site `Sec-Fetch-Site`, so a page — even one on an allowed
/// origin that holds the admin key in `?token=` or a cookie — cannot drain the node.
pub fn require_admin(node: &Node, caller: &Caller, headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none" && v.as_bytes() != b"same-origin")
    {
        node.auth.count(Refusal::Origin);
        return Err(ApiError::Forbidden(
            "admin routes are not for web pages; call them from a backend with an admin API key"
                .into(),
        ));
    }
    require(node, caller, Op::Admin, false)
}
