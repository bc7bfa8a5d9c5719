//! AgentLab: runs AI coding agents unattended, one throwaway VM per job.
//!
//! `agentlabd` is an actix actor runtime: a Supervisor spawns one SandboxActor per VM, which drives
//! the VM through clone → start → cloud-init → guest agent → run → upload → destroy on a `Backend`.
//! State lives in SQLite (`store`), so a restart loses nothing.

pub mod actors;
pub mod backend;
pub mod cli;
pub mod cloud_verdict;
pub mod cloudinit;
pub mod config;
pub mod daemon;
pub mod governor;
pub mod host_repos;
pub mod http;
pub mod instance;
pub mod jobfiles;
pub mod metrics;
pub mod model;
pub mod paths;
pub mod pve;
pub mod qemu;
pub mod runner;
pub mod runner_binary;
pub mod secrets;
pub mod start;
pub mod store;
#[cfg(test)]
mod test_git;
pub mod urlpath;
