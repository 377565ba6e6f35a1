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

/// Calls `start` (a spawn or an `output()`) again while exec fails with `ETXTBSY`: a binary a
/// test has just copied stays "busy" for as long as a child that another test thread forked
/// meanwhile still holds the copy's write descriptor, which its own exec then closes. Go's
/// `os/exec` retries the same way.
pub fn retry_while_text_busy<T>(
    mut start: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    const TRIES: u32 = 100;
    let mut tries = 1;
    loop {
        match start() {
            Err(error)
                if error.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < TRIES =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result,
        }
    }
}
