//! The tutorial's loop, live: one request every 0.5 s through the gateway, each answer with a
//! summary of the last 20, while the user runs the tutorial's steps from other terminals.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use mesh_tests::{
    agent::ADMIN,
    tutorial::{answer, steps, Action, Answer, Pace, Tally, CRASHED},
};

use super::{
    control::{self, Command},
    relay::Relay,
    state, Demo,
};

const PERIOD: Duration = Duration::from_millis(500);
const WINDOW: usize = 20;
/// Host ports of the relays: the tutorial's `curl $ROUTE/service-a` becomes
/// `curl localhost:8080/service-a`, and the admin API's reads are at their default address.
const HOST_GATEWAY: &str = "127.0.0.1:8080";
const HOST_ADMIN: &str = "127.0.0.1:15000";

/// Runs the loop until `stop` (Ctrl-C) or `rounds` requests.
pub fn run(
    demo: &Demo,
    server: &control::Server,
    rounds: Option<u32>,
    stop: &AtomicBool,
) -> Result<()> {
    let tutorial = demo.world();
    let relays = start_relays(demo);
    state::write(tutorial)?;
    print_intro(demo, &relays);

    let mut window = VecDeque::with_capacity(WINDOW);
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) && rounds.is_none_or(|n| round < n) {
        round += 1;
        let body = match tutorial.call() {
            Ok((_, body)) => body.trim().to_owned(),
            Err(error) => format!("ERROR {error:#}"),
        };
        if window.len() == WINDOW {
            window.pop_front();
        }
        window.push_back(answer(&body));
        println!(
            "{round:>5}  {:<62} [last {}] {}",
            shorten(&body, 62),
            window.len(),
            summary(&window)
        );
        server.serve_pending(|command| execute(demo, command));
        sleep_unless(stop, PERIOD);
    }
    Ok(())
}

/// The relays that could bind (host address, relay); a taken host port is reported and
/// skipped. In Kubernetes mode the API server is relayed too, on its own port, so the admin
/// kubeconfig works from the host as it is.
fn start_relays(demo: &Demo) -> Vec<(SocketAddr, Relay)> {
    let tutorial = demo.world();
    let gateway = tutorial.gateway();
    let mut wanted = vec![
        (
            HOST_GATEWAY.parse().expect("address"),
            gateway,
            "the gateway",
            format!("curl {gateway}/service-a"),
        ),
        (
            HOST_ADMIN.parse().expect("address"),
            ADMIN.parse().expect("address"),
            "the admin API",
            format!("curl {ADMIN}/clusters"),
        ),
    ];
    if let Demo::Kubernetes(kubernetes) = demo {
        let api_server = SocketAddr::from(([127, 0, 0, 1], kubernetes.control_plane().port()));
        wanted.push((
            api_server,
            api_server,
            "the API server",
            "kubectl ...".to_owned(),
        ));
    }
    let mut relays = Vec::new();
    for (listen, target, what, instead) in wanted {
        match Relay::start(listen, target, tutorial.dialer()) {
            Ok(relay) => relays.push((listen, relay)),
            Err(error) => println!(
                "no relay for {what}: {error:#} (port taken?). Inside the node instead: \
                 ip netns exec {} {instead}",
                tutorial.node().netns_name()
            ),
        }
    }
    relays
}

/// What the user needs on screen: where things are and the tutorial's steps as commands
/// (ours first, so a line can be pasted whole; the tutorial's after `#`). At most 27 lines.
fn print_intro(demo: &Demo, relays: &[(SocketAddr, Relay)]) {
    let tutorial = demo.world();
    let relayed = |addr: &str| relays.iter().any(|r| r.0 == addr.parse().expect("address"));
    let netns = tutorial.node().netns_name();
    let running = tutorial.running_pods().unwrap_or_default();
    let pods: Vec<String> = running
        .iter()
        .map(|pod| format!("{} {}", pod.name, pod.ip))
        .collect();
    println!();
    println!("The tutorial \"Service Mesh for Developers\": A (Python) → B (Deno) → C v1/v2 (Java), no sidecars.");
    println!("node netns {netns}; pods {}", pods.join(", "));
    if relayed(HOST_GATEWAY) {
        println!("  curl localhost:8080/service-a      # curl $ROUTE/service-a  (the gateway)");
    }
    if relayed(HOST_ADMIN) {
        println!(
            "  open http://localhost:15000/graph  # the live traffic graph (the agent's own page)"
        );
    }
    println!("  curl localhost:15000/clusters      # endpoints, health, ejections (the agent's admin API)");
    println!(
        "In another terminal, in {}:",
        super::workspace_root().display()
    );
    if let Demo::Kubernetes(kubernetes) = demo {
        let control_plane = kubernetes.control_plane();
        // Its own discovery cache: kubectl's default one is keyed by host and port, and a
        // server that had this port before would answer for this one.
        println!(
            "  export KUBECONFIG={} KUBECACHEDIR={}",
            control_plane.kubeconfig().display(),
            control_plane.dir().join("kube-cache").display()
        );
        println!("  kubectl -n servicemesh-apps get pods,svc,virtualservices,destinationrules");
    } else if tutorial.agents().len() == 1 {
        // `mesh-agent apply` changes the config through the agent's admin socket (root only).
        println!(
            "  export MESH_ADMIN_SOCKET={}",
            tutorial.agent().admin_socket().display()
        );
    }
    let mut seen = Vec::new();
    for action in steps(Pace::Quick).iter().flat_map(|s| s.actions.clone()) {
        let ours = tutorial.command(&action);
        if !seen.contains(&ours) {
            println!("  {ours:<88} # {}", tutorial_short(&action));
            seen.push(ours);
        }
    }
    if let Ok(pod) = tutorial.first_pod(CRASHED) {
        println!(
            "  or straight into the pod:  ip netns exec {netns} curl -s {}:8080/crash",
            pod.ip
        );
    }
    println!("Ctrl-C stops the demo and removes everything it made.\n");
}

/// The tutorial's command, short: the files have the same names there (under `kubernetes/`).
fn tutorial_short(action: &Action) -> String {
    match action {
        Action::Create(_) => "oc create -f (same file)".to_owned(),
        Action::Replace(_) => "oc replace -f (same file)".to_owned(),
        other => other.tutorial(),
    }
}

fn summary(window: &VecDeque<Answer>) -> Tally {
    let mut tally = Tally::default();
    window.iter().for_each(|answer| tally.add(answer));
    tally
}

/// Runs a command from another terminal, on this (the main) thread.
fn execute(demo: &Demo, command: &Command) -> Result<String> {
    let tutorial = demo.world();
    match command {
        Command::Apply(file) => match demo {
            Demo::Local(local) => local.apply_file(std::path::Path::new(file)),
            Demo::Kubernetes(_) => Ok("in Kubernetes mode, kubectl apply -f FILE".to_owned()),
        },
        Command::Crash(pod) => {
            tutorial.crash(pod)?;
            Ok(format!("{pod} crashed: it answers 500 until repaired"))
        }
        Command::Repair(pod) => {
            tutorial.repair(pod)?;
            Ok(format!("{pod} repaired"))
        }
        Command::Scale(deployment, count) => {
            tutorial.scale(deployment, *count)?;
            state::write(tutorial)?;
            let pods: Vec<String> = tutorial
                .running_pods()?
                .into_iter()
                .filter(|pod| pod.deployment == *deployment)
                .map(|pod| format!("{} {}", pod.name, pod.ip))
                .collect();
            Ok(format!(
                "{deployment}: {count} replicas [{}]",
                pods.join(", ")
            ))
        }
    }
}

/// One line of the screen per answer: long error texts are cut.
fn shorten(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        return line.to_owned();
    }
    let cut: String = line.chars().take(max - 1).collect();
    format!("{cut}…")
}

/// Sleeps `period`, waking early when `stop` is set so Ctrl-C feels immediate.
fn sleep_unless(stop: &AtomicBool, period: Duration) {
    let end = Instant::now() + period;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}
