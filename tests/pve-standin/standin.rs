//! `pve-standin`: a test double of Proxmox VE's `qm` and `pvesh` for hosts without Proxmox. It
//! takes the same arguments and prints the same formats, keeps its state in a folder
//! (`PVE_STANDIN_DIR`), and boots REAL VMs: `qm start` launches the clone through the project's
//! local QEMU code (`agentlab::qemu`), and `qm guest …` talks to the guest's real QEMU guest
//! agent. See README.md next to this file for what it does and does not reproduce.
//!
//! It runs as `pve-standin qm ARGS…` / `pve-standin pvesh ARGS…` (what the `qm` and `pvesh`
//! wrapper scripts here do), or through a link named `qm` or `pvesh`. Like the real tools it
//! prints errors on stderr and exits 255. Every call is appended to `PVE_STANDIN_DIR/calls.log`
//! (one JSON line: tool, arguments, start, duration, exit code), which is where the latency
//! figures of the pve backend come from.

mod opts;
mod pvesh;
mod qm;
mod state;
mod vm;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use state::State;

/// A failed command: the text `qm`/`pvesh` would print on stderr.
#[derive(Debug)]
pub struct Fail(pub String);

impl Fail {
    pub fn new(message: impl Into<String>) -> Fail {
        Fail(message.into())
    }
}

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(err: E) -> Fail {
        Fail(err.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Fail>;

/// What a successful command prints on stdout.
pub type Output = String;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let invoked = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_owned())
        .unwrap_or_default();
    let tool = if invoked == "qm" || invoked == "pvesh" {
        args.remove(0);
        invoked
    } else if args.len() > 1 {
        args.remove(0);
        args.remove(0)
    } else {
        eprintln!("usage: pve-standin qm|pvesh ARGS…");
        return ExitCode::from(2);
    };

    let started = Instant::now();
    let start_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let result = run(&tool, &args);
    let code: u8 = if result.is_ok() { 0 } else { 255 };
    let state_dir = std::env::var_os("PVE_STANDIN_DIR");
    match result {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(output.as_bytes());
        }
        Err(Fail(message)) => {
            let message = message.trim_end();
            eprintln!("{message}");
        }
    }
    if let Some(dir) = state_dir {
        let line = serde_json::json!({
            "tool": tool,
            "args": args,
            "start_ms": start_ms as u64,
            "ms": started.elapsed().as_secs_f64() * 1000.0,
            "code": code,
        });
        let log = std::path::Path::new(&dir).join("calls.log");
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            // One write per line, so concurrent calls never interleave within a line.
            let _ = file.write_all(format!("{line}\n").as_bytes());
        }
    }
    ExitCode::from(code)
}

fn run(tool: &str, args: &[String]) -> Result<Output> {
    let state = State::from_env()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match tool {
            "qm" => qm::run(&state, args).await,
            "pvesh" => pvesh::run(&state, args).await,
            other => Err(Fail::new(format!("unknown tool {other}"))),
        }
    })
}
