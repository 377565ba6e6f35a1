//! The CLI's side of the admin API (`mesh-agent apply/delete/get`), over the agent's Unix
//! socket: one HTTP/1 request per connection, so hyper's connection API over a `UnixStream`
//! is all it takes (no pool, no connector crate).

use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// One request to the agent's admin API on its socket: (status, body).
pub fn request(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    body: String,
) -> Result<(StatusCode, Bytes)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|error| connect_error(socket, error))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, "mesh-agent")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("the agent's admin socket {}", socket.display()))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    })
}

/// What the user can do about it.
fn connect_error(socket: &Path, error: std::io::Error) -> anyhow::Error {
    let hint = match error.kind() {
        std::io::ErrorKind::PermissionDenied => "admin requests need root",
        std::io::ErrorKind::NotFound => {
            "is `mesh-agent run` up? Its socket is set with --admin-socket or MESH_ADMIN_SOCKET"
        }
        std::io::ErrorKind::ConnectionRefused => {
            "nobody listens there: the socket of an agent that was killed?"
        }
        _ => "see --admin-socket",
    };
    anyhow::Error::new(error).context(format!(
        "cannot reach the agent's admin socket {}; {hint}",
        socket.display()
    ))
}
