//! `cargo xtask cluster up|down|status`: a real Kubernetes control plane on loopback (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler 1.20.2) for trying the manifests and
//! the demo by hand. The tests start their own (`mesh_tests::control_plane`); this one outlives
//! the command and lives in a directory of its own until `down`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use mesh_tests::control_plane::{self, ControlPlane};

#[derive(Subcommand)]
pub enum Command {
    /// Build the control plane's binaries if they are not cached (once), start it and print the
    /// `KUBECONFIG` to use.
    Up,
    /// Stop every process of the control plane and remove its directory (its etcd data too).
    Down,
    /// Which of its processes run, and whether the API server is ready.
    Status,
}

/// Where `up` keeps the credentials, kubeconfig, logs and etcd's data: tmpfs where there is one.
fn dir() -> PathBuf {
    control_plane::run_root().join("mesh-cluster")
}

pub fn run(command: Command) -> Result<()> {
    let dir = dir();
    match command {
        Command::Up => {
            let control_plane = ControlPlane::start_detached(&dir)?;
            let kubeconfig = control_plane.kubeconfig().to_owned();
            let server = control_plane.server().to_owned();
            control_plane.detach();
            println!(
                "Kubernetes {} is up at {server}",
                control_plane::KUBERNETES_VERSION
            );
            println!("  export KUBECONFIG={}", kubeconfig.display());
            println!("  logs: {}/*.log", dir.display());
            println!("  stop it: cargo xtask cluster down");
        }
        Command::Down => {
            let stopped = control_plane::stop_detached(&dir)?;
            if stopped.is_empty() {
                println!("no control plane was running");
            } else {
                println!("stopped {}", stopped.join(", "));
            }
        }
        Command::Status => {
            let running = control_plane::running_in(&dir);
            if running.is_empty() {
                println!("no control plane is running (start one: cargo xtask cluster up)");
                return Ok(());
            }
            println!("running: {}", running.join(", "));
            let kubeconfig = control_plane::admin_kubeconfig(&dir);
            let ready = std::process::Command::new("kubectl")
                .env("KUBECONFIG", &kubeconfig)
                .args(["get", "--raw", "/readyz"])
                .output()?;
            if ready.status.success() {
                println!("kube-apiserver: ready");
            } else {
                println!(
                    "kube-apiserver: not ready: {}",
                    String::from_utf8_lossy(&ready.stderr).trim()
                );
            }
            println!("  export KUBECONFIG={}", kubeconfig.display());
        }
    }
    Ok(())
}
