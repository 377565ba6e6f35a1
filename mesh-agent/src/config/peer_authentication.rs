//! `PeerAuthentication` (raw) → [`PeerAuthentication`] (validated): its creation time, selector,
//! mode and port modes, with the checks Istio's CRD and webhook make (a known mode, ports
//! 1–65535, `portLevelMtls` only with a selector). Which policy applies to a workload is decided
//! later, over the whole set, by [`crate::authorization::PeerAuthentications`].

use std::collections::BTreeMap;

use serde_json::Value;

use super::diagnostic::ObjectContext;
use super::fields;
use super::model::{ObjectRef, PeerAuthentication, PeerMtlsMode, ROOT_NAMESPACE};
use super::raw;

/// Converts one spec; `created` is `metadata.creationTimestamp` as read. Invalid values are
/// reported through `cx`; the caller must discard the result when `cx.has_errors()`.
pub(super) fn convert(
    cx: &mut ObjectContext,
    id: &ObjectRef,
    created: Option<&Value>,
    spec: raw::PeerAuthenticationSpec,
) -> PeerAuthentication {
    let created = fields::creation_time(cx, created);
    // Istio reads a selector without labels as no selector (a namespace- or mesh-wide policy).
    let selector = spec
        .selector
        .and_then(|s| s.match_labels)
        .filter(|labels| !labels.is_empty());
    if selector.is_some() && id.namespace == ROOT_NAMESPACE {
        cx.warn(
            "spec.selector",
            format!(
                "a policy with a selector in the root namespace ({ROOT_NAMESPACE}) applies to no \
                 workload: Istio ignores it, and so does this mesh"
            ),
        );
    }
    let mode = self::mode(
        cx,
        "spec.mtls.mode",
        spec.mtls.unwrap_or_default().mode.as_deref(),
    );
    let mut port_level = BTreeMap::new();
    if let Some(ports) = spec.port_level_mtls {
        if selector.is_none() {
            // As Istio's CRD words it; its webhook refuses the same.
            cx.error("spec.portLevelMtls", "portLevelMtls requires selector");
        }
        for (key, mtls) in ports {
            let field = format!("spec.portLevelMtls.{key}");
            let mode = self::mode(cx, &format!("{field}.mode"), mtls.mode.as_deref());
            let Some(port) = port(cx, &field, &key) else {
                continue;
            };
            if port_level.insert(port, mode).is_some() {
                cx.error(&field, format!("port {port} is set twice"));
            }
        }
    }
    PeerAuthentication {
        id: id.clone(),
        created,
        selector,
        mode,
        port_level,
    }
}

fn mode(cx: &mut ObjectContext, field: &str, mode: Option<&str>) -> PeerMtlsMode {
    match mode {
        None | Some("UNSET") => PeerMtlsMode::Unset,
        Some("DISABLE") => PeerMtlsMode::Disable,
        Some("PERMISSIVE") => PeerMtlsMode::Permissive,
        Some("STRICT") => PeerMtlsMode::Strict,
        Some(other) => {
            cx.error(
                field,
                format!("unknown mode {other:?}: expected UNSET, DISABLE, PERMISSIVE or STRICT"),
            );
            PeerMtlsMode::Unset
        }
    }
}

/// A `portLevelMtls` key: the number of a port the pod listens on.
fn port(cx: &mut ObjectContext, field: &str, key: &str) -> Option<u16> {
    match key.trim().parse::<i64>() {
        Ok(number) => Some(fields::port(cx, field, number)).filter(|port| *port > 0),
        Err(_) => {
            cx.error(field, format!("{key:?} is not a port number (1-65535)"));
            None
        }
    }
}
