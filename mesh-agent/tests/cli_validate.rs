//! `mesh-agent validate -f`: every diagnostic printed, exit 1 on any error, 0 otherwise.

use std::process::Command;

fn validate(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .arg("validate")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn the_tutorials_circuit_breaker_rule_passes_with_one_warning() {
    let (ok, out) = validate(&[
        "-f",
        "deploy/examples/circuit-breaker/2-destination-rules.yml",
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("warning:")).count(),
        1,
        "{out}"
    );
    assert!(
        out.contains("spec.trafficPolicy.connectionPool.http.maxConnections"),
        "{out}"
    );
}

#[test]
fn an_invalid_file_fails_with_file_object_field_and_reason() {
    let dir = std::env::temp_dir().join(format!("mesh-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yml");
    std::fs::write(
        &file,
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: x}\n\
         spec:\n  hosts: [x]\n  http:\n  - timeout: -1s\n    route:\n    - {destination: {host: x}, weight: 90}\n",
    )
    .unwrap();
    let (ok, out) = validate(&["-f", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!ok, "{out}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 2, "{out}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("VirtualService default/x: spec.http[0].route: weights sum to 90")),
        "{out}"
    );
    assert!(
        errors.iter().any(|e| e.contains("spec.http[0].timeout")),
        "{out}"
    );
}

/// A kind Istio enforces and this mesh does not is a warning, not an error: the file is valid
/// Istio and the rest of the set can be put in force, but the user learns the policy is not
/// enforced.
#[test]
fn a_request_authentication_is_reported_as_not_enforced_and_passes() {
    let dir = std::env::temp_dir().join(format!("mesh-validate-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwt.yml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
         metadata: {name: jwt, namespace: shop}\n\
         spec: {jwtRules: [{issuer: https://issuer.example}]}\n",
    )
    .unwrap();
    let label = file.to_str().unwrap();
    let (ok, out) = validate(&["-f", label]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(ok, "a warning only, exit 0: {out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(
        warnings,
        [format!(
            "warning: {label}: RequestAuthentication shop/jwt: kind RequestAuthentication is \
             not implemented by this mesh: not enforced"
        )],
        "{out}"
    );
    assert!(out.contains("0 error(s), 1 warning(s)"), "{out}");
}

/// An AuthorizationPolicy is validated like the traffic rules: every problem with its field,
/// and the object left out.
#[test]
fn a_bad_authorization_policy_is_reported_with_its_fields() {
    let dir = std::env::temp_dir().join(format!("mesh-validate-authz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("authz.yml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: b, namespace: shop}\nspec:\n  action: PERMIT\n  rules:\n  \
         - to: [{operation: {ports: [http]}}]\n",
    )
    .unwrap();
    let label = file.to_str().unwrap();
    let (ok, out) = validate(&["-f", label]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!ok, "{out}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors,
        [
            format!(
                "error: {label}: AuthorizationPolicy shop/b: spec.action: unknown action \
                 \"PERMIT\": expected ALLOW, DENY, AUDIT or CUSTOM"
            ),
            format!(
                "error: {label}: AuthorizationPolicy shop/b: spec.rules[0].to[0].operation.ports[0]: \
                 \"http\" is not a port number (1-65535)"
            ),
        ],
        "{out}"
    );
    assert!(out.contains("0 AuthorizationPolicy"), "{out}");
}

/// A PeerAuthentication is validated with its fields too: every problem named, and the
/// object left out.
#[test]
fn a_bad_peer_authentication_is_reported_with_its_fields() {
    let dir = std::env::temp_dir().join(format!("mesh-validate-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("peer.yml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: p, namespace: shop}\nspec:\n  mtls: {mode: REQUIRED}\n  \
         portLevelMtls:\n    0: {mode: DISABLE}\n",
    )
    .unwrap();
    let label = file.to_str().unwrap();
    let (ok, out) = validate(&["-f", label]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!ok, "{out}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors,
        [
            format!(
                "error: {label}: PeerAuthentication shop/p: spec.mtls.mode: unknown mode \
                 \"REQUIRED\": expected UNSET, DISABLE, PERMISSIVE or STRICT"
            ),
            format!(
                "error: {label}: PeerAuthentication shop/p: spec.portLevelMtls: portLevelMtls \
                 requires selector"
            ),
            format!(
                "error: {label}: PeerAuthentication shop/p: spec.portLevelMtls.0: port 0 is \
                 outside 1–65535"
            ),
        ],
        "{out}"
    );
    assert!(out.contains("0 PeerAuthentication"), "{out}");
}

/// The tutorial's canary VirtualService checked alone: its subsets are defined in another file
/// (`destination-rules.yml`), which `kubectl apply -f` may well bring later, so a warning per
/// subset, printed, and exit 0.
#[test]
fn the_tutorials_canary_alone_passes_with_a_warning_per_subset() {
    let (ok, out) = validate(&["-f", "deploy/examples/canary/2-vs-v1_and_v2_90_10.yml"]);
    assert!(ok, "a warning only, exit 0: {out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 2, "{out}");
    assert!(
        warnings[1].starts_with(
            "warning: deploy/examples/canary/2-vs-v1_and_v2_90_10.yml: VirtualService \
             default/service-c: spec.http[0].route[1].destination.subset: subset \"version-v2\" \
             is not defined (yet): no DestinationRule for host service-c; requests routed to it \
             are answered 503 NR"
        ),
        "{out}"
    );
    assert!(out.contains("1 VirtualService"), "{out}");
    assert!(out.contains("0 error(s), 2 warning(s)"), "{out}");
    // With the rules it names, nothing to say.
    let (ok, out) = validate(&[
        "-f",
        "deploy/examples/destination-rules.yml",
        "-f",
        "deploy/examples/canary/2-vs-v1_and_v2_90_10.yml",
    ]);
    assert!(ok && out.contains("0 error(s), 0 warning(s)"), "{out}");
}
