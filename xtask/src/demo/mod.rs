//! `cargo xtask demo`: the tutorial "Service Mesh for Developers", live on a simulated node (or
//! several: `--nodes N`) on this machine. Apps A (Python) → B (Deno) → C v1/v2 (Java) run as pods, the agent enrolls
//! them and serves the gateway, and the user applies the tutorial's YAML from other terminals:
//! with `mesh-agent apply` in local mode, with `kubectl` in Kubernetes mode (`--kubernetes`: a
//! real control plane and the kubelet stand-in on the node, see `mesh_tests::tutorial`).
//!
//! - `live`: the tutorial's curl loop with a running summary (the default);
//! - `steps`: the whole tutorial unattended, as a table (`--steps`);
//! - `relay`: host loopback ports into the node (gateway, admin API);
//! - `control`: `cargo xtask demo crash|repair|scale` from other terminals;
//! - `state`: `/run/mesh-demo`, where a running demo says what it is.

mod control;
mod live;
mod relay;
mod state;
mod steps;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use anyhow::{Context, Result};
use mesh_tests::{
    require_root,
    tutorial::{
        kubernetes::KubernetesTutorial,
        local::{Layout, LocalTutorial},
        World,
    },
};

pub use control::Command;

use crate::build_ebpf::workspace_root;

/// Where the tutorial runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Simulated nodes, an agent on each, rules applied with `mesh-agent apply`; more than one
    /// node: mutual TLS between the agents.
    Local { nodes: usize },
    /// A real control plane and the kubelet stand-in on the node; `kubectl` does every change.
    Kubernetes,
}

/// The running tutorial, in either setting.
pub enum Demo {
    Local(Box<LocalTutorial>),
    Kubernetes(Box<KubernetesTutorial>),
}

impl Demo {
    fn start(setting: Setting, progress: &dyn Fn(&str)) -> Result<Demo> {
        Ok(match setting {
            Setting::Local { nodes } => {
                let layout = Layout {
                    nodes,
                    mutual_tls: nodes > 1,
                };
                Demo::Local(Box::new(LocalTutorial::start(layout, progress)?))
            }
            Setting::Kubernetes => Demo::Kubernetes(Box::new(KubernetesTutorial::start(progress)?)),
        })
    }

    pub fn world(&self) -> &dyn World {
        match self {
            Demo::Local(tutorial) => &**tutorial,
            Demo::Kubernetes(tutorial) => &**tutorial,
        }
    }
}

/// What `cargo xtask demo` was asked to do.
pub enum Mode {
    /// The live loop, until Ctrl-C or `rounds` requests.
    Live { rounds: Option<u32> },
    /// Every step unattended, then the table.
    Steps,
    /// A command for the demo running in another terminal.
    Control(Command),
}

pub fn run(mode: Mode, setting: Setting) -> Result<()> {
    if let Mode::Control(command) = &mode {
        // Talks to the running demo only: nothing to build or start. Its refusals are
        // answers for a user, not program faults, so they go out without a backtrace.
        if let Err(error) = control::send(command) {
            eprintln!("{error:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    require_root();
    let began = Instant::now();
    // Taken before anything starts, so a second live demo stops here with a clear message.
    let server = match mode {
        Mode::Live { .. } => Some(control::Server::bind()?),
        _ => None,
    };
    crate::build_ebpf::run()?;
    crate::cargo(&workspace_root(), &["build", "--workspace", "--bins"])?;
    let stop = ctrl_c_flag()?;

    mesh_tests::set_echo(false);
    match setting {
        Setting::Local { nodes: 1 } => println!(
            "starting the tutorial's node: 4 pods (Python, Deno, Java ×2) and the agent ..."
        ),
        Setting::Local { nodes } => println!(
            "starting the tutorial's {nodes} nodes: 4 pods (Python, Deno, Java ×2) spread over \
             them, an agent on each, mutual TLS between the agents ..."
        ),
        Setting::Kubernetes => println!(
            "starting the tutorial's node with a Kubernetes control plane and a kubelet \
             stand-in: 4 Deployments (Python, Deno, Java ×2) and the agent in Kubernetes mode ..."
        ),
    }
    let starting = Instant::now();
    let demo = Demo::start(setting, &|line| println!("  {line}"))?;
    println!(
        "ready after {:.1} s (the node and its pods: {:.1} s)",
        began.elapsed().as_secs_f64(),
        starting.elapsed().as_secs_f64()
    );

    let result = match (mode, &server) {
        (Mode::Live { rounds }, Some(server)) => live::run(&demo, server, rounds, &stop),
        _ => steps::run(demo.world(), &stop),
    };
    drop(server);
    teardown(demo);
    result
}

/// Set by Ctrl-C; the loops check it and return, so that teardown runs on the main thread.
fn ctrl_c_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

/// Removes the node (its pods, their processes, the cgroup) and `/run/mesh-demo`, says what
/// went, and checks that nothing of this node is left.
fn teardown(demo: Demo) {
    let world = demo.world();
    let ids = world.ids();
    let mut removed = match &demo {
        Demo::Local(tutorial) if tutorial.network().nodes().len() > 1 => {
            let network = tutorial.network();
            vec![format!(
                "{} nodes and their underlay {}",
                network.nodes().len(),
                network.underlay_netns_name()
            )]
        }
        _ => vec![
            format!("node netns {}", world.node().netns_name()),
            format!("cgroup {}", world.node().cgroup_path().display()),
        ],
    };
    let pods: Vec<String> = world
        .running_pods()
        .unwrap_or_default()
        .into_iter()
        .map(|pod| pod.name)
        .collect();
    removed.push(format!("{} pods ({})", pods.len(), pods.join(", ")));
    let control_plane = match &demo {
        Demo::Kubernetes(tutorial) => Some(tutorial.control_plane().dir().to_owned()),
        Demo::Local(_) => None,
    };
    if let Some(dir) = &control_plane {
        removed.push(format!("control plane {}", dir.display()));
    }
    println!("\ntearing down ...");
    drop(demo);
    match state::remove() {
        Ok(true) => removed.push(state::RUN_DIR.to_owned()),
        Ok(false) => {}
        Err(error) => println!("{error:#}"),
    }
    println!("removed: {}", removed.join("; "));
    let mut left: Vec<String> = ids
        .iter()
        .flat_map(|id| mesh_tests::leftovers_of(id))
        .collect();
    if let Some(dir) = control_plane {
        left.extend(mesh_tests::control_plane::running_in(&dir));
        if dir.exists() {
            left.push(dir.display().to_string());
        }
    }
    if left.is_empty() {
        println!(
            "nothing of the demo is left (no namespace, cgroup, /etc/netns entry or control plane)"
        );
    } else {
        println!("LEFT BEHIND: {left:?}");
    }
}
