//! The Gateway API (`gateway.networking.k8s.io`) as the engine's model: one engine, two front
//! doors. An `HTTPRoute` or `GRPCRoute` is validated by itself ([`http_route`], [`grpc_route`]);
//! then every route of one kind attached to one Service is merged into one exclusive
//! [`VirtualService`](crate::config::model::VirtualService) for it, most specific match first
//! ([`Precedence`](crate::config::model::Precedence), then the oldest object, then namespace
//! and name, then rule and match order, as the Gateway API orders them), the routes of another
//! namespace (consumer routes) first and for their namespace's clients alone; routes attached to
//! a `Gateway` the agent's ingress serves ([`gateway`]) are bound to it per host ([`merge`]).
//!
//! A VirtualService and HTTPRoutes may claim one Service. As Istio does (its sidecars keep the
//! first virtual host of a domain, and sort them by age), the oldest object takes the host — a
//! VirtualService when neither has a creation time, as files seldom do — and the others' rules
//! for it are not used, with a warning on each. So do an HTTPRoute and a GRPCRoute, which the
//! Gateway API never merges.

pub(crate) mod gateway;
pub(crate) mod grpc_route;
pub(crate) mod http_route;
pub(crate) mod merge;
pub(crate) mod raw;

/// The key of an `HTTPRoute` in an [`ObjectSet`](super::ObjectSet), as `kubectl` names the kind.
pub const HTTP_ROUTE: &str = "HTTPRoute.gateway.networking.k8s.io";
/// The key of a `GRPCRoute`.
pub const GRPC_ROUTE: &str = "GRPCRoute.gateway.networking.k8s.io";
/// The key of a Gateway API `Gateway` (Istio's is plain `Gateway`).
pub const GATEWAY: &str = "Gateway.gateway.networking.k8s.io";

#[cfg(test)]
mod tests;
