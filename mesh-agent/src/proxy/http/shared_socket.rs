//! A client's TCP socket read and written through a shared reference, so that the serve loop
//! can watch it for the client's close (`TcpStream::poll_peek`) while hyper owns the connection.
//!
//! hyper's own watch for that close reads the socket while a request is answered, and to read
//! it reserves a fresh buffer each time, since the request's head still holds the last one: two
//! allocations per request. With `half_close` hyper leaves the socket alone mid-request and the
//! serve loop peeks instead, which needs no buffer.
//!
//! Reads and writes are tokio's own (`TcpStream`'s `AsyncRead` and `AsyncWrite` do the same
//! through its private I/O handle), including its saving: a short read or write means the
//! socket is drained or full, so its readiness is cleared then rather than by one more system
//! call that would answer `EAGAIN`.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};

use socket2::SockRef;
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

/// The client's socket, shared with the serve loop.
#[derive(Debug, Clone, Copy)]
pub struct SharedSocket<'a>(pub &'a TcpStream);

/// Runs `io` (one system call, answering how many bytes it moved) while the socket is ready
/// for `interest`; a short transfer clears the readiness under the same readiness event, as
/// tokio does, so a later change of readiness is never lost.
fn transfer(
    socket: &TcpStream,
    interest: Interest,
    asked: usize,
    io: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut moved = 0;
    match socket.try_io(interest, || {
        moved = io()?;
        if moved > 0 && moved < asked {
            // Cleared by `try_io`, and the bytes moved are still answered below.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(moved)
    }) {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock && moved > 0 => Ok(moved),
        result => result,
    }
}

impl AsyncRead for SharedSocket<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let socket = self.0;
        loop {
            ready!(socket.poll_read_ready(cx))?;
            // SAFETY: `recv` writes only initialised bytes, and `n` is how many it wrote.
            let unfilled = unsafe { buf.unfilled_mut() };
            let asked = unfilled.len();
            match transfer(socket, Interest::READABLE, asked, || {
                SockRef::from(socket).recv(unfilled)
            }) {
                Ok(n) => {
                    // SAFETY: the kernel initialised those `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for SharedSocket<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let socket = self.0;
        loop {
            ready!(socket.poll_write_ready(cx))?;
            match transfer(socket, Interest::WRITABLE, buf.len(), || {
                SockRef::from(socket).send(buf)
            }) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let socket = self.0;
        let asked = bufs.iter().map(|buf| buf.len()).sum();
        loop {
            ready!(socket.poll_write_ready(cx))?;
            match transfer(socket, Interest::WRITABLE, asked, || {
                SockRef::from(socket).send_vectored(bufs)
            }) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(self.0).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn reads_writes_and_shuts_down_through_a_shared_reference() {
        let (mut client, server) = pair().await;
        let mut shared = SharedSocket(&server);
        client.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        shared.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        let parts = [IoSlice::new(b"po"), IoSlice::new(b"ng")];
        let written = shared.write_vectored(&parts).await.unwrap();
        assert_eq!(written, 4);
        shared.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong");
    }

    #[tokio::test]
    async fn a_short_read_leaves_the_next_bytes_seen() {
        let (mut client, server) = pair().await;
        let mut shared = SharedSocket(&server);
        let mut buf = [0; 64];
        for round in 0..3u8 {
            // Each read is short (a few bytes into 64): readiness is cleared without a
            // system call, and the next bytes must still wake the reader.
            client.write_all(&[round; 3]).await.unwrap();
            let n = shared.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &[round; 3]);
        }
        drop(client);
        assert_eq!(shared.read(&mut buf).await.unwrap(), 0, "the close is seen");
    }
}
