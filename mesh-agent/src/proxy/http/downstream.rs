//! The hyper side of a downstream connection: HTTP/1.1 keep-alive or HTTP/2 (prior knowledge),
//! read through the smuggling guard, each request handed to the try loop; graceful close on
//! drain.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{
    header::{self, HeaderValue},
    Request, Response, StatusCode,
};
use http_body_util::{BodyExt, Limited};
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
    limits::{MAX_HEADER_BYTES, MAX_REPLAY_BODY},
    reply::local_reply,
    smuggling::Guarded,
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

/// One request: refused with 400 if its head was ambiguous, otherwise carried upstream.
async fn handle(conn: &HttpConn, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Some(ambiguity) = conn.verdicts.next() {
        // Read what the client sent (bounded) so closing does not reset the connection
        // before it has read the answer.
        let _ = Limited::new(req.into_body(), MAX_REPLAY_BODY as usize)
            .collect()
            .await;
        let mut response = local_reply(StatusCode::BAD_REQUEST, ambiguity.reason());
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    forward::request(conn, req).await
}
