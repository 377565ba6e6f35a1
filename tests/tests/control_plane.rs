//! Against a real Kubernetes 1.20 control plane (`mesh_tests::control_plane`): `deploy/` and
//! `deploy/gateway-api` apply with kubectl, GAMMA routes apply to our Gateway API CRDs as written
//! (`group: ""` and all) while out-of-range values are refused, the agent's ServiceAccount can
//! list and watch everything the agent watches and nothing more, the controller-manager and
//! scheduler turn a Deployment into a Pod bound to a Node, and the agent itself, with its
//! ServiceAccount's token, reads 1.20's `v1beta1` EndpointSlices and the Gateway API's routes and
//! says what it waits for while the API server cannot answer.
//!
//! The first run builds the control plane's binaries (tens of minutes, once; `cargo xtask test`
//! does it before the tests). Each test starts a control plane of its own.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use mesh_tests::{control_plane::ControlPlane, require_root, Agent, SimNode};
use serde_json::Value;

const MESH_NAMESPACE: &str = "sidecarless-system";
const AGENT: &str = "mesh-agent";
const TIMEOUT: Duration = Duration::from_secs(120);

/// What the agent watches (mesh-agent/src/discovery/kubernetes.rs), by (API group, resource).
const WATCHED: [(&str, &str); 9] = [
    ("", "services"),
    ("", "pods"),
    ("", "namespaces"),
    ("discovery.k8s.io", "endpointslices"),
    ("networking.istio.io", "virtualservices"),
    ("networking.istio.io", "destinationrules"),
    ("networking.istio.io", "gateways"),
    ("security.istio.io", "authorizationpolicies"),
    ("security.istio.io", "peerauthentications"),
];

/// The Gateway API kinds the agent watches where the API server serves them (`GATEWAY_API_KINDS`
/// there), and awaits then: served here once `deploy/gateway-api` is installed.
const GATEWAY_API: [(&str, &str); 3] = [
    (GATEWAY_API_GROUP, "httproutes"),
    (GATEWAY_API_GROUP, "grpcroutes"),
    (GATEWAY_API_GROUP, "gateways"),
];
const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// The Istio kinds the agent does not implement but watches, where served, only to report each
/// one applied as not enforced (`NOT_IMPLEMENTED` there). No CRD of `deploy/crds` serves them,
/// so the role's grant is checked, not a list.
const REPORTED_ONLY: [(&str, &str); 9] = [
    ("networking.istio.io", "serviceentries"),
    ("networking.istio.io", "sidecars"),
    ("networking.istio.io", "envoyfilters"),
    ("networking.istio.io", "workloadentries"),
    ("networking.istio.io", "workloadgroups"),
    ("networking.istio.io", "proxyconfigs"),
    ("security.istio.io", "requestauthentications"),
    ("telemetry.istio.io", "telemetries"),
    ("extensions.istio.io", "wasmplugins"),
];

/// What the agent writes, with the verbs of each: a Warning Event on an Istio object it rejects
/// (create only; an Event is never read, updated or deleted), and in Kubernetes mode a CSR per
/// workload certificate (mesh-agent/src/identity/csr.rs: created, its answer read by name,
/// deleted once answered; never listed or watched).
const CREATED: [(&str, &str, &[&str]); 2] = [
    ("events.k8s.io", "events", &["create"]),
    (
        "certificates.k8s.io",
        "certificatesigningrequests",
        &["create", "get", "delete"],
    ),
];

fn deploy_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .join("deploy")
        .display()
        .to_string()
}

/// `deploy/gateway-api`, as every test control plane installs it: its CRDs established.
fn gateway_api_established(kubectl: impl Fn(&[&str]) -> Result<String>) -> Result<()> {
    let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    wait.extend(mesh_tests::control_plane::GATEWAY_API_CRDS);
    kubectl(&wait).context("deploy/gateway-api's CRDs on Kubernetes 1.20")?;
    Ok(())
}

/// `kubectl ARGS -f -` with `yaml` on stdin: its output, whether it succeeded or not.
fn kubectl_stdin(
    control_plane: &ControlPlane,
    args: &[&str],
    yaml: &str,
) -> Result<std::process::Output> {
    let mut child = control_plane
        .kubectl_command()
        .args(args)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().expect("piped"), yaml.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// A GAMMA HTTPRoute (its parent the Service `service-c`): 90/10 between two versions.
const GAMMA_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: service-c, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: service-c, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs:
    - {name: service-c-v1, port: 8080, weight: 90}
    - {name: service-c-v2, port: 8080, weight: 10}
"#;

/// Our Gateway API CRDs on 1.20 take what a GAMMA mesh writes, as written: `group: ""` (the
/// core group, a Service), `replacePrefixMatch: ""`, `weight: 0`, at v1 and v1beta1; the API
/// server itself (kubectl's validation off) refuses a negative weight and a port out of range.
fn gateway_api_objects_apply_as_written(control_plane: &ControlPlane) -> Result<()> {
    let started = Instant::now();
    let rewrite = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: rewrite, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: service-c, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}}}]
    backendRefs: [{group: "", kind: Service, name: service-c-v1, port: 8080, weight: 0}]
    timeouts: {request: 10s}
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
  listeners: [{name: http, port: 80, protocol: HTTP, hostname: "*.example.com"}]
"#;
    control_plane.kubectl(&["create", "namespace", "shop"])?;
    for yaml in [GAMMA_ROUTE, rewrite] {
        let out = kubectl_stdin(control_plane, &["apply"], yaml)?;
        ensure!(
            out.status.success(),
            "kubectl apply of Gateway API objects failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let get = |resource: &str, name: &str| -> Result<Value> {
        json(&control_plane.kubectl(&["-n", "shop", "get", resource, name, "-o", "json"])?)
    };
    let route = get("httproutes.v1.gateway.networking.k8s.io", "service-c")?;
    let spec = &route["spec"];
    ensure!(
        spec["parentRefs"]
            == serde_json::json!([{"group": "", "kind": "Service", "name": "service-c", "port": 8080}])
            && spec["rules"][0]["matches"]
                == serde_json::json!([{"path": {"type": "PathPrefix", "value": "/"}}])
            && spec["rules"][0]["backendRefs"]
                == serde_json::json!([
                    {"name": "service-c-v1", "port": 8080, "weight": 90},
                    {"name": "service-c-v2", "port": 8080, "weight": 10}
                ]),
        "the GAMMA route reads back otherwise (no defaults, nothing dropped): {spec}"
    );
    // Written at v1beta1, read at v1: one schema, nothing converted.
    let rewrite = get("httproutes.v1.gateway.networking.k8s.io", "rewrite")?;
    let rule = &rewrite["spec"]["rules"][0];
    ensure!(
        rewrite["apiVersion"] == "gateway.networking.k8s.io/v1"
            && rewrite["spec"]["parentRefs"][0]["group"] == ""
            && rule["filters"][0]["urlRewrite"]["path"]["replacePrefixMatch"] == ""
            && rule["backendRefs"][0]["group"] == ""
            && rule["backendRefs"][0]["weight"] == 0
            && rule["timeouts"]["request"] == "10s",
        "the rewrite route reads back otherwise: {rewrite}"
    );
    let beta = get("httproutes.v1beta1.gateway.networking.k8s.io", "service-c")?;
    ensure!(
        beta["apiVersion"] == "gateway.networking.k8s.io/v1beta1" && beta["spec"] == *spec,
        "served at v1beta1 with the same spec: {beta}"
    );
    ensure!(
        get("grpcroute", "cart")?["spec"]["parentRefs"][0]["group"] == ""
            && get("gateways.gateway.networking.k8s.io", "ingress")?["spec"]["gatewayClassName"]
                == "mesh",
        "the GRPCRoute and the Gateway are there"
    );

    for (name, field, value, refusal) in [
        (
            "negative",
            "weight",
            "-1",
            "should be greater than or equal to 0",
        ),
        (
            "too-far",
            "port",
            "70000",
            "should be less than or equal to 65535",
        ),
    ] {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: service-c}}]\n  \
             rules: [{{backendRefs: [{{name: service-c-v1, port: 8080, {field}: {value}}}]}}]\n"
        );
        let out = kubectl_stdin(control_plane, &["apply", "--validate=false"], &yaml)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && stderr.contains(&format!("spec.rules.backendRefs.{field}: Invalid value"))
                && stderr.contains(refusal),
            "{field}: {value} must be refused by the API server: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    eprintln!(
        "Gateway API objects applied, read back and refused as expected in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// [`mesh_tests::wait_for`] within [`TIMEOUT`].
fn wait_for<T>(what: &str, check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    mesh_tests::wait_for(what, TIMEOUT, check)
}

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).context("kubectl printed no JSON")
}

/// The HTTP status of `method path` with `token`, straight from the API server (curl: the exact
/// status, not kubectl's reading of it). `body` is sent as JSON.
fn status(
    control_plane: &ControlPlane,
    token: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<u16> {
    let url = format!("{}{path}", control_plane.server());
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "30",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg("--cacert")
    .arg(control_plane.ca_cert())
    .args(["-X", method])
    .args(["-H", &format!("Authorization: Bearer {token}")]);
    if !body.is_empty() {
        curl.args(["-H", "Content-Type: application/json", "--data", body]);
    }
    let out = curl.arg(&url).output().context("running curl")?;
    ensure!(
        out.status.success(),
        "curl {method} {url} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("curl printed no status for {method} {url}"))
}

/// The versions of `group` the API server serves, from discovery (the core group is `v1`).
fn served_versions(control_plane: &ControlPlane, group: &str) -> Result<Vec<String>> {
    if group.is_empty() {
        return Ok(vec!["v1".to_owned()]);
    }
    let discovery = json(&control_plane.kubectl(&["get", "--raw", &format!("/apis/{group}")])?)?;
    let versions: Vec<String> = discovery["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|version| version["version"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        !versions.is_empty(),
        "{group} serves no version: {discovery}"
    );
    Ok(versions)
}

/// The resources the API server serves of `group` at `version` (a CRD may serve some of its
/// group's versions only).
fn served_resources(
    control_plane: &ControlPlane,
    group: &str,
    version: &str,
) -> Result<BTreeSet<String>> {
    let path = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let resources = json(&control_plane.kubectl(&["get", "--raw", &path])?)?;
    Ok(resources["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect())
}

/// The URL path of every object of `resource` in all namespaces.
fn collection(group: &str, version: &str, resource: &str) -> String {
    if group.is_empty() {
        format!("/api/{version}/{resource}")
    } else {
        format!("/apis/{group}/{version}/{resource}")
    }
}

/// `deploy/` and `deploy/gateway-api` applied with kubectl, with Gateway API objects as a GAMMA
/// mesh writes them ([`gateway_api_objects_apply_as_written`]); then, with the agent's
/// own tokens (a TokenRequest token, as current kubelets mount, and the token Secret 1.20's token
/// controller made, as a 1.20 kubelet mounts), list and watch of each kind the ClusterRole grants
/// — at every version the server serves — answer 200, and the role grants exactly what the agent
/// watches; secrets, other kinds and any write answer 403.
#[test]
fn the_agents_role_lets_it_watch_what_it_watches_and_nothing_more() -> Result<()> {
    let control_plane = ControlPlane::start()?;
    control_plane
        .kubectl(&["apply", "-k", &deploy_dir()])
        .context("kubectl apply -k deploy on Kubernetes 1.20")?;
    gateway_api_established(|args| control_plane.kubectl(args))?;
    gateway_api_objects_apply_as_written(&control_plane)?;

    let bound_token = control_plane
        .kubectl(&["-n", MESH_NAMESPACE, "create", "token", AGENT])?
        .trim()
        .to_owned();
    let secret_token = wait_for("the agent's ServiceAccount token Secret", || {
        let secret = control_plane.kubectl(&[
            "-n",
            MESH_NAMESPACE,
            "get",
            "serviceaccount",
            AGENT,
            "-o",
            "jsonpath={.secrets[0].name}",
        ])?;
        if secret.trim().is_empty() {
            return Ok(None);
        }
        let token = control_plane.kubectl(&[
            "-n",
            MESH_NAMESPACE,
            "get",
            "secret",
            secret.trim(),
            "-o",
            "go-template={{.data.token | base64decode}}",
        ])?;
        Ok(Some(token))
    })?;

    // What the role grants, as the server has it.
    let role = json(&control_plane.kubectl(&["get", "clusterrole", AGENT, "-o", "json"])?)?;
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().context("the role has no rules")? {
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|verb| verb.as_str())
            .collect();
        for group in rule["apiGroups"].as_array().into_iter().flatten() {
            for resource in rule["resources"].as_array().into_iter().flatten() {
                let key = (
                    group.as_str().unwrap_or_default().to_owned(),
                    resource.as_str().unwrap_or_default().to_owned(),
                );
                let expected: &[&str] = CREATED
                    .iter()
                    .find(|(g, r, _)| (*g, *r) == (key.0.as_str(), key.1.as_str()))
                    .map_or(&["get", "list", "watch"], |(_, _, verbs)| *verbs);
                ensure!(
                    verbs == expected,
                    "the role grants {verbs:?} on {key:?}, expected {expected:?}"
                );
                granted.insert(key);
            }
        }
    }
    let used: BTreeSet<(String, String)> = WATCHED
        .iter()
        .chain(&GATEWAY_API)
        .chain(&REPORTED_ONLY)
        .copied()
        .chain(
            CREATED
                .iter()
                .map(|(group, resource, _)| (*group, *resource)),
        )
        .map(|(group, resource)| (group.to_owned(), resource.to_owned()))
        .collect();
    ensure!(
        granted == used,
        "the role grants {granted:?}, the agent uses {used:?}"
    );

    let kinds: Vec<(&str, &str)> = WATCHED.iter().chain(&GATEWAY_API).copied().collect();
    let groups: BTreeSet<&str> = kinds.iter().map(|(group, _)| *group).collect();
    let mut checked = Vec::new();
    for group in groups {
        for version in served_versions(&control_plane, group)? {
            let served = served_resources(&control_plane, group, &version)?;
            for (_, resource) in kinds.iter().filter(|(g, _)| *g == group) {
                if served.contains(*resource) {
                    checked.push(collection(group, &version, resource));
                }
            }
        }
    }
    // Each watch lasts its timeout (1 s): all at once.
    std::thread::scope(|scope| {
        let requests: Vec<_> = checked
            .iter()
            .flat_map(|path| [path.clone(), format!("{path}?watch=1&timeoutSeconds=1")])
            .flat_map(|request| {
                [("bound", &bound_token), ("secret", &secret_token)]
                    .map(|(which, token)| (request.clone(), which, token))
            })
            .map(|(request, which, token)| {
                let control_plane = &control_plane;
                scope.spawn(move || -> Result<()> {
                    let code = status(control_plane, token, "GET", &request, "")?;
                    ensure!(
                        code == 200,
                        "GET {request} with the agent's {which} token: {code}, expected 200"
                    );
                    Ok(())
                })
            })
            .collect();
        requests
            .into_iter()
            .try_for_each(|request| request.join().expect("request thread panicked"))
    })?;
    // 1.20 serves EndpointSlices only as v1beta1 (the role's grant is for the group, whatever
    // the version); the agent watches the Istio kinds as v1beta1, the Gateway API's as v1.
    for expected in [
        "/apis/discovery.k8s.io/v1beta1/endpointslices",
        "/apis/networking.istio.io/v1beta1/virtualservices",
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        "/apis/gateway.networking.k8s.io/v1/gateways",
    ] {
        ensure!(
            checked.iter().any(|path| path == expected),
            "{expected} not among {checked:?}"
        );
    }
    eprintln!("list and watch answered 200 with the agent's tokens: {checked:?}");

    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"intruder"},
                  "spec":{"containers":[{"name":"c","image":"x"}]}}"#;
    for (method, path, body) in [
        ("GET", "/api/v1/secrets".to_owned(), ""),
        (
            "GET",
            format!("/api/v1/namespaces/{MESH_NAMESPACE}/secrets"),
            "",
        ),
        ("GET", "/api/v1/configmaps".to_owned(), ""),
        ("GET", "/api/v1/nodes".to_owned(), ""),
        ("GET", "/apis/apps/v1/daemonsets".to_owned(), ""),
        ("GET", "/apis/events.k8s.io/v1/events".to_owned(), ""),
        ("POST", "/api/v1/namespaces/default/pods".to_owned(), pod),
        ("DELETE", format!("/api/v1/namespaces/{MESH_NAMESPACE}"), ""),
        (
            "POST",
            format!("/api/v1/namespaces/{MESH_NAMESPACE}/serviceaccounts/{AGENT}/token"),
            r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{}}"#,
        ),
        // CSRs: neither listed nor watched, and never approved or signed by an agent.
        (
            "GET",
            "/apis/certificates.k8s.io/v1/certificatesigningrequests".to_owned(),
            "",
        ),
        (
            "PUT",
            "/apis/certificates.k8s.io/v1/certificatesigningrequests/any/approval".to_owned(),
            r#"{"apiVersion":"certificates.k8s.io/v1","kind":"CertificateSigningRequest","metadata":{"name":"any"}}"#,
        ),
        (
            "PUT",
            "/apis/certificates.k8s.io/v1/certificatesigningrequests/any/status".to_owned(),
            r#"{"apiVersion":"certificates.k8s.io/v1","kind":"CertificateSigningRequest","metadata":{"name":"any"}}"#,
        ),
        // Gateway API objects are read, never written: neither routes nor their status.
        (
            "POST",
            format!("/apis/{GATEWAY_API_GROUP}/v1/namespaces/shop/httproutes"),
            r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute","metadata":{"name":"mine"},"spec":{}}"#,
        ),
        (
            "PUT",
            format!("/apis/{GATEWAY_API_GROUP}/v1/namespaces/shop/httproutes/service-c/status"),
            r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute","metadata":{"name":"service-c"}}"#,
        ),
        // The bundle's ConfigMap is read, never written; no other ConfigMap is read.
        (
            "PUT",
            format!("/api/v1/namespaces/{MESH_NAMESPACE}/configmaps/mesh-ca-root-cert"),
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"mesh-ca-root-cert"}}"#,
        ),
        (
            "GET",
            format!("/api/v1/namespaces/{MESH_NAMESPACE}/configmaps/mesh-agent"),
            "",
        ),
    ] {
        for (which, token) in [("bound", &bound_token), ("secret", &secret_token)] {
            let code = status(&control_plane, token, method, &path, body)?;
            ensure!(
                code == 403,
                "{method} {path} with the agent's {which} token: {code}, expected 403"
            );
        }
    }
    // The trust bundle's ConfigMap may be read (the Role's one grant): 404 before the signer
    // has published it, not 403.
    let bundle = format!("/api/v1/namespaces/{MESH_NAMESPACE}/configmaps/mesh-ca-root-cert");
    for (which, token) in [("bound", &bound_token), ("secret", &secret_token)] {
        let code = status(&control_plane, token, "GET", &bundle, "")?;
        ensure!(
            code == 404,
            "GET {bundle} with the agent's {which} token: {code}, expected 404 (allowed, absent)"
        );
    }
    Ok(())
}

/// A Node registered by hand (as a kubelet would: the object, then a Ready status), and a
/// Deployment applied with kubectl: the controller-manager makes its ReplicaSet and Pod, the
/// scheduler binds the Pod to the Node. (Nothing runs it: there is no kubelet.)
#[test]
fn a_deployment_gets_a_replica_set_and_a_pod_bound_to_a_node() -> Result<()> {
    let control_plane = ControlPlane::start()?;
    let node = "node-1";
    let apply = |yaml: &str| -> Result<()> {
        let mut kubectl = control_plane.kubectl_command();
        let mut child = kubectl
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().expect("piped"), yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels:\n    \
         kubernetes.io/os: linux\n    kubernetes.io/hostname: {node}\n"
    ))?;
    let now = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()?;
    let now = String::from_utf8(now.stdout)?.trim().to_owned();
    let status = serde_json::json!({
        "status": {
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "a test registered this node",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.11"}],
        }
    });
    control_plane.kubectl(&[
        "patch",
        "node",
        node,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])?;

    control_plane.kubectl(&["create", "namespace", "smoke"])?;
    apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: smoke\n\
         spec:\n  replicas: 1\n  selector:\n    matchLabels: {app: web}\n  template:\n    \
         metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      \
         - {name: web, image: example.com/web:1}\n",
    )?;

    let started = Instant::now();
    let replica_set = wait_for("the Deployment's ReplicaSet", || {
        let sets = json(&control_plane.kubectl(&[
            "-n",
            "smoke",
            "get",
            "replicasets",
            "-l",
            "app=web",
            "-o",
            "json",
        ])?)?;
        Ok(sets["items"].as_array().and_then(|items| {
            items
                .iter()
                .find(|set| set["metadata"]["ownerReferences"][0]["name"] == "web")
                .and_then(|set| set["metadata"]["name"].as_str().map(str::to_owned))
        }))
    })?;
    let (pod, bound_to) = wait_for("a Pod of the ReplicaSet bound to a node", || {
        let pods = json(
            &control_plane
                .kubectl(&["-n", "smoke", "get", "pods", "-l", "app=web", "-o", "json"])?,
        )?;
        Ok(pods["items"].as_array().and_then(|items| {
            items
                .iter()
                .filter(|pod| pod["metadata"]["ownerReferences"][0]["name"] == replica_set.as_str())
                .find_map(|pod| {
                    let node = pod["spec"]["nodeName"].as_str()?;
                    let name = pod["metadata"]["name"].as_str()?;
                    Some((name.to_owned(), node.to_owned()))
                })
        }))
    })?;
    ensure!(
        bound_to == node,
        "pod {pod} bound to {bound_to}, expected {node}"
    );
    eprintln!(
        "deployment -> replica set {replica_set} -> pod {pod} on {bound_to} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The agent as the DaemonSet runs it (its ServiceAccount's token, the role of `deploy/base`),
/// on a simulated node whose network namespace the control plane runs in, before the Istio CRDs
/// are installed: `/healthz` answers at once; `/ready` is 503 and names the kinds whose first
/// list fails, with the API server's reason; each failing watch is logged once, then counted.
/// Once the CRDs are there it is ready, and a selector-less Service's hand-written `v1beta1`
/// EndpointSlice (all 1.20 serves) gives the service its endpoints. The Gateway API CRDs
/// (`deploy/gateway-api`) are installed from the start: the agent watches their kinds, and a
/// GAMMA HTTPRoute is in its config as soon as it is ready (their first lists are awaited).
#[test]
fn the_agent_reads_v1beta1_endpoint_slices_and_says_what_it_waits_for() -> Result<()> {
    require_root();
    let node = SimNode::new()?;
    let control_plane = node.run_on_node(ControlPlane::start)??;
    let kubectl =
        |args: &[&str]| -> Result<String> { node.run_on_node(|| control_plane.kubectl(args))? };
    let kubeconfig = node.run_on_node(|| control_plane.agent_kubeconfig())??;
    // The control plane comes with the mesh's CRDs: take them away until the agent has said
    // that it waits for them.
    let crds = format!("{}/crds", deploy_dir());
    kubectl(&["delete", "-f", &crds, "--wait"])?;
    gateway_api_established(kubectl)?;
    kubectl(&["create", "namespace", "shop"])?;
    node.run_on_node(|| -> Result<()> {
        let out = kubectl_stdin(&control_plane, &["apply"], GAMMA_ROUTE)?;
        ensure!(
            out.status.success(),
            "kubectl apply of the GAMMA route failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })??;

    let started = Instant::now();
    let agent = Agent::spawn_kubernetes(&node, &kubeconfig, "node-1")?;
    wait_for("the agent's /healthz", || {
        Ok(matches!(agent.admin_get("/healthz"), Ok((200, _))).then_some(()))
    })?;
    let healthy_after = started.elapsed();
    // Not ready, and why: no CRD serves VirtualService, DestinationRule or Gateway yet.
    // Until the kinds the API server serves are listed (a moment), they are named too.
    let reasons = wait_for(
        "/ready to name the Istio kinds it waits for, and no kind the server serves",
        || {
            let (code, body) = agent.admin_get("/ready")?;
            let istio_failing = ["VirtualService", "DestinationRule", "Gateway"]
                .iter()
                .all(|kind| body.contains(&format!("first list of {kind} (last error: ")));
            let served_listed = !body.contains("first list of Service ")
                && !body.contains("EndpointSlice")
                && !body.contains(GATEWAY_API_GROUP);
            Ok((code == 503 && istio_failing && served_listed).then_some(body))
        },
    )?;
    eprintln!(
        "/healthz answered after {healthy_after:?}; /ready: {}",
        reasons.trim()
    );
    ensure!(
        healthy_after < Duration::from_secs(5),
        "/healthz took {healthy_after:?}"
    );
    ensure!(
        agent
            .stderr_text()
            .lines()
            .any(|line| line.contains("watching the Gateway API kinds")
                && ["HTTPRoute", "GRPCRoute", "Gateway"]
                    .iter()
                    .all(|kind| line.contains(kind))),
        "the agent says it watches the Gateway API kinds:\n{}",
        agent.stderr_text()
    );
    // Backoff retries the failing lists; each kind's first failure is logged, the rest counted.
    wait_for("three failed lists of VirtualService, counted", || {
        let (_, metrics) = agent.admin_get("/metrics")?;
        let failures = metrics
            .lines()
            .find(|line| {
                line.starts_with("mesh_kubernetes_watch_failures_total")
                    && line.contains("kind=\"VirtualService\"")
            })
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        Ok((failures >= 3.0).then_some(()))
    })?;
    let logged = |what: &str| {
        agent
            .stderr_text()
            .lines()
            .filter(|line| line.contains(what) && line.contains("VirtualService"))
            .count()
    };
    ensure!(
        logged("watch failed") == 1,
        "one warning for VirtualService's failing watch, then counting:\n{}",
        agent.stderr_text()
    );
    ensure!(
        agent.stderr_text().contains("v1beta1") && agent.stderr_text().contains("EndpointSlice"),
        "the agent says it reads EndpointSlice at v1beta1:\n{}",
        agent.stderr_text()
    );

    // A Service without a selector and its EndpointSlice, written by hand at 1.20's version.
    let objects = control_plane.dir().join("service-c.yaml");
    std::fs::write(
        &objects,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: service-c, namespace: shop}\n\
         spec:\n  ports: [{name: http, port: 8080}]\n---\n\
         apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\n\
         metadata:\n  name: service-c-1\n  namespace: shop\n  labels:\n    \
         kubernetes.io/service-name: service-c\n    endpointslice.kubernetes.io/managed-by: test\n\
         addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
         endpoints:\n- addresses: [10.77.0.41]\n  conditions: {ready: true}\n  \
         topology: {kubernetes.io/hostname: node-1}\n\
         - addresses: [10.77.0.42]\n  conditions: {ready: false}\n",
    )?;
    kubectl(&["apply", "-f", &objects.display().to_string()])?;
    kubectl(&["apply", "-f", &crds])?;
    agent.wait_ready(TIMEOUT)?;
    eprintln!("ready {:?} after start", started.elapsed());
    // Listed before the agent said it was ready, so in force at once.
    let (_, dump) = agent.admin_get("/config_dump")?;
    let dump = json(&dump)?;
    let listed = dump["objects"].as_array().into_iter().flatten().any(|o| {
        o["apiVersion"] == "gateway.networking.k8s.io/v1"
            && o["kind"] == "HTTPRoute"
            && o["metadata"]["name"] == "service-c"
    });
    ensure!(
        listed,
        "the GAMMA route is not in the ready agent's config: {}",
        serde_json::to_string_pretty(&dump)?
    );
    ensure!(
        logged("watch recovered") == 1,
        "VirtualService's watch recovered, and says so:\n{}",
        agent.stderr_text()
    );
    let clusters = wait_for("service-c's endpoint in the agent's clusters", || {
        let (_, clusters) = agent.admin_get("/clusters")?;
        Ok(clusters.contains("10.77.0.41").then_some(clusters))
    })?;
    ensure!(
        !clusters.contains("10.77.0.42"),
        "a not-ready endpoint is left out: {clusters}"
    );
    Ok(())
}
