//! Kubernetes `Service`, `EndpointSlice` and `Pod` objects → the engine's registry and the
//! lookups the proxy needs, kept up to date one object at a time.
//!
//! Endpoints come from `EndpointSlice`s (label `kubernetes.io/service-name`), ready ones only;
//! each endpoint's labels are those of the `Pod` its `targetRef` names (else the pod with its
//! address), which is what subsets select on. A slice whose pods are unknown still routes,
//! without labels.
//!
//! Incremental: a change to one object recomputes only what depends on it — a pod change, the
//! services whose slices point at that pod (by name or address); a slice change, its service;
//! a service change, itself. Every map is persistent, so cloning an [`Index`] (to try a change
//! and keep the old one if the change is refused) or handing its views to a snapshot is O(1).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use imbl::{HashMap, OrdMap, OrdSet};
use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    lookups::{Discovered, Protocol, ServiceTarget, Workload},
    membership,
};
use crate::{
    config::{Object, ObjectKey},
    engine::registry::{self, Endpoint, Registry, ServicePort},
    identity::{ServiceIdentity, WorkloadIdentity},
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// What Kubernetes runs a pod as when its spec names no service account.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// `namespace/name` of a namespaced object. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl Name {
    fn new(namespace: &str, name: &str) -> Name {
        Name {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn of(key: &ObjectKey) -> Name {
        Name {
            namespace: Arc::clone(&key.namespace),
            name: Arc::clone(&key.name),
        }
    }
}

/// A service as discovery keeps it: the object and the identity every view of it shares.
#[derive(Clone, Debug)]
struct ServiceEntry {
    object: Arc<Service>,
    identity: Arc<ServiceIdentity>,
}

/// A pod as discovery keeps it: its workload and the addresses it had when last seen.
#[derive(Clone, Debug)]
struct PodEntry {
    object: Arc<Pod>,
    workload: Arc<Workload>,
    ips: Arc<[IpAddr]>,
}

/// What discovery knows, and the reverse links that say what a change affects.
#[derive(Clone, Debug, Default)]
pub struct Index {
    services: OrdMap<Name, ServiceEntry>,
    slices: OrdMap<Name, Arc<EndpointSlice>>,
    pods: OrdMap<Name, PodEntry>,
    /// Namespace → its `sidecarless.io/mesh` label, for the namespaces whose objects discovery
    /// has (local mode's folder may hold them): whether its pods are in the mesh.
    namespace_mesh_labels: OrdMap<Arc<str>, Arc<str>>,
    /// Service → the slices labelled with its name.
    slices_of_service: HashMap<Name, OrdSet<Name>>,
    /// Pod → the slices whose endpoints name it in `targetRef`.
    slices_of_pod: HashMap<Name, OrdSet<Name>>,
    /// Address → the slices with an endpoint there.
    slices_of_ip: HashMap<IpAddr, OrdSet<Name>>,
    registry: OrdMap<Name, Arc<registry::Service>>,
    discovered: Discovered,
}

impl Index {
    /// The lookups in force, for a snapshot.
    pub fn discovered(&self) -> &Discovered {
        &self.discovered
    }

    /// The engine's registry, in name order.
    pub fn registry(&self) -> Registry {
        Registry {
            services: self.registry.values().cloned().collect(),
        }
    }

    /// Puts `object` (or, with `None`, its absence) in force for `key`. Objects of kinds
    /// discovery does not use are ignored. Returns whether the engine's registry changed.
    pub fn apply(&mut self, key: &ObjectKey, object: Option<&Object>) -> bool {
        let name = Name::of(key);
        let dirty = match (&*key.kind, object) {
            ("Service", object) => self.set_service(&name, service_of(object)),
            ("EndpointSlice", object) => self.set_slice(&name, slice_of(object)),
            ("Pod", object) => self.set_pod(&name, pod_of(object)),
            ("Namespace", object) => self.set_namespace(&key.name, object),
            _ => return false,
        };
        let mut changed = false;
        for service in dirty {
            changed |= self.rebuild(&service);
        }
        changed
    }

    fn set_service(&mut self, name: &Name, service: Option<Arc<Service>>) -> Vec<Name> {
        if let Some(old) = self.services.remove(name) {
            for address in service_addresses(&old.object) {
                self.discovered.services.remove(&address);
            }
        }
        if let Some(service) = service {
            let identity = Arc::new(ServiceIdentity::new(&*name.name, &*name.namespace));
            let spec = service.spec.clone().unwrap_or_default();
            for port in spec.ports.iter().flatten() {
                let Ok(number) = u16::try_from(port.port) else {
                    continue;
                };
                let protocol =
                    Protocol::from_port(port.app_protocol.as_deref(), port.name.as_deref());
                let authority: Arc<str> = format!("{}:{number}", identity.host).into();
                for ip in cluster_ips(&spec) {
                    self.discovered.services.insert(
                        SocketAddr::new(ip, number),
                        ServiceTarget {
                            service: Arc::clone(&identity),
                            port: number,
                            protocol,
                            authority: Arc::clone(&authority),
                        },
                    );
                }
            }
            self.services.insert(
                name.clone(),
                ServiceEntry {
                    object: service,
                    identity,
                },
            );
        }
        vec![name.clone()]
    }

    fn set_slice(&mut self, name: &Name, slice: Option<Arc<EndpointSlice>>) -> Vec<Name> {
        let mut dirty = Vec::new();
        if let Some(old) = self.slices.remove(name) {
            dirty.extend(self.link_slice(name, &old, false));
        }
        if let Some(slice) = slice {
            dirty.extend(self.link_slice(name, &slice, true));
            self.slices.insert(name.clone(), slice);
        }
        dirty
    }

    /// Adds (or removes) the reverse links of one slice; returns its service.
    fn link_slice(&mut self, name: &Name, slice: &EndpointSlice, add: bool) -> Option<Name> {
        fn link<K: std::hash::Hash + Eq + Clone>(
            map: &mut HashMap<K, OrdSet<Name>>,
            key: K,
            slice: &Name,
            add: bool,
        ) {
            let set = map.entry(key.clone()).or_default();
            if add {
                set.insert(slice.clone());
            } else {
                set.remove(slice);
                if set.is_empty() {
                    map.remove(&key);
                }
            }
        }
        for endpoint in &slice.endpoints {
            if let Some(pod) = endpoint.target_ref.as_ref().and_then(|target| {
                let namespace = target.namespace.as_deref().unwrap_or(&name.namespace);
                Some(Name::new(namespace, target.name.as_deref()?))
            }) {
                link(&mut self.slices_of_pod, pod, name, add);
            }
            for ip in endpoint.addresses.iter().filter_map(|a| a.parse().ok()) {
                link(&mut self.slices_of_ip, ip, name, add);
            }
        }
        let service = Name::new(&name.namespace, slice_service(&slice.metadata)?);
        link(&mut self.slices_of_service, service.clone(), name, add);
        Some(service)
    }

    fn set_pod(&mut self, name: &Name, pod: Option<Arc<Pod>>) -> Vec<Name> {
        let mut touched_ips = Vec::new();
        if let Some(old) = self.pods.remove(name) {
            for ip in old.ips.iter() {
                // Another pod may have the address by now (IPs are reused).
                if self
                    .discovered
                    .workloads
                    .get(ip)
                    .is_some_and(|w| Arc::ptr_eq(w, &old.workload))
                {
                    self.discovered.workloads.remove(ip);
                }
                touched_ips.push(*ip);
            }
            self.discovered.pods.remove(&pod_key(name));
        }
        let namespace_label = self.namespace_mesh_labels.get(&name.namespace).cloned();
        if let Some(entry) = pod.and_then(|pod| pod_entry(name, pod, namespace_label.as_deref())) {
            for ip in entry.ips.iter() {
                self.discovered
                    .workloads
                    .insert(*ip, Arc::clone(&entry.workload));
                touched_ips.push(*ip);
            }
            self.discovered
                .pods
                .insert(pod_key(name), Arc::clone(&entry.workload));
            self.pods.insert(name.clone(), entry);
        }
        let mut slices: OrdSet<Name> = self.slices_of_pod.get(name).cloned().unwrap_or_default();
        for ip in touched_ips {
            slices.extend(self.slices_of_ip.get(&ip).into_iter().flatten().cloned());
        }
        slices
            .iter()
            .filter_map(|slice| {
                let service = slice_service(&self.slices.get(slice)?.metadata)?;
                Some(Name::new(&slice.namespace, service))
            })
            .collect()
    }

    /// A namespace's mesh label changed: its pods are looked at again (whether they are in the
    /// mesh follows it, unless they carry the label themselves).
    fn set_namespace(&mut self, namespace: &Arc<str>, object: Option<&Object>) -> Vec<Name> {
        let label = object.and_then(namespace_mesh_label);
        let old = match &label {
            Some(label) => self
                .namespace_mesh_labels
                .insert(Arc::clone(namespace), Arc::clone(label)),
            None => self.namespace_mesh_labels.remove(namespace),
        };
        if old == label {
            return Vec::new();
        }
        let pods: Vec<(Name, Arc<Pod>)> = self
            .pods
            .iter()
            .filter(|(name, _)| name.namespace == *namespace)
            .map(|(name, entry)| (name.clone(), Arc::clone(&entry.object)))
            .collect();
        pods.into_iter()
            .flat_map(|(name, pod)| self.set_pod(&name, Some(pod)))
            .collect()
    }

    /// Recomputes one service's registry entry from its object, slices and pods. Returns
    /// whether it changed.
    fn rebuild(&mut self, name: &Name) -> bool {
        let Some(service) = self.services.get(name) else {
            let Some(gone) = self.registry.remove(name) else {
                return false;
            };
            self.discovered.unlink_endpoints(&gone);
            return true;
        };
        let slices: Vec<&EndpointSlice> = self
            .slices_of_service
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.get(slice).map(|s| &**s))
            .collect();
        let spec = service.object.spec.as_ref();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|port| {
                let number = u16::try_from(port.port).ok()?;
                let target_port =
                    target_port(port.name.as_deref(), &port.target_port, &slices).unwrap_or(number);
                Some(ServicePort {
                    port: number,
                    target_port,
                })
            })
            .collect();
        let mut endpoints = Vec::new();
        for slice in &slices {
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
                    let namespace = target.namespace.as_deref().unwrap_or(&name.namespace);
                    let pod = Name::new(namespace, target.name.as_deref()?);
                    self.pods.get(&pod).map(|p| &p.workload)
                });
                for ip in endpoint.addresses.iter().filter_map(|a| a.parse().ok()) {
                    let workload = workload.or_else(|| self.discovered.workloads.get(&ip));
                    endpoints.push(Endpoint {
                        ip,
                        labels: workload.map(|w| w.labels.clone()).unwrap_or_default(),
                        workload: workload.map(|w| Arc::clone(&w.identity)),
                    });
                }
            }
        }
        endpoints.sort_by_key(|e| e.ip);
        endpoints.dedup_by_key(|e| e.ip);
        let entry = registry::Service {
            identity: Arc::clone(&service.identity),
            ports,
            endpoints,
        };
        if self
            .registry
            .get(name)
            .is_some_and(|current| **current == entry)
        {
            return false;
        }
        if let Some(old) = self.registry.get(name) {
            self.discovered.unlink_endpoints(old);
        }
        self.discovered.link_endpoints(&entry);
        self.registry.insert(name.clone(), Arc::new(entry));
        true
    }
}

/// How [`Discovered::pod`] keys pods: `namespace/name`.
pub(super) fn pod_key(name: &Name) -> Arc<str> {
    format!("{}/{}", name.namespace, name.name).into()
}

fn service_of(object: Option<&Object>) -> Option<Arc<Service>> {
    match object? {
        Object::Service(service) => Some(Arc::clone(service)),
        _ => None,
    }
}

fn slice_of(object: Option<&Object>) -> Option<Arc<EndpointSlice>> {
    match object? {
        Object::EndpointSlice(slice) => Some(Arc::clone(slice)),
        _ => None,
    }
}

fn pod_of(object: Option<&Object>) -> Option<Arc<Pod>> {
    match object? {
        Object::Pod(pod) => Some(Arc::clone(pod)),
        _ => None,
    }
}

fn slice_service(metadata: &ObjectMeta) -> Option<&str> {
    metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(String::as_str)
}

/// Every `VIP:port` a service answers on.
fn service_addresses(service: &Service) -> Vec<SocketAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let ports: Vec<u16> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| u16::try_from(p.port).ok())
        .collect();
    cluster_ips(spec)
        .into_iter()
        .flat_map(|ip| ports.iter().map(move |&port| SocketAddr::new(ip, port)))
        .collect()
}

fn cluster_ips(spec: &ServiceSpec) -> Vec<IpAddr> {
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

/// The `sidecarless.io/mesh` label of a `Namespace` object (kept as it came: discovery reads
/// nothing else of it).
fn namespace_mesh_label(object: &Object) -> Option<Arc<str>> {
    let Object::Other(value) = object else {
        return None;
    };
    let label = value
        .pointer("/metadata/labels")?
        .get(membership::MESH_LABEL)?
        .as_str()?;
    Some(label.into())
}

fn pod_entry(name: &Name, object: Arc<Pod>, namespace_label: Option<&str>) -> Option<PodEntry> {
    let pod = &*object;
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
        None => name.name.to_string(),
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let ips = pod
        .status
        .iter()
        .flat_map(|status| {
            status
                .pod_ips
                .iter()
                .flatten()
                .map(|ip| ip.ip.as_str())
                .chain(status.pod_ip.as_deref())
        })
        .filter_map(|ip| ip.parse().ok())
        .collect::<Vec<IpAddr>>();
    let mut ips = ips;
    ips.sort();
    ips.dedup();
    Some(PodEntry {
        workload: Arc::new(Workload {
            identity: Arc::new(WorkloadIdentity::from_pod_labels(
                workload,
                &*name.namespace,
                &labels,
            )),
            pod: name.name.to_string(),
            // Kubernetes mode does not feed Namespace objects to discovery (yet): there, the
            // pod's own label decides.
            in_mesh: membership::in_mesh(membership::pod_mesh_label(pod), namespace_label),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|spec| spec.service_account_name.clone())
                .filter(|account| !account.is_empty())
                .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned()),
            labels,
        }),
        ips: ips.into(),
        object,
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

    /// An index of `text`'s objects, applied one at a time in the order given.
    fn index(text: &str) -> Index {
        let mut index = Index::default();
        for document in config::documents("objects.yml", text).unwrap() {
            let sourced = config::read("objects.yml", document).unwrap();
            index.apply(&sourced.key, Some(&sourced.object));
        }
        index
    }

    fn versions(index: &Index) -> Vec<(String, Option<String>, Option<String>)> {
        let registry = index.registry();
        registry.services[0]
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.ip.to_string(),
                    e.labels.get("version").cloned(),
                    e.workload.as_ref().map(|w| w.workload.clone()),
                )
            })
            .collect()
    }

    fn key(kind: &str, name: &str) -> ObjectKey {
        ObjectKey::new(kind, Some("demo"), name)
    }

    #[test]
    fn services_slices_and_pods_become_the_registry_in_any_order() {
        let index = index(OBJECTS);
        let registry = index.registry();
        let service = &registry.services[0];
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
        let want = vec![
            (
                "10.77.0.4".to_owned(),
                Some("v1".to_owned()),
                Some("service-c-v1".to_owned()),
            ),
            (
                "10.77.0.5".to_owned(),
                Some("v2".to_owned()),
                Some("service-c-v2-0".to_owned()),
            ),
        ];
        assert_eq!(versions(&index), want);
        let discovered = index.discovered();
        let target = discovered
            .service_at("10.96.0.30:8080".parse().unwrap())
            .unwrap();
        assert_eq!(target.service.host, "service-c.demo.svc.cluster.local");
        assert_eq!(target.protocol, Protocol::Http);
        let workload = discovered
            .workload_at("10.77.0.4".parse().unwrap())
            .unwrap();
        assert_eq!(workload.identity.workload, "service-c-v1");
        assert_eq!(
            discovered.pod("demo", "service-c-v2-0").unwrap().pod,
            "service-c-v2-0"
        );

        // Pods first, then the slice, then the service: the same registry.
        let documents: Vec<&str> = OBJECTS.split("---").collect();
        let reversed = documents
            .iter()
            .rev()
            .copied()
            .collect::<Vec<_>>()
            .join("---");
        assert_eq!(versions(&self::index(&reversed)), want);
    }

    #[test]
    fn a_pod_change_reaches_the_services_that_point_at_it_and_only_those() {
        let mut index = index(OBJECTS);
        let before = index.registry();
        let moved = "apiVersion: v1\nkind: Pod\nmetadata: {name: service-c-v2-0, namespace: demo, \
                     labels: {app: service-c, version: v3}}\nstatus: {podIP: 10.77.0.5}\n";
        let document = config::documents("pod.yml", moved).unwrap().remove(0);
        let pod = config::read("pod.yml", document).unwrap();
        assert!(
            index.apply(&pod.key, Some(&pod.object)),
            "subsets see the label"
        );
        assert_eq!(versions(&index)[1].1.as_deref(), Some("v3"));
        assert!(!Arc::ptr_eq(
            &before.services[0],
            &index.registry().services[0]
        ));

        // A pod that no slice names changes no service.
        let stranger = "apiVersion: v1\nkind: Pod\nmetadata: {name: other, namespace: demo}\n\
                        status: {podIP: 10.77.0.99}\n";
        let document = config::documents("pod.yml", stranger).unwrap().remove(0);
        let pod = config::read("pod.yml", document).unwrap();
        assert!(!index.apply(&pod.key, Some(&pod.object)));
        assert!(index
            .discovered()
            .workload_at("10.77.0.99".parse().unwrap())
            .is_some());

        // A deleted pod leaves its endpoint without labels; a deleted slice, no endpoints.
        assert!(index.apply(&key("Pod", "service-c-v1-0"), None));
        assert_eq!(versions(&index)[0].1, None);
        assert!(index
            .discovered()
            .workload_at("10.77.0.4".parse().unwrap())
            .is_none());
        assert!(index.apply(&key("EndpointSlice", "service-c-abc"), None));
        assert!(index.registry().services[0].endpoints.is_empty());
        assert!(index.apply(&key("Service", "service-c"), None));
        assert!(index.registry().services.is_empty());
        assert!(index
            .discovered()
            .service_at("10.96.0.30:8080".parse().unwrap())
            .is_none());
    }

    #[test]
    fn an_endpoint_names_its_one_service_for_the_destination() {
        let mut index = index(OBJECTS);
        let at = |index: &Index, addr: &str| {
            index
                .discovered()
                .service_of_endpoint(addr.parse().unwrap())
                .map(|s| s.name.clone())
        };
        assert_eq!(at(&index, "10.77.0.4:8080").as_deref(), Some("service-c"));
        assert_eq!(at(&index, "10.77.0.4:9090"), None, "another port");
        assert_eq!(at(&index, "10.77.0.6:8080"), None, "not ready");
        // A second service with the same endpoint, and as many: the shorter name.
        let twin = OBJECTS
            .split("---")
            .take(2)
            .collect::<Vec<_>>()
            .join("---")
            .replace("service-c", "service-twin")
            .replace("10.96.0.30", "10.96.0.31");
        for document in config::documents("twin.yml", &twin).unwrap() {
            let sourced = config::read("twin.yml", document).unwrap();
            index.apply(&sourced.key, Some(&sourced.object));
        }
        assert_eq!(at(&index, "10.77.0.4:8080").as_deref(), Some("service-c"));
        assert!(index.apply(&key("Service", "service-twin"), None));
        assert_eq!(at(&index, "10.77.0.4:8080").as_deref(), Some("service-c"));
        // The endpoint leaves the service: named by none.
        assert!(index.apply(&key("EndpointSlice", "service-c-abc"), None));
        assert_eq!(at(&index, "10.77.0.4:8080"), None);
    }

    #[test]
    fn a_clone_is_untouched_by_later_changes() {
        let mut index = index(OBJECTS);
        let kept = index.clone();
        index.apply(&key("Service", "service-c"), None);
        assert_eq!(kept.registry().services.len(), 1);
        assert!(kept
            .discovered()
            .service_at("10.96.0.30:8080".parse().unwrap())
            .is_some());
    }

    #[test]
    fn a_pod_is_in_the_mesh_by_its_label_or_its_namespaces_and_runs_as_its_service_account() {
        let pods = "\
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: shop}
status: {podIP: 10.77.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, labels: {sidecarless.io/mesh: disabled}}
spec: {serviceAccountName: web}
status: {podIP: 10.77.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-in, namespace: other, labels: {sidecarless.io/mesh: enabled}}
status: {podIP: 10.77.1.4}
";
        let in_mesh = |index: &Index, namespace: &str, pod: &str| {
            let workload = index.discovered().pod(namespace, pod).expect("the pod");
            workload.in_mesh
        };
        let mut index = index(pods);
        assert!(!in_mesh(&index, "shop", "plain"));
        assert!(in_mesh(&index, "other", "opted-in"));
        let opted_out = index.discovered().pod("shop", "opted-out").unwrap();
        assert_eq!(opted_out.service_account, "web");
        let plain = index.discovered().pod("shop", "plain").unwrap();
        assert_eq!(plain.service_account, DEFAULT_SERVICE_ACCOUNT);

        let namespace = "apiVersion: v1\nkind: Namespace\n\
                         metadata: {name: shop, labels: {sidecarless.io/mesh: enabled}}\n";
        let document = config::documents("ns.yml", namespace).unwrap().remove(0);
        let sourced = config::read("ns.yml", document).unwrap();
        index.apply(&sourced.key, Some(&sourced.object));
        assert!(
            in_mesh(&index, "shop", "plain"),
            "the namespace brings it in"
        );
        assert!(
            !in_mesh(&index, "shop", "opted-out"),
            "the pod's own label wins"
        );
        let at_ip = index.discovered().workload_at("10.77.1.2".parse().unwrap());
        assert!(at_ip.unwrap().in_mesh, "looked up by address too");

        index.apply(&sourced.key, None);
        assert!(
            !in_mesh(&index, "shop", "plain"),
            "the namespace's label is gone"
        );
    }
}
