//! The `#cloud-config` user-data a Proxmox sandbox boots with (`--cicustom user=…`). Proxmox still
//! generates the meta-data (instance id, hostname) and network config (`ipconfig0`) itself; only
//! the user part is ours.
//!
//! It is the same document the local backend's NoCloud seed carries, in the YAML subset
//! docs/guest-contract.md describes: every string JSON-quoted on one line, the bootstrap file as a
//! `|` block holding one line of JSON.

use serde::Serialize;

use crate::backend::CloudInitSpec;

/// Where the runner finds the daemon's URL and its one-time token (docs/guest-contract.md).
pub const BOOTSTRAP_PATH: &str = "/etc/agentlab/bootstrap.json";

/// How often cloud-init's phone_home retries.
const PHONE_HOME_TRIES: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cloud-init field {field} {reason}")]
pub struct CloudInitError {
    pub field: &'static str,
    pub reason: &'static str,
}

#[derive(Serialize)]
struct Bootstrap<'a> {
    url: &'a str,
    token: &'a str,
}

/// A YAML double-quoted scalar: JSON string syntax is a subset of it.
fn quoted(field: &'static str, value: &str) -> Result<String, CloudInitError> {
    if value.is_empty() {
        return Err(CloudInitError {
            field,
            reason: "must not be empty",
        });
    }
    serde_json::to_string(value).map_err(|_| CloudInitError {
        field,
        reason: "cannot be encoded",
    })
}

/// Renders the user-data for one sandbox.
pub fn user_data(spec: &CloudInitSpec) -> Result<String, CloudInitError> {
    let hostname = &spec.hostname;
    if hostname.is_empty()
        || hostname.len() > 63
        || !hostname
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(CloudInitError {
            field: "hostname",
            reason: "must be 1 to 63 of a-z, 0-9 and '-'",
        });
    }
    quoted("guest_url", &spec.guest_url)?;
    quoted("bootstrap_token", &spec.bootstrap_token)?;
    // Compact JSON is one line whatever the values hold, which a block scalar line must be.
    let bootstrap = serde_json::to_string(&Bootstrap {
        url: &spec.guest_url,
        token: &spec.bootstrap_token,
    })
    .map_err(|_| CloudInitError {
        field: "bootstrap_token",
        reason: "cannot be encoded",
    })?;
    Ok(format!(
        "#cloud-config\n\
         hostname: {hostname}\n\
         write_files:\n  \
           - path: {path}\n    \
             permissions: \"0600\"\n    \
             content: |\n      \
               {bootstrap}\n\
         phone_home:\n  \
           url: {phone_home}\n  \
           post:\n    \
             - \"instance_id\"\n    \
             - \"hostname\"\n  \
           tries: {PHONE_HOME_TRIES}\n",
        hostname = quoted("hostname", hostname)?,
        path = quoted("path", BOOTSTRAP_PATH)?,
        phone_home = quoted("phone_home_url", &spec.phone_home_url)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CloudInitSpec {
        CloudInitSpec {
            hostname: "sandbox-0123456789ab".into(),
            phone_home_url: "http://10.77.0.1:8848/guest/v1/phone-home/ph-token".into(),
            guest_url: "http://10.77.0.1:8848".into(),
            bootstrap_token: "boot-token".into(),
        }
    }

    #[test]
    fn renders_the_documented_subset() {
        let text = user_data(&spec()).unwrap();
        assert_eq!(
            text,
            "#cloud-config\n\
             hostname: \"sandbox-0123456789ab\"\n\
             write_files:\n  \
               - path: \"/etc/agentlab/bootstrap.json\"\n    \
                 permissions: \"0600\"\n    \
                 content: |\n      \
                   {\"url\":\"http://10.77.0.1:8848\",\"token\":\"boot-token\"}\n\
             phone_home:\n  \
               url: \"http://10.77.0.1:8848/guest/v1/phone-home/ph-token\"\n  \
               post:\n    \
                 - \"instance_id\"\n    \
                 - \"hostname\"\n  \
               tries: 10\n"
        );
        // Real cloud-init reads it as YAML too.
        let value: serde_json::Value = yaml_serde::from_str(&text).unwrap();
        assert_eq!(value["write_files"][0]["permissions"], "0600");
        let bootstrap: serde_json::Value =
            serde_json::from_str(value["write_files"][0]["content"].as_str().unwrap()).unwrap();
        assert_eq!(bootstrap["token"], "boot-token");
    }

    #[test]
    fn values_that_need_escapes_stay_one_line_strings() {
        let mut spec = spec();
        spec.bootstrap_token = "a\"b\\c\nd: e".into();
        spec.phone_home_url = "http://h/x\"\n- evil".into();
        let text = user_data(&spec).unwrap();
        let value: serde_json::Value = yaml_serde::from_str(&text).unwrap();
        assert_eq!(value["phone_home"]["url"], "http://h/x\"\n- evil");
        let bootstrap: serde_json::Value =
            serde_json::from_str(value["write_files"][0]["content"].as_str().unwrap()).unwrap();
        assert_eq!(bootstrap["token"], "a\"b\\c\nd: e");
        assert_eq!(value.as_object().unwrap().len(), 3, "nothing was injected");
    }

    #[test]
    fn bad_hostnames_and_empty_fields_are_refused() {
        let mut bad = spec();
        bad.hostname = "Sandbox_1".into();
        assert_eq!(user_data(&bad).unwrap_err().field, "hostname");
        let mut bad = spec();
        bad.bootstrap_token.clear();
        assert_eq!(user_data(&bad).unwrap_err().field, "bootstrap_token");
    }
}
