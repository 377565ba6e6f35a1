//! The load generators and peer proxies the bench drives, installed when missing: `wrk`, `nginx`
//! and `haproxy` from the distribution (Debian packages), `oha` from crates.io into a cache.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

const APT_PACKAGES: &[(&str, &str)] = &[
    ("wrk", "wrk"),
    ("nginx", "nginx"),
    ("haproxy", "haproxy"),
    // For the iptables-mode agent of `mesh-iptables`.
    ("iptables-restore", "iptables"),
];

/// callgrind, for the agent's instructions and allocations per request.
const CALLGRIND: (&str, &str) = ("callgrind_control", "valgrind");

/// Absolute paths of the tools, so processes started inside pods find them whatever their PATH.
pub struct Tools {
    pub wrk: PathBuf,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
    /// The fixed-rate latency client; `None` when that shape does not run.
    pub oha: Option<PathBuf>,
}

/// The load generators and peers; `oha` too when `fixed_rate_latency` (it takes minutes to
/// build on a machine that has not got it yet).
pub fn ensure(fixed_rate_latency: bool) -> Result<Tools> {
    ensure_packages(APT_PACKAGES)?;
    let found = |name: &str| which(name).with_context(|| format!("{name} is still missing"));
    Ok(Tools {
        wrk: found("wrk")?,
        nginx: found("nginx")?,
        haproxy: found("haproxy")?,
        oha: fixed_rate_latency.then(oha).transpose()?,
    })
}

/// valgrind, for the request cost.
pub fn ensure_callgrind() -> Result<()> {
    ensure_packages(&[CALLGRIND])
}

/// Installs the package of each `(binary, package)` whose binary is not on `PATH`.
fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(binary, _)| which(binary).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    println!("+ apt-get install {}", packages.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages))
}

/// `oha`, built into `~/.cache/mesh/tools` on first use.
fn oha() -> Result<PathBuf> {
    crate::tools::cargo_install("oha", "oha", None)
        .context("building oha (the fixed-rate latency client)")
}

fn run(command: &mut Command) -> Result<()> {
    // Debian's maintainer scripts must never wait for an answer.
    command.env("DEBIAN_FRONTEND", "noninteractive");
    let status = command
        .status()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} failed ({status})", command.get_program());
    }
    Ok(())
}

/// `name` on PATH, plus the sbin directories a non-login root shell may lack.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
