//! Which `Gateway`s an ingress request may be routed by, compiled once per snapshot so a request
//! picks them by its listener's port without formatting a name.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::model::Gateway;

/// The mesh's gateways by listener port.
#[derive(Debug, Default)]
pub(crate) struct Gateways {
    /// `namespace/name` of each gateway, in config order: how rules' `gateways` name them.
    names: Box<[Box<str>]>,
    /// Listener port → the gateways with a server on it, in config order.
    by_port: HashMap<u16, Box<[u32]>>,
    /// Every gateway, for a port no gateway has a server on.
    all: Box<[u32]>,
}

impl Gateways {
    // Servers' `hosts` and the gateway's `selector` are not consulted yet (every gateway is
    // served by the agent's one ingress listener); they would narrow `by_port` here.
    pub(crate) fn compile(gateways: &[Arc<Gateway>]) -> Gateways {
        let names = gateways
            .iter()
            .map(|g| format!("{}/{}", g.id.namespace, g.id.name).into_boxed_str())
            .collect();
        let mut by_port: HashMap<u16, Vec<u32>> = HashMap::new();
        for (index, gateway) in gateways.iter().enumerate() {
            let index = u32::try_from(index).expect("fewer than 2^32 gateways");
            for server in &gateway.servers {
                let on_port = by_port.entry(server.port).or_default();
                if on_port.last() != Some(&index) {
                    on_port.push(index);
                }
            }
        }
        Gateways {
            names,
            by_port: by_port
                .into_iter()
                .map(|(port, gateways)| (port, gateways.into_boxed_slice()))
                .collect(),
            all: (0..gateways.len() as u32).collect(),
        }
    }

    /// The gateways to try, in order, for a request on listener `port`: those with a server on
    /// that port, or all of them when none has one (so a listener on another port than the
    /// Gateway's, as in the demo, still routes).
    pub(crate) fn for_port(&self, port: u16) -> impl Iterator<Item = &str> + '_ {
        let indices = self.by_port.get(&port).unwrap_or(&self.all);
        indices.iter().map(|&i| &*self.names[i as usize])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::model::{GatewayServer, ObjectRef};

    fn gateway(namespace: &str, name: &str, ports: &[u16]) -> Arc<Gateway> {
        Arc::new(Gateway {
            id: ObjectRef {
                namespace: namespace.into(),
                name: name.into(),
            },
            selector: BTreeMap::new(),
            servers: ports
                .iter()
                .map(|&port| GatewayServer {
                    port,
                    protocol: "HTTP".into(),
                    port_name: "http".into(),
                    hosts: vec!["*".into()],
                })
                .collect(),
        })
    }

    #[test]
    fn gateways_on_the_port_in_order_else_all() {
        let gateways = Gateways::compile(&[
            gateway("istio-system", "public", &[80, 80, 8080]),
            gateway("default", "internal", &[8080]),
            gateway("default", "tls", &[443]),
        ]);
        let on = |port| gateways.for_port(port).collect::<Vec<_>>();
        assert_eq!(on(80), ["istio-system/public"]);
        assert_eq!(on(8080), ["istio-system/public", "default/internal"]);
        assert_eq!(
            on(9999),
            ["istio-system/public", "default/internal", "default/tls"]
        );
        assert_eq!(Gateways::compile(&[]).for_port(80).count(), 0);
    }
}
