//! The node's cgroup v2 directory: every process of a simulated node lives in it, so the agent can
//! attach its programs there, and teardown can kill everything the test started.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a
/// hybrid one), found in `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mounts = fs::read_to_string("/proc/mounts").ok()?;
            mounts.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                let mount_point = fields.nth(1)?;
                (fields.next()? == "cgroup2").then(|| PathBuf::from(unescape_mount(mount_point)))
            })
        })
        .clone()
        .context("no cgroup2 file system in /proc/mounts: the harness needs cgroup v2")
}

/// `/proc/mounts` writes space, tab, newline and backslash as three octal digits (`\040`).
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn create(path: &Path) -> Result<()> {
    fs::create_dir(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// Kills every process in the cgroup and its descendants, then removes them all. Succeeds when the
/// cgroup does not exist.
pub(crate) fn remove(path: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(path) else {
        return Ok(());
    };
    // A test or the agent may have made child cgroups; rmdir needs them gone first.
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove(&entry.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        kill_all(path);
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            // EBUSY until the killed processes have exited.
            Err(error) if Instant::now() >= deadline => {
                let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
                bail!(
                    "cannot remove cgroup {}: {error}; processes left: {}",
                    path.display(),
                    procs.split_whitespace().collect::<Vec<_>>().join(" ")
                );
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// SIGKILLs every process in the cgroup (and its descendants, with `cgroup.kill`).
fn kill_all(path: &Path) {
    // cgroup.kill (Linux 5.14+) kills atomically, also processes forking right now.
    if fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
    let pids = procs.split_whitespace().filter_map(|p| p.parse().ok());
    for pid in pids.filter_map(rustix::process::Pid::from_raw) {
        // It may have exited since the list was read.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}
