//! The simulated node harness itself: pods reach each other, names resolve, processes land in the
//! node's cgroup and the pod's namespace, the host is untouched, and teardown leaves nothing;
//! and a network of nodes routes pods' traffic between nodes over its underlay.

use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use mesh_tests::network::host_namespace_is_untouched;
use mesh_tests::probe::{curl, probe, start_server};
use mesh_tests::{leftovers_of, require_root, Pod, SimNetwork, SimNode};

const TIMEOUT: Duration = Duration::from_secs(20);

fn command(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

/// Runs `probe echo-client` from `client` to `to` and checks every connection's hashes.
fn echo_round_trip(node: &SimNode, client: &Pod, to: &str, conns: usize) {
    let conns_arg = conns.to_string();
    let args = [
        "echo-client",
        "--to",
        to,
        "--conns",
        &conns_arg,
        "--bytes",
        "100000",
    ];
    let mut echo = node.spawn_in_pod(client, probe(&args)).unwrap();
    let status = echo.finish(TIMEOUT).unwrap();
    let lines = echo.stdout().json_lines();
    let (summary, reports) = lines.split_last().expect("echo-client printed nothing");
    assert!(status.success(), "echo-client failed: {lines:?}");
    assert_eq!(summary["ok"], conns, "{summary}");
    assert_eq!(reports.len(), conns);
    for report in reports {
        assert_eq!(report["sent_sha256"], report["recv_sha256"], "{report}");
        assert!(report["local_port"].as_u64().is_some(), "{report}");
    }
}

#[test]
fn pods_on_one_node_reach_each_other() {
    require_root();
    let node = SimNode::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    assert_eq!(server.ip().to_string(), "10.77.0.2");
    assert_eq!(client.ip().to_string(), "10.77.0.3");

    let _echo = start_server(&node, &server, &["echo-server", "--listen", "0.0.0.0:7000"]);
    echo_round_trip(&node, &client, &server.addr(7000).to_string(), 20);
}

#[test]
fn pod_names_and_added_hosts_resolve_in_pods() {
    require_root();
    let node = SimNode::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let getent = |name: &str| {
        let mut getent = node
            .spawn_in_pod(&client, command("getent", &["hosts", name]))
            .unwrap();
        getent.finish(TIMEOUT).unwrap();
        getent.stdout().text()
    };
    assert!(
        getent("server").starts_with("10.77.0.2"),
        "{}",
        getent("server")
    );

    // A process started before add_host sees the new entry: the file is rewritten in place.
    let sleeper = node
        .spawn_in_pod(&client, command("sleep", &["60"]))
        .unwrap();
    node.add_host("service-a", "10.77.100.1".parse().unwrap())
        .unwrap();
    assert!(getent("service-a").starts_with("10.77.100.1"));
    let seen = std::fs::read_to_string(format!("/proc/{}/root/etc/hosts", sleeper.pid())).unwrap();
    assert!(seen.contains("service-a"), "{seen}");
    // The host's own /etc/hosts is untouched.
    assert!(!std::fs::read_to_string("/etc/hosts")
        .unwrap()
        .contains("service-a"));

    let _http = start_server(
        &node,
        &server,
        &[
            "http-server",
            "--listen",
            "0.0.0.0:8080",
            "--body",
            "hello from server",
        ],
    );
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "-i",
        "--noproxy",
        "*",
        "--max-time",
        "5",
        "http://server:8080/",
    ]);
    let mut curl = node.spawn_in_pod(&client, curl).unwrap();
    assert!(curl.finish(TIMEOUT).unwrap().success());
    let response = curl.stdout().text();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("x-peer: 10.77.0.3:"), "{response}");
    assert!(response.ends_with("hello from server"), "{response}");
}

#[test]
fn spawned_processes_are_in_the_node_cgroup_and_the_pod_netns() {
    require_root();
    let node = SimNode::new().unwrap();
    let pod = node.add_pod("app").unwrap();
    let in_pod = node.spawn_in_pod(&pod, command("sleep", &["60"])).unwrap();
    let on_node = node.spawn_on_node(command("sleep", &["60"])).unwrap();

    let mount = mesh_tests::cgroup2_mount().unwrap();
    let relative = node.cgroup_path().strip_prefix(&mount).unwrap();
    let expected_cgroup = format!("0::/{}", relative.display());
    let netns_inode = |path: String| std::fs::metadata(path).unwrap().ino();
    for (process, netns) in [(&in_pod, pod.netns_path()), (&on_node, node.netns_path())] {
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", process.pid())).unwrap();
        assert!(
            cgroups.lines().any(|line| line == expected_cgroup),
            "{cgroups}"
        );
        assert_eq!(
            netns_inode(format!("/proc/{}/ns/net", process.pid())),
            netns_inode(netns.display().to_string()),
            "{} is not in {}",
            process.label(),
            netns.display()
        );
    }
    let procs = std::fs::read_to_string(node.cgroup_path().join("cgroup.procs")).unwrap();
    assert_eq!(procs.lines().count(), 2, "{procs}");

    // Threads in a namespace see the pod's interfaces.
    let addrs = node
        .run_in_pod(&pod, || {
            let output = Command::new("ip")
                .args(["-o", "-4", "addr", "show", "eth0"])
                .output();
            String::from_utf8(output.unwrap().stdout).unwrap()
        })
        .unwrap();
    assert!(addrs.contains("10.77.0.2/16"), "{addrs}");
}

#[test]
fn the_host_namespace_has_no_address_or_route_into_nodes() {
    require_root();
    let node = SimNode::new().unwrap();
    let pod = node.add_pod("app").unwrap();
    // Checked without sending anything: a real connect could leave the machine by the default
    // route.
    let addresses = Command::new("ip")
        .args(["-o", "-4", "addr"])
        .output()
        .unwrap();
    let addresses = String::from_utf8(addresses.stdout).unwrap();
    assert!(!addresses.contains("10.77."), "{addresses}");
    let routes = Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .unwrap();
    let routes = String::from_utf8(routes.stdout).unwrap();
    assert!(!routes.contains("10.77."), "{routes}");
    let route = Command::new("ip")
        .args(["route", "get", &pod.ip().to_string()])
        .output()
        .unwrap();
    let route = String::from_utf8(route.stdout).unwrap();
    assert!(!route.contains("br0"), "{route}");
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8(links.stdout).unwrap();
    assert!(!links.contains("veth") && !links.contains("br0"), "{links}");
}

#[test]
fn dropping_a_node_removes_everything() {
    require_root();
    let node = SimNode::new().unwrap();
    let id = node.id();
    let pod = node.add_pod("app").unwrap();
    // Left running on purpose, with a child of its own: the node's drop must kill both.
    let orphaned = node.spawn_in_pod(&pod, command("sh", &["-c", "sleep 60 & sleep 60"]));
    std::mem::forget(orphaned.unwrap());
    assert!(!leftovers_of(&id).is_empty());
    drop(node);
    assert_eq!(leftovers_of(&id), Vec::<String>::new());
}

#[test]
fn a_panicking_test_leaves_nothing() {
    require_root();
    let id = Mutex::new(String::new());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let node = SimNode::new().unwrap();
        *id.lock().unwrap() = node.id();
        let pod = node.add_pod("app").unwrap();
        let _sleeper = node.spawn_in_pod(&pod, command("sleep", &["60"])).unwrap();
        panic!("test failure inside a node");
    }));
    assert!(result.is_err());
    let id = id.into_inner().unwrap();
    assert!(!id.is_empty());
    assert_eq!(leftovers_of(&id), Vec::<String>::new());
}

#[test]
fn two_nodes_in_parallel_are_independent() {
    require_root();
    let nodes: Vec<SimNode> = thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let node = SimNode::new().unwrap();
                    let server = node.add_pod("server").unwrap();
                    let client = node.add_pod("client").unwrap();
                    // The same addresses in both nodes.
                    assert_eq!(server.ip().to_string(), "10.77.0.2");
                    let _echo = start_server(
                        &node,
                        &server,
                        &["echo-server", "--listen", "10.77.0.2:7000"],
                    );
                    echo_round_trip(&node, &client, "10.77.0.2:7000", 5);
                    node
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap())
            .collect()
    });
    assert_ne!(nodes[0].id(), nodes[1].id());
    assert_ne!(nodes[0].cgroup_path(), nodes[1].cgroup_path());
    // A server in one node is not reachable from the other.
    let _echo = start_server(
        &nodes[0],
        &nodes[0].pods()[0],
        &["echo-server", "--listen", "0.0.0.0:7100"],
    );
    let client = &nodes[1].pods()[1];
    let mut echo = nodes[1]
        .spawn_in_pod(
            client,
            probe(&["echo-client", "--to", "10.77.0.2:7100", "--bytes", "10"]),
        )
        .unwrap();
    assert!(!echo.finish(TIMEOUT).unwrap().success());
}

#[test]
fn leftovers_of_dead_processes_are_swept() {
    require_root();
    // A pid that no longer exists, standing in for a test process killed before its drop ran.
    let mut exited = Command::new("true").spawn().unwrap();
    exited.wait().unwrap();
    let id = format!("{}-0", exited.id());
    let netns = format!("mt-{id}-app");
    let cgroup = mesh_tests::cgroup2_mount()
        .unwrap()
        .join(format!("mesh-test-{id}"));
    let status = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::create_dir_all(format!("/etc/netns/{netns}")).unwrap();
    std::fs::create_dir(&cgroup).unwrap();
    // (Another test process may sweep them first: they are stale for everyone.)
    mesh_tests::sweep_all_stale().unwrap();
    assert_eq!(leftovers_of(&id), Vec::<String>::new());
    // Nodes of live processes (other tests running right now) are not touched.
    let node = SimNode::new().unwrap();
    mesh_tests::sweep_all_stale().unwrap();
    assert!(!leftovers_of(&node.id()).is_empty());
}

#[test]
fn pods_on_different_nodes_reach_each_other_by_pod_ip_over_the_underlay() {
    require_root();
    let network = SimNetwork::new(3).unwrap();
    let nodes = network.nodes();
    let pods: Vec<Pod> = (1..=nodes.len())
        .zip(nodes)
        .map(|(n, node)| node.add_pod(&format!("app-{n}")).unwrap())
        .collect();
    for (n, (node, pod)) in (1..).zip(nodes.iter().zip(&pods)) {
        assert_eq!(node.ip().to_string(), format!("10.77.{n}.1"));
        assert_eq!(node.pod_cidr(), format!("10.77.{n}.0/24"));
        assert_eq!(
            node.underlay_ip().map(|ip| ip.to_string()),
            Some(format!("10.78.0.{n}"))
        );
        assert_eq!(node.internal_ip(), node.underlay_ip().unwrap());
        assert_eq!(pod.ip().to_string(), format!("10.77.{n}.2"));
        assert!(network
            .node_of_pod_ip(pod.ip())
            .is_some_and(|owner| owner.id() == node.id()));
    }

    // Every pod reaches every other pod by its IP, and the server sees the client's own pod IP:
    // routed, neither NATed nor tunnelled.
    let _servers: Vec<_> = nodes
        .iter()
        .zip(&pods)
        .map(|(node, pod)| {
            let body = format!("hello from {}", pod.name());
            start_server(
                node,
                pod,
                &["http-server", "--listen", "0.0.0.0:8080", "--body", &body],
            )
        })
        .collect();
    for (node, client) in nodes.iter().zip(&pods) {
        for server in pods.iter().filter(|pod| pod.ip() != client.ip()) {
            let url = format!("http://{}/", server.addr(8080));
            let mut get = node.spawn_in_pod(client, curl(&["-i", &url])).unwrap();
            let status = get.finish(TIMEOUT).unwrap();
            let response = get.stdout().text();
            assert!(
                status.success(),
                "{} → {url}: {}",
                client.name(),
                get.stderr().text()
            );
            assert!(
                response.contains(&format!("x-peer: {}:", client.ip())),
                "{response}"
            );
            assert!(
                response.ends_with(&format!("hello from {}", server.name())),
                "{response}"
            );
        }
    }

    // The nodes reach each other by their underlay addresses, and a pod reaches another node.
    let target = nodes[2].underlay_ip().unwrap();
    let listen = format!("{target}:7000");
    let node_server = nodes[2]
        .spawn_on_node(probe(&["echo-server", "--listen", &listen]))
        .unwrap();
    node_server
        .stdout()
        .wait_for_json(|line| line["listening"].is_string(), TIMEOUT)
        .unwrap();
    let mut from_node = nodes[0]
        .spawn_on_node(probe(&["echo-client", "--to", &listen, "--bytes", "1000"]))
        .unwrap();
    assert!(
        from_node.finish(TIMEOUT).unwrap().success(),
        "node 1 → node 3"
    );
    echo_round_trip(&nodes[1], &pods[1], &listen, 2);
}

#[test]
fn a_network_touches_nothing_in_the_host_and_its_drop_removes_everything() {
    require_root();
    for nodes in [0, SimNetwork::MAX_NODES + 1] {
        let error = SimNetwork::new(nodes).err().expect("refused");
        assert!(format!("{error:#}").contains("1 to 254 nodes"), "{error:#}");
    }
    let network = SimNetwork::new(2).unwrap();
    let ids = network.ids();
    assert_eq!(ids.len(), 3);
    let node = network.node(1).unwrap();
    let pod = node.add_pod("app").unwrap();
    // Left running on purpose: the network's drop must kill it.
    std::mem::forget(node.spawn_in_pod(&pod, command("sleep", &["60"])).unwrap());
    host_namespace_is_untouched().unwrap();
    // Without sending anything: the host's route to a pod of the network is not ours.
    let route = Command::new("ip")
        .args(["route", "get", &pod.ip().to_string()])
        .output()
        .unwrap();
    let route = String::from_utf8(route.stdout).unwrap();
    assert!(!route.contains("br0") && !route.contains("veth"), "{route}");
    let underlay = leftovers_of(&network.id());
    assert!(
        underlay
            .iter()
            .any(|leftover| leftover.contains(network.underlay_netns_name())),
        "{underlay:?}"
    );
    for id in &ids {
        assert!(!leftovers_of(id).is_empty(), "{id}");
    }
    drop(network);
    for id in &ids {
        assert_eq!(leftovers_of(id), Vec::<String>::new(), "{id}");
    }
}
