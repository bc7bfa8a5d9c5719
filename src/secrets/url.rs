//! Credentials in a repository URL (`https://user:token@host/x.git`, or a token in its query,
//! `?access_token=…`): the guest needs the whole URL to clone, so the stored request keeps it, but
//! every view of a job shows it redacted and the credentials are masked in output. Every query
//! value counts as a credential: a clone URL carries nothing else there.

/// Where a URL's userinfo (`user:token`) lies: the byte range between `://` and the `@` that ends
/// the authority. None for URLs without one and for scp-like `git@host:path` (no password there).
fn userinfo(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(start..start + at)
}

/// Where a URL's query lies: after its `?`, up to a `#` or the end. None without `://` (paths and
/// scp-like addresses have no query) or without a `?`.
fn query(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let question = start + url[start..].find('?')?;
    let end = url[question..]
        .find('#')
        .map_or(url.len(), |i| question + i);
    Some(question + 1..end)
}

/// The query's values (the part after each `=`; a pair without `=` is a value whole).
fn query_values(query: &str) -> impl Iterator<Item = &str> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').map_or(pair, |(_, value)| value))
        .filter(|value| !value.is_empty())
}

/// `https://user:secret@host/x?token=t` → `https://***@host/x?token=***`, for anything shown or
/// logged.
pub fn redact_url(text: &str) -> String {
    let mut out = match userinfo(text) {
        Some(range) => format!("{}***{}", &text[..range.start], &text[range.end..]),
        None => text.to_owned(),
    };
    if let Some(range) = query(&out) {
        let redacted: Vec<String> = out[range.clone()]
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) if !value.is_empty() => format!("{key}=***"),
                Some(_) => pair.to_owned(),
                None if pair.is_empty() => String::new(),
                None => "***".to_owned(),
            })
            .collect();
        out.replace_range(range, &redacted.join("&"));
    }
    out
}

/// The credentials in a URL (the user, the password whole: it may hold `:` itself, and the query's
/// values), so output can be masked for them.
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    if let Some(range) = userinfo(url) {
        let info = &url[range];
        match info.split_once(':') {
            Some((user, password)) => secrets.extend([user.to_owned(), password.to_owned()]),
            None => secrets.push(info.to_owned()),
        }
    }
    if let Some(range) = query(url) {
        secrets.extend(query_values(&url[range]).map(str::to_owned));
    }
    secrets
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
            "https://***@host:8443/r.git?x=***"
        );
        assert_eq!(
            redact_url("https://host/r.git?access_token=t0k3n&private&empty=#frag"),
            "https://host/r.git?access_token=***&***&empty=#frag"
        );
        assert_eq!(redact_url("https://host/r.git?"), "https://host/r.git?");
        assert_eq!(redact_url("/srv/a?b=c"), "/srv/a?b=c");
        assert_eq!(redact_url("https://host/a@b"), "https://host/a@b");
        assert_eq!(redact_url("git@host:org/r.git"), "git@host:org/r.git");
        assert_eq!(redact_url("/srv/repos/r"), "/srv/repos/r");
        assert_eq!(redact_url("--depth"), "--depth");
        assert_eq!(url_secrets("https://user:tok3n@host/"), ["user", "tok3n"]);
        assert_eq!(url_secrets("https://a:b:c@host/"), ["a", "b:c"]);
        assert_eq!(url_secrets("https://tok3n@host/"), ["tok3n"]);
        assert!(url_secrets("https://host/").is_empty());
        assert_eq!(
            url_secrets("https://u:p@host/r.git?access_token=t0k3n&private#x"),
            ["u", "p", "t0k3n", "private"]
        );
        assert!(url_secrets("git@host:org/r.git").is_empty());
    }
}
