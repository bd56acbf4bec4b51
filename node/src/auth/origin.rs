//! Which browser origins may use the node: `http.allowed_origins` holds exact origins
//! (`https://app.example.com`) and one-label wildcards (`https://*.example.com`, which
//! matches `https://a.example.com` but neither `https://example.com` nor
//! `https://a.b.example.com`). The same policy decides WebSocket upgrades and CORS.
//!
//! A request from the node's own origin (its `Origin` names the `Host` it was sent to)
//! is always allowed. In development mode with no list every origin is allowed.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// The host after `*.`, or the whole host.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl OriginPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{s}` is not an origin (scheme://host[:port], optionally https://*.domain)")
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains('/') {
            return Err(bad());
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => {
                (h, Some(p.parse::<u16>().map_err(|_| bad())?))
            }
            _ => (rest, None),
        };
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(h) => (true, h),
            None => (false, host),
        };
        let ok_char =
            |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b"[]:".contains(&b);
        if host.is_empty() || host.contains('*') || !host.bytes().all(ok_char) {
            return Err(bad());
        }
        Ok(Self {
            scheme: scheme.into(),
            host: host.to_ascii_lowercase(),
            wildcard,
            port,
        })
    }

    pub fn matches(&self, origin: &str) -> bool {
        let Ok(o) = OriginPattern::parse(origin) else {
            return false;
        };
        if o.wildcard || o.scheme != self.scheme || o.port != self.port {
            return false;
        }
        if self.wildcard {
            o.host
                .strip_suffix(&self.host)
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.'))
        } else {
            o.host == self.host
        }
    }
}

#[derive(Debug, Clone)]
pub struct OriginPolicy {
    patterns: Vec<OriginPattern>,
    any: bool,
}

impl OriginPolicy {
    /// `dev_mode` with an empty list allows any origin; otherwise only the list.
    pub fn new(allowed: &[String], dev_mode: bool) -> Self {
        Self {
            patterns: allowed
                .iter()
                .filter_map(|o| OriginPattern::parse(o).ok())
                .collect(),
            any: dev_mode && allowed.is_empty(),
        }
    }

    /// Whether a request carrying `Origin: origin`, sent to `host`, may proceed.
    pub fn allows(&self, origin: &str, host: Option<&str>) -> bool {
        self.any || same_origin(origin, host) || self.patterns.iter().any(|p| p.matches(origin))
    }
}

/// Whether `origin` is the origin the request was sent to (its `Host`).
pub fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_origins() {
        let p = OriginPolicy::new(
            &[
                "https://app.example.com".into(),
                "https://*.example.org".into(),
                "http://localhost:3000".into(),
            ],
            false,
        );
        assert!(p.allows("https://app.example.com", None));
        assert!(p.allows("https://APP.example.com", None));
        assert!(!p.allows("http://app.example.com", None), "scheme counts");
        assert!(
            !p.allows("https://app.example.com:8443", None),
            "port counts"
        );
        assert!(p.allows("https://a.example.org", None));
        assert!(!p.allows("https://example.org", None));
        assert!(!p.allows("https://a.b.example.org", None));
        assert!(!p.allows("https://evilexample.org", None));
        assert!(!p.allows("https://a.example.org.evil.com", None));
        assert!(p.allows("http://localhost:3000", None));
        assert!(!p.allows("null", None));
        assert!(
            p.allows("http://127.0.0.1:8080", Some("127.0.0.1:8080")),
            "same origin"
        );
    }

    #[test]
    fn development_mode_allows_any_origin_only_without_a_list() {
        assert!(OriginPolicy::new(&[], true).allows("https://anything.test", None));
        assert!(!OriginPolicy::new(&[], false).allows("https://anything.test", None));
        let listed = OriginPolicy::new(&["https://a.test".into()], true);
        assert!(!listed.allows("https://b.test", None));
    }

    #[test]
    fn rejects_non_origins() {
        for bad in [
            "example.com",
            "https://",
            "https://a.com/path",
            "ftp://a.com",
            "https://*",
            "https://a.*.com",
            "https://a.com:x",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
