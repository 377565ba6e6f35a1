//! What can go wrong while redirecting: below the facade and both backends, which all return it.

use std::path::PathBuf;

use thiserror::Error;

use super::preflight;

#[derive(Debug, Error)]
pub enum RedirectError {
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "this mesh-agent was built without its eBPF programs ({reason}): run `cargo xtask \
         build-ebpf`, then build again"
    )]
    NotBuilt { reason: &'static str },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("this kernel cannot load or attach the {hook} hook ({program}): {source}")]
    Hook {
        hook: &'static str,
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("kernel map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("`{command}` in network namespace {netns}: {reason}")]
    Iptables {
        command: &'static str,
        netns: PathBuf,
        reason: String,
    },
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot attach the {hook} hook ({program}): {source}")]
    Link {
        hook: &'static str,
        program: &'static str,
        source: std::io::Error,
    },
    #[error("inbound capture pins its programs at {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the running agent's kernel map {map} does not fit this agent: {reason}")]
    InheritedMap { map: String, reason: String },
    #[error("taking over the running agent's kernel state: {0}")]
    Handover(String),
}
