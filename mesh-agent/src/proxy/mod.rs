//! The agent's data path: the accept layer (enrollment's in-pod listeners, the ingress
//! listener) hands each connection over with where it was going and which pod it came from; the
//! proxy carries it there from the pod's own network namespace: through the L7 engine when it
//! is HTTP to a known service, as opaque bytes otherwise.
//!
//! Nothing here needs the kernel redirect: give [`Proxy::serve`] an accepted stream and an
//! original destination and it proxies it, which is how the in-process tests drive it.

mod accept;
mod deadline;
pub mod detect;
mod drained;
pub mod http;
pub mod limits;
mod pod;
pub(crate) mod tcp;
pub mod upstream;

use std::{net::SocketAddrV4, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::{
    discovery::Protocol,
    state::{Snapshot, Store},
    telemetry::Telemetry,
};
pub use accept::{raise_fd_limit, Acceptor};
use detect::Detected;
pub use limits::Limits;
pub use pod::PodContext;

/// How long to wait for a client's first bytes on a port that declares no protocol.
const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

pub struct Proxy {
    store: Arc<Store>,
    telemetry: Arc<Telemetry>,
    drain: Drain,
    shared: Arc<Shared>,
}

/// The bounds every connection shares.
pub(crate) struct Shared {
    pub(crate) limits: Limits,
    /// One permit per downstream connection, all pods together.
    connections: Arc<Semaphore>,
    /// One permit per request-body byte held buffered, all connections together.
    pub(crate) body_bytes: Arc<Semaphore>,
    /// One permit per mirrored copy in flight, all pods together.
    pub(crate) mirrors: Arc<Semaphore>,
}

impl Shared {
    fn new(limits: Limits) -> Self {
        Shared {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            body_bytes: Arc::new(Semaphore::new(limits.body_buffer_global)),
            mirrors: Arc::new(Semaphore::new(limits.max_mirrors_in_flight)),
            limits,
        }
    }
}

/// One accept loop's view of the [`Drain`]. Its wait for accepting to stop is registered once
/// for the loop's life: one made for every accept took the token's lock to register and again
/// to drop it (~300 instructions a connection).
pub struct AcceptGate {
    drain: Drain,
    stopped: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl AcceptGate {
    /// What `accept` gives, once accept loops may accept; `None` once accepting has stopped,
    /// then not one more accept: a successor may be taking the queue.
    pub async fn admit<T>(&mut self, accept: impl std::future::Future<Output = T>) -> Option<T> {
        let AcceptGate { drain, stopped } = self;
        tokio::select! {
            biased;
            () = stopped => None,
            accepted = async {
                drain.accepting_allowed().await;
                accept.await
            } => Some(accepted),
        }
    }
}

/// A downstream connection's places in the global and its pod's connection caps.
struct ConnectionSlot {
    _global: OwnedSemaphorePermit,
    _pod: Option<OwnedSemaphorePermit>,
}

/// When accept loops accept, and shutdown in steps: `stop_accepting` ends the accept loops (on
/// a handover the successor accepts from then on, on the same sockets); `start` also asks HTTP
/// connections to finish their requests in flight and close; `wait` returns once every
/// connection task has ended. A successor holds its accept loops (`pause_accepting`) until it
/// takes over: one that fails before then has accepted nothing it could drop.
#[derive(Clone)]
pub struct Drain {
    /// Whether accept loops may accept now.
    accepting: Arc<tokio::sync::watch::Sender<bool>>,
    accepting_stopped: tokio_util::sync::CancellationToken,
    started: tokio_util::sync::CancellationToken,
    connections: tokio_util::task::TaskTracker,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            accepting: Arc::new(tokio::sync::watch::channel(true).0),
            accepting_stopped: Default::default(),
            started: Default::default(),
            connections: Default::default(),
        }
    }
}

impl Drain {
    /// Accept loops wait (accepting nothing) until [`Self::resume_accepting`].
    pub fn pause_accepting(&self) {
        self.accepting.send_replace(false);
    }

    pub fn resume_accepting(&self) {
        self.accepting.send_replace(true);
    }

    /// Resolves once accept loops may accept (at once, unless paused).
    async fn accepting_allowed(&self) {
        if *self.accepting.borrow() {
            return;
        }
        let _ = self.accepting.subscribe().wait_for(|open| *open).await;
    }

    /// Accept loops end; connections already accepted carry on as before.
    pub fn stop_accepting(&self) {
        self.accepting_stopped.cancel();
    }

    /// Stops accepting (if not already) and starts closing connections gracefully.
    pub fn start(&self) {
        self.stop_accepting();
        self.started.cancel();
        self.connections.close();
    }

    /// What one accept loop waits on besides its listener, registered once for the loop's life.
    pub fn accept_gate(&self) -> AcceptGate {
        AcceptGate {
            drain: self.clone(),
            stopped: Box::pin(self.accepting_stopped.clone().cancelled_owned()),
        }
    }

    pub async fn wait(&self) {
        self.connections.wait().await;
    }

    /// Runs `task` (a connection's) on a task the drain waits for.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(task);
    }

    /// Accepts on `listener` until accepting stops, serving each connection with `serve` on a
    /// task this drain waits for, `max_connections` at most at once: past it a new one is
    /// closed at once and `on_full` told. `name` says whose listener it is, in logs.
    pub async fn accept_bounded<F, Fut>(
        &self,
        listener: TcpListener,
        name: &str,
        max_connections: usize,
        on_full: impl Fn(),
        serve: F,
    ) where
        F: Fn(TcpStream, std::net::SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
        accept::no_delay(&listener);
        let mut gate = self.accept_gate();
        let mut backoff = Duration::ZERO;
        loop {
            let Some(accepted) = gate.admit(listener.accept()).await else {
                return;
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    backoff = Duration::ZERO;
                    accepted
                }
                Err(error) => {
                    if let Some(pause) = accept::backoff_after(&error, name, &mut backoff) {
                        tokio::time::sleep(pause).await;
                    }
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                on_full();
                continue;
            };
            let served = serve(stream, peer);
            self.spawn(async move {
                served.await;
                drop(permit);
            });
        }
    }

    /// Resolves once connections are asked to finish and close.
    pub async fn draining(&self) {
        self.started.cancelled().await;
    }

    pub fn in_flight(&self) -> usize {
        self.connections.len()
    }
}

impl Proxy {
    /// A proxy with the default [`Limits`].
    pub fn new(store: Arc<Store>, telemetry: Arc<Telemetry>) -> Self {
        Proxy::with_limits(store, telemetry, Limits::default())
    }

    pub fn with_limits(store: Arc<Store>, telemetry: Arc<Telemetry>, limits: Limits) -> Self {
        Proxy {
            store,
            telemetry,
            drain: Drain::default(),
            shared: Arc::new(Shared::new(limits)),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// An accept loop's listener, backing off on errors (see [`Acceptor`]); `name` says whose
    /// in the log.
    pub fn acceptor(&self, listener: TcpListener, name: impl std::fmt::Display) -> Acceptor {
        Acceptor::new(listener, name, Arc::clone(&self.telemetry))
    }

    /// A place for one more connection from `pod` (`None`: the ingress gateway, whose clients
    /// are outside the mesh and share only the node's cap), or `None` (counted) when the node or
    /// the pod is at its cap: the caller closes the connection.
    fn admit(&self, pod: Option<&PodContext>) -> Option<ConnectionSlot> {
        let Ok(global) = Arc::clone(&self.shared.connections).try_acquire_owned() else {
            self.telemetry.metrics.limit_hit("connections");
            return None;
        };
        let pod = match pod {
            Some(pod) => {
                let cap = pod.connection_cap(self.shared.limits.max_connections_per_pod);
                let Ok(permit) = cap.try_acquire_owned() else {
                    self.telemetry.metrics.limit_hit("connections_per_pod");
                    return None;
                };
                Some(permit)
            }
            None => None,
        };
        Some(ConnectionSlot {
            _global: global,
            _pod: pod,
        })
    }

    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Takes over a connection the accept layer accepted from `pod`, which was dialling
    /// `original_dst`: proxies it on a task of its own (tracked for the drain) until it ends.
    /// Over the node's or the pod's connection cap it is closed at once (and counted).
    pub fn serve(
        self: &Arc<Self>,
        stream: TcpStream,
        original_dst: SocketAddrV4,
        pod: Arc<PodContext>,
    ) {
        let Some(slot) = self.admit(Some(&pod)) else {
            return;
        };
        // The task is `carry`'s future alone, not one more future around it, and boxed: on its
        // way into the task it is copied whole several times (tokio's cell, its stages).
        let carrying = Box::pin(Arc::clone(self).carry(stream, original_dst, pod, slot));
        self.drain.connections.spawn(carrying);
    }

    /// The ingress gateway: every connection to `listener` (in the agent's own namespace) is
    /// HTTP routed by `Gateway`-bound rules; upstreams are dialled as `gateway`. Accepts until
    /// accepting stops.
    pub async fn serve_ingress(self: Arc<Self>, listener: TcpListener, gateway: Arc<PodContext>) {
        let port = listener.local_addr().map_or(80, |a| a.port());
        let mut acceptor = self.acceptor(listener, "ingress");
        let mut gate = self.drain.accept_gate();
        while let Some((stream, _)) = gate.admit(acceptor.accept()).await {
            let Some(slot) = self.admit(None) else {
                continue;
            };
            let conn = Arc::new(self.http_conn(
                Arc::clone(&gateway),
                http::Entry::Ingress { port },
                &self.store.snapshot(),
            ));
            let draining = self.drain.started.clone();
            self.drain.connections.spawn(async move {
                let _slot = slot;
                http::serve(stream, conn, &draining).await
            });
        }
    }

    fn http_conn(
        &self,
        pod: Arc<PodContext>,
        entry: http::Entry,
        snapshot: &Snapshot,
    ) -> http::HttpConn {
        let caller = pod.caller(snapshot);
        http::HttpConn::new(
            pod,
            entry,
            Arc::clone(&self.store),
            Arc::clone(&self.telemetry),
            caller,
            Arc::clone(&self.shared),
        )
    }

    /// Proxies one accepted connection until it ends, holding its place under the connection
    /// caps (`_slot`) as long.
    async fn carry(
        self: Arc<Self>,
        stream: TcpStream,
        original: SocketAddrV4,
        pod: Arc<PodContext>,
        _slot: ConnectionSlot,
    ) {
        let snapshot = self.store.snapshot();
        let target = snapshot.discovered.service_at(original.into()).cloned();
        if let Some(target) = &target {
            let is_http = match target.protocol {
                Protocol::Tcp => false,
                Protocol::Http | Protocol::Http2 | Protocol::Grpc => true,
                Protocol::Detect => matches!(
                    detect::detect(&stream, DETECT_TIMEOUT).await,
                    Detected::Http1 | Detected::Http2
                ),
            };
            if is_http {
                let entry = http::Entry::Service {
                    target: target.clone(),
                };
                let conn = self.http_conn(pod, entry, &snapshot);
                drop(snapshot);
                // Boxed: ~2 KiB inline, it sized the task's future, which is copied whole
                // several times on its way into the task (~1,500 instructions a connection).
                let serving = Box::pin(http::serve(stream, Arc::new(conn), &self.drain.started));
                return serving.await;
            }
        }
        drop(snapshot);
        // Boxed, as the HTTP path's future is: either inline would size every connection's task.
        Box::pin(tcp::forward(
            &self.store,
            &self.telemetry,
            &pod,
            stream,
            original,
            target.as_ref(),
            self.shared.limits.tcp_idle_timeout,
        ))
        .await;
    }
}
