//! The Proxmox VE backend: each sandbox is a linked clone of a template VM, driven through the
//! `qm` and `pvesh` command-line tools on the Proxmox host the daemon runs on.
//!
//! - `command`: runs one `qm`/`pvesh` argv (never a shell) under a timeout, capturing its output;
//! - `errors`: turns a failed command's stderr into the cases the backend acts on;
//! - `parse`: reads what `qm` and `pvesh` print;
//! - `snippets`: the user-data each clone boots with, kept as a snippet file. The user-data is
//!   the local backend's (`cloudinit::render`): one guest contract for both backends;
//! - `backend`: `PveBackend`, the `Backend` trait in `qm` terms.

pub mod backend;
pub mod command;
pub mod config;
pub mod errors;
pub mod parse;
pub mod snippets;

pub use crate::config::pve::PveConfig;
pub use backend::PveBackend;
pub use command::{CommandRunner, DuctRunner, Invocation, Tool};
