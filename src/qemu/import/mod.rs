//! `agentlab template import`: a whole-disk image (a distribution's cloud image, say) checked and
//! registered as a template that boots by firmware. The image is read by qemu-img into a raw
//! scratch copy, its partition table and root file system are checked without running anything
//! from it (`disk`, `root_fs`), and only an image that has what a sandbox needs is converted to
//! the template's qcow2 and published under `images/NAME/` (`publish`), the way the build scripts
//! publish theirs: `builds/<id>/`, then the `current` link swapped.

mod disk;
mod publish;
mod root_fs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::process::Command;

use super::layout::Template;
use super::tool::{self, ToolError};
use crate::backend::templates::{ImageCheck, ImportOutcome, TemplateImport, TemplateImportRequest};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    InvalidInput(String),
    #[error(
        "template `{0}` exists and was not imported (scripts/build-guest-image.sh built it); \
         import under another name"
    )]
    NotImported(String),
    #[error("qemu-img cannot read the image: {0}")]
    Unreadable(String),
    #[error("{0}")]
    Tool(#[from] ToolError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checking the image: {0}")]
    Task(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImportError {
    let context = context.into();
    move |source| ImportError::Io { context, source }
}

/// What `qemu-img info` says of the image, in the part that matters here.
#[derive(Debug, Deserialize)]
struct ImageInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    data: Option<FormatData>,
}

#[derive(Debug, Deserialize)]
struct FormatData {
    #[serde(rename = "data-file")]
    data_file: Option<String>,
}

/// The formats an image may come in.
const FORMATS: [&str; 2] = ["qcow2", "raw"];

/// Imports images into the templates of `images_dir`.
#[derive(Debug, Clone)]
pub struct Importer {
    pub images_dir: PathBuf,
    pub qemu_img: PathBuf,
    /// For `qemu-img info`.
    pub tool_timeout: Duration,
    /// For each whole-image conversion.
    pub convert_timeout: Duration,
}

impl Importer {
    /// Checks `request.image` and, if a sandbox can boot it, registers it as template
    /// `request.name`. The image file is left where it is; the caller removes its upload.
    pub async fn import(
        &self,
        request: &TemplateImportRequest,
    ) -> Result<ImportOutcome, ImportError> {
        let started = Instant::now();
        if request.name.is_empty() {
            return Err(ImportError::InvalidInput(
                "an imported template needs a name (the default template is built by \
                 scripts/build-guest-image.sh)"
                    .into(),
            ));
        }
        let dir = Template::dir(&self.images_dir, &request.name)
            .map_err(|e| ImportError::InvalidInput(e.to_string()))?;
        if publish::is_built_template(&dir).await {
            return Err(ImportError::NotImported(request.name.clone()));
        }
        let info = self.info(&request.image).await?;
        let scratch = publish::Scratch::create(&self.images_dir, &request.name).await?;
        let raw = scratch.path().join("disk.raw");
        self.convert(&request.image, &info.format, &raw, "raw")
            .await?;
        let serves_runner = request.serves_runner;
        let raw_for_check = raw.clone();
        let mut check = tokio::task::spawn_blocking(move || inspect(&raw_for_check, serves_runner))
            .await
            .map_err(|e| ImportError::Task(e.to_string()))??;
        check.format = info.format.clone();
        check.virtual_size = info.virtual_size;
        if !check.usable() {
            scratch.remove().await;
            return Ok(ImportOutcome::Refused(check));
        }
        let build = scratch.path().join("build");
        tokio::fs::create_dir(&build)
            .await
            .map_err(io_error(format!("creating {}", build.display())))?;
        let disk = build.join("root.qcow2");
        self.convert(&raw, "raw", &disk, "qcow2").await?;
        tokio::fs::remove_file(&raw)
            .await
            .map_err(io_error(format!("removing {}", raw.display())))?;
        let disk_bytes = tokio::fs::metadata(&disk)
            .await
            .map_err(io_error(format!("reading {}", disk.display())))?
            .len();
        let build_id = publish::build_id();
        let import = TemplateImport {
            template: request.name.clone(),
            build_id: build_id.clone(),
            boot: super::layout::FIRMWARE_BOOT.to_owned(),
            disk_bytes,
            import_seconds: started.elapsed().as_secs_f64(),
            check,
        };
        publish::write_manifest(&build, &import, &request.source_name).await?;
        publish::publish(dir, build, build_id).await?;
        scratch.remove().await;
        tracing::info!(
            template = %import.template,
            build = %import.build_id,
            os = import.check.os.as_deref().unwrap_or("unknown"),
            seconds = import.import_seconds,
            "imported a disk image as a template"
        );
        Ok(ImportOutcome::Registered(import))
    }

    async fn info(&self, image: &Path) -> Result<ImageInfo, ImportError> {
        let mut command = Command::new(&self.qemu_img);
        command.args(["info", "--output=json"]).arg(image);
        let output = tool::run(command, self.tool_timeout)
            .await
            .map_err(|e| match e {
                ToolError::Failed { stderr, .. } => ImportError::Unreadable(stderr),
                other => ImportError::Tool(other),
            })?;
        let info: ImageInfo = serde_json::from_slice(&output.stdout)
            .map_err(|e| ImportError::Unreadable(format!("its qemu-img info: {e}")))?;
        if !FORMATS.contains(&info.format.as_str()) {
            return Err(ImportError::InvalidInput(format!(
                "the image is {}; a template is imported from qcow2 or raw (qemu-img convert \
                 makes one)",
                info.format
            )));
        }
        // A backing or external data file would be a host path the image names: never followed.
        if let Some(backing) = &info.backing_filename {
            return Err(ImportError::InvalidInput(format!(
                "the image has a backing file ({backing}); import a standalone image \
                 (qemu-img convert -O qcow2 makes one)"
            )));
        }
        if let Some(data_file) = info
            .format_specific
            .as_ref()
            .and_then(|f| f.data.as_ref())
            .and_then(|d| d.data_file.as_ref())
        {
            return Err(ImportError::InvalidInput(format!(
                "the image keeps its data in an external file ({data_file}); import a \
                 standalone image"
            )));
        }
        Ok(info)
    }

    async fn convert(
        &self,
        from: &Path,
        from_format: &str,
        to: &Path,
        to_format: &str,
    ) -> Result<(), ImportError> {
        let mut command = Command::new(&self.qemu_img);
        command
            .args(["convert", "-f", from_format, "-O", to_format])
            .arg(from)
            .arg(to);
        tool::run(command, self.convert_timeout).await?;
        Ok(())
    }
}

/// Checks the raw disk at `raw`. Blocking.
fn inspect(raw: &Path, serves_runner: bool) -> Result<ImageCheck, ImportError> {
    let mut file =
        std::fs::File::open(raw).map_err(io_error(format!("opening {}", raw.display())))?;
    let mut check = ImageCheck::default();
    let layout = match disk::read_layout(&mut file) {
        Ok(layout) => layout,
        Err(disk::DiskError::Io(e)) => {
            return Err(io_error(format!("reading {}", raw.display()))(e))
        }
        Err(refusal) => {
            check.missing.push(refusal.to_string());
            return Ok(check);
        }
    };
    check.partition_table = Some(layout.table.as_str().to_owned());
    check.boot_loader = layout.boot_code.map(|c| c.as_str().to_owned());
    if layout.boot_code.is_none() {
        check.missing.push(
            "a BIOS boot loader: the first sector has no boot code, so the image boots by UEFI \
             only, and a sandbox boots by SeaBIOS"
                .into(),
        );
    } else if layout.table == disk::TableKind::Gpt && !layout.partitions.iter().any(|p| p.bios_boot)
    {
        check.missing.push(
            "a BIOS boot partition: on a GPT disk GRUB's BIOS core image lives in one, and this \
             disk has none"
                .into(),
        );
    }
    let mut seen = Vec::new();
    for partition in &layout.partitions {
        let kind = disk::fs_kind(&file, partition).map_err(|e| ImportError::Io {
            context: format!("reading partition {}", partition.number),
            source: std::io::Error::other(e.to_string()),
        })?;
        seen.push(format!("{} {}", partition.number, kind.as_str()));
        if kind != disk::FsKind::Ext4 {
            continue;
        }
        let fs = match disk::open_ext4(&file, partition) {
            Ok(fs) => fs,
            Err(reason) => {
                seen.push(format!("(partition {}: {reason})", partition.number));
                continue;
            }
        };
        if !root_fs::is_root(&fs) {
            continue;
        }
        let found = root_fs::check(&fs, serves_runner);
        check.root_partition = Some(partition.number);
        check.root_fs = Some(kind.as_str().to_owned());
        check.os = found.os;
        check.found = found.found;
        check.missing.extend(found.missing);
        return Ok(check);
    }
    check.missing.push(format!(
        "a root file system: no ext4 partition holds /etc/os-release (partitions: {}); only ext4 \
         roots can be checked",
        seen.join(", ")
    ));
    Ok(check)
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::backend::templates::ImportOutcome;
    use crate::qemu::layout::Boot;

    const MIB: u64 = 1024 * 1024;
    const DISK: u64 = 40 * MIB;
    const ROOT_START: u64 = 2 * MIB;

    #[derive(Clone, Copy, PartialEq)]
    enum Table {
        Mbr,
        Gpt,
        None,
    }

    /// The files of a root file system that has everything a sandbox needs.
    fn complete_root() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "etc/os-release",
                "NAME=\"Test\"\nPRETTY_NAME=\"Test Linux 1\"\n",
            ),
            ("usr/bin/sh", "#!"),
            ("usr/bin/cloud-init", "#!"),
            ("usr/sbin/qemu-ga", "\x7fELF"),
            ("usr/bin/sha256sum", "\x7fELF"),
            ("usr/bin/curl", "\x7fELF"),
            (
                "var/lib/dpkg/status",
                "Package: cloud-init\nStatus: install ok installed\nVersion: 22.4.2-1\n\n\
                 Package: qemu-guest-agent\nStatus: install ok installed\nVersion: 1:7.2\n",
            ),
            (
                "etc/cloud/cloud.cfg",
                "datasource_list: [ NoCloud, None ]\n",
            ),
        ]
    }

    /// A raw disk image with `table`, an ext4 root partition holding `files` (and `bin` linking
    /// to `usr/bin`, as on merged-/usr systems), and boot code if `boot_code`.
    fn disk(dir: &Path, table: Table, files: &[(&str, &str)], boot_code: bool) -> PathBuf {
        let tree = dir.join("tree");
        for (path, contents) in files {
            let path = tree.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
        }
        std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", tree.join("bin")).unwrap();
        let image = dir.join("disk.raw");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(DISK).unwrap();
        drop(file);
        let (offset, fs_bytes) = match table {
            Table::None => (0, DISK),
            _ => (ROOT_START, DISK - ROOT_START - MIB),
        };
        let status = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg("-E")
            .arg(format!("offset={offset}"))
            .arg(&image)
            .arg(format!("{}k", fs_bytes / 1024))
            .status()
            .unwrap();
        assert!(status.success());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&image)
            .unwrap();
        match table {
            Table::None => {}
            Table::Mbr => {
                let mut mbr = mbrman::MBR::new_from(&mut file, 512, [1, 2, 3, 4]).unwrap();
                mbr[1] = mbrman::MBRPartitionEntry {
                    boot: mbrman::BOOT_ACTIVE,
                    first_chs: mbrman::CHS::empty(),
                    sys: 0x83,
                    last_chs: mbrman::CHS::empty(),
                    starting_lba: (ROOT_START / 512) as u32,
                    sectors: (fs_bytes / 512) as u32,
                };
                mbr.write_into(&mut file).unwrap();
            }
            Table::Gpt => {
                let mut gpt = gptman::GPT::new_from(&mut file, 512, [7; 16]).unwrap();
                gpt[1] = gptman::GPTPartitionEntry {
                    partition_type_guid: *disk::BIOS_BOOT_GUID,
                    unique_partition_guid: [1; 16],
                    starting_lba: MIB / 512,
                    ending_lba: ROOT_START / 512 - 1,
                    attribute_bits: 0,
                    partition_name: "bios".into(),
                };
                gpt[2] = gptman::GPTPartitionEntry {
                    partition_type_guid: [0x83; 16],
                    unique_partition_guid: [2; 16],
                    starting_lba: ROOT_START / 512,
                    ending_lba: (ROOT_START + fs_bytes) / 512 - 1,
                    attribute_bits: 0,
                    partition_name: "root".into(),
                };
                gpt.write_into(&mut file).unwrap();
                gptman::GPT::write_protective_mbr_into(&mut file, 512).unwrap();
            }
        }
        if boot_code {
            file.write_all_at(
                b"\xeb\x63\x90 GRUB \x00Geom\x00Hard Disk\x00Read\x00 Error",
                0,
            )
            .unwrap();
        }
        file.seek(SeekFrom::End(0)).unwrap();
        file.flush().unwrap();
        image
    }

    fn importer(images: &Path) -> Importer {
        Importer {
            images_dir: images.to_owned(),
            qemu_img: "qemu-img".into(),
            tool_timeout: Duration::from_secs(60),
            convert_timeout: Duration::from_secs(120),
        }
    }

    fn request(name: &str, image: &Path) -> TemplateImportRequest {
        TemplateImportRequest {
            name: name.into(),
            image: image.to_owned(),
            source_name: "disk.raw".into(),
            serves_runner: true,
        }
    }

    #[test]
    fn a_complete_image_passes_the_check_on_either_table() {
        for table in [Table::Mbr, Table::Gpt] {
            let dir = tempfile::tempdir().unwrap();
            let image = disk(dir.path(), table, &complete_root(), true);
            let check = inspect(&image, true).unwrap();
            assert_eq!(check.missing, Vec::<String>::new());
            assert_eq!(check.boot_loader.as_deref(), Some("GRUB"));
            assert_eq!(check.os.as_deref(), Some("Test Linux 1"));
            assert_eq!(check.root_fs.as_deref(), Some("ext4"));
            let expected_root = if table == Table::Gpt { 2 } else { 1 };
            assert_eq!(check.root_partition, Some(expected_root));
            let found: Vec<(&str, &str, Option<&str>)> = check
                .found
                .iter()
                .map(|f| (f.what.as_str(), f.path.as_str(), f.version.as_deref()))
                .collect();
            assert!(found.contains(&("cloud-init", "/usr/bin/cloud-init", Some("22.4.2-1"))));
            assert!(found.contains(&("qemu-guest-agent", "/usr/sbin/qemu-ga", Some("1:7.2"))));
            // Found through the image's own /bin -> usr/bin link.
            assert!(found.contains(&("shell", "/bin/sh", None)), "{found:?}");
            assert!(found.contains(&("runner fetch", "/usr/bin/curl", None)));
        }
    }

    #[test]
    fn what_an_image_lacks_is_each_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = complete_root();
        files.retain(|(p, _)| !["usr/sbin/qemu-ga", "usr/bin/curl"].contains(p));
        files.push((
            "etc/cloud/cloud.cfg.d/90-ec2.cfg",
            "datasource_list: [ Ec2 ]\n",
        ));
        let image = disk(dir.path(), Table::Gpt, &files, false);
        let missing = inspect(&image, true).unwrap().missing.join("\n");
        assert!(missing.contains("a BIOS boot loader"), "{missing}");
        assert!(missing.contains("QEMU guest agent"), "{missing}");
        assert!(missing.contains("curl or wget"), "{missing}");
        assert!(missing.contains("90-ec2.cfg is [Ec2]"), "{missing}");
        assert!(!missing.contains("cloud-init (no"), "{missing}");

        let no_runner_served = inspect(&image, false).unwrap().missing.join("\n");
        assert!(
            no_runner_served.contains("serves none"),
            "{no_runner_served}"
        );

        let dir = tempfile::tempdir().unwrap();
        let whole = disk(dir.path(), Table::None, &complete_root(), false);
        let missing = inspect(&whole, true).unwrap().missing.join("\n");
        assert!(missing.contains("no partition table"), "{missing}");
    }

    #[tokio::test]
    async fn an_import_registers_a_firmware_template_and_a_second_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let image = disk(dir.path(), Table::Mbr, &complete_root(), true);
        let ImportOutcome::Registered(first) = importer(&images)
            .import(&request("stock", &image))
            .await
            .unwrap()
        else {
            panic!("refused")
        };
        let template = Template::resolve(&images, "stock", None).await.unwrap();
        assert_eq!(template.boot, Boot::Firmware);
        assert!(template
            .root_disk
            .starts_with(images.join("stock/builds").canonicalize().unwrap()));
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&template.root_disk)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], DISK);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(images.join("stock/manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["boot"], "firmware");
        assert_eq!(manifest["build_id"], first.build_id.as_str());
        assert_eq!(manifest["os"], "Test Linux 1");
        assert!(image.exists(), "the caller's image stays");
        let leftovers: Vec<_> = std::fs::read_dir(&images)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".import-"))
            .collect();
        assert!(leftovers.is_empty());

        let ImportOutcome::Registered(second) = importer(&images)
            .import(&request("stock", &image))
            .await
            .unwrap()
        else {
            panic!("refused")
        };
        assert_ne!(first.build_id, second.build_id);
        let now = Template::resolve(&images, "stock", None).await.unwrap();
        assert!(now.root_disk.to_string_lossy().contains(&second.build_id));
        assert!(
            template.root_disk.exists(),
            "the build before stays for its sandboxes"
        );
    }

    #[tokio::test]
    async fn a_refused_image_registers_nothing_and_bad_requests_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let image = disk(
            dir.path(),
            Table::Mbr,
            &[("etc/os-release", "NAME=x\n")],
            true,
        );
        let outcome = importer(&images)
            .import(&request("bare", &image))
            .await
            .unwrap();
        let ImportOutcome::Refused(check) = outcome else {
            panic!("registered")
        };
        assert!(check.missing.iter().any(|m| m.starts_with("cloud-init")));
        assert!(!images.join("bare").exists());

        for (name, expected) in [("", "needs a name"), ("../up", "plain folder name")] {
            let err = importer(&images)
                .import(&request(name, &image))
                .await
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }

        // A qcow2 that names a backing file on the host is never followed.
        let overlay = dir.path().join("overlay.qcow2");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image)
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(status.success());
        let err = importer(&images)
            .import(&request("layered", &overlay))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("backing file"), "{err}");

        // A template a build script made is not taken over.
        std::fs::create_dir_all(images.join("built")).unwrap();
        std::os::unix::fs::symlink("current/vmlinuz", images.join("built/vmlinuz")).unwrap();
        let err = importer(&images)
            .import(&request("built", &image))
            .await
            .unwrap_err();
        assert!(matches!(err, ImportError::NotImported(_)), "{err}");
    }
}
