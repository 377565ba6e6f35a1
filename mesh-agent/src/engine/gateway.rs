//! Which `Gateway`s the agent's ingress serves and which hosts each admits, compiled once per
//! snapshot so a request picks its gateways by its listener's port without formatting a name.
//!
//! As in Istio, a `Gateway` applies to the agent's built-in ingress gateway only when its
//! `selector` is a subset of that gateway's labels ([`GatewayLabels`]), and a VirtualService
//! bound to it serves only the hosts both name: each server's `hosts` entry is `[namespace/]dns`
//! (`*/` any namespace, the default; `./` the Gateway's own; otherwise that namespace, which the
//! VirtualService must live in), `dns` is a name, `*.suffix` or `*`, and a rule host matches it
//! when one of the two covers the other. Each gateway gets, per port, a route table of just
//! those hosts (their intersection, as Istio builds the gateway's virtual hosts), with no
//! service default routes: the ingress exposes only what a bound rule routes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::routing::RouteTable;
use crate::config::model::Gateway;

/// The labels of the agent's built-in ingress gateway, which `Gateway` selectors are matched
/// against. Default: those of Istio's own ingress gateway, `istio: ingressgateway` and
/// `app: istio-ingressgateway`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayLabels(BTreeMap<String, String>);

impl GatewayLabels {
    pub fn new(labels: impl IntoIterator<Item = (String, String)>) -> GatewayLabels {
        GatewayLabels(labels.into_iter().collect())
    }

    /// Whether a `Gateway` with this `selector` applies to the agent's ingress: every label it
    /// names has that value here (so an empty selector selects it, as in Istio).
    pub fn selects(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.0.get(k) == Some(v))
    }

    /// One `key=value` label, as the CLI takes it.
    pub fn parse_label(text: &str) -> Result<(String, String), String> {
        match text.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.trim().to_owned()))
            }
            _ => Err(format!("expected key=value, got {text:?}")),
        }
    }
}

impl Default for GatewayLabels {
    fn default() -> Self {
        GatewayLabels::new([
            ("app".to_owned(), "istio-ingressgateway".to_owned()),
            ("istio".to_owned(), "ingressgateway".to_owned()),
        ])
    }
}

impl fmt::Display for GatewayLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&labels.join(", "))
    }
}

/// The routes of one VirtualService as the gateways need them.
pub(crate) struct BoundRules<'a> {
    pub(crate) namespace: &'a str,
    /// Every gateway (`namespace/name`) the rule or one of its matches names.
    pub(crate) gateways: Vec<Box<str>>,
    /// Its hosts as the mesh's route table keys them (resolved, lower case).
    pub(crate) hosts: Vec<String>,
    pub(crate) routes: Range<u32>,
}

/// One gateway as a listener port sees it: its name (how rules' `gateways` name it) and the
/// virtual hosts it admits there.
#[derive(Debug)]
pub(crate) struct ServedGateway {
    pub(crate) name: Arc<str>,
    pub(crate) table: RouteTable,
}

/// The gateways the agent's ingress serves, by listener port.
#[derive(Debug, Default)]
pub(crate) struct Gateways {
    /// Listener port → the served gateways with a server on it, in config order, admitting the
    /// hosts of their servers on that port.
    by_port: HashMap<u16, Box<[ServedGateway]>>,
    /// Every served gateway with the hosts of all its servers, for a port no served gateway
    /// has a server on (so a listener on another port than the Gateway's, as in the demo,
    /// still routes).
    all: Box<[ServedGateway]>,
}

impl Gateways {
    /// `labels`: the ingress gateway's; `None` when the agent runs none (it serves nothing).
    pub(crate) fn compile(
        gateways: &[Arc<Gateway>],
        labels: Option<&GatewayLabels>,
        rules: &[BoundRules<'_>],
    ) -> Gateways {
        let served: Vec<(Arc<str>, &Gateway)> = gateways
            .iter()
            .filter(|g| labels.is_some_and(|l| l.selects(&g.selector)))
            .map(|g| (format!("{}/{}", g.id.namespace, g.id.name).into(), &**g))
            .collect();
        let mut ports: Vec<u16> = served
            .iter()
            .flat_map(|(_, g)| g.servers.iter().map(|s| s.port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let by_port = ports
            .into_iter()
            .map(|port| {
                let on_port = served
                    .iter()
                    .filter(|(_, g)| g.servers.iter().any(|s| s.port == port))
                    .map(|(name, g)| ServedGateway::compile(name, g, Some(port), rules))
                    .collect();
                (port, on_port)
            })
            .collect();
        let all = served
            .iter()
            .map(|(name, g)| ServedGateway::compile(name, g, None, rules))
            .collect();
        Gateways { by_port, all }
    }

    /// The gateways to try, in order, for a request on listener `port`: those with a server on
    /// that port, or all of them when none has one.
    pub(crate) fn for_port(&self, port: u16) -> &[ServedGateway] {
        self.by_port.get(&port).unwrap_or(&self.all)
    }
}

impl ServedGateway {
    /// The gateway's virtual hosts on `port` (`None`: on any of its ports).
    fn compile(
        name: &Arc<str>,
        gateway: &Gateway,
        port: Option<u16>,
        rules: &[BoundRules<'_>],
    ) -> ServedGateway {
        let admitted: Vec<ServerHost> = gateway
            .servers
            .iter()
            .filter(|s| port.is_none_or(|p| s.port == p))
            .flat_map(|s| &s.hosts)
            .filter_map(|h| ServerHost::parse(h, &gateway.id.namespace))
            .collect();
        let mut table = RouteTable::default();
        for rule in rules
            .iter()
            .filter(|r| r.gateways.iter().any(|g| **g == **name))
        {
            for host in &rule.hosts {
                for server_host in admitted.iter().filter(|a| a.admits(rule.namespace)) {
                    let Some(domain) = intersect(host, &server_host.dns) else {
                        continue;
                    };
                    let routes = &mut table.vhost_mut(domain).routes;
                    // Two server hosts may admit the same domain: its routes appear once.
                    if !routes.contains(&rule.routes.start) {
                        routes.extend(rule.routes.clone());
                    }
                }
            }
        }
        ServedGateway {
            name: Arc::clone(name),
            table,
        }
    }
}

/// One entry of a server's `hosts`.
struct ServerHost {
    /// The namespace a rule must live in; `None`: any.
    namespace: Option<String>,
    /// Lower case, without a trailing dot: a name, `*.suffix` or `*`.
    dns: String,
}

impl ServerHost {
    /// `[namespace/]dns` as Istio writes it; `./` is the Gateway's namespace, `*/` (or none)
    /// any. The loader refuses malformed entries, so `None` only for what it let through.
    fn parse(entry: &str, gateway_namespace: &str) -> Option<ServerHost> {
        let (namespace, dns) = entry.split_once('/').unwrap_or(("*", entry));
        let namespace = match namespace {
            "*" => None,
            "." => Some(gateway_namespace.to_owned()),
            ns => Some(ns.to_owned()),
        };
        let dns = dns.trim_end_matches('.').to_ascii_lowercase();
        (!dns.is_empty()).then_some(ServerHost { namespace, dns })
    }

    fn admits(&self, rule_namespace: &str) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| ns == rule_namespace)
    }
}

/// The hosts both patterns match, as one pattern: the more specific of the two when one covers
/// the other (`*` ∩ `a.com` = `a.com`, `*.com` ∩ `*.a.com` = `*.a.com`), else none.
fn intersect<'a>(a: &'a str, b: &'a str) -> Option<&'a str> {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (None, None) => (a == b).then_some(a),
        (Some(suffix), None) => b.ends_with(suffix).then_some(b),
        (None, Some(suffix)) => a.ends_with(suffix).then_some(a),
        (Some(sa), Some(sb)) if sa.ends_with(sb) => Some(a),
        (Some(sa), Some(sb)) => sb.ends_with(sa).then_some(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::{GatewayServer, ObjectRef};

    fn gateway(name: &str, selector: &[(&str, &str)], servers: &[(u16, &[&str])]) -> Arc<Gateway> {
        Arc::new(Gateway {
            id: ObjectRef {
                namespace: "istio-system".into(),
                name: name.into(),
            },
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            servers: servers
                .iter()
                .map(|&(port, hosts)| GatewayServer {
                    port,
                    protocol: "HTTP".into(),
                    port_name: "http".into(),
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                })
                .collect(),
        })
    }

    fn names(gateways: &[ServedGateway]) -> Vec<&str> {
        gateways.iter().map(|g| &*g.name).collect()
    }

    #[test]
    fn gateways_on_the_port_in_order_else_all() {
        let everything: &[&str] = &["*"];
        let gateways = Gateways::compile(
            &[
                gateway(
                    "public",
                    &[],
                    &[(80, everything), (80, everything), (8080, everything)],
                ),
                gateway("internal", &[], &[(8080, everything)]),
                gateway("tls", &[], &[(443, everything)]),
            ],
            Some(&GatewayLabels::default()),
            &[],
        );
        let on = |port| names(gateways.for_port(port));
        assert_eq!(on(80), ["istio-system/public"]);
        assert_eq!(on(8080), ["istio-system/public", "istio-system/internal"]);
        assert_eq!(
            on(9999),
            [
                "istio-system/public",
                "istio-system/internal",
                "istio-system/tls"
            ]
        );
        let none = Gateways::compile(&[], Some(&GatewayLabels::default()), &[]);
        assert!(none.for_port(80).is_empty());
    }

    #[test]
    fn only_gateways_whose_selector_the_labels_satisfy_are_served() {
        let everything: &[&str] = &["*"];
        let gateways = [
            gateway(
                "tutorial",
                &[("istio", "ingressgateway")],
                &[(80, everything)],
            ),
            gateway(
                "by-app",
                &[("app", "istio-ingressgateway")],
                &[(80, everything)],
            ),
            gateway(
                "both",
                &[("app", "istio-ingressgateway"), ("istio", "ingressgateway")],
                &[(80, everything)],
            ),
            gateway(
                "elsewhere",
                &[("istio", "egressgateway")],
                &[(80, everything)],
            ),
            gateway(
                "half",
                &[("istio", "ingressgateway"), ("zone", "b")],
                &[(80, everything)],
            ),
            gateway("any", &[], &[(80, everything)]),
            gateway(
                "other-port",
                &[("istio", "egressgateway")],
                &[(8080, everything)],
            ),
        ];
        let served = Gateways::compile(&gateways, Some(&GatewayLabels::default()), &[]);
        let expected = ["tutorial", "by-app", "both", "any"].map(|n| format!("istio-system/{n}"));
        assert_eq!(names(served.for_port(80)), expected);
        // A port only an unserved gateway names is like a port nobody names.
        assert_eq!(names(served.for_port(8080)), expected);

        let custom = GatewayLabels::new([("zone".to_owned(), "b".to_owned())]);
        let served = Gateways::compile(&gateways, Some(&custom), &[]);
        assert_eq!(names(served.for_port(80)), ["istio-system/any"]);
        // An agent without an ingress gateway serves none, not even `{}`.
        let served = Gateways::compile(&gateways, None, &[]);
        assert!(served.for_port(80).is_empty());
    }

    #[test]
    fn labels_parse_and_display_as_the_cli_takes_them() {
        assert_eq!(
            GatewayLabels::parse_label("istio=ingressgateway"),
            Ok(("istio".into(), "ingressgateway".into()))
        );
        assert_eq!(
            GatewayLabels::parse_label("team="),
            Ok(("team".into(), String::new()))
        );
        assert!(GatewayLabels::parse_label("istio").is_err());
        assert!(GatewayLabels::parse_label("=x").is_err());
        assert_eq!(
            GatewayLabels::default().to_string(),
            "app=istio-ingressgateway, istio=ingressgateway"
        );
    }

    #[test]
    fn hosts_intersect_as_istio_matches_them() {
        let cases = [
            ("a.example.com", "a.example.com", Some("a.example.com")),
            ("a.example.com", "b.example.com", None),
            ("*", "a.example.com", Some("a.example.com")),
            ("a.example.com", "*", Some("a.example.com")),
            ("*", "*", Some("*")),
            ("*.example.com", "a.example.com", Some("a.example.com")),
            ("*.example.com", "a.b.example.com", Some("a.b.example.com")),
            ("*.example.com", "example.com", None),
            ("*.example.com", "*.b.example.com", Some("*.b.example.com")),
            ("*.b.example.com", "*.example.com", Some("*.b.example.com")),
            ("*.example.com", "*.example.org", None),
            ("*", "*.example.com", Some("*.example.com")),
        ];
        for (a, b, want) in cases {
            assert_eq!(intersect(a, b), want, "{a} ∩ {b}");
        }
    }

    #[test]
    fn server_hosts_name_the_namespaces_of_the_rules_they_admit() {
        let parsed = |entry| ServerHost::parse(entry, "istio-system").expect(entry);
        let any = parsed("Shop.Example.com.");
        assert_eq!(
            (any.namespace.as_deref(), any.dns.as_str()),
            (None, "shop.example.com")
        );
        assert!(any.admits("default") && any.admits("shop"));
        assert!(parsed("*/shop.example.com").admits("default"));
        let own = parsed("./*");
        assert!(own.admits("istio-system") && !own.admits("default"));
        let shop = parsed("shop/*.example.com");
        assert_eq!(shop.dns, "*.example.com");
        assert!(shop.admits("shop") && !shop.admits("default"));
        assert!(ServerHost::parse("shop/", "istio-system").is_none());
    }

    #[test]
    fn a_gateway_table_holds_only_the_hosts_its_servers_admit_for_bound_rules() {
        let gateways = [gateway(
            "public",
            &[],
            &[
                (80, &["*.example.com", "shop/api.example.org"]),
                (8080, &["./*"]),
            ],
        )];
        let rule = |namespace, gateways: &[&'static str], hosts: &[&str], routes| BoundRules {
            namespace,
            gateways: gateways.iter().map(|&g| g.into()).collect(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            routes,
        };
        let rules = [
            // Bound, every host: narrowed to what the server admits.
            rule("default", &["istio-system/public"], &["*"], 0..2),
            // Bound, a host the port-80 server admits only from namespace shop.
            rule(
                "default",
                &["istio-system/public"],
                &["api.example.org"],
                2..3,
            ),
            rule("shop", &["istio-system/public"], &["api.example.org"], 3..4),
            // Not bound to this gateway.
            rule("default", &["mesh"], &["a.example.com"], 4..5),
            // Bound, in the gateway's own namespace.
            rule(
                "istio-system",
                &["mesh", "istio-system/public"],
                &["status.local"],
                5..6,
            ),
        ];
        let compiled = Gateways::compile(&gateways, Some(&GatewayLabels::default()), &rules);
        let routes = |port: u16, host: &str| -> Option<Vec<u32>> {
            let table = &compiled.for_port(port)[0].table;
            table.lookup(host, "istio-system").map(|v| v.routes.clone())
        };
        assert_eq!(routes(80, "a.example.com"), Some(vec![0, 1]));
        assert_eq!(routes(80, "a.b.example.com:80"), Some(vec![0, 1]));
        assert_eq!(routes(80, "example.com"), None);
        assert_eq!(routes(80, "api.example.org"), Some(vec![3]));
        assert_eq!(routes(80, "status.local"), None);
        // Port 8080 admits every host, but only from istio-system.
        assert_eq!(routes(8080, "status.local"), Some(vec![5]));
        assert_eq!(routes(8080, "a.example.com"), None);
        // A port without a server: every server's hosts.
        assert_eq!(routes(9000, "a.example.com"), Some(vec![0, 1]));
        assert_eq!(routes(9000, "status.local"), Some(vec![5]));
        assert!(compiled.for_port(80)[0]
            .table
            .lookup("a.example.com", "x")
            .unwrap()
            .default
            .is_none());
    }
}
