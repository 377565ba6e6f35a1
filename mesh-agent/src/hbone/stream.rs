//! One `CONNECT` stream as a byte stream: what a tunnel carries for one proxied connection, on
//! both agents.
//!
//! Written on `h2` directly rather than on hyper's upgrade, which hands every write to a task of
//! its own over a channel (a copy into a fresh buffer, a channel send and a task wake-up per
//! write, on each agent): here a write goes straight into the stream's send queue, and the
//! connection's task frames it.
//!
//! Flow control: a write takes only the send window the peer has granted, so nothing is queued
//! past it; what is read is released at once, as the reader takes it.

use std::{
    fmt, io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Each stream's receive window. A tunnel carries whole connections, bodies of any size: 1 MiB
/// keeps one stream at full speed across a node's round trip, where HTTP/2's 64 KiB default
/// would hold it to a few hundred MiB/s.
const STREAM_WINDOW: u32 = 1 << 20;

/// The connection's receive window, shared by its streams: the most one tunnel connection
/// buffers for readers that are slow to read. (Fixed: hyper's adaptive windows sent a ping
/// and read the clock under a lock for every DATA frame to estimate the path.)
const CONNECTION_WINDOW: u32 = 4 << 20;

/// The source's tunnel connections: HTTP/2 with the tunnel's windows.
pub fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    builder
}

/// The destination's: the same windows, and at most `max_streams` streams at once.
pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(max_streams);
    builder
}

/// How often a tunnel connection is pinged, and how long an answer may take before the
/// connection is given up: a peer that vanished without closing (its node gone) is found out.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pings the peer every [`KEEP_ALIVE_INTERVAL`]; returns why the connection should close. Runs
/// beside the connection's own future (a ping is answered only while the connection is polled).
pub async fn keep_alive(mut ping_pong: h2::PingPong) -> String {
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => return format!("keep-alive ping failed: {error}"),
            Err(_) => return format!("no answer to a ping in {KEEP_ALIVE_TIMEOUT:?}"),
        }
    }
}

/// A `CONNECT` stream's two halves, read and written as one connection's bytes.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What the last DATA frame held beyond the reader's buffer.
    unread: Bytes,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            unread: Bytes::new(),
        }
    }

    /// Ends the stream at once with `reason`, both ways: the peer sees a reset connection.
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }

    /// Why writing stopped: the peer's reset, as an I/O error. A peer that reset with
    /// `NO_ERROR` or `CANCEL` only stopped reading: a broken pipe, as a closed socket would be.
    fn poll_write_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io_error(reason.into()),
            Err(error) => io_error(error),
        })
    }
}

impl fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream", &self.send.stream_id().as_u32())
            .finish_non_exhaustive()
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window reopens as the reader takes data, not as the app consumes it:
                    // the reader's own buffer is the bound beyond the window.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.unread = data;
                }
                // The peer ended its side (END_STREAM): end of file.
                None => return Poll::Ready(Ok(())),
                Some(Err(error)) => {
                    return Poll::Ready(match error.reason() {
                        // The peer closed without an error of its own: as an end of file.
                        Some(Reason::NO_ERROR | Reason::CANCEL) if error.is_reset() => Ok(()),
                        _ => Err(io_error(error)),
                    });
                }
            }
        }
        let taken = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..taken]);
        this.unread.advance(taken);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        let granted = match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(granted)) => granted,
            // The stream is closed or reset: the reset says why.
            None | Some(Err(_)) => return this.poll_write_error(cx).map(Err),
        };
        let written = granted.min(buf.len());
        match this
            .send
            .send_data(Bytes::copy_from_slice(&buf[..written]), false)
        {
            Ok(()) => Poll::Ready(Ok(written)),
            Err(_) => this.poll_write_error(cx).map(Err),
        }
    }

    /// The connection's task writes frames as they are queued: nothing waits here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Ends this side of the stream (END_STREAM), as a TCP half-close does.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.send.send_data(Bytes::new(), true).is_ok() {
            return Poll::Ready(Ok(()));
        }
        this.poll_write_error(cx).map(Err)
    }
}

/// An HTTP/2 error as an I/O error; one that came from the connection's I/O keeps its kind.
fn io_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        error
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::Other.into())
    } else {
        io::Error::other(error)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http::{Method, Request, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A client and a server connection over an in-memory pipe, and one `CONNECT` stream
    /// between them: (the client's end, the server's end).
    async fn connected_pair() -> (H2Stream, H2Stream) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = server_builder(128)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            assert_eq!(request.method(), Method::CONNECT);
            let send = respond.send_response(Response::new(()), false).unwrap();
            let stream = H2Stream::new(send, request.into_body());
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            stream
        });
        let (requests, connection) = client_builder()
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        tokio::spawn(connection);
        let target: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .unwrap();
        let (response, send) = requests
            .ready()
            .await
            .unwrap()
            .send_request(request, false)
            .unwrap();
        let server_end = server.await.unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        (H2Stream::new(send, response.into_body()), server_end)
    }

    #[tokio::test]
    async fn bytes_beyond_both_windows_pass_both_ways_and_a_half_close_is_an_end_of_file() {
        let (mut client, mut server) = connected_pair().await;
        // Larger than the connection's window: only a reader that releases what it reads lets
        // it through.
        let sent: Vec<u8> = (0..(CONNECTION_WINDOW as usize * 2))
            .map(|i| (i % 251) as u8)
            .collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert!(received == expected, "the bytes arrive whole and in order");

        let mut client = writer.await.unwrap();
        server.write_all(b"answer").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
    }

    /// The paused clock moves only once every task is idle: a write that times out is one h2
    /// holds back, not a slow one.
    #[tokio::test(start_paused = true)]
    async fn a_writer_stops_at_the_window_its_reader_has_not_released() {
        let (mut client, mut server) = connected_pair().await;
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0;
        while let Ok(sent) =
            tokio::time::timeout(Duration::from_secs(1), client.write(&chunk)).await
        {
            written += sent.unwrap();
            assert!(
                written <= 2 * STREAM_WINDOW as usize,
                "{written} B written unread"
            );
        }
        assert_eq!(
            written, STREAM_WINDOW as usize,
            "the stream's window, and no more"
        );

        // What the reader takes opens the window again.
        let mut read = vec![0u8; written];
        server.read_exact(&mut read).await.unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(1), client.write(&chunk)).await;
        assert!(
            sent.is_ok_and(|sent| sent.unwrap() > 0),
            "the window reopened"
        );
    }

    #[tokio::test]
    async fn a_peer_that_drops_its_end_breaks_the_pipe_and_ends_the_reader() {
        let (mut client, server) = connected_pair().await;
        drop(server);
        let mut buf = [0u8; 16];
        // Dropped without END_STREAM: h2 resets the stream with CANCEL.
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        let error = client.write_all(b"after the reset").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
    }
}
