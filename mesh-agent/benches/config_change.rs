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
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use mesh_agent::{engine::EngineSettings, state::Store};
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

const SERVICES: usize = 1_000;
const PODS_PER_SERVICE: usize = 5;
const ROUTED_SERVICES: usize = 100;
const CHANGES: usize = 50;

fn main() {
    let world = world();
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
        let pod = pod(7, 0, if change % 2 == 0 { "v2" } else { "v1" });
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
        "loaded {SERVICES} services, {} pods, {ROUTED_SERVICES} VirtualServices + \
         DestinationRules in {:.1} ms",
        SERVICES * PODS_PER_SERVICE,
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

/// Everything but the pods' YAML in one multi-document text.
fn world() -> String {
    let mut text = String::new();
    for service in 0..SERVICES {
        let (hi, lo) = (service / 250, service % 250);
        write!(
            text,
            "apiVersion: v1
kind: Service
metadata: {{name: svc-{service}, namespace: bench}}
spec:
  clusterIP: 10.96.{hi}.{lo}
  ports: [{{name: http, port: 8080, targetPort: 8080}}]
  selector: {{app: svc-{service}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{service}-abcde
  namespace: bench
  labels: {{kubernetes.io/service-name: svc-{service}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
"
        )
        .unwrap();
        for replica in 0..PODS_PER_SERVICE {
            write!(
                text,
                "- addresses: [{}]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: svc-{service}-{replica}, namespace: bench}}
",
                pod_ip(service, replica)
            )
            .unwrap();
        }
        text.push_str("---\n");
        for replica in 0..PODS_PER_SERVICE {
            text.push_str(&pod(
                service,
                replica,
                if replica == 0 { "v2" } else { "v1" },
            ));
            text.push_str("---\n");
        }
    }
    for service in 0..ROUTED_SERVICES {
        write!(
            text,
            "apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: svc-{service}, namespace: bench}}
spec:
  host: svc-{service}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: svc-{service}, namespace: bench}}
spec:
  hosts: [svc-{service}]
  http:
  - route:
    - {{destination: {{host: svc-{service}, subset: v1}}, weight: 90}}
    - {{destination: {{host: svc-{service}, subset: v2}}, weight: 10}}
---
"
        )
        .unwrap();
    }
    text
}

fn pod(service: usize, replica: usize, version: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: svc-{service}-{replica}
  namespace: bench
  labels: {{app: svc-{service}, version: {version}}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: svc-{service}-{version}-7d9f, uid: x, controller: true}}]
status: {{podIP: {}}}
",
        pod_ip(service, replica)
    )
}

fn pod_ip(service: usize, replica: usize) -> String {
    let n = service * PODS_PER_SERVICE + replica;
    format!("10.77.{}.{}", n / 250, n % 250 + 1)
}
