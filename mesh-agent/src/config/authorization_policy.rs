//! `AuthorizationPolicy.spec` (raw) → [`AuthorizationPolicy`] (validated).
//!
//! What this mesh cannot evaluate is kept, marked, and warned about by name, so that the
//! policy fails closed as ztunnel's do: a `CUSTOM` action denies what it matches, and a rule
//! part that cannot be evaluated (JWT principals, path templates, `request.auth.*` conditions)
//! never lets an `ALLOW` rule match and never keeps a `DENY` rule from matching.

use std::str::FromStr;

use super::diagnostic::ObjectContext;
use super::model::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Condition, ObjectRef,
    OperationMatch, Pattern, SourceMatch, Values,
};
use super::raw;
use super::values;

const FAILS_CLOSED: &str = "cannot be evaluated by this mesh: the rule fails closed (an ALLOW \
                            rule never matches, a DENY rule matches regardless of it)";

/// Converts one spec. Invalid values are reported through `cx`; the caller must discard the
/// result when `cx.has_errors()`.
pub(super) fn convert(
    cx: &mut ObjectContext,
    id: &ObjectRef,
    spec: raw::AuthorizationPolicySpec,
) -> AuthorizationPolicy {
    let targeted = spec.target_ref.is_some() || spec.target_refs.is_some();
    if targeted {
        let field = if spec.target_ref.is_some() {
            "spec.targetRef"
        } else {
            "spec.targetRefs"
        };
        cx.warn(
            field,
            "not supported by this mesh: the policy applies to every workload of its namespace \
             (fails closed)",
        );
    }
    let selector = spec.selector.map(|s| s.match_labels.unwrap_or_default());
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => AuthorizationAction::Allow,
        "DENY" => AuthorizationAction::Deny,
        "AUDIT" => AuthorizationAction::Audit,
        "CUSTOM" => {
            cx.warn(
                "spec.action",
                "CUSTOM: this mesh calls no external authorizer, so what the policy matches is \
                 denied (fails closed)",
            );
            AuthorizationAction::Custom
        }
        other => {
            cx.error(
                "spec.action",
                format!("unknown action {other:?}: expected ALLOW, DENY, AUDIT or CUSTOM"),
            );
            AuthorizationAction::Deny
        }
    };
    match (action, &spec.provider) {
        (AuthorizationAction::Custom, None) => {
            cx.error("spec.provider", "a CUSTOM policy names its provider")
        }
        (AuthorizationAction::Custom, Some(_)) | (_, None) => {}
        (_, Some(_)) => cx.error("spec.provider", "only a CUSTOM policy names a provider"),
    }
    let rules = spec
        .rules
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, rule)| self::rule(cx, &format!("spec.rules[{i}]"), rule))
        .collect();
    AuthorizationPolicy {
        id: id.clone(),
        selector,
        action,
        rules,
    }
}

fn rule(cx: &mut ObjectContext, path: &str, raw: raw::AuthorizationRule) -> AuthorizationRule {
    let from = raw
        .from
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, from)| {
            let path = format!("{path}.from[{i}].source");
            source(cx, &path, from.source.unwrap_or_default())
        })
        .collect();
    let to = raw
        .to
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, to)| {
            let path = format!("{path}.to[{i}].operation");
            operation(cx, &path, to.operation.unwrap_or_default())
        })
        .collect();
    let when = raw
        .when
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, condition)| self::condition(cx, &format!("{path}.when[{i}]"), condition))
        .collect();
    AuthorizationRule { from, to, when }
}

/// Whether any of `lists` has an item, valid or not.
fn any_set(lists: &[&Option<Vec<String>>]) -> bool {
    lists
        .iter()
        .any(|l| l.as_ref().is_some_and(|l| !l.is_empty()))
}

fn source(cx: &mut ObjectContext, path: &str, raw: raw::Source) -> SourceMatch {
    if !any_set(&[
        &raw.principals,
        &raw.not_principals,
        &raw.request_principals,
        &raw.not_request_principals,
        &raw.namespaces,
        &raw.not_namespaces,
        &raw.service_accounts,
        &raw.not_service_accounts,
        &raw.ip_blocks,
        &raw.not_ip_blocks,
        &raw.remote_ip_blocks,
        &raw.not_remote_ip_blocks,
    ]) {
        cx.error(path, "a source sets at least one field");
    }
    let mut unevaluable = false;
    for (field, value) in [
        ("requestPrincipals", &raw.request_principals),
        ("notRequestPrincipals", &raw.not_request_principals),
        ("serviceAccounts", &raw.service_accounts),
        ("notServiceAccounts", &raw.not_service_accounts),
    ] {
        if value.is_some() {
            cx.warn(&format!("{path}.{field}"), FAILS_CLOSED);
            unevaluable = true;
        }
    }
    SourceMatch {
        principals: patterns(
            cx,
            path,
            ("principals", raw.principals),
            ("notPrincipals", raw.not_principals),
        ),
        namespaces: patterns(
            cx,
            path,
            ("namespaces", raw.namespaces),
            ("notNamespaces", raw.not_namespaces),
        ),
        ip_blocks: ip_blocks(
            cx,
            path,
            ("ipBlocks", raw.ip_blocks),
            ("notIpBlocks", raw.not_ip_blocks),
        ),
        remote_ip_blocks: ip_blocks(
            cx,
            path,
            ("remoteIpBlocks", raw.remote_ip_blocks),
            ("notRemoteIpBlocks", raw.not_remote_ip_blocks),
        ),
        unevaluable,
    }
}

fn operation(cx: &mut ObjectContext, path: &str, raw: raw::Operation) -> OperationMatch {
    if !any_set(&[
        &raw.hosts,
        &raw.not_hosts,
        &raw.ports,
        &raw.not_ports,
        &raw.methods,
        &raw.not_methods,
        &raw.paths,
        &raw.not_paths,
    ]) {
        cx.error(path, "an operation sets at least one field");
    }
    let hosts = {
        let lower = |list: Option<Vec<String>>| {
            list.map(|l| l.into_iter().map(|h| h.to_ascii_lowercase()).collect())
        };
        patterns(
            cx,
            path,
            ("hosts", lower(raw.hosts)),
            ("notHosts", lower(raw.not_hosts)),
        )
    };
    let paths = patterns(cx, path, ("paths", raw.paths), ("notPaths", raw.not_paths));
    let templates = paths
        .any_of
        .iter()
        .chain(&paths.none_of)
        .any(|p| matches!(p, Pattern::Exact(p) | Pattern::Prefix(p) | Pattern::Suffix(p) if p.contains('{')));
    if templates {
        cx.warn(
            &format!("{path}.paths"),
            format!("path templates {FAILS_CLOSED}"),
        );
    }
    OperationMatch {
        hosts,
        ports: ports(cx, path, ("ports", raw.ports), ("notPorts", raw.not_ports)),
        methods: patterns(
            cx,
            path,
            ("methods", raw.methods),
            ("notMethods", raw.not_methods),
        ),
        paths,
        unevaluable: templates,
    }
}

fn condition(cx: &mut ObjectContext, path: &str, raw: raw::Condition) -> Condition {
    let key = raw.key.unwrap_or_default();
    if raw.values.is_none() && raw.not_values.is_none() {
        cx.error(path, "a condition sets values or notValues");
    }
    let values = ("values", raw.values);
    let not_values = ("notValues", raw.not_values);
    if let Some(header) = key
        .strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
    {
        let Some(name) = cx.check(&format!("{path}.key"), values::header_name(header)) else {
            return Condition::Unevaluable;
        };
        return Condition::RequestHeader(name, patterns(cx, path, values, not_values));
    }
    match key.as_str() {
        "source.ip" => Condition::SourceIp(ip_blocks(cx, path, values, not_values)),
        "remote.ip" => Condition::RemoteIp(ip_blocks(cx, path, values, not_values)),
        "destination.ip" => Condition::DestinationIp(ip_blocks(cx, path, values, not_values)),
        "source.namespace" => Condition::SourceNamespace(patterns(cx, path, values, not_values)),
        "source.principal" => Condition::SourcePrincipal(patterns(cx, path, values, not_values)),
        "destination.port" => Condition::DestinationPort(ports(cx, path, values, not_values)),
        "" => {
            cx.error(&format!("{path}.key"), super::fields::MISSING);
            Condition::Unevaluable
        }
        key if key == "connection.sni"
            || key == "source.serviceAccount"
            || key.starts_with("request.auth.")
            || key.starts_with("experimental.envoy.filters.") =>
        {
            cx.warn(&format!("{path}.key"), format!("{key:?} {FAILS_CLOSED}"));
            Condition::Unevaluable
        }
        key => {
            cx.error(&format!("{path}.key"), format!("unknown key {key:?}"));
            Condition::Unevaluable
        }
    }
}

type Field = (&'static str, Option<Vec<String>>);

fn patterns(cx: &mut ObjectContext, path: &str, any: Field, none: Field) -> Values<Pattern> {
    each(cx, path, any, none, |text| {
        if text.is_empty() {
            Err("an empty string matches nothing".to_owned())
        } else {
            Ok(Pattern::parse(text))
        }
    })
}

fn ports(cx: &mut ObjectContext, path: &str, any: Field, none: Field) -> Values<u16> {
    each(cx, path, any, none, |text| match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port number (1-65535)")),
    })
}

/// Addresses and CIDR blocks; an address alone is a block of one.
fn ip_blocks(cx: &mut ObjectContext, path: &str, any: Field, none: Field) -> Values<ipnet::IpNet> {
    each(cx, path, any, none, |text| {
        ipnet::IpNet::from_str(text)
            .or_else(|_| std::net::IpAddr::from_str(text).map(ipnet::IpNet::from))
            .map(|net| net.trunc())
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))
    })
}

fn each<T>(
    cx: &mut ObjectContext,
    path: &str,
    (any_name, any): Field,
    (none_name, none): Field,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Values<T> {
    let mut list = |name: &str, items: Option<Vec<String>>| -> Vec<T> {
        items
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, item)| cx.check(&format!("{path}.{name}[{i}]"), parse(item)))
            .collect()
    };
    Values {
        any_of: list(any_name, any),
        none_of: list(none_name, none),
    }
}
