//! Topic names and topic patterns.
//!
//! A topic is `[A-Za-z0-9_.:@-]{1,255}`: no `/`, so it sits in a URL path as is, and no
//! character that needs escaping in JSON, an SSE field or a URL query. `.` separates
//! segments; the `$sys.` prefix is reserved for the node itself and is never accepted
//! from a client (it cannot pass the character rule anyway).
//!
//! Patterns (namespaces, ACLs) split on `.`: `*` matches exactly one segment, `>` matches
//! one or more trailing segments.

use thiserror::Error;

pub const MAX_TOPIC_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("topic name has a character outside [A-Za-z0-9_.:@-] at byte {0}")]
    BadChar(usize),
}

/// Whether `b` may appear in a topic name.
pub fn is_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-')
}

/// Checks a topic name against the contract's rule.
pub fn validate_topic(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    match name.bytes().position(|b| !is_topic_byte(b)) {
        Some(i) => Err(TopicError::BadChar(i)),
        None => Ok(()),
    }
}

/// A compiled topic pattern such as `chat.*.room` or `prices.>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("pattern `{0}`: `>` may only be the last segment")]
    RestNotLast(String),
    #[error("pattern `{0}` has an empty segment")]
    EmptySegment(String),
    #[error("pattern `{0}` has a character outside [A-Za-z0-9_.:@-*>]")]
    BadChar(String),
}

impl Pattern {
    pub fn parse(source: &str) -> Result<Self, PatternError> {
        if source.is_empty() {
            return Err(PatternError::Empty);
        }
        let parts: Vec<&str> = source.split('.').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "" => return Err(PatternError::EmptySegment(source.into())),
                "*" => Segment::One,
                ">" if i + 1 == parts.len() => Segment::Rest,
                ">" => return Err(PatternError::RestNotLast(source.into())),
                lit if lit.bytes().all(is_topic_byte) => Segment::Literal(lit.into()),
                _ => return Err(PatternError::BadChar(source.into())),
            };
            segments.push(seg);
        }
        Ok(Self {
            source: source.into(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('.');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return parts.next().is_some(),
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        assert!(validate_topic("chat.room-1:a@b_c").is_ok());
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert_eq!(validate_topic("a/b"), Err(TopicError::BadChar(1)));
        assert_eq!(validate_topic("a b"), Err(TopicError::BadChar(1)));
        assert_eq!(validate_topic("$sys.x"), Err(TopicError::BadChar(0)));
        assert_eq!(validate_topic("é"), Err(TopicError::BadChar(0)));
        assert!(validate_topic(&"a".repeat(255)).is_ok());
        assert_eq!(validate_topic(&"a".repeat(256)), Err(TopicError::TooLong));
    }

    #[test]
    fn pattern_matching() {
        let p = Pattern::parse("chat.*.msg").unwrap();
        assert!(p.matches("chat.r1.msg"));
        assert!(!p.matches("chat.r1"));
        assert!(!p.matches("chat.r1.msg.x"));
        let r = Pattern::parse("prices.>").unwrap();
        assert!(r.matches("prices.btc"));
        assert!(r.matches("prices.btc.usd"));
        assert!(!r.matches("prices"));
        let all = Pattern::parse(">").unwrap();
        assert!(all.matches("anything.at.all"));
        let lit = Pattern::parse("a.b").unwrap();
        assert!(lit.matches("a.b"));
        assert!(!lit.matches("a.bc"));
    }

    #[test]
    fn pattern_errors() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert!(matches!(
            Pattern::parse("a.>.b"),
            Err(PatternError::RestNotLast(_))
        ));
        assert!(matches!(
            Pattern::parse("a..b"),
            Err(PatternError::EmptySegment(_))
        ));
        assert!(matches!(
            Pattern::parse("a/b"),
            Err(PatternError::BadChar(_))
        ));
    }
}
