//! The Kubernetes manifests under `deploy/`, checked without a cluster:
//!
//! - every YAML file validates against the Kubernetes schemas (`kubernetes-validate` from PyPI,
//!   strict), and the objects of our CRDs' groups (Istio's, the Gateway API's) against our own
//!   CRDs;
//! - `kubectl kustomize` renders the base, the demo overlay and the Gateway API CRDs, and the
//!   output validates too;
//! - the Gateway API CRDs stay as shallow as a 1.20 API server needs (no `default`, no CEL, no
//!   string typed that may be empty);
//! - the agent keeps least privilege: the ClusterRole only reads what the agent watches, the
//!   DaemonSet is not privileged and has exactly the capabilities deploy/README.md explains.
//!
//! The test installs what it lacks, once per run: the pinned `kubernetes-validate` with pip, and
//! `kubectl` from Debian's `kubernetes-client` with apt (kubectl 1.20, whose built-in kustomize
//! v2 is the oldest these kustomizations must work with). It never skips.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::command::stdout_of;
use serde::Deserialize;
use yaml_serde::Value;

/// `kubernetes-validate` release used for the schemas (installed when another or none is).
const KUBERNETES_VALIDATE_VERSION: &str = "1.33.1";
/// Kubernetes version the manifests are validated against: the oldest we support.
const KUBERNETES_VERSION: &str = "1.30";

const ISTIO_GROUP: &str = "networking.istio.io";
const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// The groups of the kinds our CRDs define: Istio's (deploy/crds/) and the Gateway API's
/// (deploy/gateway-api/).
const OUR_CRD_GROUPS: [&str; 3] = [ISTIO_GROUP, "security.istio.io", GATEWAY_API_GROUP];
/// The directories of our CRDs, under deploy/.
const CRD_DIRS: [&str; 2] = ["crds", "gateway-api"];
const MESH_NAMESPACE: &str = "sidecarless-system";
const AGENT: &str = "mesh-agent";
const SIGNER: &str = "mesh-signer";
const ADMIN_PORT: u64 = 15000;
/// What the admin API serves on its TCP address in Kubernetes mode (`Access::Probe` in
/// mesh-agent/src/admin/mod.rs): everything else there answers 403.
const NODE_ADDRESS_PATHS: [&str; 4] = ["/healthz", "/ready", "/metrics", "/stats/prometheus"];
/// The directory of the admin socket's default path (`mesh_agent::admin::DEFAULT_SOCKET_PATH`).
const ADMIN_SOCKET_DIR: &str = "/run/mesh-agent";
/// Where the DaemonSet puts the handover socket: on the node, for the next pod's agent.
const HANDOVER_DIR: &str = "/run/mesh-agent-handover";
/// How long an agent that gets SIGTERM while a successor is taking over waits for it
/// (`TAKE_OVER_GRACE` in mesh-agent/src/run.rs).
const TAKE_OVER_GRACE: u64 = 10;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

// ---------------------------------------------------------------------------------------------
// Tools, installed once per test binary
// ---------------------------------------------------------------------------------------------

/// Runs a command and returns its stdout, or an error with everything it printed.
/// Makes sure `python3 -m kubernetes_validate` is the pinned release. Runs once; every test that
/// validates waits for the first one's install and shares its result.
fn ensure_kubernetes_validate() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let installed = || {
        stdout_of(Command::new("python3").args([
            "-c",
            "from kubernetes_validate.version import __version__; print(__version__)",
        ]))
        .map(|v| v.trim() == KUBERNETES_VALIDATE_VERSION)
        .unwrap_or(false)
    };
    DONE.get_or_init(|| {
        if installed() {
            return Ok(());
        }
        eprintln!("installing kubernetes-validate=={KUBERNETES_VALIDATE_VERSION} with pip");
        stdout_of(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg(format!(
                    "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
                ))
                // As root, into the machine's Python: a Debian-managed Python refuses that without
                // this; older pips ignore both variables.
                .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
                .env("PIP_ROOT_USER_ACTION", "ignore"),
        )
        .map_err(|e| format!("{e:#}"))?;
        if installed() {
            Ok(())
        } else {
            Err(format!(
                "pip installed kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}, \
                 but python3 does not import that version"
            ))
        }
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Makes sure `kubectl kustomize` works, installing Debian's `kubernetes-client` if needed.
fn ensure_kubectl() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let works = || stdout_of(Command::new("kubectl").args(["kustomize", "--help"])).is_ok();
    DONE.get_or_init(|| {
        if works() {
            return Ok(());
        }
        eprintln!("installing kubectl (Debian's kubernetes-client) with apt-get");
        for args in [
            &["update", "-qq"][..],
            &["install", "-y", "-qq", "kubernetes-client"][..],
        ] {
            stdout_of(
                Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
            .map_err(|e| format!("{e:#}"))?;
        }
        if works() {
            Ok(())
        } else {
            Err("kubernetes-client is installed but `kubectl kustomize` fails".to_owned())
        }
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

// ---------------------------------------------------------------------------------------------
// Reading manifests
// ---------------------------------------------------------------------------------------------

/// Every Kubernetes manifest under `deploy/`: all `*.yml`/`*.yaml` files except the
/// kustomization files, which are kustomize's input, not API objects.
fn manifest_files() -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, files)?;
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yml" | "yaml")
            ) && !path
                .file_stem()
                .is_some_and(|stem| stem.eq_ignore_ascii_case("kustomization"))
            {
                files.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(&deploy_dir(), &mut files)?;
    files.sort();
    Ok(files)
}

/// The objects in a multi-document YAML text (empty documents left out).
fn parse_objects(text: &str, origin: &str) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for document in yaml_serde::Deserializer::from_str(text) {
        let value = Value::deserialize(document).with_context(|| format!("parsing {origin}"))?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn read_objects(path: &Path) -> Result<Vec<Value>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_objects(&text, &path.display().to_string())
}

/// `kubectl kustomize DIR` (DIR relative to the repository root).
fn kustomize(dir: &str) -> Result<String> {
    ensure_kubectl()?;
    stdout_of(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo_root().join(dir)),
    )
}

fn rendered_base() -> Result<Vec<Value>> {
    parse_objects(&kustomize("deploy")?, "kubectl kustomize deploy")
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn seq<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    at(value, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn strings(value: &Value, path: &[&str]) -> BTreeSet<String> {
    seq(value, path)
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

/// `kind/name` of an object, for messages.
fn describe(object: &Value) -> String {
    format!(
        "{}/{}",
        str_at(object, &["kind"]).unwrap_or("?"),
        str_at(object, &["metadata", "name"]).unwrap_or("?")
    )
}

/// The one object of this kind and name.
fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    let found: Vec<_> = objects
        .iter()
        .filter(|o| {
            str_at(o, &["kind"]) == Some(kind) && str_at(o, &["metadata", "name"]) == Some(name)
        })
        .collect();
    match found[..] {
        [one] => Ok(one),
        _ => bail!("expected one {kind}/{name}, found {}", found.len()),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// Validates files with `kubernetes-validate --strict` against the Kubernetes schemas. Fails
/// with the validator's output on any error or warning, except one: it has no schema for the
/// kinds of our CRDs, which `validate_custom_objects` checks against them.
fn kubernetes_validate(files: &[PathBuf]) -> Result<()> {
    ensure_kubernetes_validate()?;
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(["--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .context("running python3 -m kubernetes_validate")?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours_without_schema = |line: &str| {
        line.contains("Couldn't find schema for kind")
            && OUR_CRD_GROUPS
                .iter()
                .any(|group| line.contains(&format!("with api version {group}/")))
    };
    let problems: Vec<&str> = output
        .lines()
        .filter(|line| !line.trim().is_empty() && !ours_without_schema(line))
        .collect();
    ensure!(
        out.status.success() && problems.is_empty(),
        "kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (Kubernetes {KUBERNETES_VERSION}, \
         strict) rejected the manifests ({}):\n{}",
        out.status,
        problems.join("\n")
    );
    Ok(())
}

/// Our CRDs (deploy/crds/, deploy/gateway-api/), by (group, kind).
fn crds() -> Result<BTreeMap<(String, String), Value>> {
    let mut crds = BTreeMap::new();
    let dirs: Vec<PathBuf> = CRD_DIRS.iter().map(|dir| deploy_dir().join(dir)).collect();
    for path in manifest_files()? {
        if !path
            .parent()
            .is_some_and(|dir| dirs.iter().any(|d| d == dir))
        {
            continue;
        }
        for crd in read_objects(&path)? {
            let group = str_at(&crd, &["spec", "group"]).context("CRD without spec.group")?;
            let kind = str_at(&crd, &["spec", "names", "kind"]).context("CRD without kind")?;
            crds.insert((group.to_owned(), kind.to_owned()), crd.clone());
        }
    }
    Ok(crds)
}

/// Checks a value against a structural OpenAPI v3 schema the way the API server treats a custom
/// resource: types, required fields, bounds (not patterns), and no field the server would prune
/// (unknown fields are kept only where the schema says `x-kubernetes-preserve-unknown-fields`).
/// Like a 1.20 API server built with Go 1.16 or later (ours), it refuses `""` in a `string`.
fn check_schema(value: &Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if str_at(schema, &["type"]) == Some("string") && value.as_str() == Some("") {
        errors.push(format!(
            "{path}: \"\" in a string field (a 1.20 API server refuses it as null)"
        ));
        return;
    }
    let number = |key: &str| schema.get(key).and_then(Value::as_i64);
    let length = match value {
        Value::String(text) => i64::try_from(text.chars().count()).ok(),
        Value::Sequence(items) => i64::try_from(items.len()).ok(),
        _ => None,
    };
    for (key, measured, lower) in [
        ("minimum", value.as_i64(), true),
        ("maximum", value.as_i64(), false),
        ("minLength", length, true),
        ("maxLength", length, false),
        ("minItems", length, true),
        ("maxItems", length, false),
    ] {
        let (Some(measured), Some(bound)) = (measured, number(key)) else {
            continue;
        };
        if (lower && measured < bound) || (!lower && measured > bound) {
            errors.push(format!("{path}: {measured} is outside {key} {bound}"));
        }
    }
    if let Some(fields) = value.as_mapping() {
        for required in strings(schema, &["required"]) {
            if !fields.contains_key(required.as_str()) {
                errors.push(format!("{path}.{required}: required"));
            }
        }
    }
    if let Some(ty) = str_at(schema, &["type"]) {
        let ok = match ty {
            "object" => value.is_mapping(),
            "array" => value.is_sequence(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_bool(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{path}: expected {ty}, found {value:?}"));
            return;
        }
    }
    if let Some(items) = schema.get("items") {
        for (i, item) in value.as_sequence().into_iter().flatten().enumerate() {
            check_schema(item, items, &format!("{path}[{i}]"), errors);
        }
    }
    let Some(fields) = value.as_mapping() else {
        return;
    };
    let properties = schema.get("properties").and_then(Value::as_mapping);
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    for (key, field) in fields {
        let name = key.as_str().unwrap_or("?");
        let field_path = format!("{path}.{name}");
        if let Some(sub) = properties.and_then(|p| p.get(name)) {
            check_schema(field, sub, &field_path, errors);
        } else if let Some(additional) = schema.get("additionalProperties") {
            check_schema(field, additional, &field_path, errors);
        } else if !(preserve || path.is_empty() && is_object_meta_field(name)) {
            errors.push(format!(
                "{field_path}: unknown field (the API server would drop it)"
            ));
        }
    }
}

/// Fields every object has, which the API server handles whatever the CRD's schema says.
fn is_object_meta_field(name: &str) -> bool {
    matches!(name, "apiVersion" | "kind" | "metadata")
}

/// Validates the objects among `objects` of [`OUR_CRD_GROUPS`] (Istio's, the Gateway API's)
/// against our CRDs: the kind is one of them, the version is served, and the object fits that
/// version's schema. (The agent's own, much deeper validation of these objects is `mesh-agent
/// validate` and its tests.)
fn validate_custom_objects(objects: &[(String, Value)]) -> Result<usize> {
    let crds = crds()?;
    let mut errors = Vec::new();
    let mut checked = 0;
    for (origin, object) in objects {
        let api_version = str_at(object, &["apiVersion"]).unwrap_or_default();
        let Some((group, version)) = api_version.split_once('/') else {
            continue;
        };
        if !OUR_CRD_GROUPS.contains(&group) {
            continue;
        }
        checked += 1;
        let what = format!("{origin}: {}", describe(object));
        let kind = str_at(object, &["kind"]).unwrap_or_default();
        let Some(crd) = crds.get(&(group.to_owned(), kind.to_owned())) else {
            errors.push(format!(
                "{what}: no CRD of ours (deploy/{}) defines {group} {kind}",
                CRD_DIRS.join(", deploy/")
            ));
            continue;
        };
        let Some(served) = seq(crd, &["spec", "versions"]).iter().find(|v| {
            str_at(v, &["name"]) == Some(version) && at(v, &["served"]) == Some(&Value::Bool(true))
        }) else {
            errors.push(format!("{what}: {kind} {version} is not served by our CRD"));
            continue;
        };
        if str_at(object, &["metadata", "name"]).is_none_or(str::is_empty) {
            errors.push(format!("{what}: metadata.name is missing"));
        }
        let schema = at(served, &["schema", "openAPIV3Schema"]).unwrap_or(&Value::Null);
        let mut object_errors = Vec::new();
        check_schema(object, schema, "", &mut object_errors);
        errors.extend(object_errors.into_iter().map(|e| format!("{what}: {e}")));
    }
    ensure!(
        errors.is_empty(),
        "objects do not fit our CRDs:\n{}",
        errors.join("\n")
    );
    Ok(checked)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn every_manifest_under_deploy_validates() -> Result<()> {
    let files = manifest_files()?;
    // The mesh, the CRDs, the demo apps and the tutorial's rules are all there.
    for expected in [
        "base/daemonset.yaml",
        "crds/virtualservice.yaml",
        "gateway-api/httproute.yaml",
        "demo/kubernetes/service-a.yml",
        "examples/gateway.yml",
    ] {
        ensure!(
            files.contains(&deploy_dir().join(expected)),
            "deploy/{expected} is missing"
        );
    }
    kubernetes_validate(&files)?;

    let mut objects = Vec::new();
    for file in &files {
        let origin = file.strip_prefix(repo_root())?.display().to_string();
        objects.extend(read_objects(file)?.into_iter().map(|o| (origin.clone(), o)));
    }
    let istio = validate_custom_objects(&objects)?;
    // deploy/examples holds the tutorial's VirtualServices, DestinationRules and Gateway.
    ensure!(
        istio >= 10,
        "only {istio} Istio objects found under deploy/"
    );
    Ok(())
}

#[test]
fn istio_crd_check_rejects_bad_shapes() -> Result<()> {
    let bad = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: typo}
spec:
  hosts: service-c          # a string, not a list
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pruned}
spce: {host: service-c}     # dropped by the API server
---
apiVersion: networking.istio.io/v2
kind: DestinationRule
metadata: {name: unserved}
spec: {host: service-c}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: no-crd}
spec: {}
"#;
    let objects: Vec<_> = parse_objects(bad, "inline")?
        .into_iter()
        .map(|o| ("inline".to_owned(), o))
        .collect();
    let message = format!("{:#}", validate_custom_objects(&objects).unwrap_err());
    for expected in [
        "VirtualService/typo: .spec.hosts: expected array",
        "DestinationRule/pruned: .spce: unknown field",
        "DestinationRule v2 is not served",
        "no CRD of ours (deploy/crds, deploy/gateway-api) defines networking.istio.io ServiceEntry",
    ] {
        ensure!(
            message.contains(expected),
            "{expected:?} not in:\n{message}"
        );
    }
    Ok(())
}

/// The Gateway API objects a GAMMA mesh writes fit our CRDs — `group: ""` (the core group of a
/// Service parent or backend), `replacePrefixMatch: ""`, `weight: 0` — and what the API server
/// refuses does not (tests/tests/control_plane.rs applies the same to a 1.20 API server).
#[test]
fn gateway_api_objects_fit_our_crds_and_bad_ones_do_not() -> Result<()> {
    let good = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: service-c, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: service-c, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs:
    - {name: service-c-v1, port: 8080, weight: 90}
    - {group: "", kind: Service, name: service-c-v2, port: 8080, weight: 10}
    timeouts: {request: 10s, backendRequest: 500ms}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: rewrite, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: service-c, sectionName: http}]
  hostnames: [service-c.shop.svc.cluster.local]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}}}]
    backendRefs: [{name: service-c-v1, port: 8080, weight: 0}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, port: 9090}]
  rules: [{matches: [{method: {service: shop.Cart}}], backendRefs: [{name: cart, port: 9090}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  gatewayClassName: mesh
  listeners: [{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]
"#;
    let inline = |text: &str| -> Result<Vec<(String, Value)>> {
        Ok(parse_objects(text, "inline")?
            .into_iter()
            .map(|o| ("inline".to_owned(), o))
            .collect())
    };
    ensure!(validate_custom_objects(&inline(good)?)? == 4);

    let bad = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: negative-weight}
spec: {rules: [{backendRefs: [{name: a, port: 8080, weight: -1}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: big-port}
spec: {rules: [{backendRefs: [{name: a, port: 70000}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: nameless-parent}
spec: {parentRefs: [{group: "", kind: Service, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: empty-host}
spec: {hostnames: [""]}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: GRPCRoute
metadata: {name: beta}
spec: {}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: classless}
spec: {listeners: [{name: http, port: 80, protocol: HTTP}]}
"#;
    let message = format!("{:#}", validate_custom_objects(&inline(bad)?).unwrap_err());
    for expected in [
        "HTTPRoute/negative-weight: .spec.rules[0].backendRefs[0].weight: -1 is outside minimum 0",
        "HTTPRoute/big-port: .spec.rules[0].backendRefs[0].port: 70000 is outside maximum 65535",
        "HTTPRoute/nameless-parent: .spec.parentRefs[0].name: required",
        "HTTPRoute/empty-host: .spec.hostnames[0]: \"\" in a string field",
        "GRPCRoute v1beta1 is not served",
        "Gateway/classless: .spec.gatewayClassName: required",
    ] {
        ensure!(
            message.contains(expected),
            "{expected:?} not in:\n{message}"
        );
    }
    Ok(())
}

/// What a schema says about each field it types, by path: the type and its bounds.
fn typed_fields(schema: &Value, path: &str, fields: &mut BTreeMap<String, String>) {
    let mut what = str_at(schema, &["type"]).unwrap_or("untyped").to_owned();
    for key in [
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
    ] {
        if let Some(n) = at(schema, &[key]).and_then(Value::as_i64) {
            what.push_str(&format!(" {key}={n}"));
        }
    }
    if let Some(pattern) = str_at(schema, &["pattern"]) {
        what.push_str(&format!(" pattern={pattern}"));
    }
    let required: Vec<String> = strings(schema, &["required"]).into_iter().collect();
    if !required.is_empty() {
        what.push_str(&format!(" required={}", required.join(",")));
    }
    if at(schema, &["x-kubernetes-preserve-unknown-fields"]) == Some(&Value::Bool(true)) {
        what.push_str(" +unknown");
    }
    if let Some(list_type) = str_at(schema, &["x-kubernetes-list-type"]) {
        what.push_str(&format!(" list={list_type}"));
    }
    fields.insert(path.to_owned(), what);
    if let Some(items) = schema.get("items") {
        typed_fields(items, &format!("{path}[]"), fields);
    }
    for (name, field) in at(schema, &["properties"])
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap_or("?");
        typed_fields(field, &format!("{path}.{name}"), fields);
    }
}

/// Whether `key` appears anywhere in `value`.
fn has_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Mapping(map) => map
            .iter()
            .any(|(k, v)| k.as_str() == Some(key) || has_key(v, key)),
        Value::Sequence(items) => items.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

/// Our Gateway API CRDs: upstream's names, the versions upstream serves, and a schema a 1.20
/// API server takes with every object a GAMMA mesh writes: no `default` (the agent applies
/// them, as for a file), no CEL, and typed only what is never empty — `group`, `kind`,
/// `namespace`, `sectionName`, `matches`, `filters` stay untyped, kept as written.
#[test]
fn gateway_api_crds_are_upstreams_names_with_a_shallow_schema() -> Result<()> {
    const NAME: &str = "string minLength=1 maxLength=253";
    const PORT: &str = "integer minimum=1 maximum=65535";
    const DURATION: &str = "string pattern=^([0-9]{1,5}(h|m|s|ms)){1,4}$";
    let parent_refs = [
        (".parentRefs", "array maxItems=32"),
        (".parentRefs[]", "object required=name +unknown"),
        (".parentRefs[].name", NAME),
        (".parentRefs[].port", PORT),
        (".hostnames", "array maxItems=16"),
        (".hostnames[]", NAME),
        (".rules", "array maxItems=16"),
        (".rules[]", "object +unknown"),
        (".rules[].backendRefs", "array maxItems=16"),
        (".rules[].backendRefs[]", "object required=name +unknown"),
        (".rules[].backendRefs[].name", NAME),
        (".rules[].backendRefs[].port", PORT),
        (
            ".rules[].backendRefs[].weight",
            "integer minimum=0 maximum=1000000",
        ),
    ];
    let timeouts = [
        (".rules[].timeouts", "object +unknown"),
        (".rules[].timeouts.request", DURATION),
        (".rules[].timeouts.backendRequest", DURATION),
    ];
    let listeners = [
        (".gatewayClassName", NAME),
        (".listeners", "array minItems=1 maxItems=64 list=map"),
        (
            ".listeners[]",
            "object required=name,port,protocol +unknown",
        ),
        (".listeners[].name", NAME),
        (".listeners[].hostname", NAME),
        (".listeners[].port", PORT),
        (".listeners[].protocol", "string minLength=1 maxLength=255"),
    ];
    /// One CRD as expected: its kind, plural, served versions, short names, and what its
    /// schema types under `spec` (`spec` itself last).
    struct Expected<'a> {
        kind: &'a str,
        plural: &'a str,
        versions: &'a [&'a str],
        short_names: &'a [&'a str],
        fields: Vec<(&'a str, &'a str)>,
        spec: &'a str,
    }
    let kinds = [
        Expected {
            kind: "HTTPRoute",
            plural: "httproutes",
            versions: &["v1", "v1beta1"],
            short_names: &[],
            fields: parent_refs.iter().chain(&timeouts).copied().collect(),
            spec: "object +unknown",
        },
        Expected {
            kind: "GRPCRoute",
            plural: "grpcroutes",
            versions: &["v1"],
            short_names: &[],
            fields: parent_refs.to_vec(),
            spec: "object +unknown",
        },
        Expected {
            kind: "Gateway",
            plural: "gateways",
            versions: &["v1", "v1beta1"],
            short_names: &["gtw"],
            fields: listeners.to_vec(),
            spec: "object required=gatewayClassName,listeners +unknown",
        },
    ];
    let crds = crds()?;
    for Expected {
        kind,
        plural,
        versions,
        short_names,
        fields,
        spec,
    } in kinds
    {
        let crd = crds
            .get(&(GATEWAY_API_GROUP.to_owned(), kind.to_owned()))
            .with_context(|| format!("no CRD for {kind} in deploy/gateway-api"))?;
        ensure!(
            str_at(crd, &["metadata", "name"]) == Some(&format!("{plural}.{GATEWAY_API_GROUP}"))
                && str_at(crd, &["spec", "scope"]) == Some("Namespaced")
                && str_at(crd, &["spec", "names", "plural"]) == Some(plural)
                && str_at(crd, &["spec", "names", "listKind"]) == Some(&format!("{kind}List"))
                && strings(crd, &["spec", "names", "shortNames"])
                    == short_names.iter().map(|s| s.to_string()).collect()
                && strings(crd, &["spec", "names", "categories"])
                    == BTreeSet::from(["gateway-api".to_owned()]),
            "{kind}: upstream's names"
        );
        // A group ending in .k8s.io needs the approval annotation, or the server refuses the CRD.
        let approval = str_at(
            crd,
            &["metadata", "annotations", "api-approved.kubernetes.io"],
        );
        ensure!(
            approval.is_some_and(|url| {
                url.starts_with("https://github.com/kubernetes-sigs/gateway-api/pull/")
            }),
            "{kind}: api-approved.kubernetes.io is {approval:?}"
        );
        for key in ["default", "x-kubernetes-validations"] {
            ensure!(!has_key(crd, key), "{kind}: no {key} anywhere");
        }
        let all = seq(crd, &["spec", "versions"]);
        let served: Vec<&str> = all
            .iter()
            .filter(|v| at(v, &["served"]) == Some(&Value::Bool(true)))
            .filter_map(|v| str_at(v, &["name"]))
            .collect();
        ensure!(served == versions, "{kind}: serves {served:?}");
        let stored: Vec<&str> = all
            .iter()
            .filter(|v| at(v, &["storage"]) == Some(&Value::Bool(true)))
            .filter_map(|v| str_at(v, &["name"]))
            .collect();
        ensure!(stored == ["v1"], "{kind}: stores {stored:?}");
        ensure!(
            at(crd, &["spec", "conversion"]).is_none(),
            "{kind}: one schema, no conversion"
        );
        let mut expected: BTreeMap<String, String> = fields
            .iter()
            .map(|(path, what)| (format!(".spec{path}"), what.to_string()))
            .collect();
        expected.insert(".spec".to_owned(), spec.to_owned());
        expected.insert(".status".to_owned(), "object +unknown".to_owned());
        expected.insert(String::new(), "object required=spec".to_owned());
        for version in all {
            let name = str_at(version, &["name"]).unwrap_or("?");
            ensure!(
                at(version, &["subresources", "status"]).is_some(),
                "{kind} {name}: the status subresource"
            );
            let columns: Vec<&str> = seq(version, &["additionalPrinterColumns"])
                .iter()
                .filter_map(|c| str_at(c, &["name"]))
                .collect();
            let upstream: &[&str] = if kind == "Gateway" {
                &["Class", "Address", "Programmed", "Age"]
            } else {
                &["Hostnames", "Age"]
            };
            ensure!(columns == upstream, "{kind} {name}: columns {columns:?}");
            let schema = at(version, &["schema", "openAPIV3Schema"]).context("no schema")?;
            let mut typed = BTreeMap::new();
            typed_fields(schema, "", &mut typed);
            ensure!(
                typed == expected,
                "{kind} {name}: the schema types\n{typed:#?}\nexpected\n{expected:#?}"
            );
        }
    }
    Ok(())
}

#[test]
fn kustomizations_render_and_validate() -> Result<()> {
    for dir in ["deploy", "deploy/overlays/demo", "deploy/gateway-api"] {
        let rendered = kustomize(dir)?;
        let file = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("kustomize-{}.yaml", dir.replace('/', "-")));
        fs::write(&file, &rendered)?;
        kubernetes_validate(&[file]).with_context(|| format!("kubectl kustomize {dir}"))?;
    }

    let base = rendered_base()?;
    for (kind, name) in [
        ("Namespace", MESH_NAMESPACE),
        ("ServiceAccount", AGENT),
        ("ClusterRole", AGENT),
        ("ClusterRoleBinding", AGENT),
        ("ConfigMap", AGENT),
        ("DaemonSet", AGENT),
        ("Role", AGENT),
        ("ServiceAccount", SIGNER),
        ("ClusterRole", SIGNER),
        ("Role", SIGNER),
        ("Deployment", SIGNER),
        (
            "CustomResourceDefinition",
            "virtualservices.networking.istio.io",
        ),
        (
            "CustomResourceDefinition",
            "destinationrules.networking.istio.io",
        ),
        ("CustomResourceDefinition", "gateways.networking.istio.io"),
    ] {
        find(&base, kind, name)?;
    }
    // The Gateway API CRDs are a kustomization of their own: a cluster with upstream's keeps
    // theirs.
    let gateway_api: Vec<String> = base
        .iter()
        .filter(|o| str_at(o, &["spec", "group"]) == Some(GATEWAY_API_GROUP))
        .map(describe)
        .collect();
    ensure!(
        gateway_api.is_empty(),
        "deploy/kustomization.yaml must not install the Gateway API CRDs: {gateway_api:?}"
    );
    let rendered = parse_objects(&kustomize("deploy/gateway-api")?, "deploy/gateway-api")?;
    let mut crds: Vec<String> = rendered.iter().map(describe).collect();
    crds.sort();
    ensure!(
        crds == [
            "CustomResourceDefinition/gateways.gateway.networking.k8s.io",
            "CustomResourceDefinition/grpcroutes.gateway.networking.k8s.io",
            "CustomResourceDefinition/httproutes.gateway.networking.k8s.io",
        ],
        "deploy/gateway-api renders {crds:?}"
    );
    for object in &base {
        let namespace = str_at(object, &["metadata", "namespace"]);
        let cluster_scoped = matches!(
            str_at(object, &["kind"]),
            Some("Namespace" | "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition")
        );
        let expected = (!cluster_scoped).then_some(MESH_NAMESPACE);
        ensure!(
            namespace == expected,
            "{}: namespace {namespace:?}, expected {expected:?}",
            describe(object)
        );
    }

    let demo = parse_objects(&kustomize("deploy/overlays/demo")?, "demo overlay")?;
    let namespace = find(&demo, "Namespace", "servicemesh-apps")?;
    ensure!(
        str_at(namespace, &["metadata", "labels", "sidecarless.io/mesh"]) == Some("enabled"),
        "the demo namespace is not enrolled: {namespace:?}"
    );
    Ok(())
}

/// What a role grants: (API group, resource, resource names) → verbs. Refuses wildcards,
/// non-resource URLs and aggregation.
type Grants = BTreeMap<(String, String, Vec<String>), BTreeSet<String>>;

fn grants(role: &Value) -> Result<Grants> {
    ensure!(
        at(role, &["aggregationRule"]).is_none(),
        "{}: must not aggregate other roles",
        describe(role)
    );
    let mut grants = Grants::new();
    for rule in seq(role, &["rules"]) {
        ensure!(
            at(rule, &["nonResourceURLs"]).is_none(),
            "rule {rule:?}: only resource rules are expected"
        );
        let verbs = strings(rule, &["verbs"]);
        let names: Vec<String> = strings(rule, &["resourceNames"]).into_iter().collect();
        for group in strings(rule, &["apiGroups"]) {
            for resource in strings(rule, &["resources"]) {
                ensure!(
                    !group.contains('*')
                        && !resource.contains('*')
                        && !verbs.iter().any(|v| v.contains('*')),
                    "rule {rule:?}: wildcards are not allowed"
                );
                grants
                    .entry((group.clone(), resource, names.clone()))
                    .or_default()
                    .extend(verbs.iter().cloned());
            }
        }
    }
    Ok(grants)
}

fn expected_grants(rules: &[(&str, &str, &[&str], &[&str])]) -> Grants {
    rules
        .iter()
        .map(|(group, resource, names, verbs)| {
            (
                (
                    group.to_string(),
                    resource.to_string(),
                    names.iter().map(|n| n.to_string()).collect(),
                ),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

/// `binding` binds the role `kind/name` to the ServiceAccount `subject` of the mesh's namespace
/// and no one else.
fn check_binding(objects: &[Value], kind: &str, name: &str, subject: &str) -> Result<()> {
    let binding = find(objects, &format!("{kind}Binding"), name)?;
    ensure!(
        str_at(binding, &["roleRef", "kind"]) == Some(kind)
            && str_at(binding, &["roleRef", "name"]) == Some(name),
        "the binding does not bind the {kind} {name}: {binding:?}"
    );
    let subjects: Vec<_> = seq(binding, &["subjects"])
        .iter()
        .map(|s| {
            (
                str_at(s, &["kind"]),
                str_at(s, &["name"]),
                str_at(s, &["namespace"]),
            )
        })
        .collect();
    ensure!(
        subjects == [(Some("ServiceAccount"), Some(subject), Some(MESH_NAMESPACE))],
        "the {kind} {name} must be bound to the ServiceAccount {subject} only: {subjects:?}"
    );
    Ok(())
}

const READ: &[&str] = &["get", "list", "watch"];

/// The agent reads what it watches, and writes exactly three things, each named here with why
/// (deploy/base/clusterrole.yaml says more):
/// - events (events.k8s.io): `create`, to report an Istio object rejected by validation on it;
/// - certificatesigningrequests (certificates.k8s.io): `create` (one CSR per workload
///   certificate, Kubernetes mode), `get` (its answer, polled by name: no list, no watch),
///   `delete` (the CSR once answered). Never the approval or status subresources, never
///   `signers`: an agent cannot approve or sign anything;
/// - and reads the trust bundle's ConfigMap, `get` by name only, in its own namespace (a Role).
///
/// The signer (`mesh-agent ca serve`) gets exactly what deciding its own signer's CSRs takes.
#[test]
fn rbac_grants_exactly_what_the_agent_and_the_signer_use() -> Result<()> {
    let base = rendered_base()?;
    let mut rbac: Vec<String> = base
        .iter()
        .filter(|o| str_at(o, &["apiVersion"]).is_some_and(|v| v.starts_with("rbac.")))
        .map(describe)
        .collect();
    rbac.sort();
    ensure!(
        rbac == [
            "ClusterRole/mesh-agent",
            "ClusterRole/mesh-signer",
            "ClusterRoleBinding/mesh-agent",
            "ClusterRoleBinding/mesh-signer",
            "Role/mesh-agent",
            "Role/mesh-signer",
            "RoleBinding/mesh-agent",
            "RoleBinding/mesh-signer",
        ],
        "unexpected RBAC objects: {rbac:?}"
    );

    let agent = expected_grants(&[
        ("", "services", &[], READ),
        ("", "pods", &[], READ),
        ("", "namespaces", &[], READ),
        ("discovery.k8s.io", "endpointslices", &[], READ),
        (ISTIO_GROUP, "virtualservices", &[], READ),
        (ISTIO_GROUP, "destinationrules", &[], READ),
        (ISTIO_GROUP, "gateways", &[], READ),
        ("security.istio.io", "authorizationpolicies", &[], READ),
        ("security.istio.io", "peerauthentications", &[], READ),
        // Istio kinds the mesh does not implement, watched to report them as not enforced
        // (`NOT_IMPLEMENTED` in mesh-agent/src/discovery/kubernetes.rs).
        (ISTIO_GROUP, "serviceentries", &[], READ),
        (ISTIO_GROUP, "sidecars", &[], READ),
        (ISTIO_GROUP, "envoyfilters", &[], READ),
        (ISTIO_GROUP, "workloadentries", &[], READ),
        (ISTIO_GROUP, "workloadgroups", &[], READ),
        (ISTIO_GROUP, "proxyconfigs", &[], READ),
        ("security.istio.io", "requestauthentications", &[], READ),
        ("telemetry.istio.io", "telemetries", &[], READ),
        ("extensions.istio.io", "wasmplugins", &[], READ),
        // The Gateway API's kinds, watched where served (`GATEWAY_API_KINDS` there).
        (GATEWAY_API_GROUP, "httproutes", &[], READ),
        (GATEWAY_API_GROUP, "grpcroutes", &[], READ),
        (GATEWAY_API_GROUP, "gateways", &[], READ),
        // Created (only) to report a rejected object on it.
        ("events.k8s.io", "events", &[], &["create"]),
        // Workload certificates (mesh-agent/src/identity/csr.rs).
        (
            "certificates.k8s.io",
            "certificatesigningrequests",
            &[],
            &["create", "get", "delete"],
        ),
    ]);
    let role = find(&base, "ClusterRole", AGENT)?;
    ensure!(
        grants(role)? == agent,
        "the agent's ClusterRole grants {:?}, the agent uses {agent:?}",
        grants(role)?
    );
    let bundle_read = expected_grants(&[("", "configmaps", &["mesh-ca-root-cert"], &["get"])]);
    let role = find(&base, "Role", AGENT)?;
    ensure!(
        grants(role)? == bundle_read,
        "the agent's Role grants {:?}, the agent reads {bundle_read:?}",
        grants(role)?
    );
    check_binding(&base, "ClusterRole", AGENT, AGENT)?;
    check_binding(&base, "Role", AGENT, AGENT)?;

    let signer = expected_grants(&[
        (
            "certificates.k8s.io",
            "certificatesigningrequests",
            &[],
            READ,
        ),
        (
            "certificates.k8s.io",
            "certificatesigningrequests/approval",
            &[],
            &["update"],
        ),
        (
            "certificates.k8s.io",
            "certificatesigningrequests/status",
            &[],
            &["update"],
        ),
        (
            "certificates.k8s.io",
            "signers",
            &["sidecarless.io/workload"],
            &["approve", "sign"],
        ),
        ("", "pods", &[], &["get", "list"]),
    ]);
    let role = find(&base, "ClusterRole", SIGNER)?;
    ensure!(
        grants(role)? == signer,
        "the signer's ClusterRole grants {:?}, the signer uses {signer:?}",
        grants(role)?
    );
    let bundle_write = expected_grants(&[
        ("", "configmaps", &[], &["create"]),
        ("", "configmaps", &["mesh-ca-root-cert"], &["get", "update"]),
    ]);
    let role = find(&base, "Role", SIGNER)?;
    ensure!(
        grants(role)? == bundle_write,
        "the signer's Role grants {:?}, the signer writes {bundle_write:?}",
        grants(role)?
    );
    check_binding(&base, "ClusterRole", SIGNER, SIGNER)?;
    check_binding(&base, "Role", SIGNER, SIGNER)?;
    Ok(())
}

/// The signer: one replica, the CA Secret mounted read-only with a private key mode, no
/// capability, no host namespace.
#[test]
fn the_signer_holds_the_ca_key_and_nothing_else() -> Result<()> {
    let base = rendered_base()?;
    let deployment = find(&base, "Deployment", SIGNER)?;
    ensure!(
        at(deployment, &["spec", "replicas"]).and_then(Value::as_u64) == Some(1),
        "one replica: {deployment:?}"
    );
    let pod = at(deployment, &["spec", "template", "spec"]).context("no pod template")?;
    ensure!(
        str_at(pod, &["serviceAccountName"]) == Some(SIGNER),
        "runs as {SIGNER}"
    );
    for flag in ["hostNetwork", "hostPID", "hostIPC"] {
        ensure!(
            at(pod, &[flag]).and_then(Value::as_bool) != Some(true),
            "{flag} must be off"
        );
    }
    let container = &seq(pod, &["containers"])[0];
    ensure!(
        seq(container, &["args"])
            .iter()
            .take(2)
            .filter_map(Value::as_str)
            .eq(["ca", "serve"]),
        "the container runs `ca serve`: {container:?}"
    );
    let security = at(container, &["securityContext"]).context("no securityContext")?;
    ensure!(
        strings(security, &["capabilities", "drop"]) == BTreeSet::from(["ALL".to_owned()])
            && at(security, &["capabilities", "add"]).is_none()
            && at(security, &["allowPrivilegeEscalation"]).and_then(Value::as_bool) == Some(false)
            && at(security, &["readOnlyRootFilesystem"]).and_then(Value::as_bool) == Some(true),
        "no capability, no escalation, read-only root: {security:?}"
    );
    let volume = seq(pod, &["volumes"])
        .iter()
        .find(|v| str_at(v, &["name"]) == Some("ca"))
        .context("no ca volume")?;
    ensure!(
        str_at(volume, &["secret", "secretName"]) == Some("mesh-ca")
            && at(volume, &["secret", "defaultMode"]).and_then(Value::as_u64) == Some(0o400),
        "the CA Secret, mode 0400: {volume:?}"
    );
    let mount = seq(container, &["volumeMounts"])
        .iter()
        .find(|m| str_at(m, &["name"]) == Some("ca"))
        .context("the ca volume is not mounted")?;
    ensure!(
        at(mount, &["readOnly"]).and_then(Value::as_bool) == Some(true),
        "mounted read-only: {mount:?}"
    );
    Ok(())
}

#[test]
fn daemonset_has_only_the_privileges_it_needs() -> Result<()> {
    let base = rendered_base()?;
    let daemonset = find(&base, "DaemonSet", AGENT)?;
    let pod = at(daemonset, &["spec", "template", "spec"]).context("no pod template")?;
    let flag = |path: &[&str]| at(pod, path).and_then(Value::as_bool) == Some(true);

    ensure!(
        str_at(pod, &["serviceAccountName"]) == Some(AGENT),
        "the agent must run as the mesh-agent ServiceAccount"
    );
    ensure!(
        flag(&["hostPID"]),
        "hostPID is needed to reach pods' /proc/PID/ns/net"
    );
    ensure!(
        flag(&["hostNetwork"]),
        "the agent runs in the node's network namespace"
    );

    let containers: Vec<&Value> = seq(pod, &["containers"])
        .iter()
        .chain(seq(pod, &["initContainers"]))
        .collect();
    for container in &containers {
        let context = container.get("securityContext").unwrap_or(&Value::Null);
        ensure!(
            at(context, &["privileged"]).and_then(Value::as_bool) != Some(true),
            "container {} is privileged: use capabilities",
            str_at(container, &["name"]).unwrap_or("?")
        );
    }
    let [agent] = &containers[..] else {
        bail!("expected exactly one container, found {}", containers.len());
    };
    let context = agent.get("securityContext").context("no securityContext")?;
    let drop = strings(context, &["capabilities", "drop"]);
    ensure!(
        drop.contains("ALL"),
        "capabilities must drop ALL, drop {drop:?}"
    );
    let added = strings(context, &["capabilities", "add"]);
    let expected: BTreeSet<String> = [
        "BPF",
        "NET_ADMIN",
        "SYS_ADMIN",
        "SYS_PTRACE",
        "NET_BIND_SERVICE",
    ]
    .map(str::to_owned)
    .into();
    ensure!(
        added == expected,
        "capabilities added {added:?}, expected exactly {expected:?} (see deploy/README.md)"
    );
    ensure!(
        at(context, &["readOnlyRootFilesystem"]) == Some(&Value::Bool(true)),
        "the root filesystem must be read-only"
    );
    ensure!(
        at(context, &["runAsUser"]).and_then(Value::as_u64) == Some(0),
        "the agent runs as root"
    );

    // Every $(VAR) in the args must be defined, or the kubelet passes it on literally.
    let config = find(&base, "ConfigMap", AGENT)?;
    let config_keys: BTreeSet<&str> = at(config, &["data"])
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.as_str())
        .collect();
    ensure!(
        seq(agent, &["envFrom"])
            .iter()
            .any(|e| str_at(e, &["configMapRef", "name"]) == Some(AGENT)),
        "the agent must take its settings from the mesh-agent ConfigMap"
    );
    let env: BTreeMap<&str, &Value> = seq(agent, &["env"])
        .iter()
        .filter_map(|e| Some((str_at(e, &["name"])?, e)))
        .collect();
    let args: Vec<&str> = seq(agent, &["args"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for arg in &args {
        for var in arg.split("$(").skip(1).filter_map(|s| s.split(')').next()) {
            ensure!(
                env.contains_key(var) || config_keys.contains(var),
                "{arg}: $({var}) is neither in env nor in the ConfigMap"
            );
        }
    }
    let field_ref = |var: &str| {
        env.get(var)
            .and_then(|e| str_at(e, &["valueFrom", "fieldRef", "fieldPath"]))
    };
    ensure!(
        field_ref("NODE_NAME") == Some("spec.nodeName"),
        "NODE_NAME from spec.nodeName"
    );
    ensure!(
        field_ref("HOST_IP") == Some("status.hostIP"),
        "HOST_IP from status.hostIP"
    );
    for expected in [
        "--kubernetes",
        "--node-name=$(NODE_NAME)",
        "--cgroup=/host/sys/fs/cgroup",
        "--proc-root=/host/proc",
        "--admin=$(HOST_IP):15000",
        "--drain-seconds=$(MESH_DRAIN_SECONDS)",
        "--ingress=$(HOST_IP):$(MESH_INGRESS_PORT)",
        "--handover-socket=/run/mesh-agent-handover/handover.sock",
    ] {
        ensure!(args.contains(&expected), "args {args:?} lack {expected}");
    }

    // The ingress gateway: the port declared (so the scheduler sees the host port taken) is the
    // one the agent listens on, and the mesh-ingress Service reaches it.
    let ingress_port: u64 = str_at(config, &["data", "MESH_INGRESS_PORT"])
        .context("MESH_INGRESS_PORT")?
        .parse()?;
    let declared = seq(agent, &["ports"])
        .iter()
        .find(|p| str_at(p, &["name"]) == Some("ingress"))
        .and_then(|p| at(p, &["containerPort"]))
        .and_then(Value::as_u64);
    ensure!(
        declared == Some(ingress_port),
        "the DaemonSet's ingress port {declared:?} is not MESH_INGRESS_PORT {ingress_port}"
    );
    let service = find(&base, "Service", "mesh-ingress")?;
    ensure!(
        seq(service, &["spec", "ports"])
            .iter()
            .any(|p| str_at(p, &["targetPort"]) == Some("ingress")),
        "the mesh-ingress Service targets the DaemonSet's ingress port"
    );
    ensure!(
        str_at(service, &["spec", "selector", "app.kubernetes.io/name"]) == Some(AGENT),
        "the mesh-ingress Service selects the agent's pods"
    );

    // Readiness on /ready and liveness on /healthz of the admin API, where the kubelet reaches
    // it: the node's IP. In Kubernetes mode that address serves only the probes and metrics.
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
        let probe =
            at(agent, &[probe, "httpGet"]).with_context(|| format!("no httpGet {probe}"))?;
        ensure!(
            str_at(probe, &["path"]) == Some(path),
            "the probe must be {path}"
        );
        ensure!(
            NODE_ADDRESS_PATHS.contains(&path),
            "{path} is not served on the node address"
        );
        let port = match probe.get("port") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(name)) => seq(agent, &["ports"])
                .iter()
                .find(|p| str_at(p, &["name"]) == Some(name))
                .and_then(|p| at(p, &["containerPort"]))
                .and_then(Value::as_u64),
            _ => None,
        };
        ensure!(
            port == Some(ADMIN_PORT),
            "{path} probes port {port:?}, the admin API is on {ADMIN_PORT}"
        );
    }
    // Prometheus scrapes what the node address serves.
    let annotations = at(daemonset, &["spec", "template", "metadata", "annotations"])
        .context("no pod annotations")?;
    let scrape_path = str_at(annotations, &["prometheus.io/path"]).context("prometheus.io/path")?;
    ensure!(
        NODE_ADDRESS_PATHS.contains(&scrape_path),
        "Prometheus scrapes {scrape_path}, which the node address does not serve"
    );
    ensure!(
        str_at(annotations, &["prometheus.io/port"]) == Some(&ADMIN_PORT.to_string()),
        "Prometheus scrapes the admin port"
    );
    // The admin socket's directory is writable on a read-only root filesystem.
    let socket_dir = seq(agent, &["volumeMounts"])
        .iter()
        .find(|m| str_at(m, &["mountPath"]) == Some(ADMIN_SOCKET_DIR))
        .and_then(|m| str_at(m, &["name"]))
        .with_context(|| format!("nothing mounted at {ADMIN_SOCKET_DIR}, the admin socket's"))?;
    ensure!(
        seq(pod, &["volumes"]).iter().any(|v| {
            str_at(v, &["name"]) == Some(socket_dir) && at(v, &["emptyDir"]).is_some()
        }),
        "{ADMIN_SOCKET_DIR} must be an emptyDir: private to the agent's container"
    );
    ensure!(
        !args.iter().any(|a| a.starts_with("--admin-socket")),
        "the admin socket stays at its default, under {ADMIN_SOCKET_DIR}"
    );

    // The kubelet waits for a successor's take-over and the drain before it kills the agent.
    let drain: u64 = str_at(config, &["data", "MESH_DRAIN_SECONDS"])
        .context("MESH_DRAIN_SECONDS")?
        .parse()?;
    let grace = at(pod, &["terminationGracePeriodSeconds"]).and_then(Value::as_u64);
    ensure!(
        grace == Some(TAKE_OVER_GRACE + drain + 5),
        "terminationGracePeriodSeconds {grace:?}, expected the take-over grace \
         ({TAKE_OVER_GRACE}) + the drain ({drain}) + 5"
    );
    // Stop then start, one node at a time: what Kubernetes 1.20 (our oldest) can do, whose
    // kubectl refuses `maxSurge`; a surge (1.22+) is documented in the manifest.
    let strategy = at(daemonset, &["spec", "updateStrategy"]).context("no updateStrategy")?;
    ensure!(
        str_at(strategy, &["type"]) == Some("RollingUpdate")
            && at(strategy, &["rollingUpdate", "maxUnavailable"]).and_then(Value::as_u64)
                == Some(1)
            && at(strategy, &["rollingUpdate", "maxSurge"]).is_none(),
        "rolling update one node at a time: {strategy:?}"
    );

    // Host paths: mount point in the container -> (host path, read-only).
    let volumes: BTreeMap<&str, &str> = seq(pod, &["volumes"])
        .iter()
        .filter_map(|v| Some((str_at(v, &["name"])?, str_at(v, &["hostPath", "path"])?)))
        .collect();
    let mounts: BTreeMap<&str, (&str, bool)> = seq(agent, &["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let host = volumes.get(str_at(m, &["name"])?)?;
            let read_only = at(m, &["readOnly"]).and_then(Value::as_bool) == Some(true);
            Some((str_at(m, &["mountPath"])?, (*host, read_only)))
        })
        .collect();
    for (mount, host, read_only) in [
        (HANDOVER_DIR, HANDOVER_DIR, false),
        ("/sys/fs/bpf", "/sys/fs/bpf", false),
        ("/host/sys/fs/cgroup", "/sys/fs/cgroup", false),
        ("/host/proc", "/proc", true),
        ("/var/run/netns", "/var/run/netns", true),
    ] {
        ensure!(
            mounts.get(mount) == Some(&(host, read_only)),
            "{mount}: expected host {host} (read-only: {read_only}), found {:?}",
            mounts.get(mount)
        );
    }
    ensure!(
        mounts.len() == 5,
        "unexpected host paths mounted: {mounts:?}"
    );

    // Kubernetes mode's CSRs go out with a token bound to the agent's pod (for the API
    // server's audience), where mesh_agent::identity::csr::DEFAULT_TOKEN_FILE reads it.
    let token = seq(pod, &["volumes"])
        .iter()
        .find(|v| str_at(v, &["name"]) == Some("pod-token"))
        .context("no pod-token volume")?;
    let sources = seq(token, &["projected", "sources"]);
    ensure!(
        sources.len() == 1
            && str_at(&sources[0], &["serviceAccountToken", "path"]) == Some("token")
            && at(&sources[0], &["serviceAccountToken", "audience"]).is_none(),
        "a projected ServiceAccount token for the API server: {token:?}"
    );
    ensure!(
        seq(agent, &["volumeMounts"]).iter().any(|m| {
            str_at(m, &["name"]) == Some("pod-token")
                && str_at(m, &["mountPath"])
                    == Some("/var/run/secrets/sidecarless.io/serviceaccount")
                && at(m, &["readOnly"]).and_then(Value::as_bool) == Some(true)
        }),
        "the pod-bound token is mounted read-only where the agent reads it"
    );
    Ok(())
}

#[test]
fn crds_serve_every_istio_version_and_store_v1() -> Result<()> {
    let crds = crds()?;
    for (kind, plural, short) in [
        ("VirtualService", "virtualservices", "vs"),
        ("DestinationRule", "destinationrules", "dr"),
        ("Gateway", "gateways", "gw"),
    ] {
        let crd = crds
            .get(&(ISTIO_GROUP.to_owned(), kind.to_owned()))
            .with_context(|| format!("no CRD for {kind}"))?;
        ensure!(
            str_at(crd, &["metadata", "name"]) == Some(&format!("{plural}.{ISTIO_GROUP}")),
            "{kind}: CRD name"
        );
        ensure!(
            str_at(crd, &["spec", "scope"]) == Some("Namespaced"),
            "{kind}: scope"
        );
        ensure!(
            str_at(crd, &["spec", "names", "plural"]) == Some(plural)
                && strings(crd, &["spec", "names", "shortNames"])
                    == BTreeSet::from([short.to_owned()]),
            "{kind}: names"
        );
        ensure!(
            strings(crd, &["spec", "names", "categories"])
                == BTreeSet::from(["istio-io".to_owned(), "networking-istio-io".to_owned()]),
            "{kind}: categories"
        );
        let versions = seq(crd, &["spec", "versions"]);
        let served: BTreeSet<&str> = versions
            .iter()
            .filter(|v| at(v, &["served"]) == Some(&Value::Bool(true)))
            .filter_map(|v| str_at(v, &["name"]))
            .collect();
        ensure!(
            served == BTreeSet::from(["v1alpha3", "v1beta1", "v1"]),
            "{kind}: served {served:?}"
        );
        let stored: Vec<&str> = versions
            .iter()
            .filter(|v| at(v, &["storage"]) == Some(&Value::Bool(true)))
            .filter_map(|v| str_at(v, &["name"]))
            .collect();
        ensure!(stored == ["v1"], "{kind}: stored {stored:?}");
        for version in versions {
            let spec = at(
                version,
                &["schema", "openAPIV3Schema", "properties", "spec"],
            );
            ensure!(
                spec.and_then(|s| s.get("x-kubernetes-preserve-unknown-fields"))
                    == Some(&Value::Bool(true)),
                "{kind} {:?}: spec must keep unknown fields",
                version.get("name")
            );
        }
    }
    Ok(())
}

/// The DaemonSet's args are flags the agent accepts, with the values the kubelet would expand:
/// `mesh-agent ARGS --help` fails on an unknown flag or a bad value, and prints help otherwise.
#[test]
fn daemonset_args_are_accepted_by_the_agent() -> Result<()> {
    let base = rendered_base()?;
    let daemonset = find(&base, "DaemonSet", AGENT)?;
    let config = find(&base, "ConfigMap", AGENT)?;
    let container = seq(daemonset, &["spec", "template", "spec", "containers"])
        .first()
        .context("no container")?;
    // The downward API's values on a node, then the ConfigMap's.
    let mut values: BTreeMap<String, String> = [("NODE_NAME", "node-1"), ("HOST_IP", "10.0.0.7")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    for (key, value) in at(config, &["data"])
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
    {
        if let (Some(key), Some(value)) = (key.as_str(), value.as_str()) {
            values.insert(key.to_owned(), value.to_owned());
        }
    }
    let args: Vec<String> = seq(container, &["args"])
        .iter()
        .filter_map(Value::as_str)
        .map(|arg| {
            values.iter().fold(arg.to_owned(), |arg, (key, value)| {
                arg.replace(&format!("$({key})"), value)
            })
        })
        .collect();
    let out = Command::new(mesh_tests::agent_binary()?)
        .args(&args)
        .arg("--help")
        .output()?;
    ensure!(
        out.status.success(),
        "mesh-agent {} rejected the DaemonSet's args:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
