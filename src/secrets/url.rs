//! Credentials in a repository URL (`https://user:token@host/x.git`): the guest needs the whole
//! URL to clone, so the stored request keeps it, but every view of a job shows it redacted and the
//! credentials are masked in output.

/// Where a URL's userinfo (`user:token`) lies: the byte range between `://` and the `@` that ends
/// the authority. None for URLs without one and for scp-like `git@host:path` (no password there).
fn userinfo(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(start..start + at)
}

/// `https://user:secret@host/x` → `https://***@host/x`, for anything shown or logged.
pub fn redact_url(text: &str) -> String {
    match userinfo(text) {
        Some(range) => format!("{}***{}", &text[..range.start], &text[range.end..]),
        None => text.to_owned(),
    }
}

/// The credentials in a URL (the user, and the password whole: it may hold `:` itself), so output
/// can be masked for them.
pub fn url_secrets(url: &str) -> Vec<String> {
    let Some(range) = userinfo(url) else {
        return Vec::new();
    };
    let info = &url[range];
    match info.split_once(':') {
        Some((user, password)) => vec![user.to_owned(), password.to_owned()],
        None => vec![info.to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials_in_urls() {
        assert_eq!(
            redact_url("https://user:tok3n@host/r.git"),
            "https://***@host/r.git"
        );
        assert_eq!(
            redact_url("https://tok3n@host:8443/r.git?x=1"),
            "https://***@host:8443/r.git?x=1"
        );
        assert_eq!(redact_url("https://host/a@b"), "https://host/a@b");
        assert_eq!(redact_url("git@host:org/r.git"), "git@host:org/r.git");
        assert_eq!(redact_url("/srv/repos/r"), "/srv/repos/r");
        assert_eq!(redact_url("--depth"), "--depth");
        assert_eq!(url_secrets("https://user:tok3n@host/"), ["user", "tok3n"]);
        assert_eq!(url_secrets("https://a:b:c@host/"), ["a", "b:c"]);
        assert_eq!(url_secrets("https://tok3n@host/"), ["tok3n"]);
        assert!(url_secrets("https://host/").is_empty());
        assert!(url_secrets("git@host:org/r.git").is_empty());
    }
}
