//! Loading this agent's programs against the maps a running agent handed over, so both agents'
//! programs read and write the same enrollment, original-destination and exemption entries.
//!
//! aya reuses an existing map only through a pin on a BPF filesystem (`map_pin_path`). Pins on
//! the node's bpffs would outlive a crash, and bpffs may not even be mounted. So the maps are
//! pinned on a bpffs of our own, mounted in a mount namespace private to one short-lived
//! thread: nothing is visible outside it, and when the thread ends its namespace goes, and with
//! it the mount and the pins (the maps live on through their descriptors).

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use aya::{maps::MapData, Ebpf, EbpfLoader};
use rustix::{
    mount::{MountFlags, MountPropagationFlags},
    thread::UnshareFlags,
};

use super::error::RedirectError;

/// Where the private bpffs is mounted, inside the loading thread's own mount namespace: the
/// kernel's usual place for bpffs, present wherever sysfs is. The node's own bpffs, if mounted
/// there, is only hidden from that thread.
const MOUNT_POINT: &str = "/sys/fs/bpf";

/// What a running agent handed over of its kernel state, by name.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Maps by their name in the object (`ENROLLED`, ...).
    pub maps: Vec<(String, OwnedFd)>,
    /// Cgroup links by the name of the program they run.
    pub links: Vec<(String, OwnedFd)>,
}

impl Inherited {
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty() && self.links.is_empty()
    }
}

/// What a map must be for this agent's programs to use it: the object's definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, {}-byte keys, {}-byte values, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Why `inherited` cannot stand in for a map of shape `wanted`, if it cannot.
pub fn misfit(wanted: Shape, inherited: Shape) -> Option<String> {
    (wanted != inherited).then(|| format!("this agent's programs need {wanted}; it is {inherited}"))
}

/// Loads `object`, its `globals` set, with each map of `maps` used in place of the object's map
/// of that name. Every inherited map must have the shape this object defines; one the object
/// does not define is dropped.
pub fn load(
    object: &[u8],
    globals: &[(&'static str, u32)],
    maps: Vec<(String, OwnedFd)>,
) -> Result<Ebpf, RedirectError> {
    let definitions = aya_obj::Object::parse(object)
        .map_err(|error| RedirectError::Handover(error.to_string()))?;
    let mut reused = Vec::new();
    for (name, fd) in maps {
        let Some(definition) = definitions.maps.get(&name) else {
            tracing::info!(map = %name, "an inherited map this agent's programs do not use: dropped");
            continue;
        };
        let map = MapData::from_fd(fd).map_err(|source| RedirectError::InheritedMap {
            map: name.clone(),
            reason: source.to_string(),
        })?;
        let info = map.info().map_err(|source| RedirectError::InheritedMap {
            map: name.clone(),
            reason: source.to_string(),
        })?;
        let wanted = Shape {
            map_type: definition.map_type(),
            key_size: definition.key_size(),
            value_size: definition.value_size(),
            max_entries: definition.max_entries(),
        };
        let inherited = Shape {
            map_type: info.map_type().map_or(u32::MAX, |map_type| map_type as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if let Some(reason) = misfit(wanted, inherited) {
            return Err(RedirectError::InheritedMap { map: name, reason });
        }
        reused.push((name, map));
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| load_in_private_namespace(object, globals, &reused))
            .join()
            .unwrap_or_else(|_| {
                Err(RedirectError::Handover(
                    "the thread loading the programs panicked".to_owned(),
                ))
            })
    })
}

/// Runs on a thread of its own, which it moves into a mount namespace of its own: the mount
/// below must never reach the rest of the agent, or the node.
fn load_in_private_namespace(
    object: &[u8],
    globals: &[(&'static str, u32)],
    maps: &[(String, MapData)],
) -> Result<Ebpf, RedirectError> {
    let failed =
        |what: &str, error: std::io::Error| RedirectError::Handover(format!("{what}: {error}"));
    // SAFETY: only the mount namespace (and, implied, the filesystem attributes) is unshared;
    // the descriptor table stays shared, so every descriptor stays valid on every thread.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }
        .map_err(|error| failed("a private mount namespace", error.into()))?;
    // Or the mount below would propagate to the node's namespace through shared mounts.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|error| failed("making mounts private", error.into()))?;
    rustix::mount::mount("bpf", MOUNT_POINT, "bpf", MountFlags::empty(), None).map_err(
        |error| {
            failed(
                &format!("mounting a private bpffs on {MOUNT_POINT}"),
                error.into(),
            )
        },
    )?;
    let pins: Vec<(&str, PathBuf)> = maps
        .iter()
        .map(|(name, _)| (name.as_str(), Path::new(MOUNT_POINT).join(name)))
        .collect();
    for ((name, map), (_, pin)) in maps.iter().zip(&pins) {
        map.pin(pin).map_err(|source| RedirectError::InheritedMap {
            map: name.clone(),
            reason: format!("pinning it on the private bpffs: {source}"),
        })?;
    }
    let mut loader = EbpfLoader::new();
    for (name, value) in globals {
        loader.override_global(name, value, true);
    }
    for (name, pin) in &pins {
        loader.map_pin_path(name, pin.as_path());
    }
    Ok(loader.load(object)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inherited_map_must_have_the_shape_the_programs_define() {
        let shape = Shape {
            map_type: 9,
            key_size: 16,
            value_size: 8,
            max_entries: 65_536,
        };
        assert_eq!(misfit(shape, shape), None);
        let wider_key = Shape {
            key_size: 24,
            ..shape
        };
        assert_eq!(
            misfit(wider_key, shape).unwrap(),
            "this agent's programs need type 9, 24-byte keys, 8-byte values, 65536 entries; it \
             is type 9, 16-byte keys, 8-byte values, 65536 entries"
        );
        let smaller = Shape {
            max_entries: 1024,
            ..shape
        };
        assert!(misfit(shape, smaller).is_some());
    }
}
