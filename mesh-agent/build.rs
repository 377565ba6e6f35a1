//! Embeds the kernel object built by `cargo xtask build-ebpf`.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = env::var_os("MESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the eBPF object {} does not exist: run `cargo xtask build-ebpf` first \
             (or set MESH_EBPF_OBJECT)",
            object.display()
        );
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy(&object, out.join("mesh-ebpf.o")).expect("copy the eBPF object into OUT_DIR");
}
