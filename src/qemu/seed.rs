//! The local backend's NoCloud seed: a small vfat image labelled `cidata` that carries the
//! sandbox's cloud-init documents (rendered by `crate::cloudinit`) to the guest as its second disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::tool::{self, ToolError};
use crate::cloudinit::{CloudInitError, SeedFiles};

/// Big enough for the two text files, small enough to be made in milliseconds.
const IMAGE_SIZE_KB: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Render(#[from] CloudInitError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tool(#[from] ToolError),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SeedError {
    let context = context.into();
    move |source| SeedError::Io { context, source }
}

/// The host tools that build the image.
#[derive(Debug, Clone)]
pub struct SeedTools {
    pub mkfs_vfat: PathBuf,
    pub mcopy: PathBuf,
    pub timeout: Duration,
}

/// Writes `files` into a fresh vfat image at `image`, labelled `cidata`. `staging` is a scratch
/// folder (removed afterwards) on the same filesystem; both end up mode 0600/0700 because the
/// user-data holds tokens.
pub async fn write_image(
    files: &SeedFiles,
    image: &Path,
    staging: &Path,
    tools: &SeedTools,
) -> Result<(), SeedError> {
    remove_dir_if_present(staging).await?;
    create_private_dir(staging).await?;
    let meta_data = staging.join("meta-data");
    let user_data = staging.join("user-data");
    write_private_file(&meta_data, files.meta_data.as_bytes()).await?;
    write_private_file(&user_data, files.user_data.as_bytes()).await?;

    let partial = image.with_extension("img.partial");
    remove_file_if_present(&partial).await?;
    let mut mkfs = Command::new(&tools.mkfs_vfat);
    mkfs.arg("-n")
        .arg("cidata")
        .arg("-C")
        .arg(&partial)
        .arg(IMAGE_SIZE_KB.to_string());
    tool::run(mkfs, tools.timeout).await?;
    set_private(&partial).await?;

    let mut mcopy = Command::new(&tools.mcopy);
    mcopy
        .arg("-i")
        .arg(&partial)
        .arg(&meta_data)
        .arg(&user_data)
        .arg("::")
        // mtools otherwise refuses images whose geometry it finds odd.
        .env("MTOOLS_SKIP_CHECK", "1");
    tool::run(mcopy, tools.timeout).await?;

    tokio::fs::rename(&partial, image)
        .await
        .map_err(io_error(format!(
            "renaming {} into place",
            partial.display()
        )))?;
    remove_dir_if_present(staging).await
}

async fn create_private_dir(path: &Path) -> Result<(), SeedError> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.mode(0o700);
    builder
        .create(path)
        .await
        .map_err(io_error(format!("creating {}", path.display())))
}

async fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), SeedError> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(io_error(format!("creating {}", path.display())))?;
    file.write_all(contents)
        .await
        .map_err(io_error(format!("writing {}", path.display())))?;
    file.flush()
        .await
        .map_err(io_error(format!("writing {}", path.display())))
}

async fn set_private(path: &Path) -> Result<(), SeedError> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(io_error(format!("restricting {}", path.display())))
}

async fn remove_file_if_present(path: &Path) -> Result<(), SeedError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_error(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

async fn remove_dir_if_present(path: &Path) -> Result<(), SeedError> {
    match tokio::fs::remove_dir_all(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_error(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudinit::render;
    use crate::cloudinit::tests::spec;

    #[tokio::test]
    async fn writes_a_cidata_vfat_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("seed.img");
        let files = render("sandbox-0123456789ab", &spec(), None).unwrap();
        let tools = SeedTools {
            mkfs_vfat: "mkfs.vfat".into(),
            mcopy: "mcopy".into(),
            timeout: Duration::from_secs(30),
        };
        // Twice: a rerun (an idempotent clone redoing residue) replaces the image.
        for _ in 0..2 {
            write_image(&files, &image, &dir.path().join("seed.d"), &tools)
                .await
                .unwrap();
        }
        assert!(!dir.path().join("seed.d").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&image).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let label = std::process::Command::new("mlabel")
            .args(["-s", "-i"])
            .arg(&image)
            .arg("::")
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        let label = String::from_utf8_lossy(&label.stdout).to_string();
        assert!(label.to_lowercase().contains("cidata"), "{label}");
        let read = |name: &str| {
            let out = std::process::Command::new("mtype")
                .arg("-i")
                .arg(&image)
                .arg(format!("::{name}"))
                .env("MTOOLS_SKIP_CHECK", "1")
                .output()
                .unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap()
        };
        assert_eq!(read("user-data"), files.user_data);
        assert_eq!(read("meta-data"), files.meta_data);
    }
}
