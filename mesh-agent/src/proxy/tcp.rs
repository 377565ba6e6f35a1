//! L4 forwarding: bytes both ways, untouched. The fallback for every non-HTTP connection. To a
//! known service VIP, the engine picks the endpoint (load balancing, outlier detection, connect
//! retries) and the cluster's `connectionPool.tcp` applies: `maxConnections` (a connection over
//! it is closed at once, `UO`), `connectTimeout` and `idleTimeout` (both sides are closed after
//! that long without a byte either way; without one, `Limits::tcp_idle_timeout`). To anything
//! else, the connection goes where the client was going, under `Limits::tcp_idle_timeout`.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};

use super::upstream::UpstreamIo;
use tracing::debug;

use super::pod::PodContext;
use crate::{
    discovery::ServiceTarget,
    engine::{EngineError, Outcome, Permit, Verdict},
    identity::spiffe::Route,
    identity::WorkloadIdentity,
    state::Store,
    telemetry::{ConnectionRecord, Telemetry},
};

/// Carries `downstream` to the service's endpoint (`service`) or else to `original`, and
/// records the connection. Both sides are closed after `idle_timeout` without a byte either
/// way, unless the service's cluster sets its own.
pub async fn forward(
    store: &Store,
    telemetry: &Telemetry,
    pod: &PodContext,
    downstream: TcpStream,
    original: SocketAddrV4,
    service: Option<&ServiceTarget>,
    idle_timeout: Duration,
) {
    let client_port = downstream.peer_addr().map_or(0, |peer| peer.port());
    let mut record = ConnectionRecord::start(telemetry, &pod.name, client_port, original);
    let connected = match service {
        Some(service) => connect_service(store, pod, service).await,
        None => pod
            .dialer
            .connect(original.into())
            .await
            .map(|stream| Upstream {
                stream,
                endpoint: SocketAddr::V4(original),
                workload: None,
                slot: None,
                idle_timeout: None,
                route: None,
            })
            .map_err(|error| format!("connect: {error}")),
    };
    let mut upstream = match connected {
        Ok(mut connected) => {
            if connected.stream.is_tunnel() {
                connected.route = pod.dialer.route(connected.endpoint);
            }
            connected
        }
        Err(error) => {
            debug!(pod = %pod.name, %original, %error, "no upstream connection");
            record.failed(error);
            return;
        }
    };
    {
        let snapshot = store.snapshot();
        let caller = pod.caller(&snapshot);
        // Outside a service, the destination may still be a pod the mesh knows.
        let known = || {
            let workload = snapshot.discovered.workload_at(upstream.endpoint.ip())?;
            Some(&workload.identity)
        };
        record.connected(
            upstream.endpoint,
            &caller,
            service.map(|s| &s.service),
            upstream.workload.as_ref().or_else(known),
            upstream.route.as_ref(),
        );
    }
    let idle_timeout = upstream.idle_timeout.unwrap_or(idle_timeout);
    let carried = carry(downstream, &mut upstream.stream, idle_timeout).await;
    record.transferred(carried.sent, carried.received);
    match carried.end {
        End::Closed => {}
        End::Idle => {
            telemetry.metrics.limit_hit("tcp_idle_timeout");
            record.failed("idle timeout".to_owned());
        }
        End::Error(error) => {
            debug!(pod = %pod.name, %original, %error, "connection ended with an error");
            record.failed(error.kind().to_string());
        }
    }
}

/// An upstream connection and what it holds.
struct Upstream {
    stream: UpstreamIo,
    endpoint: SocketAddr,
    workload: Option<Arc<WorkloadIdentity>>,
    /// Its slot of the cluster's `tcp.maxConnections`, held while it is open.
    #[expect(dead_code, reason = "held for its drop")]
    slot: Option<Permit>,
    idle_timeout: Option<Duration>,
    /// The tunnel it goes through, if any.
    route: Option<Route>,
}

/// Connects to an endpoint of `service` chosen by the engine, within the cluster's
/// `tcp.maxConnections` and `tcp.connectTimeout`, retrying connect failures as the service's
/// policy allows.
async fn connect_service(
    store: &Store,
    pod: &PodContext,
    service: &ServiceTarget,
) -> Result<Upstream, String> {
    let snapshot = store.snapshot();
    let authority = format!("{}:{}", service.service.host, service.port);
    let describe = |error: EngineError| format!("{} ({})", error, error.flags());
    let mut plan = snapshot
        .engine
        .route_tcp(&authority, &pod.namespace, service.port, clock())
        .map_err(describe)?;
    loop {
        let attempt = plan.next_attempt(clock()).map_err(describe)?;
        let endpoint = attempt.endpoint();
        let workload = attempt.workload().cloned();
        let pool = plan.pool();
        let limits = *pool.limits();
        // TCP connections are not shared, so one that would wait for a slot is refused.
        let Some(slot) = pool.try_connection() else {
            pool.overflowed();
            plan.overflowed(attempt);
            return Err(describe(EngineError::Overflow));
        };
        let connecting = pod.dialer.connect_within(endpoint, limits.connect_timeout);
        let connected = match attempt.deadline() {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), connecting)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
            None => connecting.await,
        };
        // For outlier detection an established connection counts as a success.
        let outcome = match &connected {
            Ok(_) => Outcome::status(200),
            Err(_) => Outcome::ConnectFailure,
        };
        match (plan.report(attempt, outcome, clock()), connected) {
            (Verdict::Forward, Ok(stream)) => {
                return Ok(Upstream {
                    stream,
                    endpoint,
                    workload,
                    slot: Some(slot),
                    idle_timeout: limits.tcp_idle_timeout,
                    route: None,
                })
            }
            (Verdict::RetryAt(at), _) => tokio::time::sleep_until(at.into()).await,
            (Verdict::Fail(error), _) => return Err(describe(error)),
            (Verdict::Forward, Err(error)) => return Err(format!("connect {endpoint}: {error}")),
        }
    }
}

/// How a carried connection ended.
enum End {
    /// Both sides closed.
    Closed,
    /// Nothing moved either way for the idle timeout: both sides were closed.
    Idle,
    Error(io::Error),
}

struct Carried {
    sent: u64,
    received: u64,
    end: End,
}

/// Copies both ways until both sides have closed, an error, or `idle_timeout` without a byte
/// either way.
async fn carry(
    downstream: TcpStream,
    upstream: &mut UpstreamIo,
    idle_timeout: Duration,
) -> Carried {
    let activity = Activity::new();
    let mut downstream = Watched::new(downstream, &activity);
    let end = {
        let copy = tokio::io::copy_bidirectional(&mut downstream, upstream);
        let ended = |copied: io::Result<(u64, u64)>| copied.err().map_or(End::Closed, End::Error);
        tokio::select! {
            copied = copy => ended(copied),
            () = activity.idle_for(idle_timeout) => End::Idle,
        }
    };
    Carried {
        sent: downstream.sent,
        received: downstream.received,
        end,
    }
}

/// When a byte last moved, in nanoseconds from `start` (tokio's clock: paused in tests). Also
/// what bounds opaque TCP at the destination (`inbound`).
pub(crate) struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `timeout`.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed));
            let due = last + timeout;
            if due <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// The downstream side, counting bytes each way and noting when they move.
pub(crate) struct Watched<'a, S> {
    stream: S,
    activity: &'a Activity,
    /// Read from the client (sent upstream).
    sent: u64,
    /// Written to the client (received from upstream).
    received: u64,
}

impl<'a, S> Watched<'a, S> {
    pub(crate) fn new(stream: S, activity: &'a Activity) -> Self {
        Watched {
            stream,
            activity,
            sent: 0,
            received: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.sent += read;
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            if written > 0 {
                self.received += written as u64;
                self.activity.touch();
            }
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Now, by tokio's clock (paused in tests), for the engine.
fn clock() -> std::time::Instant {
    Instant::now().into_std()
}
