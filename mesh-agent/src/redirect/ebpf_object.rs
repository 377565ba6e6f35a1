//! Which kernel object the agent embeds, decided at build time: `build.rs` includes this file
//! (the library compiles it only for its tests). The rule: embed the object `cargo xtask
//! build-ebpf` built only if it is at least as new as everything it is built from, so an edit
//! to the kernel programs can never ship with the old object; otherwise build the agent without
//! it, and `mesh-agent run` in eBPF mode says why. A prebuilt object named by
//! `MESH_EBPF_OBJECT` is trusted as it is.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// Where `cargo xtask build-ebpf` puts the object, relative to the workspace root: the eBPF
/// crate's own target directory.
pub const BUILT_OBJECT: &str = "mesh-ebpf/target/bpfel-unknown-none/release/mesh-ebpf";

/// What the object is built from, relative to the workspace root (directories are walked).
pub const INPUTS: [&str; 6] = [
    "mesh-ebpf/src",
    "mesh-ebpf/Cargo.toml",
    "mesh-ebpf/Cargo.lock",
    "mesh-ebpf/rust-toolchain.toml",
    "mesh-common/src",
    "mesh-common/Cargo.toml",
];

/// The build script's decision.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    /// Embed this object.
    Embed(PathBuf),
    /// Build without the eBPF programs, for this reason (one line).
    Without(String),
}

/// Chooses the object for a workspace at `root`: `explicit` (from `MESH_EBPF_OBJECT`) if set,
/// else [`BUILT_OBJECT`] when it exists and no file of [`INPUTS`] is newer.
pub fn choose(root: &Path, explicit: Option<PathBuf>) -> Choice {
    if let Some(object) = explicit {
        return if object.is_file() {
            Choice::Embed(object)
        } else {
            Choice::Without(format!(
                "MESH_EBPF_OBJECT names {}, which is not a file",
                object.display()
            ))
        };
    }
    let object = root.join(BUILT_OBJECT);
    let built = match fs::metadata(&object).and_then(|meta| meta.modified()) {
        Ok(built) => built,
        Err(_) => return Choice::Without(format!("no eBPF object at {}", object.display())),
    };
    match newest_input(root, &INPUTS) {
        Ok(Some((input, modified))) if modified > built => Choice::Without(format!(
            "the eBPF object {} is older than {}",
            object.display(),
            input.strip_prefix(root).unwrap_or(&input).display()
        )),
        Ok(_) => Choice::Embed(object),
        Err(error) => Choice::Without(format!(
            "cannot tell whether the eBPF object is up to date: {error}"
        )),
    }
}

/// The most recently modified file among `inputs` (relative to `root`; directories are walked),
/// with its modification time. Inputs that do not exist are skipped.
pub fn newest_input(root: &Path, inputs: &[&str]) -> io::Result<Option<(PathBuf, SystemTime)>> {
    let mut newest = None;
    for input in inputs {
        visit(&root.join(input), &mut newest)?;
    }
    Ok(newest)
}

fn visit(path: &Path, newest: &mut Option<(PathBuf, SystemTime)>) -> io::Result<()> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            visit(&entry?.path(), newest)?;
        }
        return Ok(());
    }
    let modified = meta.modified()?;
    if newest.as_ref().is_none_or(|(_, time)| modified > *time) {
        *newest = Some((path.to_path_buf(), modified));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;

    /// A workspace with every input and, unless `object` is `None`, a built object, each
    /// modified at the given second after the epoch.
    fn workspace(inputs: u64, object: Option<u64>) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let files = [
            "mesh-ebpf/src/main.rs",
            "mesh-ebpf/src/connect.rs",
            "mesh-ebpf/Cargo.toml",
            "mesh-ebpf/Cargo.lock",
            "mesh-ebpf/rust-toolchain.toml",
            "mesh-common/src/lib.rs",
            "mesh-common/Cargo.toml",
        ];
        for file in files {
            touch(&root.path().join(file), inputs);
        }
        if let Some(built) = object {
            touch(&root.path().join(BUILT_OBJECT), built);
        }
        root
    }

    fn touch(path: &Path, second: u64) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = File::create(path).unwrap();
        file.set_modified(UNIX_EPOCH + Duration::from_secs(second))
            .unwrap();
    }

    #[test]
    fn an_object_as_new_as_its_sources_is_embedded() {
        let root = workspace(1_000, Some(1_000));
        assert_eq!(
            choose(root.path(), None),
            Choice::Embed(root.path().join(BUILT_OBJECT))
        );
    }

    #[test]
    fn a_missing_object_is_not_an_error_but_a_reason() {
        let root = workspace(1_000, None);
        assert_eq!(
            choose(root.path(), None),
            Choice::Without(format!(
                "no eBPF object at {}",
                root.path().join(BUILT_OBJECT).display()
            ))
        );
    }

    #[test]
    fn any_input_newer_than_the_object_makes_it_stale() {
        for input in [
            "mesh-ebpf/src/connect.rs",
            "mesh-ebpf/src/new_hook/mod.rs",
            "mesh-ebpf/Cargo.toml",
            "mesh-ebpf/Cargo.lock",
            "mesh-ebpf/rust-toolchain.toml",
            "mesh-common/src/lib.rs",
            "mesh-common/Cargo.toml",
        ] {
            let root = workspace(1_000, Some(2_000));
            touch(&root.path().join(input), 2_001);
            assert_eq!(
                choose(root.path(), None),
                Choice::Without(format!(
                    "the eBPF object {} is older than {input}",
                    root.path().join(BUILT_OBJECT).display()
                )),
                "{input}"
            );
        }
    }

    #[test]
    fn files_the_object_is_not_built_from_do_not_matter() {
        let root = workspace(1_000, Some(2_000));
        for other in ["mesh-agent/src/main.rs", "mesh-ebpf/README.md", "README.md"] {
            touch(&root.path().join(other), 3_000);
        }
        assert!(matches!(choose(root.path(), None), Choice::Embed(_)));
    }

    #[test]
    fn an_object_named_explicitly_is_trusted_however_old() {
        let root = workspace(2_000, Some(1_000));
        let prebuilt = root.path().join("prebuilt.o");
        touch(&prebuilt, 1);
        assert_eq!(
            choose(root.path(), Some(prebuilt.clone())),
            Choice::Embed(prebuilt)
        );
        let missing = root.path().join("missing.o");
        assert_eq!(
            choose(root.path(), Some(missing.clone())),
            Choice::Without(format!(
                "MESH_EBPF_OBJECT names {}, which is not a file",
                missing.display()
            ))
        );
    }

    #[test]
    fn the_newest_input_is_found_in_nested_directories() {
        let root = workspace(1_000, None);
        touch(&root.path().join("mesh-common/src/deep/er/x.rs"), 1_500);
        let (path, modified) = newest_input(root.path(), &INPUTS).unwrap().unwrap();
        assert_eq!(path, root.path().join("mesh-common/src/deep/er/x.rs"));
        assert_eq!(modified, UNIX_EPOCH + Duration::from_secs(1_500));
        assert_eq!(newest_input(root.path(), &["nothing/here"]).unwrap(), None);
    }
}
