//! Network namespaces: entering one on the current thread, and its cookie (the key the kernel
//! programs use for enrollment).

use std::{
    fs::File,
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
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
    pub fn open(path: impl AsRef<Path>) -> io::Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Ok(NetNs { file, path })
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

fn setns(file: &File) -> io::Result<()> {
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}
