//! The configurations of the proxies under test, all doing the same job: a 90/10 split over the
//! two server pods, retries and passive ejection of failing endpoints, one worker thread.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::Result;
use mesh_tests::{ConfigDir, Pod};

/// Ports of the hello servers in each server pod.
pub const HELLO_PORT: u16 = 8080;
pub const HELLO_1K_PORT: u16 = 8081;
/// A hello server too, reached through ports declared `tcp` (L4 scenarios).
pub const TCP_PORT: u16 = 9000;

/// Ports of the peers in the proxy pod.
pub const NGINX_PORT: u16 = 80;
pub const HAPROXY_L7_PORT: u16 = 81;
pub const HAPROXY_L4_PORT: u16 = 9001;
/// `hyper-l7`'s bare hyper proxy (`hyper_proxy.rs`).
pub const HYPER_PORT: u16 = 82;

/// Service VIPs of the mesh scenarios (never routed: the agent resolves them).
pub const VIP_L7: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
pub const VIP_L7_1K: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 32);
pub const VIP_L4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
/// The service over node 2's pods (`mesh-l7-remote`, `mesh-mtls`).
pub const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 33);

/// The mesh's local config folder: four services over two server pods each; the HTTP ones with
/// a 90/10 VirtualService with retries and a DestinationRule with subsets, a connection pool and
/// outlier detection (the real path: every request is routed, split and reported). The remote
/// pods (node 2) are in the mesh, as service account `hello`.
pub fn mesh_config(v1: &Pod, v2: &Pod, remote_v1: &Pod, remote_v2: &Pod) -> Result<ConfigDir> {
    let config = ConfigDir::new()?;
    // `ConfigDir::service` writes the backends' `Pod`s with each service, and a pod may be
    // defined only once: the services are written here, the pods once.
    let mut pods = String::new();
    for (pod, app, version, mesh) in [
        (v1, "hello", "v1", ""),
        (v2, "hello", "v2", ""),
        (
            remote_v1,
            "hello-remote",
            "v1",
            ", sidecarless.io/mesh: enabled",
        ),
        (
            remote_v2,
            "hello-remote",
            "v2",
            ", sidecarless.io/mesh: enabled",
        ),
    ] {
        let _ = write!(
            pods,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, \
             labels: {{app: {app}, version: {version}{mesh}}}}}\n\
             spec: {{serviceAccountName: hello}}\nstatus: {{podIP: {}}}\n",
            pod.name(),
            pod.ip()
        );
    }
    config.write("pods.yml", &pods)?;
    for (name, app, vip, port, port_name, pods) in [
        ("hello", "hello", VIP_L7, HELLO_PORT, "http", [v1, v2]),
        (
            "hello-1k",
            "hello",
            VIP_L7_1K,
            HELLO_1K_PORT,
            "http",
            [v1, v2],
        ),
        ("hello-tcp", "hello", VIP_L4, TCP_PORT, "tcp", [v1, v2]),
        (
            "hello-remote",
            "hello-remote",
            VIP_REMOTE,
            HELLO_PORT,
            "http",
            [remote_v1, remote_v2],
        ),
    ] {
        config.write(
            &format!("service-{name}.yml"),
            &service(name, app, vip, port, port_name, &pods),
        )?;
        if port_name == "http" {
            config.write(&format!("rules-{name}.yml"), &mesh_rules(name))?;
        }
    }
    Ok(config)
}

/// A `Service` at `vip:port` selecting `app`, and its `EndpointSlice` over `pods`.
fn service(
    name: &str,
    app: &str,
    vip: Ipv4Addr,
    port: u16,
    port_name: &str,
    pods: &[&Pod],
) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{app: {app}}}\n  \
         ports:\n  - {{name: {port_name}, port: {port}, targetPort: {port}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: {port_name}, port: {port}, protocol: TCP}}]\n\
         endpoints:\n"
    );
    for pod in pods {
        let _ = writeln!(
            text,
            "- addresses: [{}]\n  conditions: {{ready: true}}\n  \
             targetRef: {{kind: Pod, name: {}, namespace: default}}",
            pod.ip(),
            pod.name()
        );
    }
    text
}

pub fn mesh_rules(host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: {host}, namespace: default}}
spec:
  hosts: [{host}]
  http:
  - route:
    - destination: {{host: {host}, subset: v1}}
      weight: 90
    - destination: {{host: {host}, subset: v2}}
      weight: 10
    retries: {{attempts: 3, perTryTimeout: 1s, retryOn: 5xx}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: {host}, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    connectionPool:
      http: {{http1MaxPendingRequests: 1024, maxRequestsPerConnection: 0}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 2s, baseEjectionTime: 10s, maxEjectionPercent: 50}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"
    )
}

/// nginx as one process (`master_process off`, i.e. one worker), access log off, keep-alive to
/// the upstreams; `max_fails` and `proxy_next_upstream` are its ejection and retries.
pub fn nginx_conf(dir: &str, v1: Ipv4Addr, v2: Ipv4Addr) -> String {
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  upstream hello {{
    server {v1}:{HELLO_PORT} weight=9 max_fails=5 fail_timeout=10s;
    server {v2}:{HELLO_PORT} weight=1 max_fails=5 fail_timeout=10s;
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen {NGINX_PORT} backlog=4096;
    location / {{
      proxy_pass http://hello;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_next_upstream error timeout http_500 http_502 http_503;
      proxy_next_upstream_tries 3;
    }}
  }}
}}
"
    )
}

/// HAProxy with one thread: an HTTP frontend (keep-alive, connection reuse to the servers,
/// retries, layer-7 error observation) and a TCP frontend, both split 90/10.
pub fn haproxy_cfg(v1: Ipv4Addr, v2: Ipv4Addr) -> String {
    format!(
        "global
  nbthread 1
  maxconn 8000
defaults
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend l7
  mode http
  bind 0.0.0.0:{HAPROXY_L7_PORT}
  option http-keep-alive
  default_backend hello
backend hello
  mode http
  http-reuse always
  retries 3
  retry-on conn-failure empty-response response-timeout 500 502 503
  server v1 {v1}:{HELLO_PORT} weight 90 observe layer7 error-limit 5 on-error mark-down
  server v2 {v2}:{HELLO_PORT} weight 10 observe layer7 error-limit 5 on-error mark-down
frontend l4
  mode tcp
  bind 0.0.0.0:{HAPROXY_L4_PORT}
  default_backend hello-tcp
backend hello-tcp
  mode tcp
  server v1 {v1}:{TCP_PORT} weight 90
  server v2 {v2}:{TCP_PORT} weight 10
"
    )
}
