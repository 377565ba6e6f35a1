//! Builds `mesh-ebpf` for `bpfel-unknown-none` with nightly and a `bpf-linker` that uses the
//! nightly compiler's own LLVM (see docs/development.md). Tools are cached per LLVM build under
//! `~/.cache/mesh`, so only the first run installs anything.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Builds the kernel object and returns its path.
pub fn run() -> Result<PathBuf> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src()?;
    let tools = ensure_bpf_linker(&sysroot)?;
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let mut path = OsString::from(tools.join("bin"));
    path.push(":");
    path.push(env::var_os("PATH").unwrap_or_default());
    let status = nightly_command("cargo")
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(root.join("mesh-ebpf"))
        .env("PATH", path)
        .status()
        .context("running cargo +nightly build for mesh-ebpf")?;
    if !status.success() {
        bail!("building mesh-ebpf failed ({status})");
    }
    let object = target_dir.join("bpfel-unknown-none/release/mesh-ebpf");
    println!("eBPF object: {}", object.display());
    Ok(object)
}

/// `rustup run nightly TOOL`, with the outer cargo's toolchain variables removed so the nightly
/// toolchain is really used.
fn nightly_command(tool: &str) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", "nightly", tool]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        command.env_remove(var);
    }
    command
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        println!("installing the nightly toolchain (minimal profile)");
        output(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    Ok(PathBuf::from(output(
        nightly_command("rustc").args(["--print", "sysroot"]),
    )?))
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("installing rust-src for nightly");
        output(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// Installs bpf-linker linked against the nightly compiler's shared LLVM, once per LLVM build.
fn ensure_bpf_linker(sysroot: &Path) -> Result<PathBuf> {
    let llvm_so = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .context("the nightly toolchain ships no libLLVM.so.*")?;
    let llvm_major = llvm_so
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let home = env::var_os("HOME").context("HOME is not set")?;
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(home).join(".cache"));
    let tools = cache.join("mesh").join(format!("bpf-linker-{llvm_so}"));
    if tools.join("bin/bpf-linker").exists() {
        return Ok(tools);
    }
    println!("building bpf-linker {BPF_LINKER_VERSION} against {llvm_so} (about a minute, once)");
    // The binary's rpath points at `$prefix/lib` and asks for the versioned soname; the link step
    // wants plain `libLLVM.so`. Both point at the toolchain's own library.
    let prefix = tools.join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so", llvm_so.as_str()] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&llvm_so), &link)?;
    }
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}"))
        .arg("--root")
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("installing bpf-linker failed ({status})");
    }
    Ok(tools)
}
