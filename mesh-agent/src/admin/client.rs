//! The CLI's side of the admin API (`mesh-agent apply/delete/get`).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// One request to the agent's admin API: (status, body).
pub fn request(
    admin: SocketAddr,
    method: Method,
    path_and_query: &str,
    body: String,
) -> Result<(StatusCode, Bytes)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client: Client<_, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path_and_query}"))
            .body(Full::new(Bytes::from(body)))?;
        let response = client
            .request(request)
            .await
            .with_context(|| format!("cannot reach the agent's admin API at {admin} (is `mesh-agent run` up? see --admin)"))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    })
}
