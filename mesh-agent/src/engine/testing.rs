//! The mesh shape the engine benchmark and the allocation test share (not a stable API).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, Request};

use super::registry::{Endpoint, Registry, Service, ServicePort};
use crate::config::model::*;
use crate::identity::ServiceIdentity;

/// `service-c` with `endpoints` endpoints (half `version: v1`, half `v2`) and one virtual
/// service of `routes` routes: route `i` matches `GET /r{i}/…` (every fifth also needs header
/// `x-tenant: t{i}`) and splits 90/10 between the two subsets.
pub fn mesh(routes: usize, endpoints: usize) -> (MeshConfig, Registry) {
    let host = |name: &str| Host {
        name: name.into(),
        namespace: "default".into(),
    };
    let subset = |name: &str, version: &str| Subset {
        name: name.into(),
        labels: BTreeMap::from([("version".to_owned(), version.to_owned())]),
        traffic_policy: TrafficPolicy::default(),
    };
    let to = |subset: &str, weight| RouteDestination {
        destination: Destination {
            host: host("service-c"),
            subset: Some(subset.into()),
            port: None,
        },
        weight,
        headers: Headers::default(),
    };
    let http = (0..routes)
        .map(|i| HttpRoute {
            name: Some(format!("r{i}")),
            matches: vec![RequestMatch {
                uri: Some(StringMatch::Prefix(format!("/r{i}/"))),
                method: Some(StringMatch::Exact("GET".into())),
                headers: if i % 5 == 4 {
                    vec![(
                        HeaderName::from_static("x-tenant"),
                        StringMatch::Exact(format!("t{i}")),
                    )]
                } else {
                    vec![]
                },
                ..RequestMatch::default()
            }],
            route: vec![to("version-v1", 90), to("version-v2", 10)],
            redirect: None,
            direct_response: None,
            rewrite: None,
            headers: Headers::default(),
            timeout: None,
            retries: None,
            fault: None,
            mirror: None,
        })
        .collect();
    let config = MeshConfig {
        virtual_services: vec![Arc::new(VirtualService {
            id: ObjectRef {
                namespace: "default".into(),
                name: "service-c".into(),
            },
            hosts: vec![host("service-c")],
            gateways: vec![],
            http,
            created: None,
            exclusive: Exclusive::No,
        })],
        destination_rules: vec![Arc::new(DestinationRule {
            id: ObjectRef {
                namespace: "default".into(),
                name: "service-c".into(),
            },
            host: host("service-c"),
            traffic_policy: TrafficPolicy {
                outlier_detection: Some(OutlierDetection::default()),
                ..TrafficPolicy::default()
            },
            subsets: vec![subset("version-v1", "v1"), subset("version-v2", "v2")],
        })],
        gateways: vec![],
        authorization_policies: vec![],
        peer_authentications: vec![],
    };
    let endpoints = (0..endpoints)
        .map(|i| Endpoint {
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1)),
            labels: BTreeMap::from([(
                "version".to_owned(),
                if i % 2 == 0 { "v1" } else { "v2" }.to_owned(),
            )]),
            workload: None,
        })
        .collect();
    let registry = Registry {
        services: vec![Arc::new(Service {
            identity: Arc::new(ServiceIdentity::new("service-c", "default")),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints,
        })],
    };
    (config, registry)
}

/// A request head that matches route `route` of [`mesh`].
pub fn request(route: usize) -> Parts {
    let mut builder = Request::get(format!("/r{route}/items?page=2"))
        .header("host", "service-c")
        .header("user-agent", "bench");
    if route % 5 == 4 {
        builder = builder.header("x-tenant", format!("t{route}"));
    }
    builder.body(()).expect("valid request").into_parts().0
}
