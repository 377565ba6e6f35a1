//! The agent's Unix socket files: the admin API's (`crate::admin`, the only way in for changes in
//! local mode) and the handover socket (`crate::handover`). Their file permissions decide who
//! may use them: root only (0600, owned by the agent's user).

use std::{
    io,
    os::{
        fd::OwnedFd,
        unix::{
            fs::{DirBuilderExt, MetadataExt, PermissionsExt},
            net::UnixListener,
        },
    },
    path::{Path, PathBuf},
};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// The socket's mode: read and write (connecting needs write) for its owner only.
const SOCKET_MODE: u32 = 0o600;
/// The mode of a directory the agent creates for its socket: others may look, not add.
const DIRECTORY_MODE: u32 = 0o755;

/// Connections a socket file's listener queues before the agent accepts them.
const BACKLOG: i32 = 64;

/// A bound socket file; [`Self::remove`] deletes it if it is still the one this agent bound (or
/// took over).
#[derive(Debug)]
pub struct SocketFile {
    pub path: PathBuf,
    /// (device, inode) of the file we bound: a later agent's socket at the same path is left
    /// alone.
    identity: (u64, u64),
}

impl SocketFile {
    /// Binds a stream socket at `path` with mode 0600. A socket file nobody listens on (left by
    /// an agent that was killed) is replaced; a live one, or anything that is not a socket, is an
    /// error.
    ///
    /// The socket is bound under a temporary name, given its mode, then renamed into place, so
    /// it is never reachable with a looser mode (the umask's), and a stale file is replaced in
    /// one step.
    pub fn bind(path: &Path) -> io::Result<(SocketFile, UnixListener)> {
        let (file, listener) = bind(path, SocketType::STREAM)?;
        let listener = UnixListener::from(listener);
        listener.set_nonblocking(true)?;
        Ok((file, listener))
    }

    /// [`Self::bind`] for a `SOCK_SEQPACKET` socket (blocking): each message arrives whole, with
    /// the descriptors sent along with it.
    pub fn bind_seqpacket(path: &Path) -> io::Result<(SocketFile, OwnedFd)> {
        bind(path, SocketType::SEQPACKET)
    }

    /// The socket file at `path`, taken over with its listener from the agent that bound it:
    /// `Some` if `path` still names that file (`identity`, as [`Self::identity`] gave it there).
    pub fn adopt(path: &Path, identity: (u64, u64)) -> Option<SocketFile> {
        let metadata = std::fs::symlink_metadata(path).ok()?;
        ((metadata.dev(), metadata.ino()) == identity).then(|| SocketFile {
            path: path.to_path_buf(),
            identity,
        })
    }

    /// (device, inode): what a successor checks before it takes the socket over.
    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }

    /// Deletes the socket file on a clean exit, unless another agent has replaced it since.
    /// Not called for a file handed over to a successor, which still serves it.
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn bind(path: &Path, socket_type: SocketType) -> io::Result<(SocketFile, OwnedFd)> {
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
    refuse_if_in_use(path, socket_type)?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = directory.join(temporary_name);
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let listener =
        rustix::net::socket_with(AddressFamily::UNIX, socket_type, SocketFlags::CLOEXEC, None)?;
    rustix::net::bind(&listener, &SocketAddrUnix::new(&temporary)?)?;
    let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| Ok(rustix::net::listen(&listener, BACKLOG)?))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    let metadata = std::fs::symlink_metadata(path)?;
    Ok((
        SocketFile {
            path: path.to_path_buf(),
            identity: (metadata.dev(), metadata.ino()),
        },
        listener,
    ))
}

fn refuse_if_in_use(path: &Path, socket_type: SocketType) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket: remove it or choose another path",
        ));
    }
    let probe =
        rustix::net::socket_with(AddressFamily::UNIX, socket_type, SocketFlags::CLOEXEC, None)?;
    match rustix::net::connect(&probe, &SocketAddrUnix::new(path)?) {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another agent is serving this socket",
        )),
        // Nobody listens: the file of an agent that did not exit cleanly.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn the_socket_is_for_its_owner_only_and_goes_on_a_clean_exit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/admin.sock");
        let (socket, _listener) = SocketFile::bind(&path).unwrap();
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
        let (first, listener) = SocketFile::bind(&path).unwrap();
        let error = SocketFile::bind(&path).expect_err("a live socket");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        // As an agent killed by SIGKILL leaves it: the file, nobody listening.
        drop(listener);
        let (second, _listener) = SocketFile::bind(&path).expect("the stale file replaced");
        UnixStream::connect(&path).expect("the new socket listens");
        // The first agent's clean exit, late, leaves the second's socket in place.
        first.remove();
        assert!(path.exists());
        second.remove();
        assert!(!path.exists());
    }

    #[test]
    fn a_live_seqpacket_socket_is_kept_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        let (_first, listener) = SocketFile::bind_seqpacket(&path).unwrap();
        let error = SocketFile::bind_seqpacket(&path).expect_err("a live socket");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        SocketFile::bind_seqpacket(&path).expect("the stale file replaced");
    }

    #[test]
    fn a_successor_adopts_the_file_only_while_it_is_the_same_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let (first, _listener) = SocketFile::bind(&path).unwrap();
        assert!(SocketFile::adopt(&path, first.identity()).is_some());
        // Another file in its place (the first one's listener still open, so its inode is not
        // reused): not the one handed over.
        let other = dir.path().join("other.sock");
        let (_second, _other_listener) = SocketFile::bind(&other).unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(SocketFile::adopt(&path, first.identity()).is_none());
    }

    #[test]
    fn a_file_that_is_no_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        std::fs::write(&path, "precious").unwrap();
        let error = SocketFile::bind(&path).expect_err("not a socket");
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
