//! The file operations the local backend's folders need (sandboxes and snapshots alike): private
//! folders, whole-file writes through a temporary name, and removals that treat "already gone"
//! as done.

use std::path::Path;

use crate::backend::BackendError;

pub async fn exists(path: &Path) -> Result<bool, BackendError> {
    tokio::fs::try_exists(path)
        .await
        .map_err(|e| BackendError::io(format!("checking {}", path.display()), e))
}

pub async fn create_private_dir_all(path: &Path) -> Result<(), BackendError> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder
        .create(path)
        .await
        .map_err(|e| BackendError::io(format!("creating {}", path.display()), e))
}

/// Creates one private folder; fails if it exists.
pub async fn create_private_dir(path: &Path) -> Result<(), BackendError> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.mode(0o700);
    builder
        .create(path)
        .await
        .map_err(|e| BackendError::io(format!("creating {}", path.display()), e))
}

/// Writes a file whole, through a temporary name, so readers never see half of it.
pub async fn write_file(path: &Path, contents: &[u8]) -> Result<(), BackendError> {
    let partial = path.with_extension("partial");
    tokio::fs::write(&partial, contents)
        .await
        .map_err(|e| BackendError::io(format!("writing {}", partial.display()), e))?;
    tokio::fs::rename(&partial, path)
        .await
        .map_err(|e| BackendError::io(format!("renaming {}", partial.display()), e))
}

pub async fn remove_file_if_present(path: &Path) -> Result<(), BackendError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(BackendError::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

pub async fn remove_dir_all(path: &Path) -> Result<(), BackendError> {
    match tokio::fs::remove_dir_all(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(BackendError::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}
