//! Messages over the handover socket: one JSON object per `SOCK_SEQPACKET` datagram, with its
//! descriptors in the same datagram (`SCM_RIGHTS`), so neither arrives without the other.
//! Blocking I/O, with a timeout on every wait: a handover is one short exchange per restart.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    time::Duration,
};

use rustix::net::{
    sockopt, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown, SocketAddrUnix, SocketFlags,
    SocketType,
};

use super::{EntryHead, Handed, Message};

/// Descriptors per datagram; the kernel takes at most 253 (`SCM_MAX_FD`).
const MAX_FDS: usize = 200;
/// Entries per datagram: keeps each one well under the socket's buffer.
const MAX_ENTRIES: usize = 100;
/// The largest datagram read.
const MAX_MESSAGE: usize = 1 << 20;

/// One end of a handover connection.
pub(super) struct Conn {
    fd: OwnedFd,
}

impl Conn {
    /// Connects to the agent listening at `path`; `None` when none does (no file, or a file
    /// nobody listens on).
    pub fn connect(path: &Path) -> io::Result<Option<Conn>> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        match rustix::net::connect(&fd, &SocketAddrUnix::new(path)?) {
            Ok(()) => Ok(Some(Conn { fd })),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The next connection on `listener`; `WouldBlock` when none came within its timeout.
    pub fn accept(listener: BorrowedFd<'_>) -> io::Result<Conn> {
        let fd = rustix::net::accept_with(listener, SocketFlags::CLOEXEC)?;
        Ok(Conn { fd })
    }

    /// Makes `accept` on `listener` give up after `timeout`.
    pub fn set_accept_timeout(listener: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
        sockopt::set_socket_timeout(listener, sockopt::Timeout::Recv, Some(timeout))?;
        Ok(())
    }

    /// Makes [`Self::recv`] give up after `timeout` (`WouldBlock`), and sends too.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        sockopt::set_socket_timeout(&self.fd, sockopt::Timeout::Recv, Some(timeout))?;
        sockopt::set_socket_timeout(&self.fd, sockopt::Timeout::Send, Some(timeout))?;
        Ok(())
    }

    /// The peer's (pid, uid), as the kernel saw them when it connected.
    pub fn peer(&self) -> io::Result<(u32, u32)> {
        let credentials = sockopt::socket_peercred(&self.fd)?;
        Ok((
            credentials.pid.as_raw_nonzero().get().unsigned_abs(),
            credentials.uid.as_raw(),
        ))
    }

    /// Wakes the other side (and a thread of ours blocked in `recv`) with an end of file.
    pub fn shutdown(&self) {
        let _ = rustix::net::shutdown(&self.fd, Shutdown::Both);
    }

    /// Another handle on the same connection (to shut it down from another thread).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn {
            fd: self.fd.try_clone()?,
        })
    }

    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let body = serde_json::to_vec(message).map_err(io::Error::other)?;
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        let sent = rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(&body)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent != body.len() {
            return Err(io::Error::other("a handover message was cut short"));
        }
        Ok(())
    }

    /// The next message with its descriptors. `UnexpectedEof` when the other side closed;
    /// `WouldBlock` when nothing came within the timeout.
    pub fn recv(&self) -> io::Result<(Message, Vec<OwnedFd>)> {
        let mut body = vec![0u8; MAX_MESSAGE];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut body)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        // Owned at once, so they are closed whatever goes wrong below.
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if received.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if received
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        {
            return Err(io::Error::other("a handover message was truncated"));
        }
        let message = serde_json::from_slice(&body[..received.bytes])
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        Ok((message, fds))
    }

    /// Sends `entries` in as many batches as their descriptors need.
    pub fn send_entries(&self, entries: &[Handed]) -> io::Result<()> {
        let mut batch: Vec<EntryHead> = Vec::new();
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        for entry in entries {
            if entry.fds.len() > MAX_FDS {
                return Err(io::Error::other(format!(
                    "{} has too many descriptors to hand over",
                    entry.name
                )));
            }
            if fds.len() + entry.fds.len() > MAX_FDS || batch.len() == MAX_ENTRIES {
                self.send(
                    &Message::Batch {
                        entries: std::mem::take(&mut batch),
                    },
                    &fds,
                )?;
                fds.clear();
            }
            batch.push(EntryHead {
                name: entry.name.clone(),
                info: entry.info.clone(),
                fds: entry.fds.len(),
            });
            fds.extend(entry.fds.iter().map(AsFd::as_fd));
        }
        if !batch.is_empty() {
            self.send(&Message::Batch { entries: batch }, &fds)?;
        }
        Ok(())
    }

    /// Receives `count` entries sent by [`Self::send_entries`].
    pub fn recv_entries(&self, count: usize) -> io::Result<Vec<Handed>> {
        let mut entries = Vec::with_capacity(count);
        while entries.len() < count {
            let (message, fds) = self.recv()?;
            let Message::Batch { entries: heads } = message else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("expected a batch of entries, got {message:?}"),
                ));
            };
            let wanted: usize = heads.iter().map(|head| head.fds).sum();
            if wanted != fds.len() || heads.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a batch of {} entries needs {wanted} descriptors and came with {}",
                        heads.len(),
                        fds.len()
                    ),
                ));
            }
            let mut fds = fds.into_iter();
            for head in heads {
                entries.push(Handed::new(
                    head.name,
                    head.info,
                    fds.by_ref().take(head.fds).collect(),
                ));
            }
        }
        if entries.len() != count {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected {count} entries, got {}", entries.len()),
            ));
        }
        Ok(entries)
    }
}

/// Whether `error` is a receive timeout rather than a failure.
pub(super) fn timed_out(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        os::fd::AsRawFd,
    };

    use serde_json::json;

    use super::*;

    fn pair() -> (Conn, Conn) {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        (Conn { fd: a }, Conn { fd: b })
    }

    /// A pipe whose write end is handed over: what is written through the received descriptor
    /// comes out of the read end kept here.
    fn pipe() -> (std::io::PipeReader, OwnedFd) {
        let (read, write) = std::io::pipe().unwrap();
        (read, OwnedFd::from(write))
    }

    #[test]
    fn descriptors_arrive_with_their_entries_across_batches() {
        let (running, new) = pair();
        let mut readers = Vec::new();
        let mut entries = Vec::new();
        // 150 entries of two descriptors: 300, more than one datagram carries.
        for i in 0..150 {
            let (first, first_fd) = pipe();
            let (second, second_fd) = pipe();
            readers.push((first, second));
            entries.push(Handed::new(
                format!("pod/default/p{i}"),
                json!({ "i": i }),
                vec![first_fd, second_fd],
            ));
        }
        let sender = std::thread::spawn(move || running.send_entries(&entries).unwrap());
        let received = new.recv_entries(150).unwrap();
        sender.join().unwrap();
        assert_eq!(received.len(), 150);
        for (i, (entry, (first, second))) in received.into_iter().zip(readers).enumerate() {
            assert_eq!(entry.name, format!("pod/default/p{i}"));
            assert_eq!(entry.info, json!({ "i": i }));
            let [first_fd, second_fd]: [OwnedFd; 2] = entry.fds.try_into().unwrap();
            assert!(first_fd.as_raw_fd() >= 0);
            for (fd, mut reader, text) in [(first_fd, first, "first"), (second_fd, second, "2nd")] {
                std::io::PipeWriter::from(fd)
                    .write_all(text.as_bytes())
                    .unwrap();
                let mut out = [0u8; 5];
                let n = reader.read(&mut out).unwrap();
                assert_eq!(&out[..n], text.as_bytes(), "entry {i}");
            }
        }
    }

    #[test]
    fn a_batch_whose_descriptors_do_not_add_up_is_refused() {
        let (running, new) = pair();
        let (_reader, fd) = pipe();
        running
            .send(
                &Message::Batch {
                    entries: vec![EntryHead {
                        name: "listener/ingress".to_owned(),
                        info: json!(null),
                        fds: 2,
                    }],
                },
                &[fd.as_fd()],
            )
            .unwrap();
        let error = new.recv_entries(1).unwrap_err();
        assert!(error.to_string().contains("needs 2 descriptors"), "{error}");
    }

    #[test]
    fn a_closed_peer_is_an_end_of_file_and_silence_a_timeout() {
        let (running, new) = pair();
        new.set_timeout(Duration::from_millis(20)).unwrap();
        assert!(timed_out(&new.recv().unwrap_err()));
        drop(running);
        assert_eq!(new.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
