//! The engine's hot path allocates nothing: 10,000 decisions (route match over 50 routes, split,
//! endpoint pick among 100, outcome report) after warm-up, counted by a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_agent::engine::{testing, Engine, EngineSettings, Outcome, RequestInfo, Verdict};

/// Counts allocations made by threads that opted in, so the test harness's own threads do not
/// disturb the count.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract for `layout` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decisions_do_not_allocate() {
    let (config, registry) = testing::mesh(50, 100);
    let t0 = Instant::now();
    let engine = Engine::new(&config, &registry, EngineSettings::default(), t0);
    let heads: Vec<_> = (0..50).map(testing::request).collect();
    let infos: Vec<RequestInfo<'_>> = heads
        .iter()
        .map(|p| RequestInfo::from_parts(p, 80, "default"))
        .collect();

    // Every path once, including a retry and an outlier sweep, so lazily built caches (the
    // regex engine's per-thread cache) exist before counting.
    let decide = |i: usize, now: Instant| {
        let mut plan = engine.route(&infos[i % infos.len()], now).expect("routes");
        let attempt = plan.next_attempt(now).expect("an endpoint");
        let status = if i.is_multiple_of(100) { 503 } else { 200 };
        if let Verdict::RetryAt(at) = plan.report(attempt, Outcome::status(status), now) {
            let retry = plan.next_attempt(at).expect("an endpoint");
            plan.report(retry, Outcome::status(200), at);
        }
    };
    for i in 0..1_000 {
        decide(i, t0);
    }

    // The counter works: an allocation while counting is seen.
    COUNTING.with(|c| c.set(true));
    drop(std::hint::black_box(Box::new(1u64)));
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCATIONS.swap(0, Ordering::Relaxed), 1);

    COUNTING.with(|c| c.set(true));
    for i in 0..10_000 {
        // Time moves on (20 s in all), so outlier sweeps (every 10 s) and the retry budget's
        // per-second slots run too.
        decide(i, t0 + Duration::from_millis(2 * i as u64));
    }
    COUNTING.with(|c| c.set(false));

    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), 0);
}
