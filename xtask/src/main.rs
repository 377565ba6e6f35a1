//! Developer commands: `cargo xtask build-ebpf`, `cargo xtask test`, `cargo xtask demo`,
//! `cargo xtask cluster`.

mod bench;
mod build_ebpf;
mod cluster;
mod demo;
mod fuzz;
mod screenshots;
mod test;
mod tools;

use std::{path::Path, process};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer commands for the mesh", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the kernel programs (installs nightly's rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Run the tutorial "Service Mesh for Developers" live on a simulated node (needs root).
    ///
    /// Without a subcommand: the tutorial's request loop, with the steps' commands on screen.
    /// With one: control the demo running in another terminal.
    ///
    /// Examples: `cargo xtask demo`, `cargo xtask demo --steps`, `cargo xtask demo --nodes 3`
    /// (A on node 1, B on node 2, C v1/v2 on nodes 2 and 3, mutual TLS between the agents),
    /// `cargo xtask demo --kubernetes` (then `kubectl` from another terminal),
    /// `cargo xtask demo crash POD`.
    #[command(args_conflicts_with_subcommands = true)]
    Demo {
        /// Stop after this many requests instead of running until Ctrl-C.
        #[arg(long)]
        rounds: Option<u32>,
        /// Run every step of the tutorial unattended and print a table of what each showed;
        /// exits non-zero unless every step behaved.
        #[arg(long, conflicts_with = "rounds")]
        steps: bool,
        /// Kubernetes mode: a real control plane (1.20, built once and cached) and a kubelet
        /// stand-in on the node, the apps as Deployments, the agent in Kubernetes mode, and
        /// `kubectl` doing every change, as on a cluster.
        #[arg(long)]
        kubernetes: bool,
        /// Spread the pods over this many simulated nodes, an agent on each, joined by an
        /// underlay; with more than one, the agents carry pod-to-pod traffic inside mutual TLS
        /// (a CA made with `mesh-agent ca init`). Local mode only.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8), conflicts_with = "kubernetes")]
        nodes: u8,
        #[command(subcommand)]
        control: Option<DemoControl>,
    },
    /// Build everything and run every test: unit, integration and end-to-end (as root).
    Test {
        /// Extra arguments passed to `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Fuzz what reads untrusted bytes (config loader, protocol detection, HTTP head checks)
    /// with libFuzzer, each target for `--seconds`. Needs nightly (installed when missing).
    ///
    /// Examples: `cargo xtask fuzz`, `cargo xtask fuzz --seconds 600 config_loader`.
    Fuzz(fuzz::Args),
    /// Take docs/tutorial.md's pictures of the agent's graph page (canary at 90/10, circuit
    /// breaker at work): the tutorial's end-to-end test in a real browser, as root.
    Screenshots,
    /// Benchmark one mesh hop against direct, nginx and HAProxy (release build, as root).
    Bench(bench::Args),
    /// A real Kubernetes control plane (1.20) on loopback: etcd, kube-apiserver,
    /// kube-controller-manager and kube-scheduler, built once from Debian's source package.
    #[command(subcommand)]
    Cluster(cluster::Command),
}

/// Commands for a running `cargo xtask demo`, from another terminal.
#[derive(Subcommand)]
enum DemoControl {
    /// Put a pod in crash mode (its `/` answers 500), as `curl localhost:8080/crash` does.
    Crash { pod: String },
    /// End a pod's crash mode.
    Repair { pod: String },
    /// `oc scale deploy/DEPLOYMENT --replicas N`, e.g. `scale service-c-v2 2`.
    Scale { deployment: String, replicas: usize },
    /// `mesh-agent apply -f FILE` to every node's agent (local mode; with `--nodes N` the
    /// demo's agents each keep their own rules), e.g. `apply deploy/examples/virtual-service-c-v1.yml`.
    Apply { file: std::path::PathBuf },
}

impl From<DemoControl> for demo::Command {
    fn from(control: DemoControl) -> Self {
        match control {
            DemoControl::Crash { pod } => demo::Command::Crash(pod),
            DemoControl::Repair { pod } => demo::Command::Repair(pod),
            DemoControl::Apply { file } => {
                // The demo runs in another directory perhaps: it is given the full path.
                let file = std::fs::canonicalize(&file).unwrap_or(file);
                demo::Command::Apply(file.display().to_string())
            }
            DemoControl::Scale {
                deployment,
                replicas,
            } => demo::Command::Scale(deployment, replicas),
        }
    }
}

fn main() -> Result<()> {
    forget_own_package();
    match Cli::parse().command {
        Command::BuildEbpf => build_ebpf::run().map(|_| ()),
        Command::Demo {
            rounds,
            steps,
            kubernetes,
            nodes,
            control,
        } => demo::run(
            match control {
                Some(control) => demo::Mode::Control(control.into()),
                None if steps => demo::Mode::Steps,
                None => demo::Mode::Live { rounds },
            },
            if kubernetes {
                demo::Setting::Kubernetes
            } else {
                demo::Setting::Local {
                    nodes: nodes.into(),
                }
            },
        ),
        Command::Test { cargo_args } => test::run(&cargo_args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Screenshots => screenshots::run(),
        Command::Bench(args) => bench::run(args),
        Command::Cluster(command) => cluster::run(command),
    }
}

/// `cargo xtask` describes xtask's own package in the environment (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_NAME`, ...). Passed on to the cargo commands xtask runs, those reach build
/// scripts that watch them (ring's): every build alternating with a plain `cargo build` would
/// then rebuild those crates and everything above them, the agent's LTO link included.
fn forget_own_package() {
    let own = |key: &str| {
        key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&key)
    };
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(own) {
            std::env::remove_var(key);
        }
    }
}

/// `cargo metadata` of the workspace whose manifest is `manifest` (relative to `root`), as JSON,
/// with its lock file as it is: an incomplete lock file is an error, not rewritten.
fn locked_metadata(root: &Path, manifest: &str) -> Result<Vec<u8>> {
    let output = process::Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--format-version", "1"])
        .args(["--manifest-path", manifest])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata --manifest-path {manifest} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// Runs the cargo that runs xtask, in `root`.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    println!("+ cargo {}", args.join(" "));
    let status = process::Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
