//! What one change costs the control side of the agent at the size of a busy node's view of a
//! cluster: 1,000 services (one EndpointSlice each, five endpoints), 5,000 pods, 100
//! VirtualServices (90/10 splits) and their DestinationRules. A pod changes (its labels move it
//! between subsets), the store validates and compiles the new snapshot and puts it in force:
//! wall time and heap allocations per change, counted by a global allocator.
//!
//! `cargo bench -p mesh-agent --bench config_change` (release build). The figures go into
//! docs/performance.md.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use mesh_agent::{engine::EngineSettings, state::Store};
use mesh_tests::world::World;
use prometheus_client::registry::Registry;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`, as the caller promises.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`, as the caller promises.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// 1,000 services of five endpoints, each a pod; the first 100 routed.
const WORLD: World = World {
    endpoints_per_service: 5,
    ..World::BUSY_NODE
};
const CHANGES: usize = 50;

fn main() {
    let world = WORLD.yaml();
    let started = Instant::now();
    let mut registry = Registry::default();
    let store =
        Store::open(None, EngineSettings::default(), &mut registry).expect("an empty store opens");
    store
        .apply("world.yml", &world)
        .expect("the world is valid");
    let loaded = started.elapsed();

    let mut times = Vec::with_capacity(CHANGES);
    let mut allocations = Vec::with_capacity(CHANGES);
    for change in 0..CHANGES {
        // Service 7's first pod moves between the subsets v1 and v2.
        let pod = WORLD.pod(7, 0, if change % 2 == 0 { "v2" } else { "v1" });
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let started = Instant::now();
        store
            .apply("pod.yml", &pod)
            .expect("the pod change is valid");
        times.push(started.elapsed());
        allocations.push(ALLOCATIONS.load(Ordering::Relaxed) - before);
    }
    times.sort();
    allocations.sort();
    println!(
        "loaded {} services, {} pods, {} VirtualServices + DestinationRules in {:.1} ms",
        WORLD.services,
        WORLD.pods(),
        WORLD.routed,
        ms(loaded)
    );
    println!(
        "one pod change: median {:.3} ms (min {:.3}, max {:.3}), median {} allocations \
         (min {}, max {}) over {CHANGES} changes",
        ms(times[CHANGES / 2]),
        ms(times[0]),
        ms(times[CHANGES - 1]),
        allocations[CHANGES / 2],
        allocations[0],
        allocations[CHANGES - 1],
    );
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
