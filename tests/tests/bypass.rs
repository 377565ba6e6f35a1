//! Nothing an enrolled pod can do on its own goes around the agent (eBPF mode): a dual-stack
//! socket (`AF_INET6`) connecting to an IPv4-mapped address (`::ffff:a.b.c.d`, what Java and
//! many runtimes do by default) is redirected like an IPv4 one, and a socket carrying the mark
//! the agent once exempted its own sockets by is redirected like any other. Native IPv6 is not
//! redirected: that bypass is counted under its own name.
//!
//! Each test proves the agent carried the connection with something only the agent does: an
//! access-log record naming the pod, the client's port and the original destination, or a
//! response header that only the mesh's route adds.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use mesh_tests::probe::start_server;
use mesh_tests::{require_root, Agent, Backend, ConfigDir, Pod, PodProcess, SimNode};
use serde_json::Value;

const UPSTREAM: &str = env!("CARGO_BIN_EXE_upstream");
const TIMEOUT: Duration = Duration::from_secs(60);
const SERVICE_C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// The `SO_MARK` the agent put on its own upstream sockets before they were exempted by cookie
/// ("MESH"); a pod with `CAP_NET_ADMIN` in its namespace can set it too.
const OLD_AGENT_MARK: u32 = 0x4d45_5348;
/// A response header only the mesh's route for service-c sets.
const ROUTE_HEADER: &str = "x-mesh-route: service-c-via-agent";

/// A node with a `client` pod, a `server` pod answering `ok` on :8080, and a `service-c` VIP
/// (10.96.0.30:8080, which exists only inside the agent) whose route adds [`ROUTE_HEADER`]; the
/// agent runs in eBPF mode with `client` enrolled.
struct Mesh {
    node: SimNode,
    client: Pod,
    server: Pod,
    agent: Agent,
    _servers: Vec<PodProcess>,
    _config: ConfigDir,
}

impl Mesh {
    fn start() -> Mesh {
        let node = SimNode::new().unwrap();
        let client = node.add_pod("client").unwrap();
        let server = node.add_pod("server").unwrap();
        let c_v1 = node.add_pod("service-c-v1-0").unwrap();
        node.add_host("service-c", SERVICE_C).unwrap();
        let plain = start_server(
            &node,
            &server,
            &["http-server", "--listen", "0.0.0.0:8080", "--body", "ok"],
        );
        let mut serve = Command::new(UPSTREAM);
        serve.args(["serve", "--listen", "0.0.0.0:8080", "--name", "v1"]);
        let service = node.spawn_in_pod(&c_v1, serve).unwrap();
        service
            .stdout()
            .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
            .unwrap();
        let config = ConfigDir::new().unwrap();
        let labels: &[(&str, &str)] = &[("app", "service-c"), ("version", "v1")];
        let backends = [Backend { pod: &c_v1, labels }];
        config
            .service("service-c", SERVICE_C, 8080, "http", &backends)
            .unwrap();
        let (name, value) = ROUTE_HEADER.split_once(": ").unwrap();
        config
            .write(
                "vs.yml",
                &format!(
                    "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                     metadata: {{name: service-c}}\n\
                     spec:\n  hosts: [service-c]\n  http:\n  - headers:\n      response:\n        \
                     set: {{{name}: {value}}}\n    route:\n    - destination: {{host: service-c}}\n"
                ),
            )
            .unwrap();
        let config_path = config.path().to_str().unwrap().to_owned();
        let agent = Agent::start(&node, &[&client], &["--config", &config_path]).unwrap();
        Mesh {
            node,
            client,
            server,
            agent,
            _servers: vec![plain, service],
            _config: config,
        }
    }

    /// Runs `command` in the client pod to completion; its stdout, or a panic with its stderr.
    fn run_in_client(&self, command: Command) -> String {
        let mut process = self.node.spawn_in_pod(&self.client, command).unwrap();
        let status = process.finish(TIMEOUT).unwrap();
        let (stdout, stderr) = (process.stdout().text(), process.stderr().text());
        assert!(status.success(), "{stdout}\n{stderr}");
        stdout
    }

    /// The access-log record of the TCP connection from the client pod's port `client_port`.
    fn tcp_record(&self, client_port: u64) -> Value {
        let matches = |r: &Value| {
            r["kind"] == "tcp" && r["source_pod"] == "client" && r["client_port"] == client_port
        };
        let records = self
            .agent
            .wait_for_records(1, matches, Duration::from_secs(10))
            .unwrap_or_else(|error| {
                panic!(
                    "the agent saw no connection from client port {client_port} ({error:#}); \
                     decisions: {:?}",
                    self.agent.decisions()
                )
            });
        records[0].clone()
    }

    /// Access-log records of HTTP requests from the client pod to service-c.
    fn service_c_requests(&self) -> usize {
        self.agent
            .access_log()
            .iter()
            .filter(|r| r["kind"] == "http" && r["source_pod"] == "client")
            .filter(|r| r["destination_service"] == "service-c.default.svc.cluster.local")
            .count()
    }
}

/// `python3` sending one HTTP/1.1 GET to `host`:`port` on a socket of `family` (`AF_INET` or
/// `AF_INET6`), with `SO_MARK` `mark` unless it is 0. Prints `port <local port>`, then the
/// response.
fn python_get(family: &str, host: &str, port: u16, mark: u32) -> Command {
    let script = format!(
        r#"
import socket, sys
s = socket.socket(socket.{family}, socket.SOCK_STREAM)
if {mark}:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {mark})
s.settimeout(5)
s.connect(("{host}", {port}))
print("port", s.getsockname()[1], flush=True)
s.sendall(b"GET / HTTP/1.1\r\nHost: service-c:8080\r\nConnection: close\r\n\r\n")
answer = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    answer += chunk
print(answer.decode())
"#
    );
    let mut python = Command::new("python3");
    python.args(["-c", &script]);
    python
}

/// The client's local port and the response, from [`python_get`]'s output.
fn port_and_response(output: &str) -> (u64, &str) {
    let (first, response) = output.split_once('\n').expect("no output");
    let port = first
        .strip_prefix("port ")
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port line: {output}"));
    (port, response)
}

/// `::ffff:a.b.c.d`, as a dual-stack runtime writes an IPv4 destination.
fn mapped(ip: Ipv4Addr) -> String {
    ip.to_ipv6_mapped().to_string()
}

#[test]
fn a_dual_stack_python_socket_to_mapped_addresses_goes_through_the_agent() {
    require_root();
    let mesh = Mesh::start();

    // A pod IP: on its way the agent records where it was going.
    let output = mesh.run_in_client(python_get("AF_INET6", &mapped(mesh.server.ip()), 8080, 0));
    let (port, response) = port_and_response(&output);
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("ok"),
        "{response}"
    );
    let record = mesh.tcp_record(port);
    assert_eq!(
        record["original_dst"],
        mesh.server.addr(8080).to_string(),
        "{record}"
    );
    assert_eq!(record["error"], Value::Null, "{record}");

    // A service VIP, which only the agent can reach: the route's header proves it.
    let output = mesh.run_in_client(python_get("AF_INET6", &mapped(SERVICE_C), 8080, 0));
    let (_, response) = port_and_response(&output);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(ROUTE_HEADER), "{response}");
    assert!(response.ends_with("v1"), "{response}");
    assert_eq!(mesh.service_c_requests(), 1);

    let counts = mesh.agent.decisions().unwrap();
    assert_eq!(counts["redirected"], 2, "{counts:?}");
    assert_eq!(counts["ipv6_bypass"], 0, "{counts:?}");
    // The agent's two upstream connections, each exempted once by its cookie.
    assert_eq!(counts["agent_socket"], 2, "{counts:?}");
}

/// Java's sockets are dual-stack by default: `new URL("http://10.96.0.30:8080/")` connects an
/// `AF_INET6` socket to `::ffff:10.96.0.30`.
const JAVA_CLIENT: &str = r#"
import java.net.HttpURLConnection;
import java.net.Proxy;
import java.net.URL;

public class Client {
    public static void main(String[] urls) throws Exception {
        for (String url : urls) {
            HttpURLConnection connection =
                (HttpURLConnection) new URL(url).openConnection(Proxy.NO_PROXY);
            connection.setConnectTimeout(5000);
            connection.setReadTimeout(5000);
            connection.setRequestProperty("Host", "service-c:8080");
            connection.setRequestProperty("Connection", "close");
            int status = connection.getResponseCode();
            String body = new String(connection.getInputStream().readAllBytes());
            System.out.println(url + " " + status + " route=" + connection.getHeaderField("x-mesh-route") + " body=" + body);
        }
    }
}
"#;

#[test]
fn a_java_client_goes_through_the_agent() {
    require_root();
    let mesh = Mesh::start();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("Client.java");
    std::fs::write(&source, JAVA_CLIENT).unwrap();
    let pod_url = format!("http://{}/", mesh.server.addr(8080));
    let vip_url = format!("http://{}/", SocketAddr::from((SERVICE_C, 8080)));
    let mut java = Command::new("java");
    // Java's own default, stated so that an environment asking for IPv4 sockets cannot turn
    // this test into one of connect4.
    java.arg("-Djava.net.preferIPv4Stack=false")
        .arg(&source)
        .args([&pod_url, &vip_url]);

    let output = mesh.run_in_client(java);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 2, "{output}");
    assert_eq!(
        lines[0],
        format!("{pod_url} 200 route=null body=ok"),
        "{output}"
    );
    assert_eq!(
        lines[1],
        format!("{vip_url} 200 route=service-c-via-agent body=v1"),
        "{output}"
    );
    let to_server = |r: &Value| {
        r["kind"] == "tcp"
            && r["source_pod"] == "client"
            && r["original_dst"] == mesh.server.addr(8080).to_string()
    };
    mesh.agent
        .wait_for_records(1, to_server, Duration::from_secs(10))
        .unwrap();
    assert_eq!(mesh.service_c_requests(), 1);
    let counts = mesh.agent.decisions().unwrap();
    assert_eq!(counts["redirected"], 2, "{counts:?}");
}

#[test]
fn a_pod_setting_the_old_agent_mark_does_not_skip_the_agent() {
    require_root();
    let mesh = Mesh::start();

    let output = mesh.run_in_client(python_get(
        "AF_INET",
        &mesh.server.ip().to_string(),
        8080,
        OLD_AGENT_MARK,
    ));
    let (port, response) = port_and_response(&output);
    assert!(response.ends_with("ok"), "{response}");
    let record = mesh.tcp_record(port);
    assert_eq!(
        record["original_dst"],
        mesh.server.addr(8080).to_string(),
        "{record}"
    );

    // The same through a dual-stack socket, to the VIP.
    let output = mesh.run_in_client(python_get(
        "AF_INET6",
        &mapped(SERVICE_C),
        8080,
        OLD_AGENT_MARK,
    ));
    let (_, response) = port_and_response(&output);
    assert!(response.contains(ROUTE_HEADER), "{response}");

    let counts = mesh.agent.decisions().unwrap();
    assert_eq!(counts["redirected"], 2, "{counts:?}");
    assert_eq!(counts["agent_socket"], 2, "{counts:?}");
}

#[test]
fn native_ipv6_is_a_counted_bypass_and_loopback_is_left_alone() {
    require_root();
    let mesh = Mesh::start();
    // The pod has no IPv6 route: the connect fails after the hook has decided and counted.
    let script = r#"
import socket
for host in ["fd00::1", "::1", "::ffff:127.0.0.1"]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((host, 9))
    except OSError as error:
        print(host, error.errno, flush=True)
"#;
    let mut python = Command::new("python3");
    python.args(["-c", script]);
    let output = mesh.run_in_client(python);
    assert_eq!(
        output.lines().count(),
        3,
        "none of them has a server: {output}"
    );

    let counts = mesh.agent.decisions().unwrap();
    assert_eq!(counts["ipv6_bypass"], 1, "{counts:?}");
    assert_eq!(counts["loopback"], 2, "{counts:?}");
    assert_eq!(counts["redirected"], 0, "{counts:?}");
    let (status, metrics) = mesh.agent.admin_get("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"mesh_redirect_decisions_total{decision="ipv6_bypass"} 1"#),
        "{metrics}"
    );
    assert!(
        mesh.agent.access_log().is_empty(),
        "{:?}",
        mesh.agent.access_log()
    );
}
