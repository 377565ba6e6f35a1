//! PeerAuthentication: read and validated with its fields, then resolved per workload as
//! Istio's `ComposePeerAuthentication` does.

use std::collections::BTreeMap;

use super::{MtlsMode, PeerAuthentications, PodMtls};
use crate::config::{self, model::PeerMtlsMode};

use MtlsMode::{Disable, Permissive, Strict};

/// A policy as YAML: `selector` and `extra` are spec lines (`""` for none).
fn policy(namespace: &str, name: &str, selector: &str, mode: &str, extra: &str) -> String {
    let mut spec = String::new();
    if !selector.is_empty() {
        spec.push_str(&format!("  selector: {{matchLabels: {selector}}}\n"));
    }
    if !mode.is_empty() {
        spec.push_str(&format!("  mtls: {{mode: {mode}}}\n"));
    }
    spec.push_str(extra);
    if spec.is_empty() {
        spec.push_str("  {}\n");
    }
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )
}

/// The policies of `yaml`, which must load without errors.
fn resolve(yaml: &str) -> PeerAuthentications {
    let loaded = config::load_str("peer.yml", yaml);
    assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
    PeerAuthentications::new(&loaded.config.peer_authentications)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn finance() -> BTreeMap<String, String> {
    labels(&[("app", "finance"), ("version", "v1")])
}

fn uniform(mode: MtlsMode) -> PodMtls {
    PodMtls {
        default: mode,
        ports: BTreeMap::new(),
    }
}

#[test]
fn no_policy_is_permissive_everywhere() {
    let none = PeerAuthentications::new(&[]);
    assert!(none.is_empty());
    let mtls = none.for_workload("foo", &finance());
    assert_eq!(mtls, PodMtls::default());
    assert_eq!(mtls, uniform(Permissive));
    assert_eq!(mtls.mode(8080), Permissive);
}

#[test]
fn the_narrowest_level_wins_mesh_then_namespace_then_workload() {
    let yaml = [
        policy("istio-system", "default", "", "STRICT", ""),
        policy("foo", "default", "", "PERMISSIVE", ""),
        policy("foo", "finance", "{app: finance}", "DISABLE", ""),
    ]
    .concat();
    let policies = resolve(&yaml);
    assert!(!policies.is_empty());
    // Another namespace has only the mesh's.
    assert_eq!(policies.for_workload("bar", &finance()), uniform(Strict));
    // The namespace's over the mesh's.
    let other = labels(&[("app", "ledger")]);
    assert_eq!(policies.for_workload("foo", &other), uniform(Permissive));
    // The workload's over the namespace's, only where its selector matches every label.
    assert_eq!(policies.for_workload("foo", &finance()), uniform(Disable));
    assert_eq!(
        policies.for_workload("foo", &BTreeMap::new()),
        uniform(Permissive)
    );
    // A selector matches in its own namespace only.
    assert_eq!(policies.for_workload("bar", &finance()), uniform(Strict));
}

#[test]
fn unset_inherits_the_next_broader_level_and_permissive_at_the_top() {
    let cases: &[(&str, &str, &str, MtlsMode)] = &[
        // mesh, namespace, workload → resolved.
        ("STRICT", "UNSET", "UNSET", Strict),
        ("STRICT", "", "", Strict),
        ("DISABLE", "STRICT", "UNSET", Strict),
        ("STRICT", "DISABLE", "", Disable),
        ("UNSET", "UNSET", "UNSET", Permissive),
        ("", "", "STRICT", Strict),
        ("STRICT", "PERMISSIVE", "STRICT", Strict),
    ];
    for (mesh, namespace, workload, expected) in cases {
        let yaml = [
            policy("istio-system", "mesh", "", mesh, ""),
            policy("foo", "namespace", "", namespace, ""),
            policy("foo", "workload", "{app: finance}", workload, ""),
        ]
        .concat();
        let resolved = resolve(&yaml).for_workload("foo", &finance());
        assert_eq!(
            resolved,
            uniform(*expected),
            "mesh {mesh:?}, namespace {namespace:?}, workload {workload:?}"
        );
    }
    // A level without any policy is skipped the same way.
    let yaml = [
        policy("istio-system", "mesh", "", "DISABLE", ""),
        policy("foo", "workload", "{app: finance}", "UNSET", ""),
    ]
    .concat();
    assert_eq!(
        resolve(&yaml).for_workload("foo", &finance()),
        uniform(Disable)
    );
}

#[test]
fn port_level_modes_override_the_workloads_and_unset_ports_inherit_it() {
    let ports = "  portLevelMtls:\n    8080: {mode: DISABLE}\n    '9090': {mode: UNSET}\n    \
                 \"9443\": {mode: STRICT}\n    7070: {}\n";
    let yaml = [
        policy("foo", "default", "", "STRICT", ""),
        policy("foo", "finance", "{app: finance}", "PERMISSIVE", ports),
    ]
    .concat();
    let resolved = resolve(&yaml).for_workload("foo", &finance());
    assert_eq!(
        resolved,
        PodMtls {
            default: Permissive,
            ports: BTreeMap::from([
                (7070, Permissive),
                (8080, Disable),
                (9090, Permissive),
                (9443, Strict),
            ]),
        }
    );
    assert_eq!(resolved.mode(8080), Disable);
    assert_eq!(resolved.mode(9443), Strict);
    assert_eq!(
        resolved.mode(80),
        Permissive,
        "a port not named: the default"
    );

    // The workload's own mode unset: ports that are unset inherit the namespace's, through it.
    let yaml = [
        policy("foo", "default", "", "STRICT", ""),
        policy(
            "foo",
            "finance",
            "{app: finance}",
            "",
            "  portLevelMtls: {8080: {mode: PERMISSIVE}, 9090: {mode: UNSET}}\n",
        ),
    ]
    .concat();
    let resolved = resolve(&yaml).for_workload("foo", &finance());
    assert_eq!(resolved.default, Strict);
    assert_eq!(resolved.mode(8080), Permissive);
    assert_eq!(resolved.mode(9090), Strict);
}

#[test]
fn of_several_policies_at_one_level_the_oldest_wins_then_the_name() {
    let at = |time: &str| format!("  creationTimestamp: \"{time}\"\n");
    let timed = |namespace: &str, name: &str, time: Option<&str>, selector: &str, mode: &str| {
        let text = policy(namespace, name, selector, mode, "");
        match time {
            Some(time) => text.replace(
                &format!("metadata: {{name: {name}, namespace: {namespace}}}\n"),
                &format!(
                    "metadata:\n  name: {name}\n  namespace: {namespace}\n{}",
                    at(time)
                ),
            ),
            None => text,
        }
    };
    // Mesh level: the older one, though its name sorts after.
    let yaml = [
        timed(
            "istio-system",
            "a-newer",
            Some("2024-05-02T00:00:00Z"),
            "",
            "DISABLE",
        ),
        timed(
            "istio-system",
            "z-older",
            Some("2024-05-01T00:00:00Z"),
            "",
            "STRICT",
        ),
    ]
    .concat();
    assert!(yaml.contains("creationTimestamp"), "{yaml}");
    assert_eq!(
        resolve(&yaml).for_workload("foo", &finance()),
        uniform(Strict)
    );

    // Namespace level: the same time, so the name decides.
    let yaml = [
        timed("foo", "b", Some("2024-05-01T00:00:00Z"), "", "DISABLE"),
        timed("foo", "a", Some("2024-05-01T00:00:00Z"), "", "STRICT"),
    ]
    .concat();
    assert_eq!(
        resolve(&yaml).for_workload("foo", &finance()),
        uniform(Strict)
    );

    // Workload level: every matching policy competes, the oldest wins and only its ports
    // count; one without a time is older than any with one.
    let yaml = [
        timed(
            "foo",
            "by-app",
            Some("2024-05-01T00:00:00Z"),
            "{app: finance}",
            "DISABLE",
        ),
        timed("foo", "by-version", None, "{version: v1}", "STRICT"),
        timed(
            "foo",
            "by-both",
            None,
            "{app: finance, version: v1}",
            "PERMISSIVE",
        ),
    ]
    .concat();
    let policies = resolve(&yaml);
    // `by-both` and `by-version` have no time: the name decides between them.
    assert_eq!(
        policies.for_workload("foo", &finance()),
        uniform(Permissive)
    );
    // A workload only `by-app` selects.
    let v2 = labels(&[("app", "finance"), ("version", "v2")]);
    assert_eq!(policies.for_workload("foo", &v2), uniform(Disable));
    let only_version = labels(&[("version", "v1")]);
    assert_eq!(policies.for_workload("foo", &only_version), uniform(Strict));
}

#[test]
fn a_selector_without_labels_is_namespace_wide_and_one_in_the_root_namespace_is_ignored() {
    let yaml = [
        policy("istio-system", "default", "", "PERMISSIVE", ""),
        policy(
            "istio-system",
            "finance-everywhere",
            "{app: finance}",
            "STRICT",
            "",
        ),
        policy("foo", "empty-selector", "{}", "DISABLE", ""),
    ]
    .concat();
    let loaded = config::load_str("peer.yml", &yaml);
    assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
    let root_selector: Vec<String> = loaded
        .warnings()
        .filter(|w| w.field == "spec.selector")
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        root_selector,
        ["peer.yml: PeerAuthentication istio-system/finance-everywhere: spec.selector: a policy \
          with a selector in the root namespace (istio-system) applies to no workload: Istio \
          ignores it, and so does this mesh"]
    );
    let policies = PeerAuthentications::new(&loaded.config.peer_authentications);
    assert_eq!(policies.for_workload("foo", &finance()), uniform(Disable));
    assert_eq!(
        policies.for_workload("bar", &finance()),
        uniform(Permissive)
    );
    // Not even in the root namespace itself, where the mesh-wide policy is the namespace's.
    assert_eq!(
        policies.for_workload("istio-system", &finance()),
        uniform(Permissive)
    );
    // Ignored alone, a workload policy of the root namespace leaves nothing in force.
    let ignored = resolve(&policy("istio-system", "x", "{app: finance}", "STRICT", ""));
    assert!(ignored.is_empty());
}

#[test]
fn holds_the_same_policies_read_again_and_not_changed_ones() {
    let yaml = [
        policy("foo", "default", "", "STRICT", ""),
        policy(
            "foo",
            "finance",
            "{app: finance}",
            "",
            "  portLevelMtls: {8080: {}}\n",
        ),
    ]
    .concat();
    let first = config::load_str("peer.yml", &yaml)
        .config
        .peer_authentications;
    let policies = PeerAuthentications::new(&first);
    assert!(policies.holds(&first));
    // Read again (a relist, a file edited elsewhere): other objects, equal.
    let again = config::load_str("peer.yml", &format!("{yaml}# edited\n"))
        .config
        .peer_authentications;
    assert!(policies.holds(&again));
    let changed = config::load_str("peer.yml", &yaml.replace("STRICT", "DISABLE"))
        .config
        .peer_authentications;
    assert!(!policies.holds(&changed));
    assert!(!policies.holds(&first[..1]));
}

// ---------------------------------------------------------------- reading and validation

#[test]
fn fields_are_read_with_integer_or_string_port_keys_from_yaml_and_json() {
    let yaml = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
  creationTimestamp: '2024-05-01T10:00:00Z'
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    '9090': {mode: PERMISSIVE}
";
    let loaded = config::load_str("peer.yml", yaml);
    assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
    let policy = &loaded.config.peer_authentications[0];
    assert_eq!(
        (policy.id.namespace.as_str(), policy.id.name.as_str()),
        ("foo", "finance")
    );
    assert_eq!(
        policy.created.map(|t| t.to_string()).as_deref(),
        Some("2024-05-01T10:00:00Z")
    );
    assert_eq!(policy.selector, Some(labels(&[("app", "finance")])));
    assert_eq!(policy.mode, PeerMtlsMode::Strict);
    assert_eq!(
        policy.port_level,
        BTreeMap::from([
            (8080, PeerMtlsMode::Disable),
            (9090, PeerMtlsMode::Permissive)
        ])
    );

    let json = r#"{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "finance", "namespace": "foo", "creationTimestamp": null},
        "spec": {"selector": {"matchLabels": {"app": "finance"}},
                 "portLevelMtls": {"8080": {"mode": "DISABLE"}}}}"#;
    let loaded = config::load_str("peer.json", json);
    assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
    let policy = &loaded.config.peer_authentications[0];
    assert_eq!(policy.created, None);
    assert_eq!(policy.mode, PeerMtlsMode::Unset, "no mtls: UNSET");
    assert_eq!(policy.port_level[&8080], PeerMtlsMode::Disable);

    // The summary of `mesh-agent validate` counts them.
    let mut out = Vec::new();
    let dir = std::env::temp_dir().join(format!("mesh-peer-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("peer.yml"), yaml).unwrap();
    let ok = config::run_validate(std::slice::from_ref(&dir), &mut out).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(ok, "{out}");
    assert!(
        out.contains("0 AuthorizationPolicy, 1 PeerAuthentication, 0 other object(s)"),
        "{out}"
    );
}

#[test]
fn a_valid_policy_loads_without_warnings_whatever_its_mode() {
    let warned = |yaml: &str| -> Vec<String> {
        let loaded = config::load_str("peer.yml", yaml);
        assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
        loaded.warnings().map(ToString::to_string).collect()
    };
    let port_strict = policy(
        "foo",
        "finance",
        "{app: finance}",
        "PERMISSIVE",
        "  portLevelMtls: {8080: {mode: STRICT}}\n",
    );
    assert_eq!(warned(&port_strict), Vec::<String>::new());
    for mode in ["STRICT", "PERMISSIVE", "DISABLE", "UNSET", ""] {
        assert_eq!(
            warned(&policy("foo", "default", "", mode, "")),
            Vec::<String>::new(),
            "{mode}"
        );
    }
}

/// An error expected: its field and reason.
type Expected = (&'static str, &'static str);

#[test]
fn invalid_policies_are_rejected_with_every_field_and_reason() {
    let cases: &[(&str, String, &[Expected])] = &[
        (
            "unknown mode",
            policy("foo", "bad", "", "strict", ""),
            &[(
                "spec.mtls.mode",
                "unknown mode \"strict\": expected UNSET, DISABLE, PERMISSIVE or STRICT",
            )],
        ),
        (
            "port level without selector",
            policy(
                "foo",
                "bad",
                "",
                "STRICT",
                "  portLevelMtls: {8080: {mode: DISABLE}}\n",
            ),
            &[("spec.portLevelMtls", "portLevelMtls requires selector")],
        ),
        (
            "a selector without labels is none",
            policy(
                "foo",
                "bad",
                "{}",
                "",
                "  portLevelMtls: {8080: {mode: DISABLE}}\n",
            ),
            &[("spec.portLevelMtls", "portLevelMtls requires selector")],
        ),
        (
            "ports out of range, not numbers, modes unknown",
            policy(
                "foo",
                "bad",
                "{app: finance}",
                "",
                "  portLevelMtls:\n    0: {mode: DISABLE}\n    70000: {mode: DISABLE}\n    \
                 http: {mode: DISABLE}\n    8080: {mode: OFF}\n",
            ),
            &[
                ("spec.portLevelMtls.0", "port 0 is outside 1–65535"),
                ("spec.portLevelMtls.70000", "port 70000 is outside 1–65535"),
                (
                    "spec.portLevelMtls.8080.mode",
                    "unknown mode \"OFF\": expected UNSET, DISABLE, PERMISSIVE or STRICT",
                ),
                (
                    "spec.portLevelMtls.http",
                    "\"http\" is not a port number (1-65535)",
                ),
            ],
        ),
        (
            "one port written twice",
            policy(
                "foo",
                "bad",
                "{app: finance}",
                "",
                "  portLevelMtls: {'8080': {mode: DISABLE}, '08080': {mode: STRICT}}\n",
            ),
            &[("spec.portLevelMtls.8080", "port 8080 is set twice")],
        ),
        (
            "a creation time that is no time",
            policy("foo", "bad", "", "STRICT", "").replace(
                "namespace: foo}",
                "namespace: foo, creationTimestamp: yesterday}",
            ),
            &[(
                "metadata.creationTimestamp",
                "\"yesterday\" is not an RFC 3339 time",
            )],
        ),
        (
            "a mode of the wrong type",
            policy("foo", "bad", "", "[STRICT]", ""),
            &[(
                "spec.mtls.mode",
                "invalid type: sequence, expected a string",
            )],
        ),
    ];
    for (name, yaml, expected) in cases {
        let loaded = config::load_str("bad.yml", yaml);
        let errors: Vec<(String, String)> = loaded
            .errors()
            .map(|d| {
                assert_eq!(
                    (d.file.as_str(), d.object.as_str()),
                    ("bad.yml", "PeerAuthentication foo/bad"),
                    "{name}"
                );
                (d.field.clone(), d.reason.clone())
            })
            .collect();
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(f, r)| ((*f).to_owned(), (*r).to_owned()))
            .collect();
        assert_eq!(errors, expected, "{name}");
        assert!(loaded.config.peer_authentications.is_empty(), "{name}");
    }
}

#[test]
fn unknown_fields_warn_and_are_ignored() {
    let yaml = policy(
        "foo",
        "finance",
        "{app: finance}",
        "DISABLE",
        "  portLevelMtls: {8080: {mode: PERMISSIVE, extra: 1}}\n  targetRefs: []\n",
    )
    .replace("mtls: {mode: DISABLE}", "mtls: {mode: DISABLE, level: 2}");
    let loaded = config::load_str("peer.yml", &yaml);
    assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
    let mut warned: Vec<(&str, &str)> = loaded
        .warnings()
        .map(|d| (d.field.as_str(), d.reason.as_str()))
        .collect();
    warned.sort();
    assert_eq!(
        warned,
        [
            ("spec.mtls.level", "unknown field, ignored"),
            ("spec.portLevelMtls.8080.extra", "unknown field, ignored"),
            ("spec.targetRefs", "unknown field, ignored"),
        ]
    );
    let policy = &loaded.config.peer_authentications[0];
    assert_eq!(policy.mode, PeerMtlsMode::Disable);
    assert_eq!(policy.port_level[&8080], PeerMtlsMode::Permissive);
}
