//! Importing a whole-disk image as a template: what is asked (`TemplateImportRequest`), what the
//! check of the image found (`ImageCheck`), and what was registered (`TemplateImport`). The
//! control API answers with these, and the CLI prints them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// An image to register as template `name`. `image` is a file the daemon made (the upload), which
/// the backend may consume.
#[derive(Debug, Clone)]
pub struct TemplateImportRequest {
    pub name: String,
    pub image: PathBuf,
    /// What the user called the file, for the manifest; never opened.
    pub source_name: String,
    /// Whether the daemon serves its runner, so that an image without one can still run jobs.
    pub serves_runner: bool,
}

/// What the check of an image found. An image is usable when `missing` is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCheck {
    /// `qcow2` or `raw`, as qemu-img read it.
    pub format: String,
    pub virtual_size: u64,
    /// `gpt` or `mbr`.
    pub partition_table: Option<String>,
    /// The BIOS boot code in the first sector (`GRUB`, or unrecognised).
    pub boot_loader: Option<String>,
    pub root_partition: Option<u32>,
    pub root_fs: Option<String>,
    /// The root file system's os-release PRETTY_NAME.
    pub os: Option<String>,
    pub found: Vec<FoundItem>,
    /// What a sandbox of this image needs and the image lacks, one sentence each.
    pub missing: Vec<String>,
}

impl ImageCheck {
    pub fn usable(&self) -> bool {
        self.missing.is_empty()
    }
}

/// One thing a sandbox needs, where the image has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundItem {
    pub what: String,
    pub path: String,
    /// The version its package manager records, when it records one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A registered template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateImport {
    pub template: String,
    pub build_id: String,
    /// `firmware`: the image boots by its own boot loader.
    pub boot: String,
    /// The template disk's size on the host.
    pub disk_bytes: u64,
    pub import_seconds: f64,
    pub check: ImageCheck,
}

/// How an import ended: registered, or refused for what the image lacks.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportOutcome {
    Registered(TemplateImport),
    Refused(ImageCheck),
}
