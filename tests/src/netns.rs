//! Named network namespaces (`ip netns`) and threads that run inside them.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::{self, JoinHandle};

use anyhow::{bail, Context, Result};

/// Where `ip netns add NAME` bind-mounts the namespace.
pub(crate) const RUN_DIR: &str = "/var/run/netns";
/// Per-namespace files that `ip netns exec` (and our spawn) mount over `/etc`.
pub(crate) const ETC_DIR: &str = "/etc/netns";

pub(crate) fn path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

pub(crate) fn etc_dir(name: &str) -> PathBuf {
    Path::new(ETC_DIR).join(name)
}

/// Runs `ip ARGS...` in the caller's namespaces; the error carries ip's stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(crate) fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes the namespace's name and its `/etc/netns` directory. The namespace itself, with its
/// links, goes away once no process, thread or socket uses it any more.
pub(crate) fn delete(name: &str) -> Result<()> {
    if path(name).exists() {
        // Another process sweeping stale leftovers may have deleted it just now.
        if let Err(error) = ip(&["netns", "del", name]) {
            if path(name).exists() {
                return Err(error);
            }
        }
    }
    match fs::remove_dir_all(etc_dir(name)) {
        Err(error) if error.kind() != ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", etc_dir(name).display()))
        }
        _ => Ok(()),
    }
}

/// Names of all namespaces under [`RUN_DIR`] and directories under [`ETC_DIR`].
pub(crate) fn entries(dir: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Moves the calling thread into the network namespace behind `ns`.
fn enter(ns: &File) -> std::io::Result<()> {
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

fn open(netns: &Path) -> Result<File> {
    File::open(netns).with_context(|| format!("opening network namespace {}", netns.display()))
}

/// Runs `f` on a fresh thread inside the network namespace at `netns` and returns its result. A
/// panic in `f` is passed on to the caller.
pub(crate) fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = open(netns)?;
    let joined = thread::scope(|scope| {
        scope
            .spawn(move || {
                enter(&ns)?;
                drop(ns);
                Ok::<_, std::io::Error>(f())
            })
            .join()
    });
    match joined {
        Ok(result) => result.with_context(|| format!("entering {}", netns.display())),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Starts `f` on a new thread inside the network namespace at `netns`.
pub(crate) fn spawn_thread_in<T, F>(netns: &Path, f: F) -> Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let ns = open(netns)?;
    let shown = netns.display().to_string();
    // Enter before handing back the handle, so a failure is an error here, not a panic later.
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let handle = thread::Builder::new()
        .name(format!("netns {shown}"))
        .spawn(move || {
            let entered = enter(&ns);
            drop(ns);
            let failed = entered.is_err();
            let _ = entered_tx.send(entered);
            if failed {
                panic!("could not enter {shown}");
            }
            f()
        })?;
    entered_rx
        .recv()
        .context("namespace thread died before entering")?
        .with_context(|| format!("entering {}", netns.display()))?;
    Ok(handle)
}
