//! What the host must offer before anything is loaded: root, and a cgroup v2 hierarchy (eBPF
//! mode) or the iptables tools (iptables mode). Each missing piece is one clear message; nothing
//! is attached or installed when one is missing.

use std::{
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// `statfs` type of a cgroup v2 file system (linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "the agent must run as root (it needs CAP_NET_ADMIN and CAP_SYS_ADMIN to enter pod \
         network namespaces and set up the redirect, and CAP_BPF to load eBPF programs); \
         effective uid is {0}"
    )]
    NotRoot(u32),
    #[error(
        "no cgroup v2 hierarchy is mounted (none of type cgroup2 in {mounts}); mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup`, or pass --cgroup PATH"
    )]
    NoCgroup2Mount { mounts: String },
    #[error("{0} is not a directory of a cgroup v2 hierarchy (--cgroup needs one)")]
    NotCgroup2(PathBuf),
    #[error(
        "--redirect iptables needs `{tool}` (Debian: `apt-get install iptables`); it is not in \
         PATH={path:?}"
    )]
    NoIptables { tool: &'static str, path: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Checks the host and returns the cgroup to attach to: `cgroup` if given, else the root of the
/// first cgroup2 mount in `/proc/mounts`.
pub fn check(cgroup: Option<&Path>) -> Result<PathBuf, PreflightError> {
    check_root()?;
    let cgroup = match cgroup {
        Some(path) => path.to_path_buf(),
        None => cgroup2_mount("/proc/mounts")?,
    };
    if !is_cgroup2(&cgroup) {
        return Err(PreflightError::NotCgroup2(cgroup));
    }
    Ok(cgroup)
}

/// The iptables tools the iptables mode runs, found on `PATH`: `(iptables-restore,
/// iptables-save)`. No cgroup is needed in that mode.
pub fn check_iptables() -> Result<(PathBuf, PathBuf), PreflightError> {
    check_root()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let find = |tool: &'static str| {
        find_in_path(&path, tool).ok_or_else(|| PreflightError::NoIptables {
            tool,
            path: path.to_string_lossy().into_owned(),
        })
    };
    Ok((find("iptables-restore")?, find("iptables-save")?))
}

fn check_root() -> Result<(), PreflightError> {
    let euid = rustix::process::geteuid().as_raw();
    if euid != 0 {
        return Err(PreflightError::NotRoot(euid));
    }
    Ok(())
}

/// The first executable file named `tool` in a `PATH`-style list of directories.
fn find_in_path(path: &std::ffi::OsStr, tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(tool))
        .find(|file| {
            fs::metadata(file)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

fn cgroup2_mount(mounts: &str) -> Result<PathBuf, PreflightError> {
    let table = fs::read_to_string(mounts).map_err(|source| PreflightError::Read {
        path: mounts.to_owned(),
        source,
    })?;
    find_cgroup2(&table).ok_or_else(|| PreflightError::NoCgroup2Mount {
        mounts: mounts.to_owned(),
    })
}

fn find_cgroup2(table: &str) -> Option<PathBuf> {
    table.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target.replace("\\040", " ")))
    })
}

fn is_cgroup2(path: &Path) -> bool {
    // `f_type`'s integer type differs between architectures; i128 holds each of them.
    rustix::fs::statfs(path)
        .is_ok_and(|stat| i128::from(stat.f_type) == i128::from(CGROUP2_SUPER_MAGIC))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        let table = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                     cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                     cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2(table),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        assert_eq!(
            find_cgroup2("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn tools_are_found_on_path_and_only_when_executable() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let tool = dir.join("iptables-restore");
        fs::write(&tool, "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), dir]).unwrap();
        assert_eq!(
            find_in_path(&path, "iptables-restore"),
            None,
            "not executable"
        );
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_in_path(&path, "iptables-restore"), Some(tool));
        assert_eq!(find_in_path(&path, "iptables-save"), None);
        assert_eq!(find_in_path("".as_ref(), "iptables-restore"), None);
    }

    #[test]
    fn a_plain_directory_is_not_cgroup2_and_the_hosts_cgroup2_mount_is() {
        assert!(!is_cgroup2(Path::new("/tmp")));
        let mount = cgroup2_mount("/proc/mounts").expect("the tests run on a host with cgroup v2");
        assert!(is_cgroup2(&mount), "{}", mount.display());
    }
}
