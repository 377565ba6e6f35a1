//! Dialling upstreams as a pod would: from its network namespace (so the pod's own IP is the
//! source) and exempted from the redirect (so the kernel programs or rules let the socket
//! through instead of sending it back to the agent).
//!
//! When the source has tunnels ([`Tunnels`], `crate::hbone`'s client) and the destination is a pod in the mesh, the
//! connection is a `CONNECT` stream on a mutual TLS tunnel to that pod's agent instead
//! ([`UpstreamIo::Tunnel`]); whatever reads and writes it sees the same bytes.
//!
//! Both are optional, for an agent that needs neither (the ingress dials from its own namespace)
//! and for tests that run without privileges: entering a namespace needs `CAP_SYS_ADMIN`, and
//! the exemption a redirect (see [`Exemption`]).

use std::{
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
};

use crate::{
    identity::spiffe::Route,
    redirect::{netns::NetNs, Exemption},
};

/// Where and how upstream connections are made for one source pod.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// The namespace to dial from; `None`: the agent's own (no namespace switch).
    netns: Option<Arc<NetNs>>,
    /// Applied to every upstream socket before it connects, so the redirect lets it pass.
    exemption: Exemption,
    /// The source's tunnels to pods in the mesh; `None`: every connection is plain TCP.
    tunnel: Option<Arc<dyn Tunnels>>,
}

/// A source's tunnels to pods in the mesh (`crate::hbone`'s client), which the dialer asks first.
pub trait Tunnels: Send + Sync + fmt::Debug {
    /// The tunnel a connection to `addr` would take now; `None`: plaintext.
    fn route(&self, addr: SocketAddr) -> Option<Route>;

    /// A stream to `addr` inside `route`'s tunnel, which is dialled through `dialer` if none is
    /// open. A tunnel that cannot be opened is `ConnectionRefused`.
    fn connect<'a>(
        &'a self,
        route: &'a Route,
        addr: SocketAddr,
        dialer: &'a Dialer,
    ) -> Pin<Box<dyn Future<Output = io::Result<TunnelStream>> + Send + 'a>>;
}

impl Dialer {
    pub fn new(netns: Option<Arc<NetNs>>, exemption: Exemption) -> Self {
        Dialer {
            netns,
            exemption,
            tunnel: None,
        }
    }

    /// Connections to pods in the mesh go through `tunnel`.
    pub fn with_tunnel(mut self, tunnel: Arc<dyn Tunnels>) -> Self {
        self.tunnel = Some(tunnel);
        self
    }

    /// The tunnel a connection to `addr` would take now (`None`: plaintext). Telemetry asks,
    /// to label the connection's security.
    pub fn route(&self, addr: SocketAddr) -> Option<Route> {
        self.tunnel.as_ref()?.route(addr)
    }

    /// A connection to `addr`: inside a tunnel when `addr` is a pod in the mesh and this source
    /// has tunnels, else plain TCP. A tunnel that cannot be opened (its dial, handshake or
    /// `CONNECT` failed or was refused) is a failed connect (`ConnectionRefused`).
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<UpstreamIo> {
        if let Some(tunnel) = &self.tunnel {
            if let Some(route) = tunnel.route(addr) {
                return tunnel
                    .connect(&route, addr, self)
                    .await
                    .map(UpstreamIo::Tunnel)
                    .inspect_err(|error| tracing::debug!(%addr, %error, "no tunnel"));
            }
        }
        self.connect_tcp(addr).await.map(UpstreamIo::Plain)
    }

    /// A plain TCP connection to `addr`, from the namespace and exempted.
    pub async fn connect_tcp(&self, addr: SocketAddr) -> io::Result<TcpStream> {
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
    ) -> io::Result<UpstreamIo> {
        tokio::time::timeout(timeout, self.connect(addr))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }

    /// [`Self::connect_tcp`], given up after `timeout` with `TimedOut`.
    pub async fn connect_tcp_within(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        tokio::time::timeout(timeout, self.connect_tcp(addr))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    }
}

/// An upstream connection: plain TCP, or a stream inside a mutual TLS tunnel.
#[derive(Debug)]
pub enum UpstreamIo {
    Plain(TcpStream),
    Tunnel(TunnelStream),
}

impl UpstreamIo {
    pub fn is_tunnel(&self) -> bool {
        matches!(self, UpstreamIo::Tunnel(_))
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            UpstreamIo::Tunnel(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            UpstreamIo::Tunnel(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_flush(cx),
            UpstreamIo::Tunnel(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            UpstreamIo::Tunnel(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            UpstreamIo::Tunnel(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(stream) => stream.is_write_vectored(),
            UpstreamIo::Tunnel(stream) => stream.is_write_vectored(),
        }
    }
}

/// One proxied connection inside a tunnel: bytes written are the app's, carried in a `CONNECT`
/// stream's DATA frames. Boxed: how a tunnel carries them is `crate::hbone`'s business.
pub type TunnelStream = Box<dyn TunnelIo>;

/// What a tunnel's stream is to the proxy: a connection's bytes, both ways.
pub trait TunnelIo: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + fmt::Debug> TunnelIo for T {}
