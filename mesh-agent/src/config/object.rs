//! One object of the agent's input, typed once when it is read and never parsed again: Istio's
//! `VirtualService`, `DestinationRule`, `Gateway`, `AuthorizationPolicy` and
//! `PeerAuthentication` (validated into [`model`](super::model)),
//! Kubernetes' `Service`, `EndpointSlice` and `Pod` (as k8s-openapi types), the other kinds of
//! Istio's API groups as read with a warning that they are not enforced, and any other kind as
//! read (kept for `get` and `/config_dump`, interpreted by nothing).
//!
//! Objects are identified as Kubernetes does, by kind, namespace and name ([`ObjectKey`]); an
//! [`ObjectSet`] holds them. The set is a persistent map: cloning it is O(1) and a change copies
//! only the path to the changed entry, so a snapshot can keep the set it was built from.

use std::{fmt, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::{de::DeserializeOwned, Serialize, Serializer};
use serde_json::{Map, Value};

use super::{
    authorization_policy, destination_rule,
    diagnostic::{Diagnostic, ObjectContext, Severity},
    document::Document,
    fields::MISSING,
    gateway,
    gateway_api::{self, grpc_route, http_route},
    model::{
        AuthorizationPolicy, DestinationRule, Gateway, GatewayApiRoute, ObjectRef,
        PeerAuthentication, VirtualService,
    },
    peer_authentication, raw,
    virtual_service::{self, DestinationRef},
};

/// Every object in force, by identity.
pub type ObjectSet = imbl::OrdMap<ObjectKey, Arc<Sourced>>;

const ISTIO_GROUP: &str = "networking.istio.io";
const SECURITY_GROUP: &str = "security.istio.io";
/// Istio's API groups: a kind of these that the mesh does not implement is a policy the user
/// expects enforced, so it is reported rather than kept silently like any unknown kind.
pub const ISTIO_API_GROUPS: &[&str] = &[
    ISTIO_GROUP,
    SECURITY_GROUP,
    "telemetry.istio.io",
    "extensions.istio.io",
];
/// The group of `EndpointSlice`.
const DISCOVERY_GROUP: &str = "discovery.k8s.io";
const ISTIO_VERSIONS: &[&str] = &["v1alpha3", "v1beta1", "v1"];
/// The Gateway API versions whose routes read alike (`v1` since Gateway API 1.0).
const GATEWAY_API_VERSIONS: &[&str] = &["v1beta1", "v1"];
/// Gateway API kinds whose rules the user expects in force but this mesh does not read yet:
/// reported, like Istio's kinds it does not implement.
const GATEWAY_API_NOT_IMPLEMENTED: &[&str] =
    &["TLSRoute", "TCPRoute", "UDPRoute", "BackendTLSPolicy"];
const SECURITY_VERSIONS: &[&str] = &["v1beta1", "v1"];
const TOP_LEVEL_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
/// The namespace of an object that names none, as `kubectl` assumes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Kubernetes identity of an object. Cheap to clone: the parts are shared.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(kind: &str, namespace: Option<&str>, name: &str) -> ObjectKey {
        let namespace = namespace
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        ObjectKey {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl ObjectKey {
    /// The identity of an object of `kind` in `api_version`'s group. Kinds are told apart by
    /// name in the groups this agent reads (Kubernetes' core, `discovery.k8s.io`, Istio's), and
    /// as `Kind.group` in any other, as `kubectl get` names them: a Gateway API `Gateway` is not
    /// Istio's, nor is a Knative `Service` a Kubernetes Service, and neither may replace it.
    pub fn of(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> ObjectKey {
        let group = api_version.split_once('/').map_or("", |(group, _)| group);
        if group.is_empty() || group == DISCOVERY_GROUP || ISTIO_API_GROUPS.contains(&group) {
            ObjectKey::new(kind, namespace, name)
        } else {
            ObjectKey::new(&format!("{kind}.{group}"), namespace, name)
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

impl Serialize for ObjectKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An object, typed by kind.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Pod(Arc<Pod>),
    VirtualService(IstioObject<VirtualService>),
    /// A Gateway API `HTTPRoute`, keyed as [`HTTP_ROUTE`](super::gateway_api::HTTP_ROUTE).
    HttpRoute(IstioObject<GatewayApiRoute>),
    /// A Gateway API `GRPCRoute`, keyed as [`GRPC_ROUTE`](super::gateway_api::GRPC_ROUTE).
    GrpcRoute(IstioObject<GatewayApiRoute>),
    DestinationRule(IstioObject<DestinationRule>),
    Gateway(IstioObject<Gateway>),
    AuthorizationPolicy(IstioObject<AuthorizationPolicy>),
    PeerAuthentication(IstioObject<PeerAuthentication>),
    /// A kind of Istio's API groups the mesh does not implement (`RequestAuthentication`,
    /// `ServiceEntry`, ...), as read: listed as ignored, never enforced.
    NotImplemented(Arc<Value>),
    /// A kind the mesh does not interpret, as read.
    Other(Arc<Value>),
}

/// Why an object of `kind` has no effect, for warnings and `/config_dump`.
pub fn not_implemented(kind: &str) -> String {
    format!("kind {kind} is not implemented by this mesh: not enforced")
}

/// A validated Istio object with the text it was read from (for `get` and `/config_dump`).
#[derive(Debug)]
pub struct IstioObject<T> {
    pub rule: Arc<T>,
    pub manifest: Arc<Value>,
    /// The destinations the object names (VirtualServices only), looked up in the set it joins.
    pub(crate) destinations: Arc<[DestinationRef]>,
}

impl<T> Clone for IstioObject<T> {
    fn clone(&self) -> Self {
        IstioObject {
            rule: Arc::clone(&self.rule),
            manifest: Arc::clone(&self.manifest),
            destinations: Arc::clone(&self.destinations),
        }
    }
}

/// An object with where it came from (a file, an `apply` label, `kubernetes`) and what was
/// worth a warning when it was read.
#[derive(Clone, Debug)]
pub struct Sourced {
    pub key: ObjectKey,
    pub origin: Arc<str>,
    pub object: Object,
    pub warnings: Vec<Diagnostic>,
}

impl Sourced {
    /// An object that arrived typed (from the API server): nothing to validate.
    pub fn typed(origin: &Arc<str>, object: Object) -> Option<Sourced> {
        let (kind, metadata) = match &object {
            Object::Service(o) => ("Service", &o.metadata),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Object::Pod(o) => ("Pod", &o.metadata),
            _ => return None,
        };
        let key = ObjectKey::new(
            kind,
            metadata.namespace.as_deref(),
            metadata.name.as_deref()?,
        );
        Some(Sourced {
            key,
            origin: Arc::clone(origin),
            object,
            warnings: Vec::new(),
        })
    }

    /// Why the mesh ignores this object as a whole, if it does: a kind of Istio's API groups
    /// that it does not implement.
    pub fn ignored(&self) -> Option<String> {
        matches!(self.object, Object::NotImplemented(_)).then(|| not_implemented(&self.key.kind))
    }

    /// The object as JSON, for `get` and `/config_dump`. Like `kubectl get`, without the
    /// server's `managedFields`.
    pub fn manifest(&self) -> Value {
        let mut value = match &self.object {
            Object::Service(o) => serde_json::to_value(&**o).unwrap_or(Value::Null),
            Object::EndpointSlice(o) => serde_json::to_value(&**o).unwrap_or(Value::Null),
            Object::Pod(o) => serde_json::to_value(&**o).unwrap_or(Value::Null),
            Object::VirtualService(o) => (*o.manifest).clone(),
            Object::HttpRoute(o) | Object::GrpcRoute(o) => (*o.manifest).clone(),
            Object::DestinationRule(o) => (*o.manifest).clone(),
            Object::Gateway(o) => (*o.manifest).clone(),
            Object::AuthorizationPolicy(o) => (*o.manifest).clone(),
            Object::PeerAuthentication(o) => (*o.manifest).clone(),
            Object::NotImplemented(value) | Object::Other(value) => (**value).clone(),
        };
        if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.remove("managedFields");
        }
        value
    }
}

/// Reads one document of `file`: its identity, its type, and every problem with it. `Err`
/// carries the errors and the warnings found before them; the object must not be used.
pub fn read(file: &str, document: Document) -> Result<Sourced, Vec<Diagnostic>> {
    let Document { location, value } = document;
    let Value::Object(map) = value else {
        return Err(vec![diagnostic(
            file,
            &location,
            "",
            Severity::Error,
            "expected a Kubernetes object (a mapping)",
        )]);
    };
    let text = |field: &str| map.get(field).and_then(Value::as_str).unwrap_or_default();
    let (kind, api_version) = (text("kind").to_owned(), text("apiVersion").to_owned());
    for (field, value) in [("kind", &kind), ("apiVersion", &api_version)] {
        if value.is_empty() {
            return Err(vec![diagnostic(
                file,
                &location,
                field,
                Severity::Error,
                MISSING,
            )]);
        }
    }
    let metadata = map.get("metadata").and_then(Value::as_object);
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name.is_empty() {
        return Err(vec![diagnostic(
            file,
            &format!("{kind} ({location})"),
            "metadata.name",
            Severity::Error,
            MISSING,
        )]);
    }
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    let key = ObjectKey::of(&api_version, &kind, namespace, name);
    let mut warnings = Vec::new();
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let object = match (group, kind.as_str()) {
        (ISTIO_GROUP, "VirtualService" | "DestinationRule" | "Gateway")
        | (SECURITY_GROUP, "AuthorizationPolicy" | "PeerAuthentication")
        | (http_route::GROUP, "HTTPRoute" | "GRPCRoute" | "Gateway") => {
            let versions = match group {
                ISTIO_GROUP => ISTIO_VERSIONS,
                SECURITY_GROUP => SECURITY_VERSIONS,
                _ => GATEWAY_API_VERSIONS,
            };
            if !versions.contains(&version) {
                let (last, others) = versions.split_last().expect("versions are listed");
                return Err(vec![diagnostic(
                    file,
                    &key.to_string(),
                    "apiVersion",
                    Severity::Error,
                    format!(
                        "unsupported version {api_version:?}: expected {group}/{} or {last}",
                        others.join(", ")
                    ),
                )]);
            }
            istio(file, &key, map, &mut warnings)?
        }
        ("", "Service") => Object::Service(kubernetes(file, &key, map)?),
        (DISCOVERY_GROUP, "EndpointSlice") => Object::EndpointSlice(kubernetes(file, &key, map)?),
        ("", "Pod") => Object::Pod(kubernetes(file, &key, map)?),
        (group, kind)
            if ISTIO_API_GROUPS.contains(&group)
                || (group == http_route::GROUP && GATEWAY_API_NOT_IMPLEMENTED.contains(&kind)) =>
        {
            warnings.push(diagnostic(
                file,
                &key.to_string(),
                "",
                Severity::Warning,
                not_implemented(&key.kind),
            ));
            Object::NotImplemented(Arc::new(Value::Object(map)))
        }
        _ => Object::Other(Arc::new(Value::Object(map))),
    };
    Ok(Sourced {
        key,
        origin: file.into(),
        object,
        warnings,
    })
}

/// Every object of `text` (read as [`documents`](super::documents) reads it), or every problem
/// with it: all or nothing.
pub fn read_text(file: &str, text: &str) -> Result<Vec<Sourced>, Vec<Diagnostic>> {
    let documents = super::documents(file, text).map_err(|error| vec![error])?;
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for document in documents {
        match read(file, document) {
            Ok(sourced) => objects.push(sourced),
            Err(diagnostics) => errors.extend(diagnostics),
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

/// Validates an Istio object into its model; warnings go to `warnings`, and on any error every
/// diagnostic found is returned instead.
fn istio(
    file: &str,
    key: &ObjectKey,
    mut map: Map<String, Value>,
    warnings: &mut Vec<Diagnostic>,
) -> Result<Object, Vec<Diagnostic>> {
    let object = key.to_string();
    let mut diagnostics = Vec::new();
    let mut cx = ObjectContext::new(file, &object, &mut diagnostics);
    for field in map
        .keys()
        .filter(|k| !TOP_LEVEL_FIELDS.contains(&k.as_str()))
    {
        cx.warn(field, "unknown field, ignored");
    }
    let Some(spec) = map.get("spec").cloned() else {
        cx.error("spec", MISSING);
        return Err(diagnostics);
    };
    map.remove("status");
    let manifest = Arc::new(Value::Object(map));
    let id = ObjectRef {
        namespace: key.namespace.to_string(),
        name: key.name.to_string(),
    };
    let object = match &*key.kind {
        "VirtualService" => parse_spec::<raw::VirtualServiceSpec>(&mut cx, spec).map(|spec| {
            let created = manifest["metadata"].get("creationTimestamp");
            let (rule, destinations) = virtual_service::convert(&mut cx, &id, created, spec);
            Object::VirtualService(IstioObject {
                rule: Arc::new(rule),
                manifest,
                destinations: destinations.into(),
            })
        }),
        gateway_api::HTTP_ROUTE => parse_spec::<gateway_api::raw::HttpRouteSpec>(&mut cx, spec)
            .map(|spec| {
                let created = manifest["metadata"].get("creationTimestamp");
                let (rule, destinations) = http_route::convert(&mut cx, &id, created, spec);
                Object::HttpRoute(IstioObject {
                    rule: Arc::new(rule),
                    manifest,
                    destinations: destinations.into(),
                })
            }),
        gateway_api::GRPC_ROUTE => parse_spec::<gateway_api::raw::GrpcRouteSpec>(&mut cx, spec)
            .map(|spec| {
                let created = manifest["metadata"].get("creationTimestamp");
                let (rule, destinations) = grpc_route::convert(&mut cx, &id, created, spec);
                Object::GrpcRoute(IstioObject {
                    rule: Arc::new(rule),
                    manifest,
                    destinations: destinations.into(),
                })
            }),
        gateway_api::GATEWAY => {
            parse_spec::<gateway_api::raw::GatewaySpec>(&mut cx, spec).map(|spec| {
                match gateway_api::gateway::convert(&mut cx, &id, spec) {
                    Some(gateway) => Object::Gateway(IstioObject {
                        rule: Arc::new(gateway),
                        manifest,
                        destinations: Arc::new([]),
                    }),
                    // Another implementation's: kept as read, with the warning saying so.
                    None => Object::Other(manifest),
                }
            })
        }
        "DestinationRule" => parse_spec::<raw::DestinationRuleSpec>(&mut cx, spec).map(|spec| {
            Object::DestinationRule(IstioObject {
                rule: Arc::new(destination_rule::convert(&mut cx, &id, spec)),
                manifest,
                destinations: Arc::new([]),
            })
        }),
        "AuthorizationPolicy" => {
            parse_spec::<raw::AuthorizationPolicySpec>(&mut cx, spec).map(|spec| {
                Object::AuthorizationPolicy(IstioObject {
                    rule: Arc::new(authorization_policy::convert(&mut cx, &id, spec)),
                    manifest,
                    destinations: Arc::new([]),
                })
            })
        }
        "PeerAuthentication" => {
            parse_spec::<raw::PeerAuthenticationSpec>(&mut cx, spec).map(|spec| {
                let created = manifest["metadata"].get("creationTimestamp");
                let policy = peer_authentication::convert(&mut cx, &id, created, spec);
                Object::PeerAuthentication(IstioObject {
                    rule: Arc::new(policy),
                    manifest,
                    destinations: Arc::new([]),
                })
            })
        }
        _ => parse_spec::<raw::GatewaySpec>(&mut cx, spec).map(|spec| {
            Object::Gateway(IstioObject {
                rule: Arc::new(gateway::convert(&mut cx, &id, spec)),
                manifest,
                destinations: Arc::new([]),
            })
        }),
    };
    match object {
        Some(object) if !cx.has_errors() => {
            warnings.append(&mut diagnostics);
            Ok(object)
        }
        _ => Err(diagnostics),
    }
}

/// A Kubernetes object as its k8s-openapi type; a value of the wrong type is an error naming
/// its field.
fn kubernetes<T: DeserializeOwned>(
    file: &str,
    key: &ObjectKey,
    map: Map<String, Value>,
) -> Result<Arc<T>, Vec<Diagnostic>> {
    serde_path_to_error::deserialize::<_, T>(Value::Object(map))
        .map(Arc::new)
        .map_err(|error| {
            vec![diagnostic(
                file,
                &key.to_string(),
                &error.path().to_string(),
                Severity::Error,
                error.inner(),
            )]
        })
}

/// Deserializes `spec`, warning about each unknown field and turning a type error into one
/// diagnostic with its path (serde cannot go on after it, so it is the object's last).
pub(super) fn parse_spec<T: DeserializeOwned>(cx: &mut ObjectContext, spec: Value) -> Option<T> {
    let mut unknown = Vec::new();
    let result: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        spec,
        &mut |path: serde_ignored::Path| unknown.push(join_path("spec", &ignored_path(&path))),
    ));
    for field in unknown {
        cx.warn(&field, "unknown field, ignored");
    }
    match result {
        Ok(spec) => Some(spec),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            cx.error(&join_path("spec", &path), e.into_inner());
            None
        }
    }
}

/// `serde_ignored`'s path in the `a.b[0].c` form the rest of the diagnostics use.
fn ignored_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => join_path(&ignored_path(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

fn join_path(parent: &str, child: &str) -> String {
    match (
        parent.is_empty(),
        child.is_empty() || child.starts_with('['),
    ) {
        (true, _) => child.to_owned(),
        (false, true) => format!("{parent}{child}"),
        (false, false) => format!("{parent}.{child}"),
    }
}

pub(crate) fn diagnostic(
    file: &str,
    object: &str,
    field: &str,
    severity: Severity,
    reason: impl fmt::Display,
) -> Diagnostic {
    Diagnostic {
        severity,
        file: file.to_owned(),
        object: object.to_owned(),
        field: field.to_owned(),
        reason: reason.to_string(),
    }
}
