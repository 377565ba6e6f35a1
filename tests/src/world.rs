//! A cluster's worth of objects, as a busy node's agent sees them: Services with their
//! EndpointSlices and Pods, some routed 90/10 by a VirtualService and DestinationRule. Used by
//! the benches that ask what size costs (`cargo bench -p mesh-agent --bench config_change`,
//! `cargo xtask bench --scale`). Nothing in it is dialled: its addresses (`10.100/16` for
//! services, `10.200/16` for pods) are outside every simulated node's.

use std::fmt::Write as _;

/// How big the world is.
#[derive(Clone, Copy, Debug)]
pub struct World {
    pub services: usize,
    /// Endpoints in each service's EndpointSlice.
    pub endpoints_per_service: usize,
    /// How many of those endpoints are Pods the world also holds (the rest have none, as
    /// endpoints outside the cluster).
    pub pods_per_service: usize,
    /// Services routed 90/10 between subsets `v1` and `v2` (the first ones).
    pub routed: usize,
}

impl World {
    /// What the issue on cost at scale names: 1,000 services, 10,000 endpoints, 5,000 pods,
    /// 100 of the services routed.
    pub const BUSY_NODE: World = World {
        services: 1_000,
        endpoints_per_service: 10,
        pods_per_service: 5,
        routed: 100,
    };

    pub fn endpoints(&self) -> usize {
        self.services * self.endpoints_per_service
    }

    pub fn pods(&self) -> usize {
        self.services * self.pods_per_service
    }

    /// Every object as one multi-document YAML text, in namespace `bench`. A service's first
    /// pod is version `v2`, the others `v1`.
    pub fn yaml(&self) -> String {
        let mut text = String::new();
        for service in 0..self.services {
            let _ = write!(
                text,
                "apiVersion: v1
kind: Service
metadata: {{name: svc-{service}, namespace: bench}}
spec:
  clusterIP: {}
  ports: [{{name: http, port: 8080, targetPort: 8080}}]
  selector: {{app: svc-{service}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{service}-abcde
  namespace: bench
  labels: {{kubernetes.io/service-name: svc-{service}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
",
                address(100, service)
            );
            for replica in 0..self.endpoints_per_service {
                let _ = writeln!(
                    text,
                    "- addresses: [{}]\n  conditions: {{ready: true}}",
                    self.pod_ip(service, replica)
                );
                if replica < self.pods_per_service {
                    let _ = writeln!(
                        text,
                        "  targetRef: {{kind: Pod, name: svc-{service}-{replica}, namespace: bench}}"
                    );
                }
            }
            for replica in 0..self.pods_per_service {
                text.push_str("---\n");
                text.push_str(&self.pod(service, replica, if replica == 0 { "v2" } else { "v1" }));
            }
            text.push_str("---\n");
        }
        for service in 0..self.routed {
            let _ = write!(
                text,
                "apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc-{service}, namespace: bench}}
spec:
  host: svc-{service}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: svc-{service}, namespace: bench}}
spec:
  hosts: [svc-{service}]
  http:
  - route:
    - {{destination: {{host: svc-{service}, subset: v1}}, weight: 90}}
    - {{destination: {{host: svc-{service}, subset: v2}}, weight: 10}}
---
"
            );
        }
        text
    }

    /// Pod `svc-<service>-<replica>` at `version`, as one YAML document.
    pub fn pod(&self, service: usize, replica: usize, version: &str) -> String {
        format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: svc-{service}-{replica}
  namespace: bench
  labels: {{app: svc-{service}, version: {version}}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: svc-{service}-{version}-7d9f, uid: x, controller: true}}]
status: {{podIP: {}}}
",
            self.pod_ip(service, replica)
        )
    }

    fn pod_ip(&self, service: usize, replica: usize) -> String {
        address(200, service * self.endpoints_per_service + replica)
    }
}

/// The `n`th address of `10.<second>/16`, skipping `.0` and `.255`.
fn address(second: u8, n: usize) -> String {
    format!("10.{second}.{}.{}", n / 254, n % 254 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_node_has_what_the_issue_names_and_every_address_once() {
        let world = World::BUSY_NODE;
        let text = world.yaml();
        assert_eq!(text.matches("kind: Service\n").count(), 1_000);
        assert_eq!(text.matches("- addresses: [").count(), 10_000);
        assert_eq!(text.matches("kind: Pod\n").count(), 5_000);
        assert_eq!(text.matches("kind: VirtualService\n").count(), 100);
        let mut pods: Vec<String> = (0..world.services)
            .flat_map(|s| (0..world.endpoints_per_service).map(move |r| (s, r)))
            .map(|(s, r)| world.pod_ip(s, r))
            .collect();
        pods.sort();
        pods.dedup();
        assert_eq!(pods.len(), 10_000);
        assert!(pods
            .iter()
            .all(|ip| !ip.ends_with(".0") && !ip.ends_with(".255")));
    }
}
