//! Dialling upstreams as a pod would: from its network namespace (so the pod's own IP is the
//! source) and exempted from the redirect (so the kernel programs or rules let the socket
//! through instead of sending it back to the agent).
//!
//! Both are optional, for an agent that needs neither (the ingress dials from its own namespace)
//! and for tests that run without privileges: entering a namespace needs `CAP_SYS_ADMIN`, and
//! the exemption a redirect (see [`Exemption`]).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

use crate::redirect::{netns::NetNs, Exemption};

/// Where and how upstream connections are made for one source pod.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// The namespace to dial from; `None`: the agent's own (no namespace switch).
    netns: Option<Arc<NetNs>>,
    /// Applied to every upstream socket before it connects, so the redirect lets it pass.
    exemption: Exemption,
}

impl Dialer {
    pub fn new(netns: Option<Arc<NetNs>>, exemption: Exemption) -> Self {
        Dialer { netns, exemption }
    }

    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = || {
            let domain = socket2::Domain::for_address(addr);
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            self.exemption.apply(&socket)?;
            socket.set_nonblocking(true)?;
            socket.set_tcp_nodelay(true)?;
            Ok(socket)
        };
        let socket = match &self.netns {
            Some(netns) => netns.run(socket)?,
            None => socket()?,
        };
        TcpSocket::from_std_stream(socket.into())
            .connect(addr)
            .await
    }

    /// [`Self::connect`], given up after `timeout` (`tcp.connectTimeout`) with `TimedOut`.
    pub async fn connect_within(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        tokio::time::timeout(timeout, self.connect(addr))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }
}
