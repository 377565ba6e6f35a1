//! The engine's per-request decision: route match (50 routes) + 90/10 split + endpoint pick
//! (100 endpoints, LEAST_REQUEST, outlier gate) + the outcome report.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use mesh_agent::engine::{testing, Engine, EngineSettings, Outcome, RequestInfo};

fn decide(engine: &Engine, info: &RequestInfo<'_>, now: Instant) {
    let mut plan = engine.route(info, now).expect("routes");
    let attempt = plan.next_attempt(now).expect("an endpoint");
    black_box(attempt.endpoint());
    black_box(plan.report(attempt, Outcome::status(200), now));
}

fn engine_decision(c: &mut Criterion) {
    let (config, registry) = testing::mesh(50, 100);
    let now = Instant::now();
    let engine = Engine::new(&config, &registry, EngineSettings::default(), now);
    let mut group = c.benchmark_group("engine_decision");

    let first = testing::request(0);
    let first = RequestInfo::from_parts(&first, 80, "default");
    group.bench_function("first_of_50_routes", |b| {
        b.iter(|| decide(&engine, black_box(&first), now))
    });

    // The worst case: every route is tried before the last one matches.
    let last = testing::request(49);
    let last = RequestInfo::from_parts(&last, 80, "default");
    group.bench_function("last_of_50_routes", |b| {
        b.iter(|| decide(&engine, black_box(&last), now))
    });

    let heads: Vec<_> = (0..50).map(testing::request).collect();
    let infos: Vec<_> = heads
        .iter()
        .map(|p| RequestInfo::from_parts(p, 80, "default"))
        .collect();
    let mut i = 0;
    group.bench_function("mixed_routes", |b| {
        b.iter(|| {
            i = (i + 1) % infos.len();
            decide(&engine, black_box(&infos[i]), now)
        })
    });
    group.finish();
}

criterion_group!(benches, engine_decision);
criterion_main!(benches);
