//! Simulated node harness for end-to-end tests (and `cargo xtask demo`).
//!
//! A [`SimNode`] is a network namespace with a bridge `br0` (10.77.0.1/16 for a node of its own,
//! with no uplink) and pods behind it, plus a cgroup v2 directory that every process started on
//! the node or in its pods joins (so the agent can attach its programs to it). A [`SimNetwork`]
//! is N nodes, each with a /24 of its own, joined by an underlay with routes between their pod
//! subnets (see [`network`]). Nodes and networks are independent, so tests run in parallel,
//! within one process and across processes.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::process::Command;
//! use std::time::Duration;
//!
//! mesh_tests::require_root();
//! let node = mesh_tests::SimNode::new()?;
//! let client = node.add_pod("client")?;
//! let mut agent = node.spawn_on_node({
//!     let mut agent = Command::new(mesh_tests::agent_binary()?);
//!     agent.arg("run").arg("--cgroup").arg(node.cgroup_path());
//!     agent.arg("--enroll").arg(client.netns_path());
//!     agent
//! })?;
//! agent.stdout().wait_for_json(|event| event["event"] == "ready", Duration::from_secs(10))?;
//! let mut curl = Command::new("curl");
//! curl.args(["-sS", "--max-time", "5", "http://server:8080/"]);
//! let mut curl = node.spawn_in_pod(&client, curl)?;
//! assert!(curl.finish(Duration::from_secs(10))?.success());
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod browser;
pub mod canary;
pub mod capture;
mod cgroup;
mod cleanup;
pub mod command;
pub mod control_plane;
pub mod graph_page;
pub mod http;
pub mod kiali;
pub mod kubelet;
pub mod mesh_config;
mod netns;
pub mod network;
pub mod packages;
pub mod probe;
mod process;
pub mod prometheus;
pub mod signer;
mod simnode;
pub mod stat;
pub mod tutorial;
pub mod world;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

pub use agent::Agent;
pub use cgroup::cgroup2_mount;
pub use cleanup::{leftovers, leftovers_of, sweep_all_stale};
pub use mesh_config::{Backend, ConfigDir, IN_MESH};
pub use network::SimNetwork;
pub use process::{set_echo, OutputLines, PodProcess};
pub use simnode::{Pod, SimNode};

/// Panics unless running as root: the end-to-end tests need it and never skip silently.
pub fn require_root() {
    assert!(
        is_root(),
        "these tests need root (network namespaces, cgroups, eBPF): run them as root, \
         e.g. with `cargo xtask test`"
    );
}

/// Polls `check` every 100 ms until it returns `Some`; after `within`, fails naming `what` and
/// the last error.
pub fn wait_for<T>(
    what: &str,
    within: std::time::Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let last = match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => String::from("not yet"),
            Err(error) => format!("{error:#}"),
        };
        if std::time::Instant::now() >= deadline {
            bail!("{what}: not within {within:?} (last: {last})");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// The agent binary: `$MESH_AGENT_BIN`, else `mesh-agent` in the target directory this test
/// binary was built into.
pub fn agent_binary() -> Result<PathBuf> {
    sibling_binary("MESH_AGENT_BIN", "mesh-agent")
        .context("build it first: cargo build -p mesh-agent — `cargo xtask test` does this")
}

/// `<agent> ca init <dir>`: a root CA the agents (`run --ca`) or the signer (`ca serve`) use.
/// `agent` is the binary to run (the bench passes its release build).
pub fn ca_init(agent: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    let output = std::process::Command::new(agent)
        .args(["ca", "init"])
        .arg(dir)
        .output()
        .context("running mesh-agent ca init")?;
    if !output.status.success() {
        bail!(
            "mesh-agent ca init {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The `probe` binary of this package: `$MESH_PROBE_BIN`, else `probe` in the target directory.
/// Integration tests of this package can use `env!("CARGO_BIN_EXE_probe")` instead.
pub fn probe_binary() -> Result<PathBuf> {
    sibling_binary("MESH_PROBE_BIN", "probe")
        .context("build it first: cargo build -p mesh-tests --bin probe")
}

/// The `upstream` binary of this package (an HTTP server and client for tests and the demo).
pub fn upstream_binary() -> Result<PathBuf> {
    sibling_binary("MESH_UPSTREAM_BIN", "upstream")
        .context("build it first: cargo build -p mesh-tests --bin upstream")
}

/// `$var`, else `name` next to the running executable, skipping the `deps/` directory where
/// cargo puts test binaries (`target/debug/deps/harness-…` → `target/debug/name`).
fn sibling_binary(var: &str, name: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(var) {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().context("finding the running executable")?;
            let mut dir = exe.parent().context("executable has no directory")?;
            if dir.ends_with("deps") {
                dir = dir.parent().context("deps/ has no parent")?;
            }
            dir.join(name)
        }
    };
    if !path.is_file() {
        bail!("{} does not exist", path.display());
    }
    Ok(path)
}
