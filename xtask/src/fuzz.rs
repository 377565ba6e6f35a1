//! `cargo xtask fuzz`: the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer), each for a time.
//!
//! Seeds come from the repository (the example configs, the HTTP corpus); what the fuzzer
//! learns is kept in `~/.cache/mesh/fuzz/corpus`, and the build in `~/.cache/mesh/fuzz/target`,
//! so later runs start warm. A crash stops the run with the input's path under
//! `fuzz/artifacts/`; fixed, it becomes a regression test next to the code.

use std::{path::Path, time::Instant};

use anyhow::{bail, Context, Result};

use crate::{build_ebpf, tools};

/// The pinned cargo-fuzz; 0.13 builds with stable rustc 1.85 and later.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The build cache's bound. Each clone's path gives the workspace's crates new hashes, so the
/// cache gains a build per clone: unbounded, it had reached 9.7 GiB and filled CI's disk.
const BUILD_CACHE_LIMIT: u64 = 5 << 30;

/// Each target, with the repository folders that seed it.
const TARGETS: &[(&str, &[&str])] = &[
    ("config_loader", &["deploy/examples", "deploy/demo"]),
    ("protocol_detection", &[]),
    ("http_head_check", &["mesh-agent/tests/data/http-corpus"]),
];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds to run each target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u32,
    /// Targets to run (default: all).
    pub targets: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let root = build_ebpf::workspace_root();
    let toolchain = build_ebpf::Toolchain::read(&root.join("fuzz/rust-toolchain.toml"))?;
    toolchain.ensure()?;
    tools::cargo_install("cargo-fuzz", "cargo-fuzz", Some(CARGO_FUZZ_VERSION))?;
    let cache = build_ebpf::cache_dir()?.join("fuzz");
    for name in &args.targets {
        if !TARGETS.iter().any(|(target, _)| target == name) {
            let names: Vec<&str> = TARGETS.iter().map(|(target, _)| *target).collect();
            bail!("no fuzz target {name}; there are {}", names.join(", "));
        }
    }
    let started = Instant::now();
    bound_build_cache(&cache.join("target"), BUILD_CACHE_LIMIT)?;
    cargo_fuzz(&toolchain, &cache, "build", &[])?;
    println!(
        "fuzz targets built ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    for (target, seeds) in TARGETS {
        if !args.targets.is_empty() && !args.targets.iter().any(|t| t == target) {
            continue;
        }
        let corpus = cache.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut run = vec![(*target).to_owned(), corpus.display().to_string()];
        run.extend(
            seeds
                .iter()
                .map(|seed| root.join(seed).display().to_string()),
        );
        run.extend([
            "--".to_owned(),
            format!("-max_total_time={}", args.seconds),
            // Configs and HTTP heads are small; longer inputs only slow the search.
            "-max_len=65536".to_owned(),
        ]);
        let run: Vec<&str> = run.iter().map(String::as_str).collect();
        cargo_fuzz(&toolchain, &cache, "run", &run).with_context(|| {
            format!("fuzz target {target} failed (its input is under fuzz/artifacts/{target}/)")
        })?;
    }
    Ok(())
}

/// Empties the build cache at `target` once its files pass `limit` bytes; the next build starts
/// cold (a few minutes) instead of the disk filling.
fn bound_build_cache(target: &Path, limit: u64) -> Result<()> {
    let bytes: u64 = walkdir::WalkDir::new(target)
        .into_iter()
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .map(|metadata| metadata.len())
        .sum();
    if bytes > limit {
        println!(
            "fuzz build cache holds {} MiB, over its {} MiB bound: emptied",
            bytes >> 20,
            limit >> 20
        );
        std::fs::remove_dir_all(target)
            .with_context(|| format!("emptying {}", target.display()))?;
    }
    Ok(())
}

/// `cargo fuzz COMMAND` with the build settings every run shares: a debug build (minutes less to
/// build than an optimised one, and overflow checks on) without a sanitizer (the code under test
/// is safe Rust; a sanitizer would also rebuild the standard library).
fn cargo_fuzz(
    toolchain: &build_ebpf::Toolchain,
    cache: &Path,
    command: &str,
    args: &[&str],
) -> Result<()> {
    let root = build_ebpf::workspace_root();
    let mut cargo = toolchain.command("cargo");
    cargo
        .args([
            "fuzz",
            command,
            "--dev",
            "--sanitizer",
            "none",
            "--target-dir",
        ])
        .arg(cache.join("target"))
        .args(args)
        .current_dir(root.join("fuzz"))
        // Incremental state is per clone path too, and a fuzz build is never edited and rebuilt.
        .env("CARGO_INCREMENTAL", "0")
        .env("PATH", tools::path_with_tools()?);
    println!("+ {cargo:?}");
    let status = cargo.status().context("running cargo fuzz")?;
    if !status.success() {
        bail!("cargo fuzz failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_cache_is_emptied_only_past_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir_all(target.join("debug/deps")).unwrap();
        std::fs::write(target.join("debug/deps/lib.rlib"), [0u8; 1000]).unwrap();

        bound_build_cache(&target, 1000).unwrap();
        assert!(
            target.join("debug/deps/lib.rlib").exists(),
            "at the bound: kept"
        );

        bound_build_cache(&target, 999).unwrap();
        assert!(!target.exists(), "past the bound: emptied");

        bound_build_cache(&target, 999).unwrap();
    }
}
