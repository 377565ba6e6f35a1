//! Upstream connections, made from the source pod's network namespace so the pod's own IP is
//! the source, and marked so the kernel programs never redirect them. HTTP upstreams are pooled
//! per endpoint by hyper's client (one pool per source pod).
//!
//! Both are optional, for an agent that needs neither (the ingress dials from its own namespace)
//! and for tests that run without privileges: entering a namespace needs `CAP_SYS_ADMIN` and
//! `SO_MARK` needs `CAP_NET_ADMIN`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection},
        Client,
    },
    rt::{TokioExecutor, TokioIo},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
};

use crate::redirect::netns::NetNs;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<PodConnector, ProxyBody>;

/// Where and how upstream connections are made for one source pod.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// The namespace to dial from; `None`: the agent's own (no namespace switch).
    netns: Option<Arc<NetNs>>,
    /// `SO_MARK` on every upstream socket, so the kernel programs let it pass; 0: none set.
    mark: u32,
}

impl Dialer {
    pub fn new(netns: Option<Arc<NetNs>>, mark: u32) -> Self {
        Dialer { netns, mark }
    }

    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = || {
            let domain = socket2::Domain::for_address(addr);
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            if self.mark != 0 {
                socket.set_mark(self.mark)?;
            }
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
}

/// Dials `http://IP:PORT` URIs with a pod's [`Dialer`].
#[derive(Clone)]
pub struct PodConnector {
    dialer: Dialer,
}

impl tower::Service<Uri> for PodConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "endpoint URI"))?;
            dialer
                .connect(addr)
                .await
                .map(|stream| TokioIo::new(UpstreamStream(stream)))
        })
    }
}

/// An upstream connection as the pool holds it. Unlike a bare `TcpStream`, it attaches no
/// `HttpInfo` (peer and local address) to every response: an allocation and a map insert per
/// response that nothing reads.
pub struct UpstreamStream(TcpStream);

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A source pod's HTTP clients: keep-alive pools per endpoint, HTTP/1.1 and HTTP/2.
pub struct UpstreamClients {
    pub http1: HttpClient,
    pub http2: HttpClient,
}

impl UpstreamClients {
    pub fn new(dialer: Dialer) -> Self {
        let connector = PodConnector { dialer };
        let builder = || {
            let mut builder = Client::builder(TokioExecutor::new());
            builder.pool_idle_timeout(Duration::from_secs(60));
            builder
        };
        UpstreamClients {
            http1: builder().build(connector.clone()),
            http2: builder().http2_only(true).build(connector),
        }
    }
}
