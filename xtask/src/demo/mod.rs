//! `cargo xtask demo`: a simulated node on this machine with a client pod and a server pod; the
//! client's requests go through the agent and the agent's kernel counters show it.

use std::{
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use mesh_tests::{probe_binary, require_root, Agent, SimNode};

use crate::build_ebpf::workspace_root;

pub fn run(rounds: Option<u32>) -> Result<()> {
    require_root();
    crate::build_ebpf::run()?;
    crate::cargo(&workspace_root(), &["build", "--workspace", "--bins"])?;

    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    mesh_tests::set_echo(false);
    let node = SimNode::new()?;
    let client = node.add_pod("client")?;
    let server = node.add_pod("server")?;
    node.add_host("server", server.ip())?;
    let mut server_cmd = Command::new(probe_binary()?);
    server_cmd.args([
        "http-server",
        "--listen",
        "0.0.0.0:8080",
        "--body",
        "hello from the server pod",
    ]);
    let server_process = node.spawn_in_pod(&server, server_cmd)?;
    server_process
        .stdout()
        .wait_for_json(|l| l["listening"].is_string(), Duration::from_secs(10))?;
    let agent = Agent::start(&node, &[&client], &[])?;

    println!();
    println!(
        "Simulated node {} (cgroup {})",
        node.netns_name(),
        node.cgroup_path().display()
    );
    println!(
        "  pod client  {}  enrolled: its connections go through the agent",
        client.ip()
    );
    println!(
        "  pod server  {}  runs an HTTP server on :8080",
        server.ip()
    );
    println!("Every 0.5 s the client calls http://server:8080/. Ctrl-C stops and cleans up.\n");

    let mut round = 0;
    while !stop.load(Ordering::SeqCst) && rounds.is_none_or(|n| round < n) {
        round += 1;
        let mut curl = Command::new("curl");
        curl.args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "2",
            "http://server:8080/",
        ]);
        let mut call = node.spawn_in_pod(&client, curl)?;
        let ok = call.finish(Duration::from_secs(5))?.success();
        let body = if ok {
            call.stdout().text()
        } else {
            call.stderr().text()
        };
        let record = agent.access_log().last().cloned().unwrap_or_default();
        let counts = agent.decisions()?;
        println!(
            "#{round:<3} client -> {}  {:?}  via agent from pod {}  | kernel: redirected={} agent_socket={} not_enrolled={}",
            record["original_dst"].as_str().unwrap_or("?"),
            body.trim(),
            record["source_pod"].as_str().unwrap_or("?"),
            counts["redirected"],
            counts["agent_socket"],
            counts["not_enrolled"],
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("\ntearing down the simulated node");
    Ok(())
}
