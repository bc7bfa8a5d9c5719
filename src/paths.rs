//! Checks on paths that come from outside (jobs, guests): a path is accepted only if it is
//! relative and cannot climb out of the folder it is joined to.

use std::path::{Component, Path, PathBuf};

/// True for a non-empty relative path with no `..`, no root, and no NUL or control characters.
pub fn is_safe_relative(path: &str) -> bool {
    if path.is_empty() || path.chars().any(char::is_control) || path.contains('\\') {
        return false;
    }
    Path::new(path)
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Joins an untrusted relative path under `base`, or None if it would escape it.
pub fn join_confined(base: &Path, untrusted: &str) -> Option<PathBuf> {
    if !is_safe_relative(untrusted) {
        return None;
    }
    let relative: PathBuf = Path::new(untrusted)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    if relative.as_os_str().is_empty() {
        return None;
    }
    Some(base.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes_and_absolute_paths() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "a\\b",
            "a\nb",
            ".",
        ] {
            assert!(join_confined(Path::new("/base"), bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn accepts_plain_relative_paths() {
        assert_eq!(
            join_confined(Path::new("/base"), "out/a.txt"),
            Some(PathBuf::from("/base/out/a.txt"))
        );
        assert_eq!(
            join_confined(Path::new("/base"), "./out//b"),
            Some(PathBuf::from("/base/out/b"))
        );
        assert!(is_safe_relative("out/**"));
    }
}
