//! Kubernetes objects (real API shapes, via k8s-openapi) → [`Discovered`].
//!
//! Endpoints come from `EndpointSlice`s (label `kubernetes.io/service-name`), ready ones only;
//! each endpoint's labels are those of the `Pod` its `targetRef` names, which is what subsets
//! select on. A slice whose pods are unknown still routes, without labels.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::de::DeserializeOwned;

use super::{Discovered, Protocol, ServiceTarget, Workload};
use crate::{
    config::{Diagnostic, RawObject, Severity},
    engine::registry::{self, Endpoint, ServicePort},
    identity::{ServiceIdentity, WorkloadIdentity},
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Builds the registry and indexes from raw objects; objects of kinds discovery does not use
/// are ignored, malformed ones are reported as errors.
pub fn discover(objects: &[RawObject]) -> (Discovered, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut pods = Vec::new();
    for object in objects {
        match object.kind() {
            Some("Service") => services.extend(parse::<Service>(object, &mut diagnostics)),
            Some("EndpointSlice") => {
                slices.extend(parse::<EndpointSlice>(object, &mut diagnostics))
            }
            Some("Pod") => pods.extend(parse::<Pod>(object, &mut diagnostics)),
            _ => {}
        }
    }

    let mut discovered = Discovered::default();
    let mut pods_by_name: HashMap<(String, String), Arc<Workload>> = HashMap::new();
    for pod in &pods {
        let Some(workload) = workload_of(pod) else {
            continue;
        };
        let workload = Arc::new(workload);
        for ip in pod_ips(pod) {
            discovered.workloads.insert(ip, Arc::clone(&workload));
        }
        pods_by_name.insert(
            (workload.identity.namespace.clone(), workload.pod.clone()),
            workload,
        );
    }

    discovered.pods = pods_by_name.clone();

    for service in &services {
        let Some(name) = service.metadata.name.clone() else {
            continue;
        };
        let namespace = namespace_of(&service.metadata.namespace);
        let identity = Arc::new(ServiceIdentity::new(name.clone(), namespace.clone()));
        let spec = service.spec.clone().unwrap_or_default();
        let service_ports = spec.ports.clone().unwrap_or_default();
        let own_slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|slice| {
                namespace_of(&slice.metadata.namespace) == namespace
                    && slice
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        == Some(&name)
            })
            .collect();

        let mut ports = Vec::new();
        for port in &service_ports {
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            let target_port =
                target_port(port.name.as_deref(), &port.target_port, &own_slices).unwrap_or(number);
            ports.push(ServicePort {
                port: number,
                target_port,
            });
            let protocol = Protocol::from_port(port.app_protocol.as_deref(), port.name.as_deref());
            for ip in cluster_ips(&spec) {
                discovered.services.insert(
                    SocketAddr::new(ip, number),
                    ServiceTarget {
                        service: Arc::clone(&identity),
                        port: number,
                        protocol,
                    },
                );
            }
        }

        let mut endpoints = Vec::new();
        for slice in &own_slices {
            for endpoint in &slice.endpoints {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if !ready {
                    continue;
                }
                let workload = endpoint.target_ref.as_ref().and_then(|target| {
                    let pod_namespace = target.namespace.clone().unwrap_or(namespace.clone());
                    pods_by_name.get(&(pod_namespace, target.name.clone()?))
                });
                for address in &endpoint.addresses {
                    let Ok(ip) = address.parse::<IpAddr>() else {
                        continue;
                    };
                    let workload = workload.or_else(|| discovered.workloads.get(&ip));
                    endpoints.push(Endpoint {
                        ip,
                        labels: workload.map(|w| w.labels.clone()).unwrap_or_default(),
                        workload: workload.map(|w| Arc::new(w.identity.clone())),
                    });
                }
            }
        }
        endpoints.sort_by_key(|e| e.ip);
        endpoints.dedup_by_key(|e| e.ip);
        discovered.registry.services.push(registry::Service {
            identity,
            ports,
            endpoints,
        });
    }
    (discovered, diagnostics)
}

fn parse<T: DeserializeOwned>(object: &RawObject, diagnostics: &mut Vec<Diagnostic>) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(&object.value) {
        Ok(value) => Some(value),
        Err(error) => {
            let metadata = &object.value["metadata"];
            diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: object.file.clone(),
                object: format!(
                    "{} {}/{}",
                    object.kind().unwrap_or("?"),
                    metadata["namespace"].as_str().unwrap_or("default"),
                    metadata["name"].as_str().unwrap_or("?")
                ),
                field: error.path().to_string(),
                reason: error.inner().to_string(),
            });
            None
        }
    }
}

fn namespace_of(namespace: &Option<String>) -> String {
    namespace.clone().unwrap_or_else(|| "default".to_owned())
}

fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The port endpoints listen on: the slice's port of the same name, else a numeric targetPort.
fn target_port(
    name: Option<&str>,
    target: &Option<IntOrString>,
    slices: &[&EndpointSlice],
) -> Option<u16> {
    let from_slice = slices
        .iter()
        .flat_map(|slice| slice.ports.iter().flatten())
        .find(|port| port.name.as_deref().unwrap_or("") == name.unwrap_or(""))
        .and_then(|port| u16::try_from(port.port?).ok());
    from_slice.or(match target {
        Some(IntOrString::Int(port)) => u16::try_from(*port).ok(),
        _ => None,
    })
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

fn workload_of(pod: &Pod) -> Option<Workload> {
    let name = pod.metadata.name.clone()?;
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let workload = match owner {
        // A ReplicaSet is named `<deployment>-<hash>`.
        Some(o) if o.kind == "ReplicaSet" => o
            .name
            .rsplit_once('-')
            .map_or(o.name.clone(), |(deployment, _)| deployment.to_owned()),
        Some(o) => o.name.clone(),
        None => name.clone(),
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    Some(Workload {
        identity: WorkloadIdentity::from_pod_labels(
            workload,
            namespace_of(&pod.metadata.namespace),
            &labels,
        ),
        pod: name,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: service-c, namespace: demo}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 8080, targetPort: 8080}]
  selector: {app: service-c}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: service-c-abc
  namespace: demo
  labels: {kubernetes.io/service-name: service-c}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.77.0.4]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: service-c-v1-0, namespace: demo}
- addresses: [10.77.0.5]
  targetRef: {kind: Pod, name: service-c-v2-0}
- addresses: [10.77.0.6]
  conditions: {ready: false}
---
apiVersion: v1
kind: Pod
metadata:
  name: service-c-v1-0
  namespace: demo
  labels: {app: service-c, version: v1}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: service-c-v1-7d9f, uid: x, controller: true}]
status: {podIP: 10.77.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: service-c-v2-0, namespace: demo, labels: {app: service-c, version: v2}}
status: {podIP: 10.77.0.5}
"#;

    #[test]
    fn services_slices_and_pods_become_the_registry() {
        let loaded = config::load_str("objects.yml", OBJECTS);
        assert!(loaded.is_ok(), "{:?}", loaded.diagnostics);
        let (discovered, diagnostics) = discover(&loaded.other_objects);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let service = &discovered.registry.services[0];
        assert_eq!(
            (
                service.identity.name.as_str(),
                service.identity.namespace.as_str()
            ),
            ("service-c", "demo")
        );
        assert_eq!(
            service.ports,
            vec![ServicePort {
                port: 8080,
                target_port: 8080
            }]
        );
        // The not-ready endpoint is left out; labels come from the pods.
        let versions: Vec<_> = service
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.ip.to_string(),
                    e.labels.get("version").cloned(),
                    e.workload.as_ref().map(|w| w.workload.clone()),
                )
            })
            .collect();
        assert_eq!(
            versions,
            vec![
                (
                    "10.77.0.4".into(),
                    Some("v1".into()),
                    Some("service-c-v1".into())
                ),
                (
                    "10.77.0.5".into(),
                    Some("v2".into()),
                    Some("service-c-v2-0".into())
                ),
            ]
        );
        let target = discovered
            .service_at("10.96.0.30:8080".parse().unwrap())
            .unwrap();
        assert_eq!(target.service.host, "service-c.demo.svc.cluster.local");
        assert_eq!(target.protocol, Protocol::Http);
        let workload = discovered
            .workload_at("10.77.0.4".parse().unwrap())
            .unwrap();
        assert_eq!(
            (
                workload.identity.app.as_str(),
                workload.identity.version.as_str()
            ),
            ("service-c", "v1")
        );
        assert_eq!(workload.identity.workload, "service-c-v1");
    }

    #[test]
    fn a_malformed_object_names_its_field() {
        let loaded = config::load_str(
            "bad.yml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: http}]}\n",
        );
        let (_, diagnostics) = discover(&loaded.other_objects);
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        assert_eq!(diagnostics[0].object, "Service default/x");
        assert_eq!(diagnostics[0].field, "spec.ports[0].port");
    }
}
