//! The agent's heap: jemalloc (the global allocator, declared in `main.rs`, as linkerd2-proxy and
//! ztunnel use), its pages given back to the kernel after a burst, and its figures on
//! `/metrics` (`mesh_heap_*_bytes`), read when someone scrapes.
//!
//! The in-process tests link the library with the system allocator: there jemalloc holds
//! nothing and its figures are zero.

use std::{
    cell::Cell,
    ffi::CStr,
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tikv_jemalloc_ctl::{epoch, stats};

/// How often freed heap pages go back to the kernel. A trim takes well under a millisecond.
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Trims so far, which each thread compares with the last it flushed its cache for.
static TRIMS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static CACHE_FLUSHED_AT: Cell<u64> = const { Cell::new(0) };
}

/// Gives freed pages back at once: jemalloc's (its arenas would otherwise wait for allocator
/// activity to decay them) and glibc's (what C code and the in-process tests allocate). Objects
/// a thread's cache holds keep their pages; each data-path thread flushes its own when it next
/// parks ([`flush_thread_cache_if_trimmed`]), and they go back with the next trim.
pub fn trim() {
    TRIMS.fetch_add(1, Ordering::Relaxed);
    flush_thread_cache_if_trimmed();
    // Every arena: jemalloc's MALLCTL_ARENAS_ALL.
    jemalloc_command(c"arena.4096.purge");
    // SAFETY: malloc_trim only walks glibc's own heap; no pointer of ours is involved.
    unsafe { libc::malloc_trim(0) };
}

/// For the runtime's `on_thread_park`: a thread's allocator cache (up to a few hundred KiB of
/// freed objects after a burst, which only that thread may flush) goes back to its arena once
/// after each trim; between trims this costs a load and a compare.
pub fn flush_thread_cache_if_trimmed() {
    let trims = TRIMS.load(Ordering::Relaxed);
    CACHE_FLUSHED_AT.with(|flushed| {
        if flushed.get() != trims {
            flushed.set(trims);
            jemalloc_command(c"thread.tcache.flush");
        }
    });
}

/// Runs a jemalloc command that takes and returns nothing.
fn jemalloc_command(name: &CStr) {
    // SAFETY: the name of a command that reads and writes nothing through the (null) pointers;
    // an unknown name is an error code, ignored.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// What the allocator holds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    /// In live allocations.
    pub allocated: u64,
    /// In pages with at least one live allocation: `active - allocated` is fragmentation.
    pub active: u64,
    /// Resident in memory: active pages, the allocator's metadata, and freed pages not yet given
    /// back.
    pub resident: u64,
    /// The allocator's own bookkeeping.
    pub metadata: u64,
}

impl Figures {
    /// The allocator's statistics now (they are cached until the epoch is advanced).
    pub fn read() -> Option<Figures> {
        epoch::advance().ok()?;
        Some(Figures {
            allocated: stats::allocated::read().ok()? as u64,
            active: stats::active::read().ok()? as u64,
            resident: stats::resident::read().ok()? as u64,
            metadata: stats::metadata::read().ok()? as u64,
        })
    }
}

/// Serves the allocator's figures on `registry` (the agent's `mesh` one: `mesh_heap_*`).
pub fn register_metrics(registry: &mut Registry) {
    registry
        .sub_registry_with_prefix("heap")
        .register_collector(Box::new(Export));
}

#[derive(Debug)]
struct Export;

impl Collector for Export {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(figures) = Figures::read() else {
            return Ok(());
        };
        for (name, help, value) in [
            (
                "allocated_bytes",
                "Bytes in live heap allocations",
                figures.allocated,
            ),
            (
                "active_bytes",
                "Bytes in heap pages holding live allocations",
                figures.active,
            ),
            (
                "resident_bytes",
                "Bytes of heap resident in memory, metadata included",
                figures.resident,
            ),
            (
                "metadata_bytes",
                "Bytes of the allocator's own bookkeeping",
                figures.metadata,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(family)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition;

    #[test]
    fn the_allocators_figures_are_served_at_scrape_time() {
        let mut registry = Registry::default();
        register_metrics(registry.sub_registry_with_prefix("mesh"));
        // The unit tests run on the system allocator; jemalloc still answers, with its own
        // (small) figures.
        let (_, text) = exposition::render(&registry, None);
        for family in ["allocated", "active", "resident", "metadata"] {
            assert!(
                text.contains(&format!("# TYPE mesh_heap_{family}_bytes gauge")),
                "{text}"
            );
        }
        let figures = Figures::read().expect("jemalloc answers");
        assert!(figures.allocated <= figures.active && figures.active <= figures.resident);
    }
}
