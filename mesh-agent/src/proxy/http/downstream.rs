//! The hyper side of a downstream connection: HTTP/1.1 keep-alive or HTTP/2 (prior knowledge),
//! read through the head checker, each request it passes handed to the try loop; graceful
//! close on drain, and on the connection's timeouts.
//!
//! Timeouts (`proxy::Limits`): a connection that has not sent a whole first request head or
//! HTTP/2 preface within `http_header_timeout` is closed (silent, half a head, part of a
//! preface); one with no request in flight for `http_idle_timeout` after its last (or after its
//! preface) is closed, HTTP/2 with GOAWAY. For HTTP/1 hyper starts the header timer as soon as
//! the connection is idle, so an idle keep-alive connection goes at `http_header_timeout`.
//! HTTP/2 pings the client every `h2_keepalive_interval` and closes when the answer is late.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    Request, Response, Version,
};
use http_body_util::BodyExt;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    conn::HttpConn,
    forward,
    head_check::Guarded,
    limits::{
        H2_CONNECTION_WINDOW, H2_MAX_CONCURRENT_STREAMS, H2_MAX_PENDING_RESET_STREAMS,
        H2_MAX_SEND_BUFFER, H2_STREAM_WINDOW, MAX_HEADER_BYTES, MAX_REPLAY_BODY,
    },
    reply::refusal_reply,
    H2_PREFACE,
};
use crate::proxy::{
    upstream::{BoxError, ProxyBody},
    Limits,
};

/// How long an HTTP/2 connection closed for idleness has to take its GOAWAY before it is
/// dropped anyway (a client that does not read is not waited for).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// While draining, how long an HTTP/1 connection may go without a request before it is closed
/// rather than answered with `Connection: close`.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(2);

/// Serves the connection until the client closes it, until `draining` (then requests in
/// flight finish and the connection closes: HTTP/2 sends GOAWAY; HTTP/1 answers its next
/// request with `Connection: close`, or closes after `DRAIN_IDLE_GRACE` without one), or until
/// one of its timeouts (see the module's doc).
pub async fn serve(stream: TcpStream, conn: Arc<HttpConn>, draining: &CancellationToken) {
    let limits = conn.shared.limits.clone();
    let activity = Arc::new(Activity::new());
    // HTTP/1 has no GOAWAY: while draining, responses say `Connection: close` instead.
    let closing = Arc::new(AtomicBool::new(false));
    let watched = Watched {
        stream,
        activity: Arc::clone(&activity),
        preface: Vec::new(),
    };
    let io = TokioIo::new(Guarded::new(watched, conn.verdicts.clone()));
    let telemetry = Arc::clone(&conn.telemetry);
    let service = {
        let activity = Arc::clone(&activity);
        let closing = Arc::clone(&closing);
        service_fn(move |req: Request<Incoming>| {
            let conn = Arc::clone(&conn);
            let in_flight = InFlight::new(Arc::clone(&activity));
            let h1 = req.version() != Version::HTTP_2;
            let closing = Arc::clone(&closing);
            async move {
                let mut response = handle(&conn, req).await;
                if h1 && closing.load(Ordering::SeqCst) {
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
    let builder = builder(&limits);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => {
            // hyper's own header timer (an HTTP/1 head cut short) ends it with an error.
            let timed_out = result.as_ref().err().and_then(|e| e.downcast_ref::<hyper::Error>());
            if timed_out.is_some_and(hyper::Error::is_timeout) {
                telemetry.metrics.limit_hit("http_header_timeout");
            }
            result
        }
        _ = draining.cancelled() => {
            if activity.is_h2() {
                connection.as_mut().graceful_shutdown();
                connection.await
            } else {
                // Closing a keep-alive connection between requests races the client's next
                // one, which would fail: answer that one with `Connection: close` instead,
                // and close only a connection that stays idle.
                closing.store(true, Ordering::SeqCst);
                tokio::select! {
                    result = connection.as_mut() => result,
                    _ = activity.expired(DRAIN_IDLE_GRACE, DRAIN_IDLE_GRACE) => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                }
            }
        }
        expired = activity.expired(limits.http_header_timeout, limits.http_idle_timeout) => {
            telemetry.metrics.limit_hit(expired);
            if activity.is_h2() {
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(IDLE_CLOSE_GRACE, connection.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            } else {
                Ok(())
            }
        }
    };
    if let Err(error) = result {
        debug!(%error, "downstream HTTP connection ended with an error");
    }
}

/// hyper's settings: every size and timer from `limits` and `http::limits`.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout);
    builder
        .http2()
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
async fn handle(conn: &HttpConn, mut req: Request<Incoming>) -> Response<ProxyBody> {
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

/// What the connection's timeouts watch: requests in flight and when it last had none.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// When the connection last became idle, in nanoseconds from `start`.
    idle_since: AtomicU64,
    /// A request head or a whole HTTP/2 preface has arrived: the idle timeout applies from
    /// here on, not the header timeout.
    started: AtomicBool,
    h2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            started: AtomicBool::new(false),
            h2: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn preface_read(&self) {
        self.h2.store(true, Ordering::SeqCst);
        self.idle_since.store(self.now(), Ordering::SeqCst);
        self.started.store(true, Ordering::SeqCst);
    }

    fn is_h2(&self) -> bool {
        self.h2.load(Ordering::SeqCst)
    }

    /// Resolves with the timeout's name (a `mesh_proxy_limit_hits_total` label) once the
    /// connection has had no request in flight for `header` (before its first) or `idle`.
    async fn expired(&self, header: Duration, idle: Duration) -> &'static str {
        loop {
            let (timeout, name) = if self.started.load(Ordering::SeqCst) {
                (idle, "http_idle_timeout")
            } else {
                (header, "http_header_timeout")
            };
            let since = self.start + Duration::from_nanos(self.idle_since.load(Ordering::SeqCst));
            let due = since + timeout;
            let busy = self.in_flight.load(Ordering::SeqCst) > 0;
            let now = Instant::now();
            if !busy && due <= now {
                return name;
            }
            // While busy, look again a timeout later: the request may have ended by then.
            tokio::time::sleep_until(if busy { now + timeout } else { due }).await;
        }
    }
}

/// A request in flight, from its head until its response has been written or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.started.store(true, Ordering::SeqCst);
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request in flight until it has been written (or dropped).
/// A type of its own rather than another box around the body: one allocation fewer per
/// request.
struct InFlightBody {
    body: ProxyBody,
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

/// The client's socket, noting when a whole HTTP/2 preface has been read.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    /// The first bytes, until they are a whole preface or cannot become one.
    preface: Vec<u8>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let watching = self.preface.len() < H2_PREFACE.len();
        if watching && buf.filled().len() > before {
            let wanted = H2_PREFACE.len() - self.preface.len();
            let read = &buf.filled()[before..];
            let take = &read[..read.len().min(wanted)];
            let this = &mut *self;
            this.preface.extend_from_slice(take);
            if !H2_PREFACE.starts_with(&this.preface) {
                // Not HTTP/2: stop looking.
                this.preface = H2_PREFACE.to_vec();
            } else if this.preface.len() == H2_PREFACE.len() {
                this.activity.preface_read();
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    async fn expiry(activity: &Activity) -> (&'static str, Duration) {
        let start = Instant::now();
        let name = activity.expired(HEADER, IDLE).await;
        (name, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_expires_at_the_header_timeout() {
        let activity = Activity::new();
        assert_eq!(expiry(&activity).await, ("http_header_timeout", HEADER));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_preface_the_idle_timeout_runs_from_it() {
        let activity = Arc::new(Activity::new());
        tokio::time::sleep(Duration::from_secs(3)).await;
        activity.preface_read();
        let (name, after) = expiry(&activity).await;
        assert_eq!((name, after), ("http_idle_timeout", IDLE));
        assert!(activity.is_h2());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_the_connection_and_its_end_restarts_the_clock() {
        let activity = Arc::new(Activity::new());
        let request = InFlight::new(Arc::clone(&activity));
        let ends = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move {
                // Longer than both timeouts.
                tokio::time::sleep(Duration::from_secs(100)).await;
                drop(request);
                activity.now()
            })
        };
        let start = Instant::now();
        let name = activity.expired(HEADER, IDLE).await;
        let ended = Duration::from_nanos(ends.await.unwrap());
        assert_eq!(name, "http_idle_timeout");
        assert_eq!(ended, Duration::from_secs(100));
        assert_eq!(start.elapsed(), ended + IDLE);
    }

    #[tokio::test]
    async fn the_preface_is_seen_across_reads_and_only_at_the_start() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (writes, h2) in [
            (vec![&H2_PREFACE[..5], &H2_PREFACE[5..], b"rest"], true),
            (vec![b"GET / HTTP/1.1\r\n", &H2_PREFACE[..]], false),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let activity = Arc::new(Activity::new());
            let mut watched = Watched {
                stream,
                activity: Arc::clone(&activity),
                preface: Vec::new(),
            };
            let total: usize = writes.iter().map(|w| w.len()).sum();
            let mut read = Vec::new();
            for write in writes {
                client.write_all(write).await.unwrap();
                let mut buf = vec![0u8; write.len()];
                watched.read_exact(&mut buf).await.unwrap();
                read.extend(buf);
            }
            assert_eq!(read.len(), total);
            assert_eq!(activity.is_h2(), h2);
        }
    }
}
