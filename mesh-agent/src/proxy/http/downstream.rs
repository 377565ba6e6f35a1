//! The hyper side of a downstream connection: HTTP/1.1 keep-alive or HTTP/2 (prior knowledge),
//! read through the head checker, each request it passes handed to the try loop; graceful
//! close on drain.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{
    header::{self, HeaderValue},
    Request, Response, Version,
};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    conn::HttpConn,
    forward,
    head_check::Guarded,
    limits::{MAX_HEADER_BYTES, MAX_REPLAY_BODY},
    reply::refusal_reply,
};
use crate::proxy::upstream::ProxyBody;

/// Serves the connection until the client closes it, or until `draining`: then requests in
/// flight finish and the connection closes (HTTP/2 sends GOAWAY, HTTP/1 closes when idle).
pub async fn serve(stream: TcpStream, conn: Arc<HttpConn>, draining: &CancellationToken) {
    let io = TokioIo::new(Guarded::new(stream, conn.verdicts.clone()));
    let service = service_fn(move |req| {
        let conn = Arc::clone(&conn);
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = draining.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%error, "downstream HTTP connection ended with an error");
    }
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
