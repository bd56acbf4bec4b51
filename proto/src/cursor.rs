//! Cursors: `epoch:offset`, the position just after `offset` in `epoch`.
//!
//! As with Kubernetes' resourceVersion, `e:o` means "I have seen everything up to and
//! including offset `o` of epoch `e`", so `e:0` is the start of the epoch and a read
//! `since=e:o` returns `o+1, o+2, …`.
//!
//! A [`MultiCursor`] is the cursor of a multi-topic watch: `topic=epoch:offset` pairs
//! joined by `,`. Topic names cannot contain `=` or `,`, and epochs are alphanumeric, so
//! the encoding is unambiguous and needs no escaping in an SSE `id:` line.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::topic::validate_topic;

/// Longest epoch accepted from the wire; node-minted epochs are far shorter.
pub const MAX_EPOCH_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cursor {
    pub epoch: String,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CursorError {
    #[error("cursor must look like `epoch:offset`")]
    Shape,
    #[error("cursor epoch must be 1-{MAX_EPOCH_LEN} characters of [A-Za-z0-9]")]
    Epoch,
    #[error("cursor offset is not a non-negative integer")]
    Offset,
    #[error("multi-topic cursor must look like `topic=epoch:offset,…`")]
    MultiShape,
    #[error("multi-topic cursor names an invalid topic")]
    MultiTopic,
    #[error("multi-topic cursor names topic `{0}` twice")]
    MultiDuplicate(String),
    #[error("multi-topic cursor has more than {0} topics")]
    MultiTooMany(usize),
}

impl Cursor {
    pub fn new(epoch: impl Into<String>, offset: u64) -> Self {
        Self {
            epoch: epoch.into(),
            offset,
        }
    }
}

pub fn valid_epoch(epoch: &str) -> bool {
    !epoch.is_empty()
        && epoch.len() <= MAX_EPOCH_LEN
        && epoch.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl FromStr for Cursor {
    type Err = CursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, offset) = s.rsplit_once(':').ok_or(CursorError::Shape)?;
        if !valid_epoch(epoch) {
            return Err(CursorError::Epoch);
        }
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CursorError::Offset);
        }
        let offset = offset.parse::<u64>().map_err(|_| CursorError::Offset)?;
        Ok(Self {
            epoch: epoch.to_owned(),
            offset,
        })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

/// Cursors for several topics at once, in the order they were given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MultiCursor {
    pub entries: Vec<(String, Cursor)>,
}

impl MultiCursor {
    /// Parses `topic=epoch:offset,…`, accepting at most `max_topics` entries (checked
    /// before anything is allocated per entry).
    pub fn parse(s: &str, max_topics: usize) -> Result<Self, CursorError> {
        if s.is_empty() {
            return Ok(Self::default());
        }
        if s.split(',').count() > max_topics {
            return Err(CursorError::MultiTooMany(max_topics));
        }
        let mut entries: Vec<(String, Cursor)> = Vec::new();
        for part in s.split(',') {
            let (topic, cursor) = part.split_once('=').ok_or(CursorError::MultiShape)?;
            validate_topic(topic).map_err(|_| CursorError::MultiTopic)?;
            if entries.iter().any(|(t, _)| t == topic) {
                return Err(CursorError::MultiDuplicate(topic.into()));
            }
            entries.push((topic.to_owned(), cursor.parse()?));
        }
        Ok(Self { entries })
    }

    pub fn get(&self, topic: &str) -> Option<&Cursor> {
        self.entries
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, c)| c)
    }
}

impl fmt::Display for MultiCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (topic, cursor)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{topic}={cursor}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let c: Cursor = "ab12:45".parse().unwrap();
        assert_eq!(c, Cursor::new("ab12", 45));
        assert_eq!(c.to_string(), "ab12:45");
        assert_eq!("e:0".parse::<Cursor>().unwrap().offset, 0);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!("".parse::<Cursor>(), Err(CursorError::Shape));
        assert_eq!("abc".parse::<Cursor>(), Err(CursorError::Shape));
        assert_eq!(":5".parse::<Cursor>(), Err(CursorError::Epoch));
        assert_eq!("e-1:5".parse::<Cursor>(), Err(CursorError::Epoch));
        assert_eq!("e:".parse::<Cursor>(), Err(CursorError::Offset));
        assert_eq!("e:-1".parse::<Cursor>(), Err(CursorError::Offset));
        assert_eq!("e:+1".parse::<Cursor>(), Err(CursorError::Offset));
        assert_eq!(
            "e:99999999999999999999999".parse::<Cursor>(),
            Err(CursorError::Offset)
        );
        assert_eq!(
            format!("{}:1", "a".repeat(33)).parse::<Cursor>(),
            Err(CursorError::Epoch)
        );
    }

    #[test]
    fn multi_cursor_round_trip() {
        let m = MultiCursor::parse("a.b=e1:5,c:d=e2:0", 8).unwrap();
        assert_eq!(m.get("a.b"), Some(&Cursor::new("e1", 5)));
        assert_eq!(m.get("c:d"), Some(&Cursor::new("e2", 0)));
        assert_eq!(m.to_string(), "a.b=e1:5,c:d=e2:0");
        assert_eq!(MultiCursor::parse("", 8).unwrap().entries.len(), 0);
    }

    #[test]
    fn multi_cursor_errors() {
        assert_eq!(MultiCursor::parse("a", 8), Err(CursorError::MultiShape));
        assert_eq!(
            MultiCursor::parse("a/b=e:1", 8),
            Err(CursorError::MultiTopic)
        );
        assert_eq!(
            MultiCursor::parse("a=e:1,a=e:2", 8),
            Err(CursorError::MultiDuplicate("a".into()))
        );
        assert_eq!(
            MultiCursor::parse("a=e:1,b=e:2", 1),
            Err(CursorError::MultiTooMany(1))
        );
        assert_eq!(MultiCursor::parse("a=e:x", 8), Err(CursorError::Offset));
    }
}
