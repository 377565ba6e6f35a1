//! What the host must offer before anything is loaded: root, a cgroup v2 hierarchy. Each
//! missing piece is one clear message; nothing is attached when one is missing.

use std::{
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;

const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "the agent must run as root (it needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN to load \
         eBPF programs and enter pod network namespaces); effective uid is {0}"
    )]
    NotRoot(u32),
    #[error(
        "no cgroup v2 hierarchy is mounted (none of type cgroup2 in {mounts}); mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup`, or pass --cgroup PATH"
    )]
    NoCgroup2Mount { mounts: String },
    #[error("{0} is not a directory of a cgroup v2 hierarchy (--cgroup needs one)")]
    NotCgroup2(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Checks the host and returns the cgroup to attach to: `cgroup` if given, else the root of the
/// first cgroup2 mount in `/proc/mounts`.
pub fn check(cgroup: Option<&Path>) -> Result<PathBuf, PreflightError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(PreflightError::NotRoot(euid));
    }
    let cgroup = match cgroup {
        Some(path) => path.to_path_buf(),
        None => cgroup2_mount("/proc/mounts")?,
    };
    if !is_cgroup2(&cgroup) {
        return Err(PreflightError::NotCgroup2(cgroup));
    }
    Ok(cgroup)
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
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data, valid when zeroed.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `stat` is valid for writes.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as libc::c_long == CGROUP2_SUPER_MAGIC
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
    fn a_plain_directory_is_not_cgroup2() {
        assert!(!is_cgroup2(Path::new("/tmp")));
    }
}
