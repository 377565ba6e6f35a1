//! Field-level conversions shared by the per-kind modules. Each records its own diagnostic
//! and returns a placeholder on error, so the caller goes on and every error is reported.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::diagnostic::ObjectContext;
use super::model::{Host, Percent};
use super::raw;
use super::values;

pub(super) const MISSING: &str = "missing required field";

/// A required host (`service-c`, `service-c.ns.svc.cluster.local`, `*`, `*.example.com`),
/// kept as written with the object's namespace: resolution is the registry's job.
pub(super) fn host(
    cx: &mut ObjectContext,
    field: &str,
    name: Option<&str>,
    namespace: &str,
) -> Host {
    let name = name.unwrap_or_default().trim();
    if name.is_empty() {
        cx.error(field, MISSING);
    } else if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        cx.error(field, format!("invalid host {name:?}"));
    }
    Host {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
    }
}

/// A required list of hosts.
pub(super) fn hosts(
    cx: &mut ObjectContext,
    field: &str,
    names: Option<Vec<String>>,
    namespace: &str,
) -> Vec<Host> {
    let names = names.unwrap_or_default();
    if names.is_empty() {
        cx.error(field, MISSING);
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| host(cx, &format!("{field}[{i}]"), Some(name), namespace))
        .collect()
}

pub(super) fn port(cx: &mut ObjectContext, field: &str, number: i64) -> u16 {
    match u16::try_from(number) {
        Ok(port) if port > 0 => port,
        _ => {
            cx.error(field, format!("port {number} is outside 1–65535"));
            0
        }
    }
}

/// A count or limit that must fit `u32` and not be negative.
pub(super) fn count(cx: &mut ObjectContext, field: &str, value: i64) -> u32 {
    if value < 0 {
        cx.error(field, format!("{value} must not be negative"));
        return 0;
    }
    u32::try_from(value).unwrap_or_else(|_| {
        cx.error(field, format!("{value} is too large"));
        0
    })
}

/// A connection-pool limit: Istio reads 0 (or absence) as "not set", i.e. unlimited.
pub(super) fn limit(cx: &mut ObjectContext, field: &str, value: Option<i64>) -> Option<u32> {
    match value {
        None | Some(0) => None,
        Some(value) => Some(count(cx, field, value)),
    }
}

pub(super) fn duration(cx: &mut ObjectContext, field: &str, text: &str) -> Duration {
    cx.check(field, values::parse_duration(text))
        .unwrap_or_default()
}

/// A duration Istio requires to be at least 1 ms (intervals, ejection times, connect timeout).
pub(super) fn positive_duration(cx: &mut ObjectContext, field: &str, text: &str) -> Duration {
    let parsed = values::parse_duration(text);
    match parsed {
        Ok(d) if d < Duration::from_millis(1) => {
            cx.error(field, format!("duration {text:?} must be at least 1ms"));
            d
        }
        other => cx.check(field, other).unwrap_or_default(),
    }
}

/// A timeout where Istio reads zero as "no timeout".
pub(super) fn optional_timeout(
    cx: &mut ObjectContext,
    field: &str,
    text: Option<&str>,
) -> Option<Duration> {
    let d = duration(cx, field, text?);
    (!d.is_zero()).then_some(d)
}

/// `percentage: {value: 12.5}` or, failing that, a legacy integer field; `None` when neither
/// is written, so each caller applies Istio's own default for that field.
pub(super) fn percentage(
    cx: &mut ObjectContext,
    field: &str,
    percentage: Option<raw::PercentValue>,
    legacy_field: &str,
    legacy: Option<i64>,
) -> Option<Percent> {
    match (percentage, legacy) {
        (Some(p), _) => Some(
            cx.check(
                &format!("{field}.value"),
                values::percent_from_f64(p.value.unwrap_or(0.0)),
            )
            .unwrap_or(Percent::ZERO),
        ),
        (None, Some(whole)) => Some(
            cx.check(legacy_field, values::percent_from_int(whole))
                .unwrap_or(Percent::ZERO),
        ),
        (None, None) => None,
    }
}

/// `metadata.creationTimestamp`: RFC 3339, as the API server writes it; `null` (as
/// `kubectl create --dry-run -o yaml` writes it) or absent is no time.
pub(super) fn creation_time(cx: &mut ObjectContext, value: Option<&Value>) -> Option<Timestamp> {
    const FIELD: &str = "metadata.creationTimestamp";
    match value? {
        Value::Null => None,
        Value::String(text) => cx.check(
            FIELD,
            text.parse::<Timestamp>()
                .map_err(|_| format!("{text:?} is not an RFC 3339 time")),
        ),
        other => {
            cx.error(FIELD, format!("{other} is not an RFC 3339 time"));
            None
        }
    }
}
