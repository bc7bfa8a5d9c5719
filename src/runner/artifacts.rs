//! Choosing which files leave the guest as artifacts: the job's globs, expanded relative to the
//! checkout, kept only when they are regular files whose real location is inside the checkout.
//!
//! A pattern that names a directory stands for every file beneath it, and a trailing `**` (as in
//! `out/**`) means everything below (the `glob` crate alone would match only the subdirectories). Symlinks are resolved and kept only when they point inside the checkout;
//! symlinked directories are not descended into, which also rules out loops.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use glob::{MatchOptions, Pattern};

/// A file cleared for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Relative to the checkout, `/`-separated, as the artifact's name.
    pub rel: Vec<u8>,
    /// Where its bytes really are (symlinks resolved, inside the checkout).
    pub real: PathBuf,
    pub len: u64,
}

impl Candidate {
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.rel).into_owned()
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expansion {
    /// Sorted by name, each once however many patterns matched it.
    pub files: Vec<Candidate>,
    /// Human-readable reasons for what was refused.
    pub errors: Vec<String>,
}

const OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    // `*` stays within one directory; `**` is how a pattern says "any depth".
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// `glob` follows symlinked directories while matching `**`, so a link to `/` could make it walk
/// the whole guest; what it yields there is refused later, but the walk itself needs a bound.
const MAX_PATHS_PER_PATTERN: usize = 100_000;

/// Refuses patterns that could only name files outside the checkout.
fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("an empty artifact pattern".into());
    }
    let path = Path::new(pattern);
    if path.is_absolute() {
        return Err(format!(
            "artifact pattern `{pattern}` is absolute; patterns are relative to the checkout"
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "artifact pattern `{pattern}` contains `..`; patterns stay inside the checkout"
        ));
    }
    Pattern::new(pattern)
        .map(drop)
        .map_err(|e| format!("artifact pattern `{pattern}` is invalid: {e}"))
}

/// Expands `patterns` under `checkout`.
pub fn expand(checkout: &Path, patterns: &[String]) -> Expansion {
    let mut found = BTreeMap::new();
    let mut errors = Vec::new();
    let root = match std::fs::canonicalize(checkout) {
        Ok(root) => root,
        Err(e) => {
            errors.push(format!(
                "cannot resolve the checkout {}: {e}",
                checkout.display()
            ));
            return Expansion {
                files: Vec::new(),
                errors,
            };
        }
    };
    let escaped_root = Pattern::escape(&root.to_string_lossy());
    for pattern in patterns {
        if let Err(e) = check_pattern(pattern) {
            errors.push(e);
            continue;
        }
        let full = if pattern == "**" || pattern.ends_with("/**") {
            format!("{escaped_root}/{pattern}/*")
        } else {
            format!("{escaped_root}/{pattern}")
        };
        let paths = match glob::glob_with(&full, OPTIONS) {
            Ok(paths) => paths,
            Err(e) => {
                errors.push(format!("artifact pattern `{pattern}` is invalid: {e}"));
                continue;
            }
        };
        for (seen, entry) in paths.enumerate() {
            if seen == MAX_PATHS_PER_PATTERN {
                errors.push(format!(
                    "artifact pattern `{pattern}` matched more than {MAX_PATHS_PER_PATTERN} paths; \
                     the rest are ignored"
                ));
                break;
            }
            match entry {
                Ok(path) => visit(&root, &path, &mut found, &mut errors),
                Err(e) => errors.push(format!("artifact pattern `{pattern}`: {e}")),
            }
        }
    }
    Expansion {
        files: found.into_values().collect(),
        errors,
    }
}

/// Adds `path` if it is a file that may be uploaded, or the files beneath it if it is a real
/// directory.
fn visit(
    root: &Path,
    path: &Path,
    found: &mut BTreeMap<Vec<u8>, Candidate>,
    errors: &mut Vec<String>,
) {
    let rel = match relative_name(root, path) {
        Ok(rel) => rel,
        Err(e) => {
            errors.push(e);
            return;
        }
    };
    let shown = String::from_utf8_lossy(&rel).into_owned();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => {
            errors.push(format!("artifact {shown}: {e}"));
            return;
        }
    };
    if meta.is_dir() {
        walk(root, path, found, errors);
        return;
    }
    match resolve_inside(root, path) {
        Ok(Some((real, len))) => {
            found.insert(rel.clone(), Candidate { rel, real, len });
        }
        Ok(None) => {}
        Err(reason) => errors.push(format!("artifact {shown} skipped: {reason}")),
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    found: &mut BTreeMap<Vec<u8>, Candidate>,
    errors: &mut Vec<String>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(format!("cannot list {}: {e}", dir.display()));
            return;
        }
    };
    for entry in entries {
        match entry {
            Ok(entry) => visit(root, &entry.path(), found, errors),
            Err(e) => errors.push(format!("cannot list {}: {e}", dir.display())),
        }
    }
}

/// The artifact name of `path`: its components under `root`, all plain names.
fn relative_name(root: &Path, path: &Path) -> Result<Vec<u8>, String> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| format!("{} is outside the checkout", path.display()))?;
    let mut name = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => {
                if !name.is_empty() {
                    name.push(b'/');
                }
                name.extend_from_slice(part.as_bytes());
            }
            _ => return Err(format!("{} is not a plain relative path", rel.display())),
        }
    }
    if name.is_empty() {
        return Err("the checkout itself is not a file".into());
    }
    Ok(name)
}

/// `Some((real path, size))` for a regular file (possibly through symlinks) that really lives
/// inside `root`; `None` for things that are not files (sockets, fifos, symlinked directories);
/// an error for anything that resolves outside.
pub fn resolve_inside(root: &Path, path: &Path) -> Result<Option<(PathBuf, u64)>, String> {
    let real = std::fs::canonicalize(path).map_err(|e| format!("cannot resolve it: {e}"))?;
    if !real.starts_with(root) {
        return Err("it resolves outside the checkout".into());
    }
    let meta = std::fs::metadata(&real).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Ok(None);
    }
    Ok(Some((real, meta.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(expansion: &Expansion) -> Vec<String> {
        expansion.files.iter().map(Candidate::display).collect()
    }

    fn checkout() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let co = tmp.path().join("co");
        std::fs::create_dir_all(co.join("out/sub")).unwrap();
        std::fs::write(co.join("out/a.txt"), "a").unwrap();
        std::fs::write(co.join("out/sub/b.bin"), [0u8, 1, 2]).unwrap();
        std::fs::write(co.join("out/.hidden"), "h").unwrap();
        std::fs::write(co.join("top.log"), "t").unwrap();
        std::fs::write(co.join("other.log"), "o").unwrap();
        std::fs::write(tmp.path().join("outside.txt"), "secret").unwrap();
        (tmp, co)
    }

    #[test]
    fn expands_globs_relative_to_the_checkout() {
        let (_tmp, co) = checkout();
        let e = expand(&co, &["*.log".into()]);
        assert_eq!(names(&e), ["other.log", "top.log"]);
        assert!(e.errors.is_empty(), "{:?}", e.errors);

        // `*` does not cross directories; `**` does, and a matched directory brings its files.
        let e = expand(&co, &["out/*".into()]);
        assert_eq!(names(&e), ["out/.hidden", "out/a.txt", "out/sub/b.bin"]);
        let e = expand(
            &co,
            &["out/**".into(), "out/**/*.bin".into(), "top.log".into()],
        );
        assert_eq!(
            names(&e),
            ["out/.hidden", "out/a.txt", "out/sub/b.bin", "top.log"]
        );
        assert_eq!(e.files[2].len, 3);

        let e = expand(&co, &["nothing/**".into()]);
        assert!(e.files.is_empty() && e.errors.is_empty());
    }

    #[test]
    fn refuses_absolute_and_parent_patterns() {
        let (_tmp, co) = checkout();
        let e = expand(
            &co,
            &[
                "/etc/passwd".into(),
                "../outside.txt".into(),
                "out/../../outside.txt".into(),
                "a**b".into(),
            ],
        );
        assert!(e.files.is_empty());
        assert_eq!(e.errors.len(), 4, "{:?}", e.errors);
        assert!(e.errors[0].contains("absolute"));
        assert!(e.errors[1].contains(".."));
        assert!(e.errors[2].contains(".."));
        assert!(e.errors[3].contains("invalid"));
    }

    #[test]
    fn symlinks_escaping_the_checkout_are_refused() {
        let (tmp, co) = checkout();
        symlink(tmp.path().join("outside.txt"), co.join("out/escape.txt")).unwrap();
        symlink("/etc", co.join("out/etc")).unwrap();
        symlink(tmp.path(), co.join("parentdir")).unwrap();
        // A link that stays inside is fine; it is uploaded under its own name.
        symlink("a.txt", co.join("out/alias.txt")).unwrap();

        let e = expand(&co, &["out/**".into(), "parentdir/outside.txt".into()]);
        assert_eq!(
            names(&e),
            ["out/.hidden", "out/a.txt", "out/alias.txt", "out/sub/b.bin"]
        );
        let alias = e.files.iter().find(|c| c.rel == b"out/alias.txt").unwrap();
        assert_eq!(
            alias.real,
            std::fs::canonicalize(co.join("out/a.txt")).unwrap()
        );
        let joined = e.errors.join("\n");
        assert!(joined.contains("out/escape.txt skipped"), "{joined}");
        assert!(joined.contains("out/etc skipped"), "{joined}");
        assert!(joined.contains("parentdir/outside.txt skipped"), "{joined}");
        assert!(e
            .files
            .iter()
            .all(|c| c.real.starts_with(std::fs::canonicalize(&co).unwrap())));
    }

    #[test]
    fn a_checkout_reached_through_a_symlink_still_works() {
        let (tmp, co) = checkout();
        let link = tmp.path().join("link-to-co");
        symlink(&co, &link).unwrap();
        let e = expand(&link, &["top.log".into()]);
        assert_eq!(names(&e), ["top.log"]);
    }
}
