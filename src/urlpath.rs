//! Percent-encoding of URL path segments, shared by the runner (artifact uploads) and the CLI
//! (ids and artifact names in control API paths), so a name can never add or climb a segment.

use percent_encoding::{percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but RFC 3986's unreserved characters is escaped in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Encodes one segment: `/` is escaped too.
pub fn encode_segment(segment: &str) -> String {
    percent_encode(segment.as_bytes(), SEGMENT).to_string()
}

/// Percent-encodes each `/`-separated segment of a relative path, keeping the separators.
pub fn encode_path(path: &[u8]) -> String {
    path.split(|b| *b == b'/')
        .map(|segment| percent_encode(segment, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_each_segment_and_keeps_separators() {
        assert_eq!(encode_path(b"out/report.txt"), "out/report.txt");
        assert_eq!(
            encode_path(b"out/with space/a#b?c%d"),
            "out/with%20space/a%23b%3Fc%25d"
        );
        assert_eq!(encode_path("dir/é".as_bytes()), "dir/%C3%A9");
        assert_eq!(encode_path(b"bad\xffname"), "bad%FFname");
    }

    #[test]
    fn a_segment_cannot_climb_or_split() {
        assert_eq!(encode_segment("../x/y"), "..%2Fx%2Fy");
        assert_eq!(encode_segment("0199abc"), "0199abc");
    }
}
