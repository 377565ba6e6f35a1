//! `cargo xtask fuzz`: the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer), each for a time.
//!
//! Seeds come from the repository (the example configs, the HTTP corpus); what the fuzzer
//! learns is kept in `~/.cache/mesh/fuzz/corpus`, and the build in `~/.cache/mesh/fuzz/target`,
//! so later runs start warm. A crash stops the run with the input's path under
//! `fuzz/artifacts/`; fixed, it becomes a regression test next to the code.

use std::{collections::BTreeSet, path::Path, time::Instant};

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
    check_lockfile(&root)?;
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

/// Fails unless `fuzz/Cargo.lock` is complete and pins every package it shares with the
/// agent's `Cargo.lock` at the same version. The fuzz workspace has a lock file of its own;
/// left behind, cargo fuzz resolved it anew in CI, so the fuzzers ran on other versions than
/// the agent ships (h2 0.4.20 beside 0.4.21) and each CI run left the clone modified.
fn check_lockfile(root: &Path) -> Result<()> {
    let refresh = "refresh it from the agent's: `cp Cargo.lock fuzz/Cargo.lock && cargo metadata \
                   --manifest-path fuzz/Cargo.toml --format-version 1 >/dev/null`, and commit it";
    crate::locked_metadata(root, "fuzz/Cargo.toml")
        .with_context(|| format!("fuzz/Cargo.lock is out of date; {refresh}"))?;
    let read = |path: &str| -> Result<BTreeSet<(String, String)>> {
        let text =
            std::fs::read_to_string(root.join(path)).with_context(|| format!("reading {path}"))?;
        locked_packages(&text).with_context(|| format!("reading {path}"))
    };
    let differing = differing_versions(&read("Cargo.lock")?, &read("fuzz/Cargo.lock")?);
    if !differing.is_empty() {
        bail!(
            "fuzz/Cargo.lock pins other versions than Cargo.lock ({}); {refresh}",
            differing.join(", ")
        );
    }
    Ok(())
}

/// Every `(name, version)` a lock file pins.
fn locked_packages(lock: &str) -> Result<BTreeSet<(String, String)>> {
    #[derive(serde::Deserialize)]
    struct Lock {
        package: Vec<Locked>,
    }
    #[derive(serde::Deserialize)]
    struct Locked {
        name: String,
        version: String,
    }
    let lock: Lock = toml::from_str(lock)?;
    Ok(lock
        .package
        .into_iter()
        .map(|package| (package.name, package.version))
        .collect())
}

/// The fuzz lock's packages, as `name version`, that the agent's lock has at another version
/// of the same semver line (h2 0.4.20 against 0.4.21). Packages only the fuzzers use
/// (libfuzzer-sys, arbitrary, and a getrandom 0.4 beside the agent's 0.2 and 0.3) are theirs
/// to pin.
fn differing_versions(
    agent: &BTreeSet<(String, String)>,
    fuzz: &BTreeSet<(String, String)>,
) -> Vec<String> {
    let agent_lines: BTreeSet<(&str, &str)> = agent
        .iter()
        .map(|(name, version)| (name.as_str(), semver_line(version)))
        .collect();
    fuzz.difference(agent)
        .filter(|(name, version)| agent_lines.contains(&(name.as_str(), semver_line(version))))
        .map(|(name, version)| format!("{name} {version}"))
        .collect()
}

/// The versions cargo treats as compatible with `version`, by their common prefix: `1` for
/// 1.2.3, `0.4` for 0.4.21, `0.0.3` for 0.0.3.
fn semver_line(version: &str) -> &str {
    let mut ends = version.match_indices('.').map(|(at, _)| at);
    let (first, second) = (ends.next(), ends.next());
    let end = if !version.starts_with("0.") {
        first
    } else if !version.starts_with("0.0.") {
        second
    } else {
        None
    };
    &version[..end.unwrap_or(version.len())]
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
    fn the_fuzz_lock_may_add_packages_but_not_pin_the_agents_at_other_versions() {
        let lock = |packages: &[(&str, &str)]| -> BTreeSet<(String, String)> {
            let text: String = packages
                .iter()
                .map(|(name, version)| {
                    format!("[[package]]\nname = \"{name}\"\nversion = \"{version}\"\n\n")
                })
                .collect();
            locked_packages(&format!("version = 4\n\n{text}")).unwrap()
        };
        let agent = lock(&[("h2", "0.4.21"), ("syn", "1.0.109"), ("getrandom", "0.3.4")]);

        let same = lock(&[
            ("h2", "0.4.21"),
            ("getrandom", "0.4.3"),
            ("arbitrary", "1.5.0"),
        ]);
        assert!(differing_versions(&agent, &same).is_empty());

        let stale = lock(&[("h2", "0.4.20"), ("syn", "1.0.99"), ("syn", "2.0.111")]);
        assert_eq!(
            differing_versions(&agent, &stale),
            ["h2 0.4.20", "syn 1.0.99"]
        );
    }

    #[test]
    fn a_semver_line_is_what_cargo_treats_as_compatible() {
        assert_eq!(semver_line("1.2.3"), "1");
        assert_eq!(semver_line("0.4.21"), "0.4");
        assert_eq!(semver_line("0.0.3"), "0.0.3");
        assert_eq!(semver_line("2.0.0-rc.1"), "2");
    }

    #[test]
    fn the_fuzz_lock_matches_the_agents() {
        check_lockfile(&build_ebpf::workspace_root()).unwrap();
    }

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
