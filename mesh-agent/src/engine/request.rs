//! The request as the engine sees it: borrowed from the proxy's request head.

use http::request::Parts;
use http::{HeaderMap, Method, Uri};

/// What the engine needs to know about a request. Borrowed: building one allocates nothing.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    /// Path and query (an absolute URI is fine too).
    pub uri: &'a Uri,
    /// The `:authority` / `Host` as sent, port included.
    pub authority: &'a str,
    /// `:scheme`: HTTP/2's pseudo-header or an absolute-form URI's, else `http` (the mesh
    /// carries plain HTTP: no listener of the agent terminates TLS).
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// The destination port the client connected to.
    pub port: u16,
    /// `namespace/name` of the gateway the request came through; `None` for mesh traffic.
    pub gateway: Option<&'a str>,
    /// The client's namespace, which short host names resolve against.
    pub namespace: &'a str,
    /// Whether the request can be sent again: no body, or a body fully buffered within
    /// `EngineSettings::max_replay_body`. Non-replayable requests are never retried.
    pub replayable: bool,
}

impl<'a> RequestInfo<'a> {
    /// From a request's head: authority from the URI or else the `Host` header, scheme from the
    /// URI or else `http`; replayable.
    pub fn from_parts(parts: &'a Parts, port: u16, namespace: &'a str) -> Self {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok())
            .unwrap_or("");
        RequestInfo {
            method: &parts.method,
            uri: &parts.uri,
            authority,
            scheme: parts.uri.scheme_str().unwrap_or("http"),
            headers: &parts.headers,
            port,
            gateway: None,
            namespace,
            replayable: true,
        }
    }
}
