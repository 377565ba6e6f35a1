//! Running a tool to completion, for the harness, the tests and xtask alike.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `command` and returns what it printed on stdout; if it fails, the error carries the
/// command, its exit status and everything it printed.
pub fn stdout_of(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{command:?} printed non-UTF-8"))
}
