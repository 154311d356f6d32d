//! Criterion benchmarks of the fhirkeep engine: durable ingest in commits of 1,000 resources
//! and warm reads by id, each for the encrypted store and the plaintext baseline, plus the
//! JSON parsing that precedes every write (outside the store, for scale).
//!
//! `cargo bench -p fhirkeep-benches --bench engine` runs them (a few minutes on 2 cores).
//! `cargo test --all-targets` runs each once as a smoke test with small data sets; the full
//! preload only happens when criterion is given `--bench`.

use std::cell::Cell;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fhirkeep_benches::{
    Backend, BenchStore, Dataset, ParsedResource, SplitMix64, bench_context, load, write_batch,
};

/// Resources per durable commit in the ingest benchmarks.
const BATCH: u64 = 1_000;

/// Whether criterion is measuring (`cargo bench`) rather than smoke-testing (`cargo test`).
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Resources preloaded before ingest/read measurements (small in test mode).
fn preload() -> u64 {
    if measuring() { 20_000 } else { 1_000 }
}

fn parsed(dataset: &Dataset, start: u64) -> Vec<ParsedResource> {
    dataset
        .parsed_batch(start..start + BATCH)
        .expect("generated resources are valid JSON")
}

fn ingest(c: &mut Criterion) {
    let dataset = Dataset::default();
    let ctx = bench_context();
    let mut group = c.benchmark_group("ingest_1000_per_commit");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(10));
    for backend in Backend::BOTH {
        let bs = BenchStore::create(backend).expect("create bench store");
        let base = preload();
        load(&bs.store, &dataset, 0..base, BATCH).expect("preload");
        // Every iteration commits the next 1,000 resources of the same data set (new ids),
        // so both backends ingest identical bytes; parsing is done in the untimed setup.
        let next = Cell::new(base);
        group.bench_function(backend.name(), |b| {
            b.iter_batched(
                || {
                    let start = next.get();
                    next.set(start + BATCH);
                    parsed(&dataset, start)
                },
                |batch| write_batch(&bs.store, &ctx, batch).expect("durable commit"),
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

fn read_by_id(c: &mut Criterion) {
    let dataset = Dataset::default();
    let ctx = bench_context();
    let n = preload();
    let keys: Vec<(&'static str, String)> = (0..n).map(|i| dataset.key(i)).collect();
    let mut group = c.benchmark_group("read_by_id_warm");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for backend in Backend::BOTH {
        let bs = BenchStore::create(backend).expect("create bench store");
        load(&bs.store, &dataset, 0..n, BATCH).expect("preload");
        for (rt, id) in &keys {
            bs.store.read(&ctx, rt, id).expect("warm-up read");
        }
        bs.store.flush_audit().expect("flush audit");
        let mut rng = SplitMix64::new(0x5EAD);
        group.bench_function(backend.name(), |b| {
            b.iter(|| {
                let (rt, id) = &keys[rng.index(keys.len())];
                black_box(bs.store.read(&ctx, rt, id).expect("read by id"))
            });
        });
    }
    group.finish();
}

fn parse_json(c: &mut Criterion) {
    let dataset = Dataset::default();
    let batch = dataset.batch(0..BATCH);
    let mut group = c.benchmark_group("parse_json_1000");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("serde_json", |b| {
        b.iter(|| {
            for r in &batch {
                black_box(r.to_value().expect("valid JSON"));
            }
        });
    });
    group.finish();
}

criterion_group!(benches, ingest, read_by_id, parse_json);
criterion_main!(benches);
