//! The paging parameters of the list routes: `limit` (default 100, at most 1000) and `after`, a
//! cursor from the previous page's `next`.

use std::str::FromStr;

use super::error::ApiError;
use crate::store::BadCursor;

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

pub fn limit(given: Option<u32>) -> Result<u32, ApiError> {
    match given.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::BadRequest("`limit` must be above 0".into())),
        n if n > MAX_LIMIT => Err(ApiError::BadRequest(format!(
            "`limit` must be at most {MAX_LIMIT}; follow `next` for more"
        ))),
        n => Ok(n),
    }
}

pub fn cursor<C: FromStr<Err = BadCursor>>(after: Option<&str>) -> Result<Option<C>, ApiError> {
    after
        .map(str::parse)
        .transpose()
        .map_err(|e: BadCursor| ApiError::BadRequest(format!("`after`: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::JobCursor;

    #[test]
    fn limits_and_cursors_are_checked() {
        assert_eq!(limit(None).unwrap(), 100);
        assert_eq!(limit(Some(1000)).unwrap(), 1000);
        assert!(limit(Some(1001)).is_err());
        assert!(limit(Some(0)).is_err());
        assert!(cursor::<JobCursor>(None).unwrap().is_none());
        assert!(cursor::<JobCursor>(Some("bogus")).is_err());
    }
}
