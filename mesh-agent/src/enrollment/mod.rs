//! Enrolled pods. For each: a listener the agent opens inside the pod's own network namespace,
//! then the kernel enrollment that sends the pod's connections to it. Every source of
//! enrollment (command-line flags, the admin API, Kubernetes labels: [`by_label`]) goes
//! through here.
//!
//! This is the accept layer: it asks the redirect where each accepted connection was going and
//! hands (stream, original destination, pod) to the proxy.
//!
//! On a restart the pods, their listeners and namespaces go to the successor
//! (`crate::handover`): it serves the very same listening sockets, so no connection waiting to
//! be accepted is lost, and the kernel never finds a pod without its listener.

pub mod by_label;

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

use mesh_common::PlaintextInbound;

use crate::{
    authorization::MtlsMode,
    config::DEFAULT_NAMESPACE,
    handover::{self, Handed},
    hbone::{self, Hbone, InboundPod, Source, TunnelClient},
    inbound::{
        self,
        plaintext::{self, PlaintextPod},
    },
    proxy::{upstream::Dialer, PodContext, Proxy},
    redirect::{addresses, capture::PlaintextPolicy, netns::NetNs, Redirect, RedirectError},
    state::Snapshot,
};

#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("pod {pod}: cannot open network namespace {path}: {source}")]
    Netns {
        pod: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("pod {pod}: cannot listen on {listen} inside its network namespace {path}: {source}")]
    Listen {
        pod: String,
        listen: SocketAddrV4,
        path: PathBuf,
        source: io::Error,
    },
    #[error("pod {pod}: its network namespace is already enrolled as pod {existing}")]
    AlreadyEnrolled { pod: String, existing: String },
    #[error("pod {0} is not enrolled")]
    NotEnrolled(String),
    #[error(
        "pod {0}: enrollment is paused while a new agent takes over from this one; the new \
         agent serves it"
    )]
    HandingOver(String),
    #[error(transparent)]
    Kernel(#[from] RedirectError),
}

/// A pod to enroll: a name, its Kubernetes namespace and its network namespace.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    /// Short service names in its requests resolve against this namespace.
    pub namespace: String,
    pub netns: PathBuf,
}

impl PodSpec {
    /// `namespace/name`: how enrolled pods are told apart.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Parses `NAME=PATH`, or a bare netns name (`/var/run/netns/NAME`) or path (named after
    /// its last component, e.g. `/proc/123/ns/net` → `123`).
    pub fn parse(spec: &str) -> Result<PodSpec, String> {
        if let Some((name, path)) = spec.split_once('=') {
            if name.is_empty() || path.is_empty() {
                return Err(format!("expected NAME=NETNS_PATH, got {spec:?}"));
            }
            return Ok(PodSpec {
                name: name.to_owned(),
                namespace: DEFAULT_NAMESPACE.to_owned(),
                netns: PathBuf::from(path),
            });
        }
        if spec.contains('/') {
            let path = Path::new(spec);
            let name = path
                .components()
                .rev()
                .map(|c| c.as_os_str().to_string_lossy())
                .find(|c| c != "net" && c != "ns")
                .ok_or_else(|| format!("cannot name a pod after {spec:?}; use NAME=PATH"))?;
            return Ok(PodSpec {
                name: name.into_owned(),
                namespace: DEFAULT_NAMESPACE.to_owned(),
                netns: path.to_path_buf(),
            });
        }
        Ok(PodSpec {
            name: spec.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            netns: Path::new("/var/run/netns").join(spec),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrolledPod {
    pub name: String,
    pub namespace: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
}

struct Entry {
    pod: EnrolledPod,
    accept_loop: JoinHandle<()>,
    /// The pod's tunnel listener (port 15008) and its accept loop, when the agent tunnels.
    tunnel: Option<(OwnedFd, JoinHandle<()>)>,
    /// The pod's inbound listener and its accept loop, when what arrives at it is captured.
    inbound: Option<(OwnedFd, JoinHandle<()>)>,
    /// A second descriptor of the pod's listener (the accept loop owns the first), for a
    /// successor.
    listener: OwnedFd,
    netns: Arc<NetNs>,
}

/// A pod the predecessor had enrolled: its listener and network namespace, waiting for this
/// agent to serve them.
pub struct InheritedPod {
    pod: EnrolledPod,
    netns: NetNs,
    listener: std::net::TcpListener,
    /// Its tunnel listener, if the predecessor ran one.
    tunnel_listener: Option<std::net::TcpListener>,
    /// Its inbound listener, if the predecessor captured what arrives at it.
    inbound_listener: Option<std::net::TcpListener>,
}

impl InheritedPod {
    /// The pod of a handover entry `pod/<namespace>/<name>`.
    pub fn from_handed(handed: Handed) -> Result<InheritedPod, String> {
        let pod: EnrolledPod = serde_json::from_value(handed.info)
            .map_err(|error| format!("{}: {error}", handed.name))?;
        let [listener, netns]: [OwnedFd; 2] = handed
            .fds
            .try_into()
            .map_err(|_| format!("{}: expected a listener and a namespace", handed.name))?;
        let netns = NetNs::from_fd(netns, pod.netns.clone())
            .map_err(|error| format!("{}: {error}", handed.name))?;
        Ok(InheritedPod {
            pod,
            netns,
            listener: std::net::TcpListener::from(listener),
            tunnel_listener: None,
            inbound_listener: None,
        })
    }

    /// `namespace/name`, as its handover entries name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.pod.namespace, self.pod.name)
    }

    /// Its tunnel listener, from the entry `tunnel/<namespace>/<name>`.
    pub fn set_tunnel_listener(&mut self, handed: Handed) -> Result<(), String> {
        let [listener]: [OwnedFd; 1] = handed
            .fds
            .try_into()
            .map_err(|_| format!("{}: expected one listener", handed.name))?;
        self.tunnel_listener = Some(std::net::TcpListener::from(listener));
        Ok(())
    }

    /// Its inbound listener, from the entry `inbound/<namespace>/<name>`.
    pub fn set_inbound_listener(&mut self, handed: Handed) -> Result<(), String> {
        let [listener]: [OwnedFd; 1] = handed
            .fds
            .try_into()
            .map_err(|_| format!("{}: expected one listener", handed.name))?;
        self.inbound_listener = Some(std::net::TcpListener::from(listener));
        Ok(())
    }
}

pub struct Enrollments {
    redirect: Arc<Redirect>,
    proxy: Arc<Proxy>,
    listen: SocketAddrV4,
    /// The data-path runtime: accept loops run there whoever asks to enroll.
    runtime: tokio::runtime::Handle,
    pods: Mutex<BTreeMap<String, Entry>>,
    /// The predecessor's pods not served yet, by netns cookie.
    inherited: Mutex<BTreeMap<u64, InheritedPod>>,
    /// Set (under the `pods` lock) while a successor holds the pods as they were: nothing is
    /// enrolled or unenrolled then.
    frozen: AtomicBool,
    /// `mesh_enrolled_pods`: how many `pods` holds.
    enrolled: Gauge,
    /// The tunnel between agents: each pod gets a listener on port 15008 and its upstream
    /// connections to pods in the mesh go through tunnels. `None`: plaintext only.
    hbone: Option<Arc<Hbone>>,
}

impl Enrollments {
    /// Registers `enrolled_pods` on `registry` (the agent's `mesh` sub-registry).
    pub fn new(
        redirect: Arc<Redirect>,
        proxy: Arc<Proxy>,
        listen: SocketAddrV4,
        runtime: tokio::runtime::Handle,
        registry: &mut Registry,
    ) -> Self {
        let enrolled = Gauge::default();
        registry.register(
            "enrolled_pods",
            "Pods whose connections the agent currently intercepts",
            enrolled.clone(),
        );
        Enrollments {
            redirect,
            proxy,
            listen,
            runtime,
            pods: Mutex::new(BTreeMap::new()),
            inherited: Mutex::new(BTreeMap::new()),
            frozen: AtomicBool::new(false),
            enrolled,
            hbone: None,
        }
    }

    /// Pods get tunnels (see the field).
    pub fn with_hbone(mut self, hbone: Option<Arc<Hbone>>) -> Self {
        self.hbone = hbone;
        self
    }

    /// The predecessor's pods: each is served with its own listener when it is enrolled
    /// (by [`Self::enroll`], or all at once by [`Self::adopt_inherited`]).
    pub fn inherit(&self, pods: Vec<InheritedPod>) {
        let mut inherited = self.inherited.lock().expect("inherited pods lock");
        for pod in pods {
            inherited.insert(pod.pod.netns_cookie, pod);
        }
    }

    /// Enrolls every inherited pod not enrolled yet, as the predecessor had it. Returns how
    /// many.
    pub fn adopt_inherited(&self) -> usize {
        let inherited = std::mem::take(&mut *self.inherited.lock().expect("inherited pods lock"));
        let mut adopted = 0;
        for (cookie, pod) in inherited {
            let spec = PodSpec {
                name: pod.pod.name,
                namespace: pod.pod.namespace,
                netns: pod.pod.netns,
            };
            let listeners = Listeners {
                proxy: Some(pod.listener),
                tunnel: pod.tunnel_listener,
                inbound: pod.inbound_listener,
            };
            match self.install(&spec, pod.netns, cookie, listeners) {
                Ok(_) => adopted += 1,
                Err(error) => warn!(pod = %spec.key(), %error, "cannot serve an inherited pod"),
            }
        }
        adopted
    }

    /// Stops serving every pod without touching the redirect: a successor serves them now.
    /// Nothing can be enrolled afterwards.
    pub fn hand_over(&self) {
        let pods = {
            let mut pods = self.pods.lock().expect("enrollments lock");
            self.frozen.store(true, Ordering::Relaxed);
            std::mem::take(&mut *pods)
        };
        self.enrolled.set(0);
        for entry in pods.into_values() {
            entry.stop_serving();
        }
    }

    fn count(&self, pods: &BTreeMap<String, Entry>) {
        self.enrolled
            .set(i64::try_from(pods.len()).unwrap_or(i64::MAX));
    }

    /// Enrolls a pod, or re-enrolls it if its namespace changed.
    pub fn enroll(&self, spec: &PodSpec) -> Result<EnrolledPod, EnrollError> {
        let netns = NetNs::open(&spec.netns).map_err(|source| EnrollError::Netns {
            pod: spec.name.clone(),
            path: spec.netns.clone(),
            source,
        })?;
        let cookie = netns.cookie().map_err(|source| EnrollError::Netns {
            pod: spec.name.clone(),
            path: spec.netns.clone(),
            source,
        })?;
        let inherited = self
            .inherited
            .lock()
            .expect("inherited pods lock")
            .remove(&cookie)
            .map(|pod| Listeners {
                proxy: Some(pod.listener),
                tunnel: pod.tunnel_listener,
                inbound: pod.inbound_listener,
            })
            .unwrap_or_default();
        self.install(spec, netns, cookie, inherited)
    }

    /// Enrolls `spec` in `netns` (whose cookie is `cookie`), serving `inherited` (the
    /// predecessor's listeners there) if given, else listeners of its own.
    fn install(
        &self,
        spec: &PodSpec,
        netns: NetNs,
        cookie: u64,
        inherited: Listeners,
    ) -> Result<EnrolledPod, EnrollError> {
        let _runtime = self.runtime.enter();
        let mut pods = self.pods.lock().expect("enrollments lock");
        if self.frozen.load(Ordering::Relaxed) {
            return Err(EnrollError::HandingOver(spec.key()));
        }
        if let Some(existing) = pods.values().find(|e| e.pod.netns_cookie == cookie) {
            if existing.pod.name == spec.name && existing.pod.namespace == spec.namespace {
                return Ok(existing.pod.clone());
            }
            return Err(EnrollError::AlreadyEnrolled {
                pod: spec.name.clone(),
                existing: existing.pod.name.clone(),
            });
        }
        if let Some(old) = pods.remove(&spec.key()) {
            self.release(old, Leaving::Pod)?;
        }
        let listen_error = |source| EnrollError::Listen {
            pod: spec.name.clone(),
            listen: self.listen,
            path: spec.netns.clone(),
            source,
        };
        // Listener first: the kernel only redirects to a listener that exists. An inherited
        // one exists already, and has all along.
        let listener = match inherited.proxy {
            Some(listener) if listener.local_addr().ok() == Some(SocketAddr::V4(self.listen)) => {
                listener
            }
            _ => listen_in(&netns, self.listen).map_err(listen_error)?,
        };
        let listen_at = |address: SocketAddrV4, inherited: Option<std::net::TcpListener>| {
            served_listener(&netns, address, inherited).map_err(|source| EnrollError::Listen {
                pod: spec.name.clone(),
                listen: address,
                path: spec.netns.clone(),
                source,
            })
        };
        let tunnel_listener = match &self.hbone {
            Some(_) => Some(listen_at(TUNNEL_LISTEN, inherited.tunnel)?),
            None => None,
        };
        let inbound_listener = match (&self.hbone, self.redirect.capture()) {
            (Some(_), Some(_)) => Some(listen_at(INBOUND_LISTEN, inherited.inbound)?),
            _ => None,
        };
        let listener_copy = listener.try_clone().map_err(listen_error)?.into();
        listener.set_nonblocking(true).map_err(listen_error)?;
        let listener = TcpListener::from_std(listener).map_err(listen_error)?;
        let pod = EnrolledPod {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            netns: spec.netns.clone(),
            netns_cookie: cookie,
        };
        let netns = Arc::new(netns);
        let mut context = PodContext::new(
            spec.name.clone(),
            spec.namespace.clone(),
            Some(Arc::clone(&netns)),
            self.redirect.exemption(),
        );
        let mut tunnel = None;
        if let (Some(hbone), Some((copy, listener))) = (&self.hbone, tunnel_listener) {
            context = context.with_tunnel(Arc::new(TunnelClient::new(
                Arc::clone(hbone),
                Source::Pod {
                    namespace: spec.namespace.clone(),
                    name: spec.name.clone(),
                },
            )));
            let pod = InboundPod {
                name: spec.name.clone(),
                namespace: spec.namespace.clone(),
                netns: Some(Arc::clone(&netns)),
                exemption: self.redirect.exemption(),
            };
            let serving = self.runtime.spawn(hbone::serve_inbound(
                Arc::clone(hbone),
                listener,
                pod,
                self.proxy.drain().clone(),
            ));
            tunnel = Some((copy, serving));
        }
        let mut inbound = None;
        if let (Some(hbone), Some((copy, listener))) = (&self.hbone, inbound_listener) {
            let pod = PlaintextPod {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                dialer: Dialer::new(Some(Arc::clone(&netns)), self.redirect.exemption()),
                limits: *hbone.limits(),
                store: Arc::clone(hbone.store()),
                metrics: Arc::clone(&hbone.telemetry().metrics),
            };
            let serving =
                self.runtime
                    .spawn(plaintext::serve(listener, pod, self.proxy.drain().clone()));
            inbound = Some((copy, serving));
        }
        let context = Arc::new(context);
        let accept_loop = self.runtime.spawn(accept(
            Arc::clone(&self.proxy),
            Arc::clone(&self.redirect),
            listener,
            context,
            cookie,
        ));
        let entry = Entry {
            pod: pod.clone(),
            accept_loop,
            tunnel,
            inbound,
            listener: listener_copy,
            netns,
        };
        if let Err(error) = self.redirect.enroll(&entry.netns, cookie, self.listen) {
            entry.stop_serving();
            return Err(error.into());
        }
        if let Err(error) = self.capture(&entry) {
            let _ = self.release(entry, Leaving::Pod);
            return Err(error);
        }
        info!(pod = %pod.name, netns = %pod.netns.display(), cookie, "enrolled");
        pods.insert(spec.key(), entry);
        self.count(&pods);
        Ok(pod)
    }

    /// New connections from the pod go direct again; connections in flight finish.
    /// Unenrolls `namespace/name` (a bare name means the `default` namespace).
    pub fn unenroll(&self, pod: &str) -> Result<(), EnrollError> {
        let key = if pod.contains('/') {
            pod.to_owned()
        } else {
            format!("{DEFAULT_NAMESPACE}/{pod}")
        };
        let entry = {
            let mut pods = self.pods.lock().expect("enrollments lock");
            if self.frozen.load(Ordering::Relaxed) {
                return Err(EnrollError::HandingOver(key));
            }
            let entry = pods.remove(&key);
            self.count(&pods);
            entry.ok_or_else(|| EnrollError::NotEnrolled(key.clone()))?
        };
        self.release(entry, Leaving::Pod)?;
        self.forget_unused_identities();
        info!(pod = key, "unenrolled");
        Ok(())
    }

    /// The agent is leaving: new connections from every pod go direct, and plaintext arriving
    /// at them meets its fail mode (see [`Leaving::Agent`]).
    pub fn unenroll_all(&self) {
        let pods = std::mem::take(&mut *self.pods.lock().expect("enrollments lock"));
        self.enrolled.set(0);
        for (name, entry) in pods {
            if let Err(error) = self.release(entry, Leaving::Agent) {
                tracing::warn!(pod = %name, %error, "unenroll failed");
            }
        }
        self.forget_unused_identities();
    }

    pub fn list(&self) -> Vec<EnrolledPod> {
        let pods = self.pods.lock().expect("enrollments lock");
        pods.values().map(|e| e.pod.clone()).collect()
    }

    fn release(&self, entry: Entry, leaving: Leaving) -> Result<(), EnrollError> {
        // Kernel first, so no new connection is sent to a listener about to close.
        self.redirect.unenroll(entry.pod.netns_cookie)?;
        if let (Leaving::Pod, Some(capture)) = (leaving, self.redirect.capture()) {
            capture.release(entry.pod.netns_cookie)?;
        }
        entry.stop_serving();
        Ok(())
    }

    /// Captures what arrives at the pod of `entry`, if it has an inbound listener: the kernel
    /// hands it over, or refuses plaintext where its PeerAuthentication is STRICT.
    fn capture(&self, entry: &Entry) -> Result<(), EnrollError> {
        let (Some(capture), Some((listener, _)), Some(hbone)) =
            (self.redirect.capture(), &entry.inbound, &self.hbone)
        else {
            return Ok(());
        };
        let pod = &entry.pod;
        let addresses = entry
            .netns
            .run(addresses::own_addresses)
            .map_err(|source| EnrollError::Netns {
                pod: pod.name.clone(),
                path: pod.netns.clone(),
                source,
            })?;
        let policy = plaintext_policy(&hbone.store().snapshot(), &pod.namespace, &pod.name);
        capture.capture(
            &entry.netns,
            pod.netns_cookie,
            &addresses,
            listener.as_fd(),
            &policy,
        )?;
        Ok(())
    }

    /// Every pod to serve is enrolled: the captures of pods that left the mesh while no agent
    /// ran go.
    pub fn prune_captures(&self) {
        if let Some(capture) = self.redirect.capture() {
            let _pods = self.pods.lock().expect("enrollments lock");
            capture.prune_unclaimed();
        }
    }

    /// Puts the pods' PeerAuthentication modes, as they are now, in the kernel.
    pub fn update_capture(&self) {
        let (Some(capture), Some(hbone)) = (self.redirect.capture(), &self.hbone) else {
            return;
        };
        let snapshot = hbone.store().snapshot();
        let pods = self.pods.lock().expect("enrollments lock");
        for entry in pods.values() {
            let pod = &entry.pod;
            let policy = plaintext_policy(&snapshot, &pod.namespace, &pod.name);
            if let Err(error) = capture.set_policy(pod.netns_cookie, &policy) {
                warn!(pod = %pod.name, %error, "cannot update what plaintext meets");
            }
        }
    }

    /// Certificates of identities no enrolled pod has any more are let go.
    fn forget_unused_identities(&self) {
        if let Some(hbone) = &self.hbone {
            let pods = self.pods.lock().expect("enrollments lock");
            hbone.forget_unused_identities(
                pods.values()
                    .map(|entry| (entry.pod.namespace.as_str(), entry.pod.name.as_str())),
            );
        }
    }
}

/// Where each pod's tunnel listener is, inside the pod: every address of the pod (a pod's
/// namespace holds its own addresses only), HBONE's port.
const TUNNEL_LISTEN: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, hbone::PORT);

/// Where each pod's inbound listener is, inside the pod: the kernel's capture hands it what
/// arrives at the pod's addresses (a listener need not be bound to an address to be handed
/// connections for it). Istio's inbound port.
const INBOUND_LISTEN: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, INBOUND_PORT);
const INBOUND_PORT: u16 = 15006;

/// Why a pod's entry goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaving {
    /// The pod leaves the mesh: everything of it goes, its capture too.
    Pod,
    /// The agent shuts down (and may be back): the capture's pinned program stays, so plaintext
    /// to STRICT ports stays refused, the rest reaches the app directly.
    Agent,
}

/// What plaintext to pod `namespace/name` meets, from its PeerAuthentication.
fn plaintext_policy(snapshot: &Snapshot, namespace: &str, name: &str) -> PlaintextPolicy {
    let modes = snapshot
        .peer_authentication
        .for_workload(namespace, inbound::pod_labels(snapshot, namespace, name));
    let kernel = |mode| match mode {
        MtlsMode::Strict => PlaintextInbound::Refuse,
        MtlsMode::Permissive | MtlsMode::Disable => PlaintextInbound::Capture,
    };
    PlaintextPolicy {
        default: kernel(modes.default),
        ports: modes
            .ports
            .iter()
            .map(|(port, mode)| (*port, kernel(*mode)))
            .collect(),
    }
}

impl Entry {
    fn stop_serving(self) {
        self.accept_loop.abort();
        for (_, serving) in self.tunnel.into_iter().chain(self.inbound) {
            serving.abort();
        }
    }
}

/// A pod's listeners a predecessor handed over.
#[derive(Default)]
struct Listeners {
    proxy: Option<std::net::TcpListener>,
    tunnel: Option<std::net::TcpListener>,
    inbound: Option<std::net::TcpListener>,
}

/// The listener at `address` inside `netns`: `inherited` if it is bound there, else a new
/// one; with a second descriptor of it, for a successor.
fn served_listener(
    netns: &NetNs,
    address: SocketAddrV4,
    inherited: Option<std::net::TcpListener>,
) -> io::Result<(OwnedFd, TcpListener)> {
    let listener = match inherited {
        Some(listener) if listener.local_addr().ok() == Some(SocketAddr::V4(address)) => listener,
        _ => listen_in(netns, address)?,
    };
    let copy = listener.try_clone()?.into();
    listener.set_nonblocking(true)?;
    Ok((copy, TcpListener::from_std(listener)?))
}

/// Opens a listening socket at `addr` inside `netns`.
fn listen_in(netns: &NetNs, addr: SocketAddrV4) -> io::Result<std::net::TcpListener> {
    netns.run(|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::V4(addr).into())?;
        socket.listen(1024)?;
        Ok(std::net::TcpListener::from(socket))
    })
}

/// A successor gets every enrolled pod: its listener, then its network namespace.
impl handover::Source for Enrollments {
    fn handed(&self) -> io::Result<Vec<Handed>> {
        let pods = self.pods.lock().expect("enrollments lock");
        self.frozen.store(true, Ordering::Relaxed);
        let mut handed = Vec::new();
        for (key, entry) in pods.iter() {
            handed.push(Handed::new(
                format!("{}{key}", handover::names::POD),
                serde_json::to_value(&entry.pod).map_err(io::Error::other)?,
                vec![
                    entry.listener.try_clone()?,
                    entry.netns.as_fd().try_clone_to_owned()?,
                ],
            ));
            if let Some((listener, _)) = &entry.tunnel {
                handed.push(Handed::new(
                    format!("{}{key}", handover::names::POD_TUNNEL),
                    serde_json::Value::Null,
                    vec![listener.try_clone()?],
                ));
            }
            if let Some((listener, _)) = &entry.inbound {
                handed.push(Handed::new(
                    format!("{}{key}", handover::names::POD_INBOUND),
                    serde_json::Value::Null,
                    vec![listener.try_clone()?],
                ));
            }
        }
        Ok(handed)
    }

    fn thaw(&self) {
        let _pods = self.pods.lock().expect("enrollments lock");
        self.frozen.store(false, Ordering::Relaxed);
    }
}

/// Accepts the pod's redirected connections until the task is aborted (unenroll) or accepting
/// stops (drain, handover), and hands each to the proxy with where it was going.
async fn accept(
    proxy: Arc<Proxy>,
    redirect: Arc<Redirect>,
    listener: TcpListener,
    pod: Arc<PodContext>,
    netns_cookie: u64,
) {
    let mut acceptor = proxy.acceptor(listener, &pod.name);
    let mut gate = proxy.drain().accept_gate();
    while let Some((stream, peer)) = gate.admit(acceptor.accept()).await {
        let Some(original) = redirect.original_dst(&stream, netns_cookie, peer.port()) else {
            // Someone dialled the listener directly: there is nowhere known to forward to.
            debug!(pod = %pod.name, %peer, "connection without an original destination");
            continue;
        };
        proxy.serve(stream, original, Arc::clone(&pod));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_specs() {
        let named = PodSpec::parse("client=/proc/42/ns/net").unwrap();
        assert_eq!(
            (named.name.as_str(), named.netns.as_path()),
            ("client", Path::new("/proc/42/ns/net"))
        );
        let bare = PodSpec::parse("mn-pod").unwrap();
        assert_eq!(bare.netns, Path::new("/var/run/netns/mn-pod"));
        assert_eq!(PodSpec::parse("/proc/42/ns/net").unwrap().name, "42");
        assert!(PodSpec::parse("=x").is_err());
    }
}
