//! What the Proxmox VE backend makes of the config: the profile settings it cannot honour. The
//! `pve:` section itself is plain data in `crate::config::pve`.

pub use crate::config::pve::{is_identifier, PveConfig, PveConfigError};

/// What the pve backend will not honour in `profiles`: it needs a `template_vmid`, and it puts
/// every sandbox on `bridge` and full clones on `storage` from this section, whatever a profile's
/// own `network.bridge` / `storage.storage` say. One line per problem, for start-up warnings.
pub fn profile_warnings<'a>(
    config: &PveConfig,
    profiles: impl IntoIterator<Item = &'a crate::config::profile::Profile>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for profile in profiles {
        let name = &profile.name;
        if profile.template_vmid.is_none() {
            warnings.push(format!(
                "profile `{name}` has no template_vmid: its jobs fail at clone on the pve backend"
            ));
        }
        if let Some(bridge) = profile
            .network
            .bridge
            .as_deref()
            .filter(|b| *b != config.bridge)
        {
            warnings.push(format!(
                "profile `{name}` asks for bridge `{bridge}`, but sandboxes join pve.bridge `{}`",
                config.bridge
            ));
        }
        if let (Some(wanted), Some(storage)) = (&profile.storage.storage, &config.storage) {
            if wanted != storage {
                warnings.push(format!(
                    "profile `{name}` asks for storage `{wanted}`, but full clones go to \
                     pve.storage `{storage}` (linked clones stay on the template's storage)"
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn profiles_the_backend_cannot_honour_are_named() {
        let profiles = crate::config::profile::Profiles::load_dir(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/profiles"
        )))
        .unwrap();
        assert!(profile_warnings(&PveConfig::default(), profiles.all()).is_empty());
        let config = PveConfig {
            bridge: "vmbr9".into(),
            storage: Some("local-lvm".into()),
            ..PveConfig::default()
        };
        let warnings = profile_warnings(&config, profiles.all());
        assert!(
            warnings.iter().any(|w| w.contains("bridge `vmbr1`")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("storage `local-zfs`")),
            "{warnings:?}"
        );
    }
}
