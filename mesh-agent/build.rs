//! Embeds the kernel object built by `cargo xtask build-ebpf`, or a prebuilt one named by
//! `MESH_EBPF_OBJECT`. Never fails: without an up-to-date object the agent builds without its
//! eBPF programs (one warning says why), and `mesh-agent run` in eBPF mode refuses to start with
//! the same reason. Everything else (validate, apply, the iptables mode) works either way.
//! Release builds are also laid out to keep few pages resident ([`release_layout`]).

use std::{env, fs, path::PathBuf};

#[path = "src/redirect/ebpf_object.rs"]
mod ebpf_object;

use ebpf_object::{Choice, BUILT_OBJECT, INPUTS};

fn main() {
    release_layout();
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .parent()
        .expect("mesh-agent lives in the workspace")
        .to_path_buf();
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("mesh-ebpf.o");
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let explicit = env::var_os("MESH_EBPF_OBJECT").map(PathBuf::from);
    match &explicit {
        // Watching a path that does not exist would rerun this script, and rebuild the agent,
        // on every build; a mistyped MESH_EBPF_OBJECT is the one case where that is accepted.
        Some(object) => println!("cargo:rerun-if-changed={}", object.display()),
        None => {
            for input in INPUTS {
                println!("cargo:rerun-if-changed={}", root.join(input).display());
            }
            // The object, or before it is built the nearest folder that exists on its way
            // (watching a missing path would rerun this script, and rebuild the agent, on every
            // build). Not the whole eBPF target directory: cargo rewrites its dep-info files on
            // every build, even one that changed nothing.
            let watched = root
                .join(BUILT_OBJECT)
                .ancestors()
                .find(|path| path.exists())
                .expect("the workspace root exists")
                .to_path_buf();
            println!("cargo:rerun-if-changed={}", watched.display());
        }
    }
    let embedded = match ebpf_object::choose(&root, explicit) {
        Choice::Embed(object) => fs::copy(&object, &out)
            .map(drop)
            .map_err(|error| format!("cannot copy {}: {error}", object.display())),
        Choice::Without(reason) => Err(reason),
    };
    if let Err(reason) = embedded {
        // One line: cargo takes the value up to the end of the line.
        let reason = reason.replace(['\n', '\r'], " ");
        println!(
            "cargo:warning=building mesh-agent without its eBPF programs ({reason}): run \
             `cargo xtask build-ebpf`, then build again (until then `mesh-agent run` works \
             only with --redirect iptables)"
        );
        println!("cargo:rustc-env=MESH_EBPF_NOT_EMBEDDED={reason}");
        // `include_bytes!` needs a file either way; the agent never loads this one.
        fs::write(&out, []).expect("writing into OUT_DIR");
    }
}

/// Release builds keep few pages of the binary resident:
/// - the functions the agent runs lie side by side, in the order of `link/symbol-order.txt`
///   (written by `cargo xtask bench --request-cost --symbol-order`); the toolchain links with
///   rust-lld, which skips names the binary no longer has;
/// - the relocations the loader applies at start (one per pointer in the binary's data: ~24,000,
///   576 KiB as RELA entries, every page of them read at each start) are packed as RELR
///   bitmaps, a few KiB. It needs glibc 2.36 or later (Debian 12, the agent's image), which the
///   binary then says in its version needs, so an older loader refuses it by name.
fn release_layout() {
    if env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let order = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("link/symbol-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    println!(
        "cargo:rustc-link-arg-bin=mesh-agent=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
        order.display()
    );
    println!("cargo:rustc-link-arg-bin=mesh-agent=-Wl,-z,pack-relative-relocs");
}
