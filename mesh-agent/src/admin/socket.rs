//! The admin API's Unix socket: the only way in for changes in local mode. Its file permissions
//! decide who may make them: root only (0600, owned by the agent's user).

use std::{
    io,
    os::unix::{
        fs::{DirBuilderExt, MetadataExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

/// Where `mesh-agent run` listens and the CLI connects unless told otherwise
/// (`--admin-socket`, or `MESH_ADMIN_SOCKET` for both).
pub const DEFAULT_PATH: &str = "/run/mesh-agent/admin.sock";

/// The socket's mode: read and write (connecting needs write) for its owner only.
const SOCKET_MODE: u32 = 0o600;
/// The mode of a directory the agent creates for its socket: others may look, not add.
const DIRECTORY_MODE: u32 = 0o755;

/// A bound admin socket; [`Self::remove`] deletes its file if it is still ours.
pub struct AdminSocket {
    pub path: PathBuf,
    /// (device, inode) of the file we bound: a later agent's socket at the same path is left
    /// alone.
    identity: (u64, u64),
}

impl AdminSocket {
    /// Binds `path` with mode 0600. A socket file nobody listens on (left by an agent that was
    /// killed) is replaced; a live one, or anything that is not a socket, is an error.
    ///
    /// The socket is bound under a temporary name, given its mode, then renamed into place, so
    /// it is never reachable with a looser mode (the umask's), and a stale file is replaced in
    /// one step.
    pub fn bind(path: &Path) -> io::Result<(AdminSocket, UnixListener)> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if !directory.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIRECTORY_MODE)
                .create(directory)?;
        }
        refuse_if_in_use(path)?;
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(format!(".{}.tmp", std::process::id()));
        let temporary = directory.join(temporary_name);
        match std::fs::remove_file(&temporary) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        let listener = UnixListener::bind(&temporary)?;
        let placed =
            std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(SOCKET_MODE))
                .and_then(|()| std::fs::rename(&temporary, path));
        if let Err(error) = placed {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
        let metadata = std::fs::symlink_metadata(path)?;
        listener.set_nonblocking(true)?;
        Ok((
            AdminSocket {
                path: path.to_path_buf(),
                identity: (metadata.dev(), metadata.ino()),
            },
            listener,
        ))
    }

    /// Deletes the socket file on a clean exit, unless another agent has replaced it since.
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn refuse_if_in_use(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket: remove it or choose another --admin-socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another agent is serving this admin socket",
        )),
        // Nobody listens: the file of an agent that did not exit cleanly.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_for_its_owner_only_and_goes_on_a_clean_exit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/admin.sock");
        let (socket, _listener) = AdminSocket::bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("run")), 0o755);
        UnixStream::connect(&path).expect("the agent's own user connects");
        socket.remove();
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let (first, listener) = AdminSocket::bind(&path).unwrap();
        let error = AdminSocket::bind(&path).err().expect("a live socket");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        // As an agent killed by SIGKILL leaves it: the file, nobody listening.
        drop(listener);
        let (second, _listener) = AdminSocket::bind(&path).expect("the stale file replaced");
        UnixStream::connect(&path).expect("the new socket listens");
        // The first agent's clean exit, late, leaves the second's socket in place.
        first.remove();
        assert!(path.exists());
        second.remove();
        assert!(!path.exists());
    }

    #[test]
    fn a_file_that_is_no_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        std::fs::write(&path, "precious").unwrap();
        let error = AdminSocket::bind(&path).err().expect("not a socket");
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
