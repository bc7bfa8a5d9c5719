//! Keyset paging of the job and sandbox lists: a page, and the cursors that say where the next one
//! starts. A cursor is opaque to clients; only the store reads it.

use std::fmt;
use std::str::FromStr;

/// One page of a list, newest first, and the cursor of the next page (None on the last one).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T, C> {
    pub items: Vec<T>,
    pub next: Option<C>,
}

impl<T, C> Page<T, C> {
    /// Builds a page from up to `limit + 1` rows: the extra row only tells that there is more.
    pub(super) fn from_rows(mut rows: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> C) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more {
            rows.last().map(cursor_of)
        } else {
            None
        };
        Page { items: rows, next }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a cursor from a previous page")]
pub struct BadCursor(String);

/// Where a page of jobs ends: the last job's insertion order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCursor(pub(super) i64);

impl fmt::Display for JobCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "j{}", self.0)
    }
}

impl FromStr for JobCursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix('j')
            .and_then(|n| n.parse().ok())
            .map(JobCursor)
            .ok_or_else(|| BadCursor(s.to_owned()))
    }
}

/// Where a page of sandboxes ends: the last one's creation time and id (ids break ties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCursor {
    pub(super) created_ms: i64,
    pub(super) id: String,
}

impl fmt::Display for SandboxCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}.{}", self.created_ms, self.id)
    }
}

impl FromStr for SandboxCursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCursor(s.to_owned());
        let (created, id) = s
            .strip_prefix('s')
            .and_then(|rest| rest.split_once('.'))
            .ok_or_else(bad)?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(SandboxCursor {
            created_ms: created.parse().map_err(|_| bad())?,
            id: id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_what_they_wrote_and_refuse_anything_else() {
        let job = JobCursor(42);
        assert_eq!(job.to_string().parse::<JobCursor>(), Ok(job));
        let sandbox = SandboxCursor {
            created_ms: 1_700_000_000_000,
            id: "sandbox-01.x".into(),
        };
        assert_eq!(sandbox.to_string().parse::<SandboxCursor>(), Ok(sandbox));
        for bad in ["", "42", "jx", "s12", "s.x", "s12.", "j1.5"] {
            assert!(bad.parse::<JobCursor>().is_err(), "{bad}");
            assert!(bad.parse::<SandboxCursor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_page_says_whether_more_follow() {
        let full = Page::from_rows(vec![5, 4, 3], 2, |n| *n);
        assert_eq!((full.items, full.next), (vec![5, 4], Some(4)));
        let last = Page::from_rows(vec![2, 1], 2, |n| *n);
        assert_eq!((last.items, last.next), (vec![2, 1], None));
    }
}
