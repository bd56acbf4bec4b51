//! Finding a request's credential: `Authorization: Bearer`, `?token=` (browsers cannot
//! set headers on `EventSource` or `WebSocket`), or the configured cookie. The value
//! is borrowed from the request and never logged.

use axum::http::{header, HeaderMap, Uri};

use crate::error::ApiError;

/// A credential as presented: an API key or a JWT, not yet told apart.
#[derive(Clone, Copy)]
pub struct Credential<'a>(&'a str);

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(***)")
    }
}

impl<'a> Credential<'a> {
    pub fn new(secret: &'a str) -> Self {
        Self(secret)
    }
    pub fn secret(&self) -> &'a str {
        self.0
    }
}

/// Largest credential accepted; a longer one is refused before it is parsed.
pub const MAX_CREDENTIAL: usize = 8 * 1024;

/// The one credential of a request. Two different ones (say a header and a query
/// token) are refused: which one counts must never be a guess.
pub fn from_request<'a>(
    headers: &'a HeaderMap,
    uri: &'a Uri,
    cookie: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let mut found: Option<String> = None;
    let offer = |found: &mut Option<String>, v: String| -> Result<(), ApiError> {
        if v.is_empty() || v.len() > MAX_CREDENTIAL {
            return Err(ApiError::Unauthorized("malformed credentials".into()));
        }
        match found {
            Some(f) if *f != v => Err(ApiError::Unauthorized(
                "more than one credential presented".into(),
            )),
            _ => {
                *found = Some(v);
                Ok(())
            }
        }
    };
    for v in headers.get_all(header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
        let Some((scheme, rest)) = v.split_once(' ') else {
            return Err(ApiError::Unauthorized(
                "Authorization must be `Bearer <token>`".into(),
            ));
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::Unauthorized(
                "Authorization must be `Bearer <token>`".into(),
            ));
        }
        offer(&mut found, rest.trim().to_owned())?;
    }
    if let Some(q) = uri.query() {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k == "token" {
                offer(&mut found, v.into_owned())?;
            }
        }
    }
    if let Some(name) = cookie {
        if found.is_none() {
            if let Some(v) = cookie_value(headers, name) {
                offer(&mut found, v.to_owned())?;
            }
        }
    }
    Ok(found)
}

/// The value of cookie `name` from the `Cookie` headers.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)], uri: &str) -> (HeaderMap, Uri) {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        (h, uri.parse().unwrap())
    }

    #[test]
    fn header_query_and_cookie() {
        let (h, u) = req(&[("authorization", "Bearer abc")], "/x");
        assert_eq!(from_request(&h, &u, None).unwrap().as_deref(), Some("abc"));
        let (h, u) = req(&[], "/x?a=1&token=q%2Bv");
        assert_eq!(from_request(&h, &u, None).unwrap().as_deref(), Some("q+v"));
        let (h, u) = req(&[("cookie", "a=1; weft_token=ck")], "/x");
        assert_eq!(
            from_request(&h, &u, Some("weft_token")).unwrap().as_deref(),
            Some("ck")
        );
        assert_eq!(
            from_request(&h, &u, None).unwrap(),
            None,
            "cookie not configured"
        );
        let (h, u) = req(&[], "/x");
        assert_eq!(from_request(&h, &u, None).unwrap(), None);
    }

    #[test]
    fn refuses_ambiguous_or_malformed() {
        let (h, u) = req(&[("authorization", "Bearer a")], "/x?token=b");
        assert_eq!(from_request(&h, &u, None).unwrap_err().code(), 401);
        let (h, u) = req(&[("authorization", "Basic YTpi")], "/x");
        assert_eq!(from_request(&h, &u, None).unwrap_err().code(), 401);
        let (h, u) = req(&[], "/x?token=");
        assert_eq!(from_request(&h, &u, None).unwrap_err().code(), 401);
        let long = format!("/x?token={}", "a".repeat(MAX_CREDENTIAL + 1));
        let (h, u) = req(&[], &long);
        assert_eq!(from_request(&h, &u, None).unwrap_err().code(), 401);
        // The same credential twice is not ambiguous.
        let (h, u) = req(&[("authorization", "Bearer a")], "/x?token=a");
        assert_eq!(from_request(&h, &u, None).unwrap().as_deref(), Some("a"));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        assert_eq!(
            format!("{:?}", Credential::new("s3cret")),
            "Credential(***)"
        );
    }
}
