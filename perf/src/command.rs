//! Running the tools a benchmark drives: the project's binaries beside `perf`, and the system's
//! on PATH, with errors that carry what the command printed.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// The project binary `name` built beside `perf` (same profile).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("perf has no directory")?.join(name);
    ensure!(
        path.exists(),
        "{} is missing: build it first (cargo build --release -p sealfs-tools, or without \
         --release for a debug perf)",
        path.display()
    );
    Ok(path)
}

/// Runs `command`; its standard output, or an error with everything it printed.
pub fn run(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    succeeded(out, &format!("{command:?}"))
}

/// The standard output of a finished command (`what`), or an error with everything it printed.
pub fn succeeded(out: std::process::Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where `tool` is on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|candidate| candidate.is_file())
    })
}

pub fn require_tools(tools: &[&str]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| which(tool).is_none())
        .collect();
    ensure!(
        missing.is_empty(),
        "missing tools {missing:?}: run scripts/install-deps.sh"
    );
    Ok(())
}
