//! The checks on an image's root file system: what a sandbox needs to boot and take a job
//! (a shell, cloud-init with the NoCloud data source, the QEMU guest agent, and the runner or a
//! way to fetch the daemon's). Paths are looked up in the image's own file system, symlinks
//! followed inside it; nothing in it is run. Blocking.

use ext4_view::Ext4;

use crate::backend::templates::FoundItem;
use crate::cloudinit::RUNNER_PATH;

/// Files larger than this are not read as configuration.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// dpkg's database is read whole; a real one is a few MB.
const MAX_DPKG_STATUS_BYTES: u64 = 64 << 20;

/// What the root file system holds and lacks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RootCheck {
    pub os: Option<String>,
    pub found: Vec<FoundItem>,
    pub missing: Vec<String>,
}

/// Whether `fs` is a root file system (it says which OS it is).
pub fn is_root(fs: &Ext4) -> bool {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .any(|p| fs.exists(*p).unwrap_or(false))
}

/// Checks `fs` for what a sandbox needs; `serves_runner` says whether the daemon serves its runner.
pub fn check(fs: &Ext4, serves_runner: bool) -> RootCheck {
    let packages = dpkg_versions(fs);
    let mut check = RootCheck {
        os: os_name(fs),
        ..RootCheck::default()
    };
    let mut need = |what: &str, paths: &[&str], package: Option<&str>, lacking: String| match paths
        .iter()
        .find(|p| is_file(fs, p))
    {
        Some(path) => check.found.push(FoundItem {
            what: what.to_owned(),
            path: (*path).to_owned(),
            version: package.and_then(|p| packages.get(p).cloned()),
        }),
        None => check.missing.push(lacking),
    };
    need(
        "shell",
        &["/bin/sh", "/usr/bin/sh"],
        None,
        "a shell at /bin/sh (the runner and cloud-init's runcmd use it)".into(),
    );
    need(
        "cloud-init",
        &[
            "/usr/bin/cloud-init",
            "/bin/cloud-init",
            "/usr/local/bin/cloud-init",
        ],
        Some("cloud-init"),
        "cloud-init (no /usr/bin/cloud-init): the sandbox's identity and tokens come through \
         its NoCloud seed"
            .into(),
    );
    need(
        "qemu-guest-agent",
        &["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga", "/sbin/qemu-ga"],
        Some("qemu-guest-agent"),
        "the QEMU guest agent (no /usr/sbin/qemu-ga, package qemu-guest-agent): the daemon runs \
         the job through it"
            .into(),
    );
    need(
        "sha256sum",
        &["/usr/bin/sha256sum", "/bin/sha256sum"],
        None,
        "sha256sum (coreutils): the user-data checks the runner with it".into(),
    );
    if is_file(fs, RUNNER_PATH) {
        check.found.push(FoundItem {
            what: "runner (its own)".into(),
            path: RUNNER_PATH.into(),
            version: None,
        });
    } else if !serves_runner {
        check.missing.push(format!(
            "a runner at {RUNNER_PATH}: the image has none and this daemon serves none \
             (runner_path is off)"
        ));
    } else {
        match ["/usr/bin/curl", "/usr/bin/wget", "/bin/wget"]
            .iter()
            .find(|p| is_file(fs, p))
        {
            Some(path) => check.found.push(FoundItem {
                what: "runner fetch".into(),
                path: (*path).to_owned(),
                version: None,
            }),
            None => check.missing.push(
                "curl or wget, to fetch the daemon's runner (the image has no runner of its own)"
                    .into(),
            ),
        }
    }
    if let Some((file, list)) = datasource_list(fs) {
        if !list.iter().any(|d| d == "NoCloud") {
            check.missing.push(format!(
                "the NoCloud data source: cloud-init's datasource_list in {file} is [{}], so the \
                 daemon's seed would be ignored",
                list.join(", ")
            ));
        }
    }
    check
}

fn is_file(fs: &Ext4, path: &str) -> bool {
    fs.metadata(path)
        .is_ok_and(|m| !m.is_dir() && !m.is_symlink())
}

fn read_small(fs: &Ext4, path: &str, max: u64) -> Option<Vec<u8>> {
    let meta = fs.metadata(path).ok()?;
    if meta.is_dir() || meta.len() > max {
        return None;
    }
    fs.read(path).ok()
}

/// os-release's PRETTY_NAME (or NAME), unquoted.
fn os_name(fs: &Ext4) -> Option<String> {
    let text = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| read_small(fs, p, MAX_CONFIG_BYTES))?;
    let text = String::from_utf8_lossy(&text);
    let value = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_owned())
    };
    let name = value("PRETTY_NAME").or_else(|| value("NAME"))?;
    Some(name.chars().filter(|c| !c.is_control()).take(120).collect())
}

/// Installed package versions from dpkg's database, if the image has one.
fn dpkg_versions(fs: &Ext4) -> std::collections::HashMap<String, String> {
    let mut versions = std::collections::HashMap::new();
    let Some(status) = read_small(fs, "/var/lib/dpkg/status", MAX_DPKG_STATUS_BYTES) else {
        return versions;
    };
    let status = String::from_utf8_lossy(&status);
    for stanza in status.split("\n\n") {
        let field = |key: &str| {
            stanza
                .lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
                .map(str::trim)
        };
        let installed = field("Status").is_some_and(|s| s.ends_with(" installed"));
        if let (true, Some(name), Some(version)) = (installed, field("Package"), field("Version")) {
            versions.insert(name.to_owned(), version.chars().take(80).collect());
        }
    }
    versions
}

/// The datasource_list cloud-init ends up with: cloud.cfg, then cloud.cfg.d/*.cfg in name order,
/// the last one that sets it winning. None when nothing sets it (cloud-init's default list has
/// NoCloud).
fn datasource_list(fs: &Ext4) -> Option<(String, Vec<String>)> {
    let mut files = vec!["/etc/cloud/cloud.cfg".to_owned()];
    if let Ok(entries) = fs.read_dir("/etc/cloud/cloud.cfg.d") {
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().display().to_string())
            .filter(|n| n.ends_with(".cfg"))
            .collect();
        names.sort();
        files.extend(
            names
                .into_iter()
                .map(|n| format!("/etc/cloud/cloud.cfg.d/{n}")),
        );
    }
    let mut last = None;
    for file in files {
        let Some(text) = read_small(fs, &file, MAX_CONFIG_BYTES) else {
            continue;
        };
        if let Some(list) = datasource_list_in(&text) {
            last = Some((file, list));
        }
    }
    last
}

#[derive(serde::Deserialize)]
struct DatasourceConfig {
    datasource_list: Option<DatasourceList>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum DatasourceList {
    List(Vec<String>),
    /// `datasource_list: NoCloud` is accepted by cloud-init too.
    One(String),
}

fn datasource_list_in(text: &[u8]) -> Option<Vec<String>> {
    let config: DatasourceConfig = yaml_serde::from_slice(text).ok()?;
    Some(match config.datasource_list? {
        DatasourceList::List(list) => list,
        DatasourceList::One(one) => vec![one],
    })
    .map(|list| list.into_iter().map(|d| d.trim().to_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_datasource_list_is_read_in_its_yaml_forms() {
        assert_eq!(
            datasource_list_in(b"datasource_list: [ NoCloud, ConfigDrive ]\n"),
            Some(vec!["NoCloud".to_owned(), "ConfigDrive".to_owned()])
        );
        assert_eq!(
            datasource_list_in(b"datasource_list:\n  - Ec2\n"),
            Some(vec!["Ec2".to_owned()])
        );
        assert_eq!(
            datasource_list_in(b"datasource_list: NoCloud\n"),
            Some(vec!["NoCloud".to_owned()])
        );
        assert_eq!(datasource_list_in(b"users: [default]\n"), None);
        assert_eq!(datasource_list_in(b"not: [yaml"), None);
    }
}
