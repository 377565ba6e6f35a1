//! Builds `mesh-ebpf` for `bpfel-unknown-none` with the toolchain `mesh-ebpf/rust-toolchain.toml`
//! names (nightly, with rust-src) and a `bpf-linker` linked against that compiler's own LLVM (it
//! must read the bitcode the compiler emits). Tools are cached per LLVM build under
//! `~/.cache/mesh`, so only the first run installs anything.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The rule mesh-agent's build script applies to the object, shared rather than restated.
#[path = "../../mesh-agent/src/redirect/ebpf_object.rs"]
mod ebpf_object;

const BPF_LINKER_VERSION: &str = "0.13.0";

/// The eBPF crate's own target directory: `mesh-agent/build.rs` looks for the object there
/// (`BUILT_OBJECT` in mesh-agent/src/redirect/ebpf_object.rs).
const TARGET_DIR: &str = "mesh-ebpf/target";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where xtask keeps the tools it installs: `~/.cache/mesh` (or under `$XDG_CACHE_HOME`).
pub fn cache_dir() -> Result<PathBuf> {
    let cache = match env::var_os("XDG_CACHE_HOME") {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("mesh"))
}

/// Builds the kernel object and returns its path.
pub fn run() -> Result<PathBuf> {
    let root = workspace_root();
    let toolchain = Toolchain::read(&root.join("mesh-ebpf/rust-toolchain.toml"))?;
    let sysroot = toolchain.ensure()?;
    let tools = ensure_bpf_linker(&toolchain, &sysroot)?;
    let target_dir = root.join(TARGET_DIR);
    let mut path = OsString::from(tools.join("bin"));
    path.push(":");
    path.push(env::var_os("PATH").unwrap_or_default());
    let status = toolchain
        .command("cargo")
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
        .with_context(|| format!("running cargo +{} build for mesh-ebpf", toolchain.channel))?;
    if !status.success() {
        bail!("building mesh-ebpf failed ({status})");
    }
    let object = root.join(ebpf_object::BUILT_OBJECT);
    // The object is now built from the current inputs, but cargo leaves it untouched when no
    // change mattered to it (a comment in Cargo.toml, a touched file). mesh-agent/build.rs
    // refuses an object older than its inputs, so date it now — only then: a newer date makes
    // the agent's build script, and so the agent, build again.
    if ebpf_object::choose(&root, None) != ebpf_object::Choice::Embed(object.clone()) {
        std::fs::File::options()
            .write(true)
            .open(&object)
            .and_then(|file| file.set_modified(std::time::SystemTime::now()))
            .with_context(|| format!("dating {}", object.display()))?;
    }
    println!("eBPF object: {}", object.display());
    Ok(object)
}

#[derive(Deserialize)]
struct ToolchainFile {
    toolchain: Toolchain,
}

/// The `[toolchain]` table of a `rust-toolchain.toml` (`mesh-ebpf/`'s, `fuzz/`'s): the nightly
/// those crates build with, while the workspace builds on stable.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Toolchain {
    channel: String,
    #[serde(default)]
    components: Vec<String>,
    /// The file it was read from, named when the toolchain is missing.
    #[serde(skip)]
    file: String,
}

impl Toolchain {
    pub fn read(file: &Path) -> Result<Toolchain> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let mut toolchain =
            Toolchain::parse(&text).with_context(|| format!("reading {}", file.display()))?;
        let root = workspace_root();
        toolchain.file = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        Ok(toolchain)
    }

    fn parse(text: &str) -> Result<Toolchain> {
        Ok(toml::from_str::<ToolchainFile>(text)?.toolchain)
    }

    /// The rustup command that installs this toolchain with its components.
    fn install_command(&self) -> Vec<String> {
        let mut command = [
            "rustup",
            "toolchain",
            "install",
            &self.channel,
            "--profile",
            "minimal",
        ]
        .map(String::from)
        .to_vec();
        for component in &self.components {
            command.extend(["--component".to_owned(), component.clone()]);
        }
        command
    }

    /// Makes sure the toolchain and its components are installed (installing them when missing)
    /// and returns its sysroot. Fails with the rustup command to run when they cannot be had.
    pub fn ensure(&self) -> Result<PathBuf> {
        let (channel, file) = (&self.channel, &self.file);
        let install = self.install_command();
        let sysroot = match self.sysroot() {
            Ok(sysroot) => sysroot,
            Err(_) => {
                println!("installing the {channel} toolchain that {file} names (once)");
                run_rustup(&install).with_context(|| {
                    format!(
                        "{file} names the {channel} toolchain, which is not installed and \
                         could not be installed; install it with `{}`",
                        install.join(" ")
                    )
                })?;
                self.sysroot()?
            }
        };
        for component in &self.components {
            if component_present(&sysroot, component) {
                continue;
            }
            let add = [
                "rustup",
                "component",
                "add",
                component,
                "--toolchain",
                channel,
            ];
            println!("installing {component} for the {channel} toolchain (once)");
            run_rustup(&add.map(String::from)).with_context(|| {
                format!(
                    "{file} needs {component} for the {channel} toolchain and it could not \
                     be installed; install it with `{}`",
                    add.join(" ")
                )
            })?;
        }
        Ok(sysroot)
    }

    fn sysroot(&self) -> Result<PathBuf> {
        let mut rustc = self.command("rustc");
        // Only ever install through `ensure`, which says so.
        rustc.env("RUSTUP_AUTO_INSTALL", "0");
        Ok(PathBuf::from(output(rustc.args(["--print", "sysroot"]))?))
    }

    /// `rustup run CHANNEL TOOL`, with the outer cargo's toolchain variables removed so this
    /// toolchain is really used.
    pub fn command(&self, tool: &str) -> Command {
        let mut command = Command::new("rustup");
        command.args(["run", &self.channel, tool]);
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
}

/// Whether a component the eBPF build needs is in the toolchain at `sysroot`. Only rust-src is
/// checked by its files (what `-Z build-std` reads); others are taken as present.
fn component_present(sysroot: &Path, component: &str) -> bool {
    component != "rust-src" || sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
}

fn run_rustup(args: &[String]) -> Result<()> {
    let status = Command::new(&args[0])
        .args(&args[1..])
        .status()
        .context("running rustup (https://rustup.rs)")?;
    if !status.success() {
        bail!("`{}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    Ok(mesh_tests::command::stdout_of(command)?.trim().to_owned())
}

/// Installs bpf-linker linked against the nightly compiler's shared LLVM, once per LLVM build.
fn ensure_bpf_linker(toolchain: &Toolchain, sysroot: &Path) -> Result<PathBuf> {
    let llvm_so = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("the {} toolchain ships no libLLVM.so.*", toolchain.channel))?;
    let llvm_major = llvm_so
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let tools = cache_dir()?.join(format!("bpf-linker-{llvm_so}"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_crates_toolchain_file_names_nightly_with_rust_src() {
        let toolchain =
            Toolchain::read(&workspace_root().join("mesh-ebpf/rust-toolchain.toml")).unwrap();
        assert_eq!(
            toolchain,
            Toolchain {
                channel: "nightly".to_owned(),
                components: vec!["rust-src".to_owned()],
                file: "mesh-ebpf/rust-toolchain.toml".to_owned(),
            }
        );
        assert_eq!(
            toolchain.install_command().join(" "),
            "rustup toolchain install nightly --profile minimal --component rust-src"
        );
    }

    #[test]
    fn a_toolchain_file_without_a_channel_is_an_error() {
        assert!(Toolchain::parse("[toolchain]\ncomponents = [\"rust-src\"]\n").is_err());
    }

    #[test]
    fn rust_src_is_present_only_with_its_sources() {
        let sysroot = tempfile::tempdir().unwrap();
        assert!(!component_present(sysroot.path(), "rust-src"));
        std::fs::create_dir_all(sysroot.path().join("lib/rustlib/src/rust/library/core")).unwrap();
        assert!(component_present(sysroot.path(), "rust-src"));
    }
}
