//! The agent's data path: in-pod listeners accept redirected connections, look up where each
//! was going, and carry it there from the pod's own network namespace: through the L7 engine
//! when it is HTTP to a known service, as opaque bytes otherwise.

mod detect;
pub mod http;
mod smuggling;
mod tcp;
pub mod upstream;

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    discovery::Protocol,
    identity::WorkloadIdentity,
    redirect::{netns::NetNs, Redirect},
    state::{Snapshot, Store},
    telemetry::Telemetry,
};
use detect::Detected;
use upstream::UpstreamClients;

/// How long to wait for a client's first bytes on a port that declares no protocol.
const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// What the proxy knows about the pod a listener serves.
pub struct PodContext {
    pub name: String,
    /// Short host names in rules and requests resolve against it.
    pub namespace: String,
    pub netns: Arc<NetNs>,
    pub netns_cookie: u64,
    pub clients: UpstreamClients,
}

impl PodContext {
    pub fn new(
        name: String,
        namespace: String,
        netns: NetNs,
        netns_cookie: u64,
        mark: u32,
    ) -> Self {
        let netns = Arc::new(netns);
        PodContext {
            clients: UpstreamClients::new(Arc::clone(&netns), mark),
            name,
            namespace,
            netns,
            netns_cookie,
        }
    }
}

pub struct Proxy {
    redirect: Arc<Redirect>,
    store: Arc<Store>,
    agent_mark: u32,
    telemetry: Arc<Telemetry>,
    drain: Drain,
}

/// Shutdown in two steps: `start` stops accepting and asks HTTP connections to finish their
/// requests in flight and close; `wait` returns once every connection task has ended.
#[derive(Clone, Default)]
pub struct Drain {
    started: tokio_util::sync::CancellationToken,
    connections: tokio_util::task::TaskTracker,
}

impl Drain {
    pub fn start(&self) {
        self.started.cancel();
        self.connections.close();
    }

    pub async fn wait(&self) {
        self.connections.wait().await;
    }

    pub fn in_flight(&self) -> usize {
        self.connections.len()
    }
}

/// Opens a listening socket at `addr` inside `netns`.
pub fn listen_in(netns: &NetNs, addr: SocketAddrV4) -> io::Result<TcpListener> {
    let listener = netns.run(|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::V4(addr).into())?;
        socket.listen(1024)?;
        Ok(std::net::TcpListener::from(socket))
    })?;
    TcpListener::from_std(listener)
}

impl Proxy {
    pub fn new(
        redirect: Arc<Redirect>,
        store: Arc<Store>,
        agent_mark: u32,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Proxy {
            redirect,
            store,
            agent_mark,
            telemetry,
            drain: Drain::default(),
        }
    }

    pub fn agent_mark(&self) -> u32 {
        self.agent_mark
    }

    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Accepts the pod's redirected connections until the task is aborted (unenroll).
    pub async fn serve_pod(self: Arc<Self>, listener: TcpListener, pod: Arc<PodContext>) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = self.drain.started.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(pod = %pod.name, %error, "accept failed");
                    continue;
                }
            };
            let proxy = Arc::clone(&self);
            let pod = Arc::clone(&pod);
            self.drain
                .connections
                .spawn(async move { proxy.handle(stream, peer, pod).await });
        }
    }

    /// The ingress gateway: every connection to `listener` (in the agent's own namespace) is
    /// HTTP routed by `Gateway`-bound rules; upstreams are dialled from the agent's namespace.
    pub async fn serve_ingress(self: Arc<Self>, listener: TcpListener, gateway: Arc<PodContext>) {
        let port = listener.local_addr().map_or(80, |a| a.port());
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = self.drain.started.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Arc::new(self.http_conn(
                Arc::clone(&gateway),
                http::Entry::Ingress { port },
                &self.store.snapshot(),
            ));
            let draining = self.drain.started.clone();
            self.drain
                .connections
                .spawn(async move { http::serve(stream, conn, &draining).await });
        }
    }

    fn http_conn(
        &self,
        pod: Arc<PodContext>,
        entry: http::Entry,
        snapshot: &Snapshot,
    ) -> http::HttpConn {
        let source = source_identity(snapshot, &pod);
        http::HttpConn::new(
            pod,
            entry,
            Arc::clone(&self.store),
            Arc::clone(&self.telemetry),
            source,
        )
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
        let Some(original) = self
            .redirect
            .original_dst(&stream, pod.netns_cookie, peer.port())
        else {
            // Someone dialled the listener directly: there is nowhere known to forward to.
            debug!(pod = %pod.name, %peer, "connection without an original destination");
            return;
        };
        let _ = stream.set_nodelay(true);
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
                    authority: format!("{}:{}", target.service.host, target.port),
                    target: target.clone(),
                };
                let conn = self.http_conn(pod, entry, &snapshot);
                return http::serve(stream, Arc::new(conn), &self.drain.started).await;
            }
        }
        drop(snapshot);
        tcp::forward(self, stream, peer, original, &pod, target.as_ref()).await;
    }
}

/// The enrolled pod as telemetry names it: from its `Pod` object if discovery has one.
pub fn source_identity(snapshot: &Snapshot, pod: &PodContext) -> WorkloadIdentity {
    match snapshot.discovered.pod(&pod.namespace, &pod.name) {
        Some(workload) => workload.identity.clone(),
        None => WorkloadIdentity::from_pod_labels(&pod.name, &pod.namespace, &Default::default()),
    }
}
