//! A Gateway API `Gateway` (raw) → the ingress [`Gateway`] the agent serves, when its class is
//! one this mesh implements: each HTTP listener becomes a server of the agent's built-in
//! ingress on its port, admitting the routes its `allowedRoutes` admits for its `hostname`.

use super::raw;
use crate::config::diagnostic::ObjectContext;
use crate::config::fields::{self, MISSING};
use crate::config::model::{Gateway, GatewayServer, ObjectRef};

/// The `gatewayClassName`s the agent's ingress serves: Istio's (so Gateways written for Istio
/// work unchanged) and this mesh's own.
pub(crate) const SERVED_CLASSES: [&str; 2] = ["istio", "sidecarless"];

/// Converts one spec; `None` when its class is another implementation's (warned: the Gateway
/// is not served). Invalid values are reported through `cx`.
pub(crate) fn convert(
    cx: &mut ObjectContext,
    id: &ObjectRef,
    spec: raw::GatewaySpec,
) -> Option<Gateway> {
    cx.unsupported("spec.addresses", &spec.addresses);
    cx.unsupported("spec.infrastructure", &spec.infrastructure);
    cx.unsupported("spec.backendTLS", &spec.backend_tls);
    let Some(class) = spec.gateway_class_name.filter(|c| !c.is_empty()) else {
        cx.error("spec.gatewayClassName", MISSING);
        return None;
    };
    let listeners = spec.listeners.unwrap_or_default();
    if listeners.is_empty() {
        cx.error("spec.listeners", MISSING);
    }
    let servers: Vec<GatewayServer> = listeners
        .into_iter()
        .enumerate()
        .filter_map(|(i, l)| listener(cx, &format!("spec.listeners[{i}]"), l))
        .collect();
    if !SERVED_CLASSES.contains(&class.as_str()) {
        cx.warn(
            "spec.gatewayClassName",
            format!(
                "class {class:?} is not this mesh's ({}): not served by its ingress",
                SERVED_CLASSES.join(", ")
            ),
        );
        return None;
    }
    Some(Gateway {
        id: id.clone(),
        // Selects the agent's built-in ingress, whatever its labels.
        selector: Default::default(),
        servers,
    })
}

fn listener(cx: &mut ObjectContext, path: &str, raw: raw::Listener) -> Option<GatewayServer> {
    cx.unsupported(&format!("{path}.tls"), &raw.tls);
    let name = raw.name.unwrap_or_default();
    if name.is_empty() {
        cx.error(&format!("{path}.name"), MISSING);
    }
    let port = match raw.port {
        Some(port) => fields::port(cx, &format!("{path}.port"), port),
        None => {
            cx.error(&format!("{path}.port"), MISSING);
            0
        }
    };
    match raw.protocol.as_deref() {
        Some("HTTP") => {}
        Some(other) => {
            cx.warn(
                &format!("{path}.protocol"),
                format!("protocol {other} is not served by this mesh's ingress (HTTP is): this listener is ignored"),
            );
            return None;
        }
        None => {
            cx.error(&format!("{path}.protocol"), MISSING);
            return None;
        }
    }
    let namespaces = raw.allowed_routes.and_then(|a| a.namespaces);
    let from = match namespaces {
        None => "Same".to_owned(),
        Some(namespaces) => {
            cx.unsupported(
                &format!("{path}.allowedRoutes.namespaces.selector"),
                &namespaces.selector,
            );
            namespaces.from.unwrap_or_else(|| "Same".to_owned())
        }
    };
    // Istio's server hosts say which namespaces' rules a host admits: `./` the Gateway's own,
    // `*/` any.
    let admitted = match from.as_str() {
        "Same" => ".",
        "All" => "*",
        "Selector" => {
            cx.warn(
                &format!("{path}.allowedRoutes.namespaces.from"),
                "Selector is not supported: only routes of the Gateway's namespace attach",
            );
            "."
        }
        other => {
            cx.error(
                &format!("{path}.allowedRoutes.namespaces.from"),
                format!("unknown value {other:?}: expected Same, All or Selector"),
            );
            "."
        }
    };
    let hostname = raw.hostname.filter(|h| !h.is_empty());
    let host = hostname.as_deref().unwrap_or("*").to_ascii_lowercase();
    Some(GatewayServer {
        port,
        protocol: "HTTP".to_owned(),
        port_name: name,
        hosts: vec![format!("{admitted}/{host}")],
    })
}
