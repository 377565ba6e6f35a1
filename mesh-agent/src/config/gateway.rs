//! `Gateway.spec` (raw) → [`Gateway`] (validated).

use super::diagnostic::ObjectContext;
use super::fields::{self, MISSING};
use super::model::{Gateway, GatewayServer, ObjectRef};
use super::raw;

/// Istio's server protocols.
const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "REDIS", "MYSQL",
];

/// Converts one spec. Invalid values are reported through `cx` and replaced by placeholders;
/// the caller must discard the result when `cx.has_errors()`.
pub(super) fn convert(cx: &mut ObjectContext, id: &ObjectRef, spec: raw::GatewaySpec) -> Gateway {
    let servers = spec.servers.unwrap_or_default();
    if servers.is_empty() {
        cx.error("spec.servers", MISSING);
    }
    let servers = servers
        .into_iter()
        .enumerate()
        .map(|(i, s)| server(cx, &format!("spec.servers[{i}]"), s))
        .collect();
    Gateway {
        id: id.clone(),
        selector: spec.selector.unwrap_or_default(),
        servers,
    }
}

fn server(cx: &mut ObjectContext, path: &str, raw: raw::Server) -> GatewayServer {
    cx.unsupported(&format!("{path}.tls"), &raw.tls);
    cx.unsupported(&format!("{path}.bind"), &raw.bind);
    cx.unsupported(&format!("{path}.defaultEndpoint"), &raw.default_endpoint);
    let hosts = raw.hosts.unwrap_or_default();
    if hosts.is_empty() {
        cx.error(&format!("{path}.hosts"), MISSING);
    }
    for (i, host) in hosts.iter().enumerate() {
        if let Err(reason) = check_host(host) {
            cx.error(&format!("{path}.hosts[{i}]"), reason);
        }
    }
    let Some(port) = raw.port else {
        cx.error(&format!("{path}.port"), MISSING);
        return GatewayServer {
            port: 0,
            protocol: String::new(),
            port_name: String::new(),
            hosts,
        };
    };
    cx.unsupported(&format!("{path}.port.targetPort"), &port.target_port);
    let number = match port.number {
        Some(n) => fields::port(cx, &format!("{path}.port.number"), n),
        None => {
            cx.error(&format!("{path}.port.number"), MISSING);
            0
        }
    };
    // Istio compares protocols case-insensitively.
    let protocol = port.protocol.unwrap_or_default().to_ascii_uppercase();
    if protocol.is_empty() {
        cx.error(&format!("{path}.port.protocol"), MISSING);
    } else if !PROTOCOLS.contains(&protocol.as_str()) {
        cx.error(
            &format!("{path}.port.protocol"),
            format!(
                "unknown protocol {protocol:?}: expected one of {}",
                PROTOCOLS.join(", ")
            ),
        );
    }
    GatewayServer {
        port: number,
        protocol,
        port_name: port.name.unwrap_or_default(),
        hosts,
    }
}

/// A server host as Istio writes it: `[namespace/]dns`, where namespace is a name, `*` (any) or
/// `.` (the Gateway's), and dns a name, `*.suffix` or `*` (the wildcard only in front).
fn check_host(host: &str) -> Result<(), String> {
    let (namespace, dns) = host.split_once('/').unwrap_or(("*", host));
    if namespace.is_empty() || dns.is_empty() || dns.contains('/') {
        return Err(format!(
            "{host:?} is not [namespace/]host (e.g. \"*\", \"shop/*.example.com\")"
        ));
    }
    if namespace.contains('*') && namespace != "*" {
        return Err(format!("{host:?}: the namespace is a name, \"*\" or \".\""));
    }
    if dns.strip_prefix('*').unwrap_or(dns).contains('*') {
        return Err(format!(
            "{host:?}: a wildcard is allowed only at the start of the host"
        ));
    }
    Ok(())
}
