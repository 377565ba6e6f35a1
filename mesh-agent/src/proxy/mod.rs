//! The agent's data path: in-pod listeners accept redirected connections, look up where each
//! was going, and forward it from the pod's own network namespace.

mod tcp;
mod upstream;

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    redirect::{netns::NetNs, Redirect},
    telemetry::AccessLog,
};

/// What the proxy knows about the pod a listener serves.
pub struct PodContext {
    pub name: String,
    pub netns: NetNs,
    pub netns_cookie: u64,
}

pub struct Proxy {
    redirect: Arc<Redirect>,
    agent_mark: u32,
    access_log: AccessLog,
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
    pub fn new(redirect: Arc<Redirect>, agent_mark: u32, access_log: AccessLog) -> Self {
        Proxy {
            redirect,
            agent_mark,
            access_log,
        }
    }

    /// Accepts the pod's redirected connections until the task is aborted (unenroll).
    pub async fn serve_pod(self: Arc<Self>, listener: TcpListener, pod: Arc<PodContext>) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(pod = %pod.name, %error, "accept failed");
                    continue;
                }
            };
            let proxy = Arc::clone(&self);
            let pod = Arc::clone(&pod);
            tokio::spawn(async move { proxy.handle(stream, peer, pod).await });
        }
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
        let Some(original) = self.redirect.original_dst(pod.netns_cookie, peer.port()) else {
            // Someone dialled the listener directly: there is nowhere known to forward to.
            debug!(pod = %pod.name, %peer, "connection without an original destination");
            return;
        };
        tcp::forward(self, stream, peer, original, &pod).await;
    }
}
