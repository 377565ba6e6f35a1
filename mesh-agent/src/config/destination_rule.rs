//! `DestinationRule.spec` (raw) → [`DestinationRule`] (validated), with Envoy's defaults
//! filled in for absent fields.

use std::collections::BTreeMap;

use super::diagnostic::ObjectContext;
use super::fields::{self, MISSING};
use super::model::{
    ConnectionPool, DestinationRule, HttpPool, LoadBalancer, ObjectRef, OutlierDetection, Subset,
    TcpPool, TrafficPolicy,
};
use super::raw;

/// Converts one spec. Invalid values are reported through `cx` and replaced by placeholders;
/// the caller must discard the result when `cx.has_errors()`.
pub(super) fn convert(
    cx: &mut ObjectContext,
    id: &ObjectRef,
    spec: raw::DestinationRuleSpec,
) -> DestinationRule {
    cx.unsupported("spec.exportTo", &spec.export_to);
    cx.unsupported("spec.workloadSelector", &spec.workload_selector);
    let host = fields::host(cx, "spec.host", spec.host.as_deref(), &id.namespace);
    let host_policy = spec
        .traffic_policy
        .map(|tp| traffic_policy(cx, "spec.trafficPolicy", tp))
        .unwrap_or_default();
    let mut first_index: BTreeMap<String, usize> = BTreeMap::new();
    let subsets = spec
        .subsets
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let path = format!("spec.subsets[{i}]");
            let name = s.name.unwrap_or_default();
            if name.is_empty() {
                cx.error(&format!("{path}.name"), MISSING);
            } else if let Some(first) = first_index.get(&name) {
                cx.error(
                    &format!("{path}.name"),
                    format!("duplicate subset name {name:?} (first at spec.subsets[{first}])"),
                );
            } else {
                first_index.insert(name.clone(), i);
            }
            Subset {
                name,
                labels: s.labels.unwrap_or_default(),
                traffic_policy: s
                    .traffic_policy
                    .map(|tp| traffic_policy(cx, &format!("{path}.trafficPolicy"), tp))
                    .unwrap_or_default(),
            }
        })
        .collect();
    DestinationRule {
        id: id.clone(),
        host,
        traffic_policy: host_policy,
        subsets,
    }
}

fn traffic_policy(cx: &mut ObjectContext, path: &str, raw: raw::TrafficPolicy) -> TrafficPolicy {
    cx.unsupported(&format!("{path}.tls"), &raw.tls);
    cx.unsupported(
        &format!("{path}.portLevelSettings"),
        &raw.port_level_settings,
    );
    cx.unsupported(&format!("{path}.tunnel"), &raw.tunnel);
    cx.unsupported(&format!("{path}.proxyProtocol"), &raw.proxy_protocol);
    TrafficPolicy {
        load_balancer: raw
            .load_balancer
            .and_then(|lb| load_balancer(cx, &format!("{path}.loadBalancer"), lb)),
        connection_pool: raw
            .connection_pool
            .map(|cp| connection_pool(cx, &format!("{path}.connectionPool"), cp)),
        outlier_detection: raw
            .outlier_detection
            .map(|od| outlier_detection(cx, &format!("{path}.outlierDetection"), od)),
    }
}

fn load_balancer(
    cx: &mut ObjectContext,
    path: &str,
    raw: raw::LoadBalancer,
) -> Option<LoadBalancer> {
    cx.unsupported(&format!("{path}.consistentHash"), &raw.consistent_hash);
    cx.unsupported(
        &format!("{path}.localityLbSetting"),
        &raw.locality_lb_setting,
    );
    cx.unsupported(
        &format!("{path}.warmupDurationSecs"),
        &raw.warmup_duration_secs,
    );
    cx.unsupported(&format!("{path}.warmup"), &raw.warmup);
    match raw.simple.as_deref()? {
        "UNSPECIFIED" => None,
        "ROUND_ROBIN" => Some(LoadBalancer::RoundRobin),
        // Istio deprecated LEAST_CONN as an alias: both are Envoy's LEAST_REQUEST.
        "LEAST_REQUEST" | "LEAST_CONN" => Some(LoadBalancer::LeastRequest),
        "RANDOM" => Some(LoadBalancer::Random),
        "PASSTHROUGH" => Some(LoadBalancer::Passthrough),
        other => {
            cx.error(
                &format!("{path}.simple"),
                format!(
                    "unknown load balancer {other:?}: expected ROUND_ROBIN, LEAST_REQUEST, \
                     LEAST_CONN, RANDOM or PASSTHROUGH"
                ),
            );
            None
        }
    }
}

fn connection_pool(cx: &mut ObjectContext, path: &str, raw: raw::ConnectionPool) -> ConnectionPool {
    let mut pool = ConnectionPool::default();
    if let Some(tcp) = raw.tcp {
        let p = format!("{path}.tcp");
        cx.unsupported(
            &format!("{p}.maxConnectionDuration"),
            &tcp.max_connection_duration,
        );
        pool.tcp = TcpPool {
            max_connections: fields::limit(cx, &format!("{p}.maxConnections"), tcp.max_connections),
            connect_timeout: match tcp.connect_timeout {
                Some(t) => fields::positive_duration(cx, &format!("{p}.connectTimeout"), &t),
                None => TcpPool::default().connect_timeout,
            },
            // Absent ⇒ Istio's 1 h; an explicit 0s turns the idle timeout off.
            idle_timeout: match tcp.idle_timeout {
                Some(t) => fields::optional_timeout(cx, &format!("{p}.idleTimeout"), Some(&t)),
                None => TcpPool::default().idle_timeout,
            },
        };
    }
    if let Some(http) = raw.http {
        let p = format!("{path}.http");
        cx.unsupported(
            &format!("{p}.maxConcurrentStreams"),
            &http.max_concurrent_streams,
        );
        pool.http = HttpPool {
            http1_max_pending_requests: fields::limit(
                cx,
                &format!("{p}.http1MaxPendingRequests"),
                http.http1_max_pending_requests,
            ),
            http2_max_requests: fields::limit(
                cx,
                &format!("{p}.http2MaxRequests"),
                http.http2_max_requests,
            ),
            max_requests_per_connection: fields::limit(
                cx,
                &format!("{p}.maxRequestsPerConnection"),
                http.max_requests_per_connection,
            ),
            max_retries: fields::limit(cx, &format!("{p}.maxRetries"), http.max_retries),
            // Absent ⇒ Istio's 1 h; an explicit 0s turns the idle timeout off, as in Envoy.
            idle_timeout: match http.idle_timeout {
                Some(t) => fields::optional_timeout(cx, &format!("{p}.idleTimeout"), Some(&t)),
                None => HttpPool::default().idle_timeout,
            },
        };
    }
    pool
}

fn outlier_detection(
    cx: &mut ObjectContext,
    path: &str,
    raw: raw::OutlierDetection,
) -> OutlierDetection {
    let mut od = OutlierDetection::default();
    let field = |name: &str| format!("{path}.{name}");
    // The deprecated field first, so the explicit new fields override it (as Istio does):
    // Istio maps it to gateway errors only and stops counting plain 5xx.
    if let Some(n) = raw.consecutive_errors {
        let n = fields::count(cx, &field("consecutiveErrors"), n);
        if n > 0 {
            od.consecutive_gateway_errors = Some(n);
            od.consecutive_5xx_errors = 0;
        }
    }
    if let Some(n) = raw.consecutive_5xx_errors {
        od.consecutive_5xx_errors = fields::count(cx, &field("consecutive5xxErrors"), n);
    }
    if let Some(n) = raw.consecutive_gateway_errors {
        let n = fields::count(cx, &field("consecutiveGatewayErrors"), n);
        od.consecutive_gateway_errors = (n > 0).then_some(n);
    }
    if let Some(n) = raw.consecutive_local_origin_failures {
        od.consecutive_local_origin_failures =
            fields::count(cx, &field("consecutiveLocalOriginFailures"), n);
    }
    if let Some(split) = raw.split_external_local_origin_errors {
        od.split_external_local_origin_errors = split;
    }
    if let Some(t) = raw.interval {
        od.interval = fields::positive_duration(cx, &field("interval"), &t);
    }
    if let Some(t) = raw.base_ejection_time {
        od.base_ejection_time = fields::positive_duration(cx, &field("baseEjectionTime"), &t);
    }
    let mut percent = |name: &str, value: i64| match u32::try_from(value) {
        Ok(p) if p <= 100 => p,
        _ => {
            cx.error(&field(name), format!("percentage {value} is outside 0–100"));
            0
        }
    };
    if let Some(p) = raw.max_ejection_percent {
        od.max_ejection_percent = percent("maxEjectionPercent", p);
    }
    if let Some(p) = raw.min_health_percent {
        od.min_health_percent = percent("minHealthPercent", p);
    }
    od
}
