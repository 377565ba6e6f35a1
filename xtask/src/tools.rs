//! Cargo-installed tools the developer commands drive (cargo-deny, cargo-fuzz, oha): built once
//! into `~/.cache/mesh/tools` with `cargo install --locked`, so a fresh clone needs nothing
//! installed by hand and CI rebuilds none of them.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::build_ebpf::cache_dir;

/// Where the tools are installed; its `bin` goes first on the PATH of commands that use them.
pub fn root() -> Result<PathBuf> {
    Ok(cache_dir()?.join("tools"))
}

/// The binary `binary` of crate `krate`, installed first if missing or, when `version` is given,
/// if the installed one reports another version (`binary --version` must print
/// `<binary> <version>`, as cargo subcommands do).
pub fn cargo_install(krate: &str, binary: &str, version: Option<&str>) -> Result<PathBuf> {
    let root = root()?;
    let path = root.join("bin").join(binary);
    let installed = Command::new(&path)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let up_to_date = match (&installed, version) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(installed), Some(version)) => installed.ends_with(&format!(" {version}")),
    };
    if up_to_date {
        return Ok(path);
    }
    let mut args = vec!["install", "--locked", krate];
    if let Some(version) = version {
        args.extend(["--version", version]);
    }
    println!(
        "+ cargo {} --root {} (a few minutes, once)",
        args.join(" "),
        root.display()
    );
    let status = Command::new(env!("CARGO"))
        .args(&args)
        .arg("--root")
        .arg(&root)
        .status()
        .with_context(|| format!("running cargo install {krate}"))?;
    if !status.success() {
        bail!("installing {krate} failed ({status})");
    }
    Ok(path)
}

/// `PATH` with the tools' `bin` first, for commands run as `cargo <tool>`.
pub fn path_with_tools() -> Result<std::ffi::OsString> {
    let mut path = root()?.join("bin").into_os_string();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    Ok(path)
}
