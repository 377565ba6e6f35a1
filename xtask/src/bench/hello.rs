//! The benchmark's server: the smallest hyper HTTP/1.1 server that answers every request with a
//! fixed body, so `direct` measures the network path and the proxy, not the application.
//!
//! It runs as `xtask bench --serve PORT=BYTES ...` (a hidden flag) from the *release* build of
//! xtask, one process per server pod, on one thread: `upstream serve` does per-request JSON-ish
//! bookkeeping (peer and counter headers) that would blur the cost of a hop.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{bail, Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// `PORT=BYTES`: a listener on 0.0.0.0:PORT whose body is BYTES long.
#[derive(Clone, Copy, Debug)]
pub struct Listener {
    pub port: u16,
    pub body_len: usize,
}

impl Listener {
    pub fn parse(text: &str) -> Result<Self> {
        let (port, len) = text
            .split_once('=')
            .with_context(|| format!("--serve {text:?}: expected PORT=BYTES"))?;
        Ok(Self {
            port: port.parse().context("--serve: bad port")?,
            body_len: len.parse().context("--serve: bad body length")?,
        })
    }

    pub fn arg(&self) -> String {
        format!("{}={}", self.port, self.body_len)
    }
}

/// `hello world\n` (12 bytes) repeated and cut to `len`.
fn body(len: usize) -> Bytes {
    b"hello world\n".iter().copied().cycle().take(len).collect()
}

/// Serves every listener until killed.
pub fn serve(listeners: &[Listener]) -> Result<()> {
    if listeners.is_empty() {
        bail!("--serve needs at least one PORT=BYTES");
    }
    // One thread, like the proxies under test: the server pod's core is shared with them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for listener in listeners {
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, listener.port));
            let socket = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind {addr}"))?;
            tasks.push(tokio::spawn(accept_loop(socket, body(listener.body_len))));
        }
        println!("listening");
        for task in tasks {
            task.await?;
        }
        Ok(())
    })
}

async fn accept_loop(listener: TcpListener, body: Bytes) {
    let content_type = HeaderValue::from_static("text/plain");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors under churn: yield rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (body, content_type) = (body.clone(), content_type.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                // `Bytes` clones are reference counts: no copy of the body per request.
                let mut response = Response::new(Full::new(body.clone()));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, content_type.clone());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
