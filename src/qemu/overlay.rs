//! qcow2 overlays: a sandbox's root disk is a copy-on-write overlay of its base (the template's
//! root disk, or a snapshot's disk), made in O(1) whatever the base's size.

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use super::tool::{self, ToolError};
use crate::backend::BackendError;

/// A qcow2 image's virtual size, from its header (big-endian u64 at offset 24).
pub async fn virtual_size(path: &Path) -> Result<u64, BackendError> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 32];
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| BackendError::io(format!("opening {}", path.display()), e))?;
    file.read_exact(&mut header)
        .await
        .map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?;
    if &header[..4] != b"QFI\xfb" {
        return Err(BackendError::InvalidInput(format!(
            "{} is not a qcow2 image",
            path.display()
        )));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[24..32]);
    Ok(u64::from_be_bytes(size))
}

/// The size an overlay of `base` gets for a sandbox asking for `disk_gb`: never smaller than the
/// base, or the guest would see a truncated file system.
pub async fn size_for(base: &Path, disk_gb: u64) -> Result<u64, BackendError> {
    Ok((disk_gb << 30).max(virtual_size(base).await?))
}

/// Creates `overlay` on `base` with `size_bytes` of virtual size.
pub async fn create(
    qemu_img: &Path,
    base: &Path,
    overlay: &Path,
    size_bytes: u64,
    timeout: Duration,
) -> Result<(), BackendError> {
    let mut command = Command::new(qemu_img);
    command
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay)
        .arg(size_bytes.to_string());
    tool::run(command, timeout)
        .await
        .map(drop)
        .map_err(|e| tool_error("clone", e))
}

pub fn tool_error(operation: &'static str, error: ToolError) -> BackendError {
    match error {
        ToolError::Timeout { timeout, .. } => BackendError::Timeout {
            operation,
            seconds: timeout.as_secs_f64(),
        },
        other => BackendError::operation(operation, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlays_take_the_larger_of_base_and_request() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("3G")
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(virtual_size(&base).await.unwrap(), 3 << 30);
        assert_eq!(size_for(&base, 1).await.unwrap(), 3 << 30);
        assert_eq!(size_for(&base, 8).await.unwrap(), 8 << 30);
        let overlay = dir.path().join("overlay.qcow2");
        let timeout = Duration::from_secs(30);
        create(Path::new("qemu-img"), &base, &overlay, 5 << 30, timeout)
            .await
            .unwrap();
        assert_eq!(virtual_size(&overlay).await.unwrap(), 5 << 30);
        std::fs::write(dir.path().join("raw"), [0u8; 64]).unwrap();
        assert!(virtual_size(&dir.path().join("raw")).await.is_err());
    }
}
