//! Secret masking for the job's output. Every job env value of `MIN_SECRET_LEN` bytes or more is
//! replaced by `***`: by the runner before a byte of output leaves the guest, and again by the
//! daemon before a byte a guest posts is stored (a guest is untrusted and may not mask at all).
//!
//! The masker works on a byte stream, not on lines: it emits everything it can as soon as it
//! arrives and holds back only a tail that could still be the start of a secret. A secret split
//! across reads, across log batches or across a long pause is therefore still masked whole, and no
//! more than (longest secret - 1) bytes are ever held back.

use std::fmt;
use std::sync::Arc;

/// Shorter values (`1`, `true`, `debug`) are too common in ordinary output to mask usefully.
pub const MIN_SECRET_LEN: usize = 6;
pub const MASK: &[u8] = b"***";

/// A per-stream masker; clone one per stream so each keeps its own held-back tail.
#[derive(Clone)]
pub struct Masker {
    /// Longest first, so an overlapping longer secret wins over its own prefix.
    secrets: Arc<Vec<Vec<u8>>>,
    /// Which bytes start some secret: most positions are rejected with one lookup.
    starts: Arc<[bool; 256]>,
    pending: Vec<u8>,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("secrets", &self.secrets.len())
            .field("pending_bytes", &self.pending.len())
            .finish()
    }
}

impl Masker {
    pub fn new<I, S>(values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut secrets: Vec<Vec<u8>> = values
            .into_iter()
            .map(|v| v.as_ref().to_vec())
            .filter(|v| v.len() >= MIN_SECRET_LEN)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        let mut starts = [false; 256];
        for secret in &secrets {
            if let Some(first) = secret.first() {
                starts[usize::from(*first)] = true;
            }
        }
        Masker {
            secrets: Arc::new(secrets),
            starts: Arc::new(starts),
            pending: Vec::new(),
        }
    }

    /// A masker with the same secrets and nothing held back.
    pub fn fresh(&self) -> Self {
        Masker {
            secrets: Arc::clone(&self.secrets),
            starts: Arc::clone(&self.starts),
            pending: Vec::new(),
        }
    }

    /// Feeds `data`; appends to `out` whatever can be emitted safely.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.pending.extend_from_slice(data);
        self.drain(out, false);
    }

    /// The stream has ended: emits the held-back tail (masked where it is a whole secret).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.drain(out, true);
    }

    /// Masks a complete text in one go (runner notes, git's stderr).
    pub fn mask_all(&self, data: &[u8]) -> Vec<u8> {
        let mut masker = self.fresh();
        let mut out = Vec::with_capacity(data.len());
        masker.push(data, &mut out);
        masker.finish(&mut out);
        out
    }

    fn drain(&mut self, out: &mut Vec<u8>, at_end: bool) {
        let buf = std::mem::take(&mut self.pending);
        let mut at = 0;
        'scan: while at < buf.len() {
            if !self.starts[usize::from(buf[at])] {
                out.push(buf[at]);
                at += 1;
                continue;
            }
            let rest = &buf[at..];
            // A longer secret may still complete here once more bytes arrive: wait for them
            // rather than mask a shorter one (or nothing) and leak the longer one's remainder.
            if !at_end
                && self
                    .secrets
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            {
                break;
            }
            for secret in self.secrets.iter() {
                if rest.starts_with(secret) {
                    out.extend_from_slice(MASK);
                    at += secret.len();
                    continue 'scan;
                }
            }
            out.push(buf[at]);
            at += 1;
        }
        self.pending = buf[at..].to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_in_pieces(masker: &Masker, pieces: &[&str]) -> String {
        let mut m = masker.fresh();
        let mut out = Vec::new();
        for piece in pieces {
            m.push(piece.as_bytes(), &mut out);
        }
        m.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn masks_whole_values_and_ignores_short_ones() {
        let m = Masker::new(["hunter2hunter2", "abc", "123456"]);
        assert_eq!(
            mask_in_pieces(&m, &["key=hunter2hunter2 n=123456 x=abc\n"]),
            "key=*** n=*** x=abc\n"
        );
    }

    #[test]
    fn masks_values_split_across_chunks() {
        let m = Masker::new(["s3cr3t-value"]);
        for split in 1.."s3cr3t-value".len() {
            let text = "before s3cr3t-value after";
            let cut = "before ".len() + split;
            assert_eq!(
                mask_in_pieces(&m, &[&text[..cut], &text[cut..]]),
                "before *** after",
                "split at {split}"
            );
        }
        // One byte at a time.
        let text = "xs3cr3t-values3cr3t-value\n";
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(mask_in_pieces(&m, &pieces), "x******\n");
    }

    #[test]
    fn emits_eagerly_and_holds_back_only_a_possible_prefix() {
        let mut m = Masker::new(["s3cr3t-value"]);
        let mut out = Vec::new();
        m.push(b"progress 10% s3cr", &mut out);
        assert_eq!(out, b"progress 10% ");
        m.push(b"ew", &mut out);
        assert_eq!(out, b"progress 10% s3crew");
        out.clear();
        m.push(b"tail s3", &mut out);
        m.finish(&mut out);
        assert_eq!(out, b"tail s3");
    }

    #[test]
    fn prefers_the_longer_of_overlapping_secrets() {
        let m = Masker::new(["abcdef", "abcdefgh"]);
        assert_eq!(mask_in_pieces(&m, &["<abcdefg", "h>"]), "<***>");
        assert_eq!(mask_in_pieces(&m, &["<abcdef", "X>"]), "<***X>");
        assert_eq!(mask_in_pieces(&m, &["<abcdef"]), "<***");
    }

    #[test]
    fn multiline_values_are_masked_too() {
        let m = Masker::new(["line one\nline two"]);
        assert_eq!(
            mask_in_pieces(&m, &["a line one\n", "line two b\n"]),
            "a *** b\n"
        );
    }

    #[test]
    fn without_secrets_bytes_pass_through() {
        let m = Masker::new(Vec::<String>::new());
        let data: Vec<u8> = (0..=255u8).collect();
        assert_eq!(m.mask_all(&data), data);
    }
}
