//! The hyper side of a downstream connection: HTTP/1.1 keep-alive or HTTP/2 (prior knowledge),
//! read through the head checker, each request it passes handed to the try loop; graceful
//! close on drain, and on the connection's timeouts.
//!
//! Timeouts (`proxy::Limits`): a connection that has not sent a whole first request head or
//! HTTP/2 preface within `http_header_timeout` is closed (silent, half a head, part of a
//! preface), and so is an HTTP/1 one whose next head, once begun, is not whole within it of
//! the request before; one with no request in flight for `http_idle_timeout` after its last
//! (or after its preface) is closed, HTTP/2 with GOAWAY. HTTP/2 pings the client every
//! `h2_keepalive_interval` and closes when the answer is late.
//!
//! hyper is given a connection only once a whole request head (or the HTTP/2 preface) has
//! arrived: until then the bytes are read through the head checker into a buffer of the
//! connection's own (at most one head), so a silent connection or one with half a head holds
//! no hyper state. An HTTP/1 connection idle for a second sleeps: hyper's connection is taken
//! apart (`into_parts`) once the head checker says every byte read belongs to whole requests,
//! every request has been answered and every byte written flushed, and only the socket is held
//! until the client's next bytes, which start a new hyper connection on it. An idle keep-alive
//! connection then costs 3.6 KiB of heap instead of 36 (hyper's 8 KiB write buffer, its 8 to
//! 16 KiB read buffer, its boxed request future; `cargo xtask bench --scale`).
//!
//! hyper is told `half_close`, so it does not read the socket while it answers a request (that
//! read reallocated its read buffer for every request); [`ClientClosed`] peeks for the client's
//! close meanwhile, through the same socket, which hyper reads through a borrowed handle
//! (`shared_socket`).

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::{pin, Pin},
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    Request, Response, Version,
};
use http_body_util::BodyExt;
use hyper::server::conn::{http1, http2};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    activity::{Activity, Due, InFlight, IDLE_CLOSE_GRACE},
    conn::HttpConn,
    forward,
    head_check::Guarded,
    limits::{
        H2_CONNECTION_WINDOW, H2_MAX_CONCURRENT_STREAMS, H2_MAX_PENDING_RESET_STREAMS,
        H2_MAX_SEND_BUFFER, H2_STREAM_WINDOW, MAX_HEADER_BYTES, MAX_REPLAY_BODY,
    },
    reply::refusal_reply,
    shared_socket::SharedSocket,
};
use crate::{
    proxy::{
        drained::{drained, Drained},
        upstream::{BoxError, ReplyBody},
        Limits,
    },
    telemetry::Telemetry,
};

/// While draining, how long an HTTP/1 connection may go without a request before it is closed
/// rather than answered with `Connection: close`.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(2);

/// How long an HTTP/1 connection goes without a request before it sleeps: hyper's connection
/// and its buffers (about 32 KiB of heap) are given back, and only the socket is held until the
/// client's next bytes. A second is long enough that a busy connection never pays for waking.
const SLEEP_AFTER: Duration = Duration::from_secs(1);

/// Serves the connection until the client closes it, until `draining` (then requests in
/// flight finish and the connection closes: HTTP/2 sends GOAWAY; HTTP/1 answers its next
/// request with `Connection: close`, or closes after `DRAIN_IDLE_GRACE` without one), or until
/// one of its timeouts (see the module's doc).
pub async fn serve(stream: TcpStream, conn: Arc<HttpConn>, draining: &CancellationToken) {
    // Shared, not cloned: the connection's task stays small (it lives as long as the socket).
    let shared = Arc::clone(&conn.shared);
    let limits = &shared.limits;
    let telemetry = Arc::clone(&conn.telemetry);
    let verdicts = conn.verdicts.clone();
    let activity = Arc::new(Activity::new());
    let mut io = Watched::new(
        Guarded::new(SharedSocket(&stream), conn.verdicts.clone()),
        Arc::clone(&activity),
    );
    let mut service = {
        let activity = Arc::clone(&activity);
        service_fn(move |req: Request<Incoming>| {
            let conn = Arc::clone(&conn);
            let in_flight = InFlight::new(Arc::clone(&activity));
            let h1 = req.version() != Version::HTTP_2;
            async move {
                let mut response = handle(&conn, req).await;
                if h1 && in_flight.activity().closing.load(Ordering::SeqCst) {
                    // hyper closes the connection once this response is written.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response.map(|body| InFlightBody {
                    body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let watch = Watch {
        activity: &activity,
        limits,
        telemetry: &telemetry,
    };
    // One for the connection's life, so that the drain registers its waker once.
    let mut drain = pin!(drained(draining));
    // The first request head, or the HTTP/2 preface.
    if !watch.read_head(&mut io, drain.as_mut()).await {
        return;
    }
    if io.is_http2() {
        let mut connection = Box::pin(http2(limits).serve_connection(TokioIo::new(io), service));
        let result = tokio::select! {
            // As HTTP/1's: the connection first, what ends it after.
            biased;
            result = connection.as_mut() => result,
            _ = drain.as_mut() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            expired = activity.expired(limits.http_header_timeout, limits.http_idle_timeout) => {
                telemetry.metrics.limit_hit(expired);
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(IDLE_CLOSE_GRACE, connection.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            }
        };
        if let Err(error) = result {
            debug!(%error, "downstream HTTP/2 connection ended with an error");
        }
        return;
    }
    let http1 = http1();
    let sleep_after = SLEEP_AFTER.min(limits.http_header_timeout / 2);
    loop {
        // Boxed, so that the connection's task is small while it sleeps.
        let mut connection = Box::pin(http1.serve_connection(TokioIo::new(io), service));
        let mut not_before = Instant::now();
        let mut client_closed = ClientClosed::new(&stream, &activity);
        // Until hyper holds nothing of a request and can be put away.
        loop {
            let closing_now = activity.closing.load(Ordering::SeqCst);
            tokio::select! {
                // The connection first: a request it starts is watched for the client's close
                // in the same turn.
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(%error, "downstream HTTP/1 connection ended with an error");
                    }
                    return;
                }
                _ = drain.as_mut(), if !closing_now => {
                    activity.closing.store(true, Ordering::SeqCst);
                }
                due = watch.due(Some((sleep_after, not_before))) => match due {
                    Due::Expired(_) if closing_now => {
                        // Draining, and idle: nothing races the close any more.
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.as_mut().await;
                        return;
                    }
                    Due::Expired(expired) => {
                        telemetry.metrics.limit_hit(expired);
                        return;
                    }
                    Due::Quiet if activity.is_quiet() && verdicts.all_taken() => break,
                    Due::Quiet => not_before = Instant::now() + sleep_after,
                },
                () = &mut client_closed => {
                    debug!("downstream HTTP/1 connection closed by the client mid-request");
                    return;
                }
            }
        }
        let http1::Parts {
            io: parted,
            read_buf,
            service: parted_service,
            ..
        } = Pin::into_inner(connection).into_parts();
        if !read_buf.is_empty() {
            // Cannot happen while the checker says hyper read whole requests and handed them
            // all on; if it did, the bytes could not be trusted to start a request.
            debug!("downstream HTTP/1 connection closed: bytes left unread while idle");
            return;
        }
        // Even empty, it holds hyper's read buffer.
        drop(read_buf);
        (io, service) = (parted.into_inner(), parted_service);
        io.sleep();
        if !watch.read_head(&mut io, drain.as_mut()).await {
            return;
        }
    }
}

/// What closes a connection besides its own end and the drain: the timeouts.
struct Watch<'a> {
    activity: &'a Activity,
    limits: &'a Limits,
    telemetry: &'a Telemetry,
}

impl Watch<'_> {
    /// The connection's timeouts, shortened to `DRAIN_IDLE_GRACE` while draining.
    async fn due(&self, quiet: Option<(Duration, Instant)>) -> Due {
        if self.activity.closing.load(Ordering::SeqCst) {
            self.activity
                .due(DRAIN_IDLE_GRACE, DRAIN_IDLE_GRACE, quiet)
                .await
        } else {
            let limits = self.limits;
            self.activity
                .due(limits.http_header_timeout, limits.http_idle_timeout, quiet)
                .await
        }
    }

    /// Waits for the client's next bytes, then reads a request head ahead of hyper
    /// (`Watched::read_head`) within the header timeout; `false` once the connection is to
    /// close.
    async fn read_head(&self, io: &mut Watched<'_>, mut drain: Pin<&mut Drained<'_>>) -> bool {
        let woke = self.asleep(pin!(io.readable()), drain.as_mut()).await;
        if !matches!(woke, Some(Ok(()))) {
            return false;
        }
        // A first head is timed from the accept, as a silent connection is.
        let from = if self.activity.started.load(Ordering::SeqCst) {
            Instant::now()
        } else {
            self.activity.start
        };
        let head = tokio::time::timeout_at(from + self.limits.http_header_timeout, io.read_head());
        tokio::pin!(head);
        loop {
            let closing = self.activity.closing.load(Ordering::SeqCst);
            tokio::select! {
                // In order, not at random (a random number drawn for every poll): a head that
                // is in wins over the drain that came with it.
                biased;
                read = head.as_mut() => match read {
                    Ok(read) => return read.is_ok(),
                    Err(_) => {
                        self.telemetry.metrics.limit_hit("http_header_timeout");
                        return false;
                    }
                },
                // Answered with `Connection: close`.
                _ = drain.as_mut(), if !closing => {
                    self.activity.closing.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Waits for `bytes` (the client's next ones) with no request in flight; `None` once the
    /// connection is to close: at its header or idle timeout, or while draining after
    /// `DRAIN_IDLE_GRACE` without a request.
    ///
    /// Takes `bytes` pinned where it was made: a future keeps its arguments for its whole life,
    /// so pinning it here would hold it twice in the connection's task.
    async fn asleep<T>(
        &self,
        mut bytes: Pin<&mut impl Future<Output = T>>,
        mut drain: Pin<&mut Drained<'_>>,
    ) -> Option<T> {
        loop {
            let closing = self.activity.closing.load(Ordering::SeqCst);
            tokio::select! {
                // As `read_head`'s: the client's bytes win over a timeout that came with them.
                biased;
                woke = bytes.as_mut() => return Some(woke),
                _ = drain.as_mut(), if !closing => {
                    self.activity.closing.store(true, Ordering::SeqCst);
                }
                due = self.due(None) => {
                    if let (Due::Expired(expired), false) = (due, closing) {
                        self.telemetry.metrics.limit_hit(expired);
                    }
                    return None;
                }
            }
        }
    }
}

/// Resolves when the client closes its side (or resets) while a request is answered, which
/// hyper, told `half_close`, does not read for. Bytes the client sent meanwhile (a pipelined
/// request) are hyper's to read after the answer, and so is a close in the middle of a request
/// body hyper is reading (answered 400): once either is seen, the socket is not looked at again
/// until a request has ended. Polled after the connection in each turn (see the `biased`
/// select), and woken by the socket.
struct ClientClosed<'a> {
    socket: &'a TcpStream,
    activity: &'a Activity,
    /// `Activity::idle_since` when what waits on the socket was last left to hyper.
    left_at: Option<u64>,
}

impl<'a> ClientClosed<'a> {
    fn new(socket: &'a TcpStream, activity: &'a Activity) -> Self {
        ClientClosed {
            socket,
            activity,
            left_at: None,
        }
    }
}

impl Future for ClientClosed<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let activity = self.activity;
        let last_end = activity.idle_since.load(Ordering::SeqCst);
        if activity.in_flight.load(Ordering::SeqCst) == 0 || self.left_at == Some(last_end) {
            // hyper reads for itself between requests.
            return Poll::Pending;
        }
        let mut byte = [0; 1];
        match self.socket.poll_peek(cx, &mut ReadBuf::new(&mut byte)) {
            Poll::Ready(Ok(0) | Err(_)) if activity.between_requests.load(Ordering::SeqCst) => {
                Poll::Ready(())
            }
            Poll::Ready(_) => {
                self.left_at = Some(last_end);
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// hyper's HTTP/1 settings: the head's size limit; the client's close mid-request is watched
/// by [`ClientClosed`] instead of hyper (see `shared_socket`), and a head cut short by
/// [`Activity::due`]. hyper gets no timer: its header timer would be armed, boxed and dropped
/// for every request (an allocation and ~800 instructions).
fn http1() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.half_close(true).max_buf_size(MAX_HEADER_BYTES);
    builder
}

/// hyper's HTTP/2 settings: every size and timer from `limits` and `http::limits`.
fn http2(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESET_STREAMS)
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout);
    builder
}

/// One request: refused with 400 or 431 if the head checker refused it, otherwise carried
/// upstream.
async fn handle(conn: &HttpConn, mut req: Request<Incoming>) -> Response<ReplyBody> {
    if req.version() != Version::HTTP_2 {
        if let Err(refusal) = conn.verdicts.next() {
            debug!(reason = refusal.reason(), "downstream request refused");
            // Read some of what the client sent, so closing does not reset the connection
            // before it has read the answer; bounded in bytes and time, and kept nowhere.
            let mut body = req.into_body();
            let mut read = 0;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, |data| data.len() as u64);
                    if read > MAX_REPLAY_BODY {
                        break;
                    }
                }
            })
            .await;
            return refusal_reply(refusal);
        }
    }
    // RFC 9112 §3.2.2, as Envoy: an absolute-form target's authority replaces `Host`, so the
    // request is routed and forwarded by the same name.
    if let Some(authority) = req.uri().authority() {
        let host = match authority.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        if let Ok(host) = HeaderValue::from_str(&host) {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    forward::request(conn, req).await
}

/// A response body that keeps its request in flight until it has been written (or dropped).
/// A type of its own rather than another box around the body: one allocation fewer per
/// request.
struct InFlightBody {
    body: ReplyBody,
    _in_flight: InFlight,
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket read through the head checker. Until a whole request head (or the
/// HTTP/2 preface) has arrived, the bytes are held here rather than in hyper's buffers, then
/// handed to hyper before the socket's; and [`Activity`] is told whether what hyper has read is
/// whole requests and what it wrote has been flushed.
struct Watched<'s> {
    inner: Guarded<SharedSocket<'s>>,
    activity: Arc<Activity>,
    /// Read ahead of hyper: at most a head (the checker refuses one over `MAX_HEADER_BYTES`)
    /// and what came with it in the same read.
    held: Vec<u8>,
    replayed: usize,
}

/// How many bytes a read ahead of hyper asks for at once.
const HEAD_READ: usize = 1024;

impl<'s> Watched<'s> {
    fn new(inner: Guarded<SharedSocket<'s>>, activity: Arc<Activity>) -> Self {
        Watched {
            inner,
            activity,
            held: Vec::new(),
            replayed: 0,
        }
    }

    /// Reads until a whole request head, the HTTP/2 preface or a head the checker refuses has
    /// arrived: hyper is only given a connection with a request to read.
    async fn read_head(&mut self) -> io::Result<()> {
        let Watched { inner, held, .. } = self;
        // Stopped: HTTP/2, or a refusal hyper is to answer.
        while !inner.checker().is_stopped() && inner.verdicts().all_taken() {
            held.reserve(HEAD_READ);
            // Cancel safe: the bytes are in `held` once read.
            if inner.read_buf(held).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if self.is_http2() {
            self.activity.preface_read();
        }
        Ok(())
    }

    fn is_http2(&self) -> bool {
        self.inner.checker().is_http2()
    }

    /// Until the client's next bytes (or its close).
    async fn readable(&self) -> io::Result<()> {
        self.inner.get_ref().0.readable().await
    }

    /// Gives back what only a request needs, while the connection waits for one.
    fn sleep(&mut self) {
        self.inner.checker_mut().release_buffer();
    }

    fn note_between_requests(&self) {
        let between = self.held.is_empty() && self.inner.checker().is_between_requests();
        self.activity
            .between_requests
            .store(between, Ordering::SeqCst);
    }
}

impl AsyncRead for Watched<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = if this.held.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let held = &this.held[this.replayed..];
            let n = held.len().min(buf.remaining());
            buf.put_slice(&held[..n]);
            this.replayed += n;
            if this.replayed == this.held.len() {
                (this.held, this.replayed) = (Vec::new(), 0);
            }
            Poll::Ready(Ok(()))
        };
        if polled.is_ready() {
            this.note_between_requests();
        }
        polled
    }
}

impl AsyncWrite for Watched<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.activity.flushed.store(false, Ordering::SeqCst);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.activity.flushed.store(false, Ordering::SeqCst);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.activity.flushed.store(true, Ordering::SeqCst);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Watched` socket and the client's end of it.
    /// The agent's end of a connection, and the client's.
    async fn sockets() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        (stream, client)
    }

    fn watched(stream: &TcpStream) -> (Watched<'_>, Arc<Activity>) {
        let activity = Arc::new(Activity::new());
        let guarded = Guarded::new(SharedSocket(stream), Default::default());
        (Watched::new(guarded, Arc::clone(&activity)), activity)
    }

    #[tokio::test]
    async fn a_whole_head_or_the_preface_is_read_ahead_across_reads_and_handed_on_whole() {
        use super::super::H2_PREFACE;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (writes, h2) in [
            (vec![&H2_PREFACE[..5], &H2_PREFACE[5..]], true),
            (vec![b"PRI", b" / HTTP/1.1\r\nHo", b"st: a\r\n\r\n"], false),
            (vec![b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], false),
        ] {
            let (stream, mut client) = sockets().await;
            let (mut watched, activity) = watched(&stream);
            let sent: Vec<u8> = writes.concat();
            let (last, before) = writes.split_last().unwrap();
            for write in before {
                client.write_all(write).await.unwrap();
            }
            // Not before its last bytes.
            let early = tokio::time::timeout(Duration::from_millis(50), watched.read_head());
            assert!(early.await.is_err(), "{sent:?}");
            client.write_all(last).await.unwrap();
            watched.read_head().await.unwrap();
            assert_eq!(watched.is_http2(), h2);
            assert_eq!(activity.started.load(Ordering::SeqCst), h2);
            let mut read = vec![0u8; sent.len()];
            watched.read_exact(&mut read).await.unwrap();
            assert_eq!(read, sent);
            // A whole HTTP/1 request read: hyper would hold nothing of one.
            assert_eq!(activity.between_requests.load(Ordering::SeqCst), !h2);
            assert!(watched.held.capacity() == 0);
        }
    }

    /// Polls `closed` once: whether it resolved.
    fn resolved(closed: &mut ClientClosed<'_>) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(closed).poll(&mut cx).is_ready()
    }

    #[tokio::test]
    async fn the_clients_close_is_seen_while_a_request_is_in_flight_and_only_then() {
        use tokio::io::AsyncWriteExt;
        let (stream, mut client) = sockets().await;
        let activity = Arc::new(Activity::new());
        activity.between_requests.store(true, Ordering::SeqCst);
        let mut closed = ClientClosed::new(&stream, &activity);
        client.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!resolved(&mut closed), "between requests hyper reads");
        let request = InFlight::new(Arc::clone(&activity));
        assert!(resolved(&mut closed), "a request in flight");
        drop(request);
    }

    #[tokio::test]
    async fn pipelined_bytes_and_a_close_mid_body_are_left_to_hyper_until_the_request_ends() {
        use tokio::io::AsyncWriteExt;
        let (stream, mut client) = sockets().await;
        let activity = Arc::new(Activity::new());
        activity.between_requests.store(true, Ordering::SeqCst);
        let mut closed = ClientClosed::new(&stream, &activity);
        let request = InFlight::new(Arc::clone(&activity));
        client.write_all(b"GET /next HTTP/1.1\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The next request's bytes come first: left for hyper, and not peeked at again (the
        // same answer every time would spin the connection's task).
        assert!(!resolved(&mut closed));
        assert_eq!(
            closed.left_at,
            Some(activity.idle_since.load(Ordering::SeqCst))
        );
        drop(request);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let request = InFlight::new(Arc::clone(&activity));
        assert!(
            !resolved(&mut closed),
            "bytes still wait: a new request looks again"
        );
        drop(request);
        // hyper read them (and, with the close, the head is cut short): a close in the middle
        // of what hyper reads is hyper's to answer.
        let mut rest = [0; 64];
        let n = stream.try_read(&mut rest).unwrap();
        assert_eq!(&rest[..n], b"GET /next HTTP/1.1\r\n");
        activity.between_requests.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let request = InFlight::new(Arc::clone(&activity));
        assert!(!resolved(&mut closed));
        drop(request);
    }

    #[tokio::test]
    async fn a_head_read_in_part_or_a_write_not_flushed_is_not_quiet() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (stream, mut client) = sockets().await;
        let (mut watched, activity) = watched(&stream);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        watched.read_head().await.unwrap();
        assert!(!activity.is_quiet(), "a head not handed on yet");
        let mut buf = [0u8; 64];
        let _ = watched.read(&mut buf).await.unwrap();
        assert!(activity.is_quiet(), "a whole head handed on");
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let _ = watched.read(&mut buf).await.unwrap();
        assert!(!activity.is_quiet(), "half a head");
        client.write_all(b"Host: a\r\n\r\n").await.unwrap();
        let _ = watched.read(&mut buf).await.unwrap();
        assert!(activity.is_quiet(), "the rest of it");
        watched.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert!(!activity.is_quiet(), "written, not flushed");
        watched.flush().await.unwrap();
        assert!(activity.is_quiet());
    }
}
