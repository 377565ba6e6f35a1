//! Every bound the data path enforces on what clients can make it hold: time, connections,
//! buffered bytes. The settable ones are [`Limits`] (the agent's `run` flags fill it; tests
//! inject short values); fixed protocol sizes live in `http::limits`. Defaults follow Envoy's
//! (and Istio's) where they have one, and say why where they do not.

use std::time::Duration;

/// How long a new HTTP connection may take to send its first request head (HTTP/1) or its
/// whole preface (HTTP/2), and an HTTP/1 keep-alive connection the rest of a head once its
/// first bytes have come. Envoy has no default here (`request_headers_timeout` off) and
/// recommends 10 s at the edge; inside the mesh 60 s keeps what the agent did before.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an HTTP connection (HTTP/1 keep-alive or HTTP/2) may stay open with no request in
/// flight: Envoy's `common_http_protocol_options.idle_timeout` default (1 h). An idle HTTP/1
/// connection sleeps meanwhile, holding little more than its socket.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// How often an HTTP/2 connection is pinged, and how long the answer may take before the
/// connection is closed: finds dead peers that hold streams open. Envoy pings only when
/// `connection_keepalive` is set; 60 s / 20 s (hyper's default ack timeout) cost one frame a
/// minute per connection.
pub const DEFAULT_H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Opaque TCP (passthrough and TCP services) is closed after this long without a byte either
/// way, unless the service's `DestinationRule` sets `connectionPool.tcp.idleTimeout`: Istio's
/// default for TCP (1 h).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Downstream connections the agent holds at once, all pods together. Each costs up to two
/// file descriptors (client and upstream) and a few KiB; 100,000 stays below the usual hard
/// `RLIMIT_NOFILE` (524,288 or more) the agent raises itself to.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;

/// Downstream connections one pod may hold at once: a tenth of the node's, so one noisy pod
/// cannot take the node's whole budget. The ingress gateway's clients, outside the mesh, have
/// only the node's cap.
pub const DEFAULT_MAX_CONNECTIONS_PER_POD: usize = 10_000;

/// Request-body bytes one connection may hold buffered for retries and mirroring at once:
/// Envoy's `per_connection_buffer_limit_bytes` default (1 MiB).
pub const DEFAULT_BODY_BUFFER_PER_CONNECTION: usize = 1024 * 1024;

/// Request-body bytes all connections together may hold buffered at once. Past either budget
/// a body is streamed without being kept, so the request is neither retried nor mirrored, as
/// Envoy's router does when its retry buffer overflows.
pub const DEFAULT_BODY_BUFFER_GLOBAL: usize = 64 * 1024 * 1024;

/// Mirrored copies in flight, all pods together (each pod also has its own bound, 256, in its
/// upstream pool); past it a copy is dropped and counted. Each holds at most a buffered body
/// (64 KiB), so copies cost at most 64 MiB.
pub const DEFAULT_MAX_MIRRORS_IN_FLIGHT: usize = 1024;

/// The data path's settable bounds; see each default for its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub http_header_timeout: Duration,
    pub http_idle_timeout: Duration,
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_pod: usize,
    pub body_buffer_per_connection: usize,
    pub body_buffer_global: usize,
    pub max_mirrors_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            http_header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            http_idle_timeout: DEFAULT_HTTP_IDLE_TIMEOUT,
            h2_keepalive_interval: DEFAULT_H2_KEEPALIVE_INTERVAL,
            h2_keepalive_timeout: DEFAULT_H2_KEEPALIVE_TIMEOUT,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_pod: DEFAULT_MAX_CONNECTIONS_PER_POD,
            body_buffer_per_connection: DEFAULT_BODY_BUFFER_PER_CONNECTION,
            body_buffer_global: DEFAULT_BODY_BUFFER_GLOBAL,
            max_mirrors_in_flight: DEFAULT_MAX_MIRRORS_IN_FLIGHT,
        }
    }
}
