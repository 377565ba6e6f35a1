//! `/run/mesh-demo/`: what a running demo tells other terminals. `state.json` describes the
//! node and its pods (for people and scripts); `control.sock` takes commands (see `control`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use mesh_tests::tutorial::World;
use serde_json::json;

pub const RUN_DIR: &str = "/run/mesh-demo";

pub fn state_file() -> PathBuf {
    Path::new(RUN_DIR).join("state.json")
}

pub fn control_socket() -> PathBuf {
    Path::new(RUN_DIR).join("control.sock")
}

/// Writes `state.json` afresh; called at start and after every scale.
pub fn write(world: &dyn World) -> Result<()> {
    fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let pods: Vec<_> = world
        .running_pods()?
        .into_iter()
        .map(|pod| json!({"name": pod.name, "deployment": pod.deployment, "ip": pod.ip}))
        .collect();
    let state = json!({
        "pid": std::process::id(),
        "node_netns": world.node().netns_path(),
        "node_netns_name": world.node().netns_name(),
        "gateway_in_node": world.gateway(),
        "admin_in_node": mesh_tests::agent::ADMIN,
        "admin_socket": world.agent().admin_socket(),
        "pods": pods,
    });
    // Write then rename, so a reader never sees half a file.
    let tmp = Path::new(RUN_DIR).join(".state.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
    fs::rename(&tmp, state_file()).context("writing state.json")
}

/// Removes the run directory; returns whether there was one.
pub fn remove() -> Result<bool> {
    match fs::remove_dir_all(RUN_DIR) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {RUN_DIR}")),
    }
}
