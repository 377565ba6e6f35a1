//! Network namespaces: entering one on the current thread, and its cookie (the key the kernel
//! programs use for enrollment).

use std::{
    fs::File,
    io,
    marker::PhantomData,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::{Path, PathBuf},
};

/// `SO_NETNS_COOKIE` (Linux ≥ 5.14); not yet in the libc crate for every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// An open network namespace (`/var/run/netns/NAME` or `/proc/PID/ns/net`).
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens `path` if it is a network namespace, and refuses anything else at once
    /// (`InvalidInput`, saying what it is instead). Nothing is opened before `stat` says the path
    /// is a regular file (as nsfs files are): opening a device can have effects of its own
    /// (`/dev/watchdog` arms a reboot), and opening a FIFO would block until a writer came.
    pub fn open(path: impl AsRef<Path>) -> io::Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        refuse_unless_regular(&std::fs::metadata(&path)?.file_type())?;
        // Non-blocking and no controlling terminal: should the path be swapped for a FIFO or a
        // tty between the check above and this open, the open still returns at once.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)?;
        refuse_unless_regular(&file.metadata()?.file_type())?;
        NetNs::if_network(file, path)
    }

    /// A namespace handed over by another process (`path`: where it was opened, for messages),
    /// if `fd` is a network namespace.
    pub fn from_fd(fd: OwnedFd, path: PathBuf) -> io::Result<NetNs> {
        NetNs::if_network(File::from(fd), path)
    }

    fn if_network(file: File, path: PathBuf) -> io::Result<NetNs> {
        match namespace_type(&file)? {
            libc::CLONE_NEWNET => Ok(NetNs { file, path }),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "not a network namespace: a {} namespace",
                    namespace_name(other)
                ),
            )),
        }
    }

    /// The namespace the calling thread is in now.
    pub fn current() -> io::Result<NetNs> {
        NetNs::open("/proc/thread-self/ns/net")
    }

    /// Another handle on the same namespace (a duplicated file descriptor), which keeps the
    /// namespace reachable even if its path goes away.
    pub fn try_clone(&self) -> io::Result<NetNs> {
        Ok(NetNs {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace, to hand over to another process.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Moves the calling thread into this namespace until the guard drops. The guard is not
    /// `Send`, so it cannot be held across an `.await` in a task that may move threads.
    pub fn enter(&self) -> io::Result<NetNsGuard> {
        let previous = NetNs::current()?;
        setns(&self.file)?;
        Ok(NetNsGuard {
            previous,
            _not_send: PhantomData,
        })
    }

    /// The kernel's cookie for this namespace, as `bpf_get_netns_cookie` returns it.
    pub fn cookie(&self) -> io::Result<u64> {
        let _inside = self.enter()?;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }

    /// Runs `f` with the calling thread inside this namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let _inside = self.enter()?;
        f()
    }
}

/// Returns the thread to the namespace it was in when dropped.
pub struct NetNsGuard {
    previous: NetNs,
    _not_send: PhantomData<*const ()>,
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        if let Err(error) = setns(&self.previous.file) {
            // A thread stuck in a pod's namespace would open later sockets in the wrong place.
            panic!(
                "cannot return to network namespace {:?}: {error}",
                self.previous.path
            );
        }
    }
}

fn refuse_unless_regular(file_type: &std::fs::FileType) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let what = if file_type.is_file() {
        return Ok(());
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a network namespace: {what}"),
    ))
}

/// The `CLONE_NEW*` type of the namespace `file` refers to; an error naming the file as no
/// namespace at all if the kernel says so (`ENOTTY`: not an nsfs file).
fn namespace_type(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor, which `file` keeps
    // open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if rc >= 0 {
        return Ok(rc);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOTTY) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a network namespace: a regular file, not a namespace",
        ));
    }
    Err(error)
}

fn namespace_name(clone_flag: libc::c_int) -> &'static str {
    match clone_flag {
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWUTS => "UTS",
        libc::CLONE_NEWIPC => "IPC",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWPID => "PID",
        libc::CLONE_NEWCGROUP => "cgroup",
        libc::CLONE_NEWTIME => "time",
        _ => "non-network",
    }
}

fn setns(file: &File) -> io::Result<()> {
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn refusal(path: &Path) -> String {
        let error = NetNs::open(path).expect_err("not a network namespace");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        error.to_string()
    }

    #[test]
    fn a_network_namespace_opens() {
        NetNs::open("/proc/self/ns/net").expect("our own network namespace");
    }

    #[test]
    fn a_namespace_handed_over_is_checked_too() {
        let ours = NetNs::open("/proc/self/ns/net").unwrap();
        let fd = ours.as_fd().try_clone_to_owned().unwrap();
        NetNs::from_fd(fd, PathBuf::from("/proc/self/ns/net")).expect("a network namespace");
        let uts = File::open("/proc/self/ns/uts").unwrap();
        let error = NetNs::from_fd(uts.into(), PathBuf::from("uts")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "not a network namespace: a UTS namespace"
        );
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("netns");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let started = Instant::now();
        assert_eq!(refusal(&fifo), "not a network namespace: a FIFO");
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn other_files_and_namespaces_are_refused_with_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            refusal(&file),
            "not a network namespace: a regular file, not a namespace"
        );
        assert_eq!(refusal(dir.path()), "not a network namespace: a directory");
        assert_eq!(
            refusal(Path::new("/dev/null")),
            "not a network namespace: a character device"
        );
        assert_eq!(
            refusal(Path::new("/proc/self/ns/uts")),
            "not a network namespace: a UTS namespace"
        );
    }
}
