//! Cloud-init documents for one sandbox, the same for every backend: `meta-data` and the
//! `user-data` that writes the runner's bootstrap file and phones home. This is the guest contract
//! (docs/guest-contract.md); how the documents reach the guest is each backend's business (the local
//! backend's NoCloud image in `qemu::seed`, a Proxmox snippet in `pve::snippets`).
//!
//! The YAML stays inside the subset both real cloud-init and the test image's parser accept:
//! double-quoted one-line scalars, `|` block scalars for file contents, two-space indentation and
//! one sequence item per line. Values that would need escapes in a double-quoted scalar (quotes,
//! backslashes, control and non-ASCII characters) are refused rather than escaped.

use std::fmt;

use crate::backend::{CloudInitSpec, RunnerFetch};

/// Where the runner finds the daemon's URL and its one-time token.
pub const BOOTSTRAP_PATH: &str = "/etc/agentlab/bootstrap.json";

/// The script the user-data writes and runs to install the daemon's runner.
pub const FETCH_RUNNER_PATH: &str = "/etc/agentlab/fetch-runner.sh";
/// Where the runner lives in every guest, baked in or installed (docs/guest-contract.md).
pub const RUNNER_PATH: &str = "/usr/local/bin/agentlab-runner";

/// How often cloud-init's phone_home retries.
const PHONE_HOME_TRIES: u32 = 10;

/// A field of the spec that cannot go into the documents as it is.
#[derive(Debug, thiserror::Error)]
#[error("cloud-init field {field} {reason}")]
pub struct CloudInitError {
    pub field: &'static str,
    pub reason: &'static str,
}

/// The two documents of a sandbox's seed. `user_data` carries tokens, so the Debug form only
/// gives its size.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
}

impl fmt::Debug for SeedFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedFiles")
            .field("meta_data", &self.meta_data)
            .field("user_data_bytes", &self.user_data.len())
            .finish()
    }
}

/// The runner's bootstrap file, in the field order the guest contract shows.
#[derive(serde::Serialize)]
struct Bootstrap<'a> {
    url: &'a str,
    token: &'a str,
}

/// Renders the seed's files of a job's sandbox, with the runner's fetch when the daemon serves
/// it. `instance_id` names the VM for cloud-init; a new id makes cloud-init treat a boot as a
/// first boot.
pub fn render(
    instance_id: &str,
    spec: &CloudInitSpec,
    runner: Option<&RunnerFetch>,
) -> Result<SeedFiles, CloudInitError> {
    check_hostname("instance_id", instance_id)?;
    check_hostname("hostname", &spec.hostname)?;
    check_scalar("guest_url", &spec.guest_url)?;
    check_scalar("phone_home_url", &spec.phone_home_url)?;
    check_scalar("bootstrap_token", &spec.bootstrap_token)?;

    let meta_data = format!(
        "instance-id: \"{instance_id}\"\nlocal-hostname: \"{hostname}\"\n",
        hostname = spec.hostname
    );
    // serde_json escapes whatever needs it, and its compact output is a single line, which is
    // what a block scalar line must be.
    let bootstrap = serde_json::to_string(&Bootstrap {
        url: &spec.guest_url,
        token: &spec.bootstrap_token,
    })
    .map_err(|_| CloudInitError {
        field: "bootstrap_token",
        reason: "cannot be encoded as JSON",
    })?;
    let runner = runner.map(runner_parts).transpose()?;
    let (runner_file, runcmd) = runner.unwrap_or_default();
    let user_data = format!(
        "#cloud-config\n\
         hostname: \"{hostname}\"\n\
         write_files:\n  \
           - path: \"{BOOTSTRAP_PATH}\"\n    \
             permissions: \"0600\"\n    \
             content: |\n      \
               {bootstrap}\n\
         {runner_file}\
         {runcmd}\
         phone_home:\n  \
           url: \"{phone_home_url}\"\n  \
           post:\n    \
             - \"instance_id\"\n    \
             - \"hostname\"\n  \
           tries: {PHONE_HOME_TRIES}\n",
        hostname = spec.hostname,
        phone_home_url = spec.phone_home_url,
    );
    Ok(SeedFiles {
        meta_data,
        user_data,
    })
}

/// The seed of a sandbox: its job's (`render`), or, for a pool sandbox booted before any job,
/// one that names only its hostname and, when the daemon serves its runner, the fetch of it with
/// the pool sandbox's own runner token (the job's identity comes later through the guest agent).
pub fn render_for(
    instance_id: &str,
    spec: Option<&CloudInitSpec>,
    runner: Option<&RunnerFetch>,
) -> Result<SeedFiles, CloudInitError> {
    match spec {
        Some(spec) => render(instance_id, spec, runner),
        None => render_template(instance_id, instance_id, runner),
    }
}

/// The seed of a snapshot's template VM, or of a pool sandbox: an identity and nothing of a job's
/// but, when the daemon serves its runner, the fetch of it (with the runner token of the job or
/// pool sandbox that makes the snapshot, or of the pool sandbox): no bootstrap token, no
/// phone-home. Each sandbox restored from it gets its own identity through the guest agent.
pub fn render_template(
    instance_id: &str,
    hostname: &str,
    runner: Option<&RunnerFetch>,
) -> Result<SeedFiles, CloudInitError> {
    check_hostname("instance_id", instance_id)?;
    check_hostname("hostname", hostname)?;
    let mut user_data = format!("#cloud-config\nhostname: \"{hostname}\"\n");
    if let Some(runner) = runner {
        let (file, runcmd) = runner_parts(runner)?;
        user_data.push_str("write_files:\n");
        user_data.push_str(&file);
        user_data.push_str(&runcmd);
    }
    Ok(SeedFiles {
        meta_data: format!("instance-id: \"{instance_id}\"\nlocal-hostname: \"{hostname}\"\n"),
        user_data,
    })
}

/// The `write_files` item of the runner's fetch script and the `runcmd` that runs it. The script
/// keeps a runner that is already the daemon's (a template with one baked in boots as before),
/// otherwise downloads it (curl, else busybox wget), checks its sha256, and installs it; a
/// download that is not that file is refused, and cloud-init records the failure. The script
/// holds a token, so it is 0700 and removes itself.
fn runner_parts(runner: &RunnerFetch) -> Result<(String, String), CloudInitError> {
    for (field, value) in [("runner_url", &runner.url), ("runner_token", &runner.token)] {
        check_scalar(field, value)?;
        if value.contains('\'') {
            return Err(CloudInitError {
                field,
                reason: "must not contain a single quote",
            });
        }
    }
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if runner.sha256.len() != 64 || !runner.sha256.bytes().all(lower_hex) {
        return Err(CloudInitError {
            field: "runner_sha256",
            reason: "must be 64 lower-case hex digits",
        });
    }
    // No quote of either kind in the url and token, so single quotes hold them safely.
    let script = [
        "set -u".to_owned(),
        format!("want={}", runner.sha256),
        format!("dest={RUNNER_PATH}"),
        "have=$(sha256sum \"$dest\" 2>/dev/null | cut -d ' ' -f 1)".to_owned(),
        "if [ \"$have\" = \"$want\" ]; then rm -f \"$0\"; exit 0; fi".to_owned(),
        "mkdir -p \"$(dirname \"$dest\")\"".to_owned(),
        "tmp=\"$dest.download\"".to_owned(),
        "rm -f \"$tmp\"".to_owned(),
        "if command -v curl >/dev/null 2>&1; then".to_owned(),
        format!(
            "  curl -fsS --noproxy '*' --retry 5 -H 'Authorization: Bearer {}' -o \"$tmp\" '{}'",
            runner.token, runner.url
        ),
        "else".to_owned(),
        format!(
            "  wget -q -Y off --header 'Authorization: Bearer {}' -O \"$tmp\" '{}'",
            runner.token, runner.url
        ),
        "fi".to_owned(),
        "fetched=$?".to_owned(),
        "rm -f \"$0\"".to_owned(),
        "if [ \"$fetched\" -ne 0 ]; then rm -f \"$tmp\"; echo \"agentlab: cannot fetch the runner\" >&2; exit 1; fi".to_owned(),
        "got=$(sha256sum \"$tmp\" | cut -d ' ' -f 1)".to_owned(),
        "if [ \"$got\" != \"$want\" ]; then rm -f \"$tmp\"; echo \"agentlab: refused the runner: its sha256 is $got, not $want\" >&2; exit 1; fi".to_owned(),
        "chmod 0755 \"$tmp\" && mv -f \"$tmp\" \"$dest\"".to_owned(),
    ];
    let mut file =
        format!("  - path: \"{FETCH_RUNNER_PATH}\"\n    permissions: \"0700\"\n    content: |\n");
    for line in script {
        file.push_str("      ");
        file.push_str(&line);
        file.push('\n');
    }
    let runcmd = format!("runcmd:\n  - \"/bin/sh {FETCH_RUNNER_PATH}\"\n");
    Ok((file, runcmd))
}

/// A hostname-like identifier: RFC 1123 labels, lower case.
fn check_hostname(field: &'static str, value: &str) -> Result<(), CloudInitError> {
    let invalid = |reason| Err(CloudInitError { field, reason });
    if value.is_empty() || value.len() > 63 {
        return invalid("must be 1 to 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return invalid("may only hold a-z, 0-9 and '-'");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return invalid("must not start or end with '-'");
    }
    Ok(())
}

/// A value that can sit between double quotes without any escape.
fn check_scalar(field: &'static str, value: &str) -> Result<(), CloudInitError> {
    if value.is_empty() {
        return Err(CloudInitError {
            field,
            reason: "must not be empty",
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(CloudInitError {
            field,
            reason: "may only hold printable ASCII without spaces, quotes or backslashes",
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;

    /// A sandbox's cloud-init input, as the backends' tests use it too.
    pub(crate) fn spec() -> CloudInitSpec {
        CloudInitSpec {
            hostname: "sandbox-0123456789ab".into(),
            phone_home_url: "http://10.0.2.100/guest/v1/phone-home/PHONETOKEN123".into(),
            guest_url: "http://10.0.2.100".into(),
            bootstrap_token: "BOOTTOKEN456".into(),
        }
    }

    fn runner() -> RunnerFetch {
        RunnerFetch {
            url: "http://10.0.2.100/guest/v1/runner".into(),
            token: "RUNNERTOKEN789".into(),
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn the_runner_fetch_is_a_0700_script_that_runcmd_runs_and_that_checks_the_digest() {
        let spec = spec();
        let files = render("sandbox-0123456789ab", &spec, Some(&runner())).unwrap();
        let body = files.user_data.strip_prefix("#cloud-config\n").unwrap();
        let doc: serde_json::Value = yaml_serde::from_str(body).unwrap();
        let script = &doc["write_files"][1];
        assert_eq!(script["path"], FETCH_RUNNER_PATH);
        assert_eq!(script["permissions"], "0700");
        let text = script["content"].as_str().unwrap();
        assert!(
            text.contains(&format!("want={}", "ab".repeat(32))),
            "{text}"
        );
        assert!(
            text.contains("Authorization: Bearer RUNNERTOKEN789"),
            "{text}"
        );
        assert!(
            text.contains("'http://10.0.2.100/guest/v1/runner'"),
            "{text}"
        );
        assert_eq!(
            doc["runcmd"],
            serde_json::json!([format!("/bin/sh {FETCH_RUNNER_PATH}")])
        );
        // The phone-home still comes last, after runcmd has installed the runner.
        assert!(doc["phone_home"]["url"].is_string());
        assert!(!format!("{:?}", runner()).contains("RUNNERTOKEN789"));
        assert!(!format!("{files:?}").contains("RUNNERTOKEN789"));

        let template =
            render_template("snapshot-0123", "sandbox-snapshot", Some(&runner())).unwrap();
        let doc: serde_json::Value =
            yaml_serde::from_str(template.user_data.strip_prefix("#cloud-config\n").unwrap())
                .unwrap();
        assert_eq!(doc["write_files"][0]["path"], FETCH_RUNNER_PATH);
        assert!(doc.get("phone_home").is_none());

        for bad in [
            RunnerFetch {
                sha256: "not-a-digest".into(),
                ..runner()
            },
            RunnerFetch {
                url: "http://10.0.2.100/x';reboot;'".into(),
                ..runner()
            },
        ] {
            assert!(render_template("snapshot-0123", "sandbox-snapshot", Some(&bad)).is_err());
        }
    }

    #[test]
    fn a_pool_sandboxs_seed_fetches_the_runner_and_carries_nothing_of_a_job() {
        let files = render_for("sandbox-pool-0123", None, Some(&runner())).unwrap();
        let doc: serde_json::Value =
            yaml_serde::from_str(files.user_data.strip_prefix("#cloud-config\n").unwrap()).unwrap();
        assert_eq!(doc["hostname"], "sandbox-pool-0123");
        let script = doc["write_files"][0]["content"].as_str().unwrap();
        assert!(
            script.contains("Authorization: Bearer RUNNERTOKEN789"),
            "{script}"
        );
        assert!(script.contains(&format!("want={}", "ab".repeat(32))));
        assert_eq!(
            doc["runcmd"],
            serde_json::json!([format!("/bin/sh {FETCH_RUNNER_PATH}")])
        );
        let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["hostname", "runcmd", "write_files"], "{doc}");
        assert_eq!(doc["write_files"].as_array().unwrap().len(), 1);
        assert!(!files.user_data.contains(BOOTSTRAP_PATH));
        // Without a runner to serve it names only its hostname, as before.
        let bare = render_for("sandbox-pool-0123", None, None).unwrap();
        assert_eq!(
            bare.user_data,
            "#cloud-config\nhostname: \"sandbox-pool-0123\"\n"
        );
    }

    #[test]
    fn renders_the_expected_documents() {
        let files = render("sandbox-0123456789ab", &spec(), None).unwrap();
        assert_eq!(
            files.meta_data,
            "instance-id: \"sandbox-0123456789ab\"\nlocal-hostname: \"sandbox-0123456789ab\"\n"
        );
        let expected = r#"#cloud-config
hostname: "sandbox-0123456789ab"
write_files:
  - path: "/etc/agentlab/bootstrap.json"
    permissions: "0600"
    content: |
      {"url":"http://10.0.2.100","token":"BOOTTOKEN456"}
phone_home:
  url: "http://10.0.2.100/guest/v1/phone-home/PHONETOKEN123"
  post:
    - "instance_id"
    - "hostname"
  tries: 10
"#;
        assert_eq!(files.user_data, expected);
    }

    #[test]
    fn user_data_means_what_it_says_to_a_yaml_parser() {
        let files = render("sandbox-0123456789ab", &spec(), None).unwrap();
        let body = files.user_data.strip_prefix("#cloud-config\n").unwrap();
        let doc: serde_json::Value = yaml_serde::from_str(body).unwrap();
        assert_eq!(doc["hostname"], "sandbox-0123456789ab");
        let file = &doc["write_files"][0];
        assert_eq!(file["path"], BOOTSTRAP_PATH);
        assert_eq!(file["permissions"], "0600");
        let bootstrap: serde_json::Value =
            serde_json::from_str(file["content"].as_str().unwrap()).unwrap();
        assert_eq!(
            bootstrap,
            serde_json::json!({"url": "http://10.0.2.100", "token": "BOOTTOKEN456"})
        );
        assert_eq!(
            doc["phone_home"],
            serde_json::json!({
                "url": "http://10.0.2.100/guest/v1/phone-home/PHONETOKEN123",
                "post": ["instance_id", "hostname"],
                "tries": 10
            })
        );
        let meta: serde_json::Value = yaml_serde::from_str(&files.meta_data).unwrap();
        assert_eq!(meta["instance-id"], "sandbox-0123456789ab");
    }

    #[test]
    fn a_template_seed_carries_an_identity_and_nothing_of_a_job() {
        let files = render_template("snapshot-0123456789abcdef", "sandbox-snapshot", None).unwrap();
        let body = files.user_data.strip_prefix("#cloud-config\n").unwrap();
        let doc: serde_json::Value = yaml_serde::from_str(body).unwrap();
        assert_eq!(doc, serde_json::json!({"hostname": "sandbox-snapshot"}));
        let meta: serde_json::Value = yaml_serde::from_str(&files.meta_data).unwrap();
        assert_eq!(meta["instance-id"], "snapshot-0123456789abcdef");
        assert!(render_template("Bad Id", "sandbox-snapshot", None).is_err());
    }

    #[test]
    fn tokens_stay_out_of_debug_output() {
        let spec = spec();
        let files = render("sandbox-0123456789ab", &spec, None).unwrap();
        for text in [format!("{files:?}"), format!("{spec:?}")] {
            assert!(!text.contains("BOOTTOKEN456"), "{text}");
            assert!(!text.contains("PHONETOKEN123"), "{text}");
        }
    }

    #[test]
    fn refuses_values_that_would_need_escaping() {
        let mut bad = spec();
        bad.hostname = "evil\nruncmd: [reboot]".into();
        assert!(matches!(
            render("sandbox-1", &bad, None),
            Err(CloudInitError {
                field: "hostname",
                ..
            })
        ));
        let mut bad = spec();
        bad.phone_home_url = "http://x/\"quoted\"".into();
        assert!(matches!(
            render("sandbox-1", &bad, None),
            Err(CloudInitError {
                field: "phone_home_url",
                ..
            })
        ));
        let mut bad = spec();
        bad.bootstrap_token = String::new();
        assert!(render("sandbox-1", &bad, None).is_err());
        assert!(render("Sandbox_1", &spec(), None).is_err());
    }

    /// The guest image's own YAML reader (guest-image/, busybox awk) reads what we write.
    #[test]
    fn the_guest_image_parser_reads_the_user_data() {
        let parser = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("guest-image/rootfs/usr/libexec/agentlab/yaml2tree.awk");
        let dir = tempfile::tempdir().unwrap();
        let files = render("sandbox-0123456789ab", &spec(), None).unwrap();
        for (name, text) in [
            ("user-data", &files.user_data),
            ("meta-data", &files.meta_data),
        ] {
            let input = dir.path().join(name);
            std::fs::write(&input, text).unwrap();
            let out = dir.path().join(format!("{name}.tree"));
            let run = std::process::Command::new("busybox")
                .arg("awk")
                .arg("-v")
                .arg(format!("out={}", out.display()))
                .arg("-f")
                .arg(&parser)
                .arg(&input)
                .output()
                .expect("busybox (busybox-static, see scripts/install-deps.sh) runs the parser");
            assert!(
                run.status.success() && run.stderr.is_empty(),
                "{}",
                String::from_utf8_lossy(&run.stderr)
            );
        }
        let read = |path: &str| {
            std::fs::read_to_string(dir.path().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        assert_eq!(read("user-data.tree/hostname"), "sandbox-0123456789ab");
        assert_eq!(read("user-data.tree/write_files/0000/path"), BOOTSTRAP_PATH);
        assert_eq!(read("user-data.tree/write_files/0000/permissions"), "0600");
        assert_eq!(
            read("user-data.tree/write_files/0000/content"),
            "{\"url\":\"http://10.0.2.100\",\"token\":\"BOOTTOKEN456\"}\n"
        );
        assert_eq!(
            read("user-data.tree/phone_home/url"),
            "http://10.0.2.100/guest/v1/phone-home/PHONETOKEN123"
        );
        assert_eq!(read("user-data.tree/phone_home/post/0000"), "instance_id");
        assert_eq!(read("user-data.tree/phone_home/post/0001"), "hostname");
        assert_eq!(read("user-data.tree/phone_home/tries"), "10");
        assert_eq!(read("meta-data.tree/instance-id"), "sandbox-0123456789ab");
        assert_eq!(
            read("meta-data.tree/local-hostname"),
            "sandbox-0123456789ab"
        );
    }
}
