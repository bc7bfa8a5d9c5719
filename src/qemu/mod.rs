//! The local QEMU backend: one throwaway VM per sandbox, each a qcow2 overlay of a template plus a
//! NoCloud seed, run by a detached `qemu-system` process and driven over QMP and the guest agent.

pub mod accel;
pub mod backend;
pub mod files;
pub mod import;
pub mod launch;
pub mod layout;
pub mod library;
pub mod memory;
pub mod migration;
pub mod overlay;
pub mod process;
pub mod qga;
pub mod qmp;
pub mod restore;
pub mod seed;
pub mod snapshot;
pub mod snapshot_maker;
pub mod tool;
mod wire;

pub use crate::config::qemu::{Accel, QemuConfig};
pub use backend::{QemuBackend, QemuDirs, GUEST_URL};
