//! Commands the end-to-end tests run inside pods: the `probe` program (tests/src/bin/probe.rs:
//! echo and HTTP servers and clients) and curl.

use std::{process::Command, time::Duration};

use crate::{Pod, PodProcess, SimNode};

/// How long a probe server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// `probe ARGS…`.
pub fn probe(args: &[&str]) -> Command {
    let binary = crate::probe_binary().unwrap_or_else(|error| panic!("{error:#}"));
    let mut command = Command::new(binary);
    command.args(args);
    command
}

/// `curl -sS --noproxy '*' --max-time 5 ARGS…`.
pub fn curl(args: &[&str]) -> Command {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--noproxy", "*", "--max-time", "5"])
        .args(args);
    command
}

/// Starts a probe server (`probe ARGS…`) in `pod` and waits until it listens.
pub fn start_server(node: &SimNode, pod: &Pod, args: &[&str]) -> PodProcess {
    let server = node.spawn_in_pod(pod, probe(args)).unwrap();
    server
        .stdout()
        .wait_for_json(|line| line["listening"].is_string(), LISTEN_TIMEOUT)
        .unwrap();
    server
}
