//! What a whole-disk image holds, read from its raw bytes: the partition table (MBR or GPT), the
//! BIOS boot code in its first sector, and which partition is the root file system. Nothing in the
//! image is trusted: every offset read from it is checked against the disk's length before use.
//! Blocking: run it off the async executor.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use ext4_view::Ext4;

/// The sector size partition tables are read with (what every cloud image uses).
const SECTOR: u64 = 512;
/// The MBR type of a GPT's protective entry.
const GPT_PROTECTIVE: u8 = 0xee;
/// A GPT "BIOS boot" partition's type GUID (21686148-6453-6E6F-744E-656564454649), as stored.
pub(super) const BIOS_BOOT_GUID: &[u8; 16] = b"Hah!IdontNeedEFI";
/// Where an ext4 superblock's magic number is, from the start of its file system.
const EXT4_MAGIC_AT: u64 = 1024 + 56;
/// How many partitions are looked at; a real disk has a handful.
const MAX_PARTITIONS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("reading the disk image: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the image has no partition table (no boot signature in its first sector): it is not a \
         whole-disk image; a template whose root file system is the whole disk is built with \
         scripts/build-guest-image.sh"
    )]
    NoPartitionTable,
    #[error("its partition table cannot be read: {0}")]
    BadPartitionTable(String),
    #[error("its partition table lists no partition")]
    NoPartitions,
}

/// Which table the disk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Mbr,
    Gpt,
}

impl TableKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TableKind::Mbr => "mbr",
            TableKind::Gpt => "gpt",
        }
    }
}

/// One partition, in bytes from the start of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// A GPT partition of type "BIOS boot", where GRUB keeps its core image.
    pub bios_boot: bool,
}

/// The disk's layout, as far as booting it by firmware is concerned.
#[derive(Debug, Clone)]
pub struct DiskLayout {
    pub table: TableKind,
    pub partitions: Vec<Partition>,
    /// What the first sector's boot code is: None when it is all zeros (no BIOS boot loader).
    pub boot_code: Option<BootCode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootCode {
    Grub,
    Other,
}

impl BootCode {
    pub fn as_str(self) -> &'static str {
        match self {
            BootCode::Grub => "GRUB",
            BootCode::Other => "unrecognised boot code",
        }
    }
}

/// What a partition's file system is, by its magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    Xfs,
    Btrfs,
    Vfat,
    Unknown,
}

impl FsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Vfat => "vfat",
            FsKind::Unknown => "unknown",
        }
    }
}

/// Reads the first sector and the partition table of the disk in `file`.
pub fn read_layout(file: &mut File) -> Result<DiskLayout, DiskError> {
    let disk_len = file.metadata()?.len();
    let mut first = [0u8; SECTOR as usize];
    file.read_exact_at(&mut first, 0)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                DiskError::BadPartitionTable("the image is shorter than one sector".into())
            }
            _ => DiskError::Io(e),
        })?;
    if first[510..512] != [0x55, 0xaa] {
        return Err(DiskError::NoPartitionTable);
    }
    let boot_code = boot_code(&first[..440]);
    file.seek(SeekFrom::Start(0))?;
    let mbr = mbrman::MBR::read_from(file, SECTOR as u32)
        .map_err(|e| DiskError::BadPartitionTable(e.to_string()))?;
    let protective = mbr
        .iter()
        .any(|(_, p)| p.is_used() && p.sys == GPT_PROTECTIVE);
    let (table, mut partitions) = if protective {
        file.seek(SeekFrom::Start(0))?;
        let gpt = gptman::GPT::read_from(file, SECTOR)
            .map_err(|e| DiskError::BadPartitionTable(format!("GPT: {e}")))?;
        let partitions = gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .take(MAX_PARTITIONS)
            .map(|(number, p)| Partition {
                number,
                start: p.starting_lba.saturating_mul(SECTOR),
                len: p
                    .ending_lba
                    .saturating_sub(p.starting_lba)
                    .saturating_add(1)
                    .saturating_mul(SECTOR),
                bios_boot: &p.partition_type_guid == BIOS_BOOT_GUID,
            })
            .collect::<Vec<_>>();
        (TableKind::Gpt, partitions)
    } else {
        let partitions = mbr
            .iter()
            .filter(|(_, p)| p.is_used())
            .take(MAX_PARTITIONS)
            .map(|(number, p)| Partition {
                number: u32::try_from(number).unwrap_or(u32::MAX),
                start: u64::from(p.starting_lba) * SECTOR,
                len: u64::from(p.sectors) * SECTOR,
                bios_boot: false,
            })
            .collect::<Vec<_>>();
        (TableKind::Mbr, partitions)
    };
    // A partition that runs past the end of the disk is cut to it; one that starts past it is
    // dropped: the table is the image's word, not a fact.
    partitions.retain(|p| p.start < disk_len && p.len > 0);
    for p in &mut partitions {
        p.len = p.len.min(disk_len - p.start);
    }
    if partitions.is_empty() {
        return Err(DiskError::NoPartitions);
    }
    Ok(DiskLayout {
        table,
        partitions,
        boot_code,
    })
}

fn boot_code(code: &[u8]) -> Option<BootCode> {
    if code.iter().all(|b| *b == 0) {
        return None;
    }
    // GRUB's boot.img carries its error messages, "GRUB " first among them.
    let grub = code.windows(5).any(|w| w == b"GRUB ");
    Some(if grub {
        BootCode::Grub
    } else {
        BootCode::Other
    })
}

/// The file system on `partition`, by its magic number.
pub fn fs_kind(file: &File, partition: &Partition) -> Result<FsKind, DiskError> {
    let mut head = [0u8; 2048];
    let available = partition.len.min(head.len() as u64) as usize;
    file.read_exact_at(&mut head[..available], partition.start)?;
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    Ok(if at(EXT4_MAGIC_AT as usize, &[0x53, 0xef]) {
        FsKind::Ext4
    } else if at(0, b"XFSB") {
        FsKind::Xfs
    } else if at(82, b"FAT32   ") || at(54, b"FAT16   ") || at(54, b"FAT12   ") {
        FsKind::Vfat
    } else {
        let mut btrfs = [0u8; 8];
        let read = partition.len > 0x10040 + 8
            && file
                .read_exact_at(&mut btrfs, partition.start + 0x10040)
                .is_ok();
        if read && &btrfs == b"_BHRfS_M" {
            FsKind::Btrfs
        } else {
            FsKind::Unknown
        }
    })
}

/// A partition's bytes, for the ext4 reader: every read is confined to the partition.
struct PartitionReader {
    file: File,
    start: u64,
    len: u64,
}

impl ext4_view::Ext4Read for PartitionReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let inside = start_byte
            .checked_add(dst.len() as u64)
            .is_some_and(|end| end <= self.len);
        if !inside {
            return Err("a read past the end of the partition".into());
        }
        self.file.read_exact_at(dst, self.start + start_byte)?;
        Ok(())
    }
}

/// Opens the ext4 file system on `partition` of the disk in `file`.
pub fn open_ext4(file: &File, partition: &Partition) -> Result<Ext4, String> {
    let reader = PartitionReader {
        file: file.try_clone().map_err(|e| e.to_string())?,
        start: partition.start,
        len: partition.len,
    };
    Ext4::load(Box::new(reader)).map_err(|e| e.to_string())
}
