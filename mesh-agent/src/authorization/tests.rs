use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use http::{HeaderMap, HeaderValue};

use super::{path, Attributes, Authorization, Decision, HttpAttributes, Policies};
use crate::config;

const A: &str = "cluster.local/ns/default/sa/service-a";
const OTHER: &str = "cluster.local/ns/other/sa/client";

/// The policies of `yaml` that apply to `default`'s `app: service-b`.
fn policies(yaml: &str) -> Policies {
    let loaded = config::load_str("policies.yml", yaml);
    assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
    let authorization = Authorization::new(&loaded.config.authorization_policies);
    let labels = BTreeMap::from([("app".to_owned(), "service-b".to_owned())]);
    authorization.for_workload("default", &labels)
}

fn destination() -> SocketAddr {
    "10.0.0.2:8080".parse().unwrap()
}

fn connection(principal: Option<&str>) -> Attributes<'_> {
    Attributes {
        principal,
        source: "10.0.0.1".parse().unwrap(),
        destination: destination(),
        http: None,
    }
}

fn request<'a>(
    principal: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
) -> Attributes<'a> {
    Attributes {
        http: Some(HttpAttributes {
            method,
            path,
            host: "service-b:8080",
            headers,
        }),
        ..connection(principal)
    }
}

fn allowed(policies: &Policies, attributes: &Attributes) -> bool {
    policies.evaluate(attributes).allowed
}

const ONLY_A_GET: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-from-a, namespace: default}
spec:
  selector: {matchLabels: {app: service-b}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ['cluster.local/ns/default/sa/service-a']}}]
    to: [{operation: {methods: [GET], paths: ['/', '/api/*']}}]
";

#[test]
fn an_allow_policy_admits_only_what_it_matches() {
    let policies = policies(ONLY_A_GET);
    let headers = HeaderMap::new();
    assert!(policies.reads_http());
    assert!(allowed(&policies, &request(Some(A), "GET", "/", &headers)));
    assert!(allowed(
        &policies,
        &request(Some(A), "GET", "/api/x", &headers)
    ));
    assert!(!allowed(
        &policies,
        &request(Some(A), "POST", "/", &headers)
    ));
    assert!(!allowed(
        &policies,
        &request(Some(A), "GET", "/admin", &headers)
    ));
    assert!(!allowed(
        &policies,
        &request(Some(OTHER), "GET", "/", &headers)
    ));
    assert!(!allowed(&policies, &request(None, "GET", "/", &headers)));
    // A connection, before any HTTP: the rule's methods and paths are unknown, so the ALLOW
    // rule does not match (fails closed).
    assert!(!allowed(&policies, &connection(Some(A))));
}

#[test]
fn deny_wins_over_allow_and_audit_only_marks() {
    let policies = policies(&format!(
        "{ONLY_A_GET}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin-api, namespace: default}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: ['/api/admin*']}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: watch-api, namespace: default}}
spec:
  action: AUDIT
  rules: [{{to: [{{operation: {{paths: ['/api/*']}}}}]}}]
"
    ));
    let headers = HeaderMap::new();
    let id = |name: &str| config::model::ObjectRef {
        namespace: "default".into(),
        name: name.into(),
    };
    assert_eq!(
        policies.evaluate(&request(Some(A), "GET", "/api/admin/users", &headers)),
        Decision {
            allowed: false,
            denied_by: Some(id("no-admin-api")),
            audited_by: Some(id("watch-api")),
        }
    );
    assert_eq!(
        policies.evaluate(&request(Some(A), "GET", "/api/x", &headers)),
        Decision {
            allowed: true,
            denied_by: None,
            audited_by: Some(id("watch-api")),
        }
    );
    // On a connection the DENY rule's paths are unknown: it matches (fails closed).
    assert_eq!(
        policies.evaluate(&connection(Some(A))).denied_by,
        Some(id("no-admin-api"))
    );
}

#[test]
fn scope_is_the_root_namespace_the_policys_own_and_its_selector() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [blocked]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: elsewhere, namespace: other}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-c, namespace: default}
spec: {selector: {matchLabels: {app: service-c}}}
";
    let policies = policies(yaml);
    assert_eq!(policies.policies.len(), 1, "{policies:?}");
    assert!(allowed(&policies, &connection(Some(A))));
    assert!(!allowed(
        &policies,
        &connection(Some("cluster.local/ns/blocked/sa/x"))
    ));
}

#[test]
fn an_allow_policy_without_rules_allows_nothing_and_an_empty_rule_everything() {
    let nothing = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing}
spec: {}
",
    );
    assert!(!allowed(&nothing, &connection(Some(A))));
    let everything = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all}
spec: {rules: [{}]}
",
    );
    assert!(allowed(&everything, &connection(None)));
    assert!(!everything.reads_http());
}

#[test]
fn not_principals_star_denies_plaintext_only() {
    let policies = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-mtls}
spec:
  action: DENY
  rules: [{from: [{source: {notPrincipals: ['*']}}]}]
",
    );
    assert!(allowed(&policies, &connection(Some(OTHER))));
    assert!(!allowed(&policies, &connection(None)));
}

#[test]
fn ports_ip_blocks_and_conditions() {
    let policies = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: narrow}
spec:
  rules:
  - from: [{source: {ipBlocks: [10.0.0.0/24], notIpBlocks: [10.0.0.9]}}]
    to: [{operation: {ports: ['8080']}}]
    when:
    - {key: source.namespace, values: [default]}
    - {key: 'request.headers[x-team]', values: [blue, 'g*']}
",
    );
    let mut headers = HeaderMap::new();
    assert!(!allowed(&policies, &request(Some(A), "GET", "/", &headers)));
    headers.insert("x-team", HeaderValue::from_static("green"));
    assert!(allowed(&policies, &request(Some(A), "GET", "/", &headers)));
    assert!(!allowed(
        &policies,
        &request(Some(OTHER), "GET", "/", &headers)
    ));
    let mut from_nine = request(Some(A), "GET", "/", &headers);
    from_nine.source = "10.0.0.9".parse().unwrap();
    assert!(!allowed(&policies, &from_nine));
    let mut mapped = request(Some(A), "GET", "/", &headers);
    mapped.source = "::ffff:10.0.0.9".parse::<IpAddr>().unwrap();
    assert!(
        !allowed(&policies, &mapped),
        "an IPv4-mapped address is that IPv4 address"
    );
    let mut other_port = request(Some(A), "GET", "/", &headers);
    other_port.destination.set_port(9090);
    assert!(!allowed(&policies, &other_port));
}

#[test]
fn hosts_match_with_or_without_the_port_and_not_hosts_cannot_be_dodged_by_one() {
    let policies = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hosts}
spec:
  action: DENY
  rules: [{to: [{operation: {hosts: [SERVICE-B]}}]}]
",
    );
    let headers = HeaderMap::new();
    // The request's host is `service-b:8080`.
    assert!(!allowed(&policies, &request(Some(A), "GET", "/", &headers)));
}

#[test]
fn what_cannot_be_evaluated_fails_closed() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt-allow}
spec:
  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ['/private*']}}]}]
";
    let loaded = config::load_str("policies.yml", yaml);
    assert!(loaded.is_ok(), "{:#?}", loaded.diagnostics);
    let warned: Vec<String> = loaded.warnings().map(|d| d.to_string()).collect();
    assert!(
        warned
            .iter()
            .any(|w| w.contains("spec.rules[0].from[0].source.requestPrincipals")),
        "{warned:?}"
    );
    assert!(
        warned.iter().any(|w| w.contains("spec.action")),
        "{warned:?}"
    );
    let policies = Authorization::new(&loaded.config.authorization_policies)
        .for_workload("default", &BTreeMap::new());
    let headers = HeaderMap::new();
    assert!(!allowed(&policies, &request(Some(A), "GET", "/", &headers)));
}

#[test]
fn custom_denies_what_it_matches() {
    let policies = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ['/private*']}}]}]
",
    );
    let headers = HeaderMap::new();
    assert!(!allowed(
        &policies,
        &request(Some(A), "GET", "/private/x", &headers)
    ));
    assert!(allowed(
        &policies,
        &request(Some(A), "GET", "/public", &headers)
    ));
}

#[test]
fn invalid_policies_are_rejected_with_their_field() {
    let loaded = config::load_str(
        "bad.yml",
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad}
spec:
  action: PERMIT
  rules:
  - from: [{source: {ipBlocks: [10.0.0.0/33]}}]
    to: [{operation: {ports: ['http']}}]
    when: [{key: request.size, values: ['1']}]
",
    );
    let errors: Vec<String> = loaded.errors().map(|d| d.to_string()).collect();
    for field in [
        "spec.action",
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "spec.rules[0].to[0].operation.ports[0]",
        "spec.rules[0].when[0].key",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(&format!(": {field}:"))),
            "{field}: {errors:#?}"
        );
    }
    assert!(loaded.config.authorization_policies.is_empty());
}

#[test]
fn a_path_is_judged_normalized() {
    let policies = policies(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ['/admin*']}}]}]
",
    );
    let headers = HeaderMap::new();
    for raw in ["/admin", "/./admin", "/x/../admin/", "/%61dmin"] {
        let normal = path::normalize(raw);
        assert!(
            !allowed(&policies, &request(Some(A), "GET", &normal, &headers)),
            "{raw}"
        );
    }
}
