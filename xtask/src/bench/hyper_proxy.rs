//! `hyper-l7`: a proxy built the usual way on the agent's own HTTP library, doing nothing a
//! mesh does. hyper's HTTP/1.1 server in front, hyper-util's pooled client behind, a 90/10
//! split by a counter, `Connection` dropped so that upstream connections stay alive: no routing
//! table, retries, ejection, telemetry, trace headers or HTTP checks. Every request the agent
//! serves runs the same two hyper state machines (its pool is its own), so the gap between
//! this and nginx is hyper's, and the gap between `mesh-l7` and this is the mesh's; measured
//! in the same run as nginx and HAProxy.
//!
//! It runs as `xtask bench --hyper-proxy PORT=V1,V2` (a hidden flag) in the proxy pod, on one
//! thread like every proxy under test.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use hyper::body::Incoming;
use hyper::header::CONNECTION;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// `PORT=V1,V2`: listen on 0.0.0.0:PORT, send nine requests in ten to V1 and one to V2.
#[derive(Clone, Copy, Debug)]
pub struct Split {
    pub port: u16,
    pub upstreams: [SocketAddr; 2],
}

impl Split {
    pub fn parse(text: &str) -> Result<Self> {
        let parsed = || -> Option<Split> {
            let (port, upstreams) = text.split_once('=')?;
            let (v1, v2) = upstreams.split_once(',')?;
            Some(Split {
                port: port.parse().ok()?,
                upstreams: [v1.parse().ok()?, v2.parse().ok()?],
            })
        };
        parsed().with_context(|| format!("--hyper-proxy {text:?}: expected PORT=IP:PORT,IP:PORT"))
    }

    pub fn arg(&self) -> String {
        let [v1, v2] = self.upstreams;
        format!("{}={v1},{v2}", self.port)
    }
}

/// Proxies until killed.
pub fn serve(split: Split) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, split.port));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
        let upstreams = split
            .upstreams
            .map(|addr| Uri::try_from(format!("http://{addr}")))
            .map(|uri| uri.expect("a socket address makes a URI"));
        let proxy = Arc::new(Proxy {
            client,
            upstreams,
            sent: AtomicU32::new(0),
        });
        println!("listening");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors under churn: yield rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let proxy = Arc::clone(&proxy);
            tokio::spawn(async move {
                let service = service_fn(move |request| Arc::clone(&proxy).forward(request));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

struct Proxy {
    client: Client<HttpConnector, Incoming>,
    /// `http://V1` and `http://V2`.
    upstreams: [Uri; 2],
    sent: AtomicU32,
}

impl Proxy {
    async fn forward(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<hyper::Response<Incoming>, hyper_util::client::legacy::Error> {
        let (mut parts, body) = request.into_parts();
        let upstream = match self.sent.fetch_add(1, Ordering::Relaxed) % 10 {
            9 => &self.upstreams[1],
            _ => &self.upstreams[0],
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut uri = upstream.clone().into_parts();
        uri.path_and_query = path.parse().ok();
        parts.uri = Uri::from_parts(uri).expect("an authority and a path make a URI");
        // The client's `Connection: close` (the churn shape) is its hop's, not the upstream's.
        parts.headers.remove(CONNECTION);
        self.client.request(Request::from_parts(parts, body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::Split;

    #[test]
    fn a_split_reads_back_as_written() {
        let split = Split::parse("82=10.0.0.2:8080,10.0.0.3:8080").unwrap();
        assert_eq!(split.port, 82);
        assert_eq!(split.arg(), "82=10.0.0.2:8080,10.0.0.3:8080");
        assert!(Split::parse("82=10.0.0.2:8080").is_err());
        assert!(Split::parse("x=10.0.0.2:8080,10.0.0.3:8080").is_err());
    }
}
