//! The tunnels' own metrics, under `mesh_tunnel_`.

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// `direction`: `outbound` (this agent dialled) or `inbound` (a peer dialled this agent).
type ByDirection = Family<[(&'static str, &'static str); 1], Counter>;
type ByDirectionAndReason = Family<[(&'static str, &'static str); 2], Counter>;

#[derive(Clone, Default)]
pub struct TunnelMetrics {
    /// TLS handshakes completed (a tunnel connection opened), by direction.
    handshakes: ByDirection,
    /// TLS handshakes that failed, by direction and `HandshakeError::reason`.
    handshake_failures: ByDirectionAndReason,
    /// Outbound tunnel streams that could not be opened, by reason.
    connect_failures: Family<[(&'static str, &'static str); 1], Counter>,
    /// CONNECT streams opened on a tunnel (each one a proxied connection), by direction.
    streams: ByDirection,
    /// CONNECT streams refused, by direction and why.
    refused_streams: ByDirectionAndReason,
}

impl TunnelMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "handshakes",
            "Mutual TLS handshakes of tunnel connections completed, by direction",
            self.handshakes.clone(),
        );
        registry.register(
            "handshake_failures",
            "Mutual TLS handshakes of tunnel connections refused or failed, by direction and reason",
            self.handshake_failures.clone(),
        );
        registry.register(
            "connect_failures",
            "Outbound tunnel streams that could not be opened (each a failed connect), by reason",
            self.connect_failures.clone(),
        );
        registry.register(
            "streams",
            "CONNECT streams opened on tunnel connections (one per proxied connection), by direction",
            self.streams.clone(),
        );
        registry.register(
            "refused_streams",
            "CONNECT streams refused, by direction and reason",
            self.refused_streams.clone(),
        );
    }

    pub fn handshake(&self, direction: &'static str) {
        self.handshakes
            .get_or_create(&[("direction", direction)])
            .inc();
    }

    pub fn handshake_failed(&self, direction: &'static str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&[("direction", direction), ("reason", reason)])
            .inc();
    }

    pub fn connect_failed(&self, reason: &'static str) {
        self.connect_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn connect_failures(&self, reason: &'static str) -> u64 {
        self.connect_failures
            .get_or_create(&[("reason", reason)])
            .get()
    }

    pub fn stream(&self, direction: &'static str) {
        self.streams
            .get_or_create(&[("direction", direction)])
            .inc();
    }

    pub fn stream_refused(&self, direction: &'static str, reason: &'static str) {
        self.refused_streams
            .get_or_create(&[("direction", direction), ("reason", reason)])
            .inc();
    }

    /// Handshakes completed so far in `direction` (tests, and tunnel reuse figures).
    pub fn handshakes(&self, direction: &'static str) -> u64 {
        self.handshakes
            .get_or_create(&[("direction", direction)])
            .get()
    }

    pub fn handshake_failures(&self, direction: &'static str, reason: &'static str) -> u64 {
        self.handshake_failures
            .get_or_create(&[("direction", direction), ("reason", reason)])
            .get()
    }

    pub fn refused_streams(&self, direction: &'static str, reason: &'static str) -> u64 {
        self.refused_streams
            .get_or_create(&[("direction", direction), ("reason", reason)])
            .get()
    }
}

pub const OUTBOUND: &str = "outbound";
pub const INBOUND: &str = "inbound";
