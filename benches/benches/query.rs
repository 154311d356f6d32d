//! Criterion benchmarks of the query layer (`fhirkeep-query`): indexed bulk ingest against
//! store-only ingest of the same cohort data in the same run (the index overhead), single
//! `Database::update` latency (store commit, index catch-up and index commit per write)
//! against a store-only update, and search latency on a pre-loaded database.
//!
//! `cargo bench -p fhirkeep-benches --bench query` runs them (a few minutes on 2 cores, most
//! of it loading the 200-patient search fixture). `cargo test --all-targets` runs each once as
//! a smoke test on a few patients; the full fixtures are only built when criterion is given
//! `--bench`. For the figures in BENCHMARKS.md use the `query_figures` binary.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fhirkeep_benches::{
    Backend, BenchDatabase, BenchStore, ParsedResource, bench_context, cohort_parsed, family_of,
    query_searches, upserts, write_batch,
};
use fhirkeep_query::params::{Handling, parse_search_url};
use fhirkeep_synth::Cohort;
use serde_json::Value;

/// Whether criterion is measuring (`cargo bench`) rather than smoke-testing (`cargo test`).
fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Resources per `load_many` / `update_many` call in the ingest group.
fn slice() -> usize {
    if measuring() { 1_000 } else { 100 }
}

/// Patients in the search fixture (200 patients are ~37k resources).
fn search_patients() -> u64 {
    if measuring() { 200 } else { 3 }
}

/// Patients preloaded before the single-update measurements.
fn update_patients() -> u64 {
    if measuring() { 20 } else { 1 }
}

/// The resources of a cohort in patient order, handed out in slices of any size, generating
/// patients as needed. Two streams of the same cohort hand out identical slices.
struct CohortStream {
    cohort: Cohort,
    next_patient: u64,
    buffer: VecDeque<ParsedResource>,
}

impl CohortStream {
    fn new(cohort: Cohort) -> Self {
        CohortStream {
            cohort,
            next_patient: 0,
            buffer: VecDeque::new(),
        }
    }

    fn take(&mut self, n: usize) -> Vec<ParsedResource> {
        while self.buffer.len() < n {
            let p = self.next_patient;
            self.next_patient += 1;
            self.buffer.extend(
                cohort_parsed(&self.cohort, p..p + 1).expect("generated resources are valid JSON"),
            );
        }
        self.buffer.drain(..n).collect()
    }
}

fn ingest(c: &mut Criterion) {
    let ctx = bench_context();
    let n = slice();
    let mut group = c.benchmark_group("ingest_cohort_slice");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(16));

    // Store only: one durable commit per slice, as the engine bench ingests.
    let store = BenchStore::create(Backend::Encrypted).expect("create bench store");
    let stream = RefCell::new(CohortStream::new(Cohort::default()));
    group.bench_function("store_only_update_many", |b| {
        b.iter_batched(
            || stream.borrow_mut().take(n),
            |batch| write_batch(&store.store, &ctx, batch).expect("durable commit"),
            BatchSize::PerIteration,
        );
    });
    drop(store);

    // Store and index: the same slices (a fresh stream) through `load_many`, then
    // `flush_index`, so each iteration includes all of its index work (tantivy indexes on a
    // background thread until the commit).
    let bdb = BenchDatabase::create().expect("create bench database");
    let stream = RefCell::new(CohortStream::new(Cohort::default()));
    group.bench_function("indexed_load_many_and_flush", |b| {
        b.iter_batched(
            || upserts(stream.borrow_mut().take(n)),
            |items| {
                for result in bdb.db.load_many(&ctx, items).expect("load_many") {
                    result.expect("resource written");
                }
                bdb.db.flush_index().expect("flush_index");
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

/// The Patients of the first `patients` of the default cohort, as (id, body).
fn patients_of(parsed: &[ParsedResource]) -> Vec<(String, Value)> {
    parsed
        .iter()
        .filter(|r| r.resource_type == "Patient")
        .map(|r| (r.id.clone(), r.body.clone()))
        .collect()
}

/// The next version of a Patient: `active` flips on every write, so each one is a real change.
fn next_version(patients: &[(String, Value)], i: usize) -> (String, Value) {
    let (id, body) = &patients[i % patients.len()];
    let mut body = body.clone();
    if let Some(object) = body.as_object_mut() {
        object.insert("active".into(), Value::Bool(i.is_multiple_of(2)));
    }
    (id.clone(), body)
}

fn update_single(c: &mut Criterion) {
    let ctx = bench_context();
    let parsed =
        cohort_parsed(&Cohort::default(), 0..update_patients()).expect("valid generated JSON");
    let patients = patients_of(&parsed);
    let mut group = c.benchmark_group("update_single");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));

    let store = BenchStore::create(Backend::Encrypted).expect("create bench store");
    write_batch(&store.store, &ctx, parsed.clone()).expect("preload");
    let mut i = 0usize;
    group.bench_function("store_only", |b| {
        b.iter_batched(
            || {
                i += 1;
                next_version(&patients, i)
            },
            |(id, body)| {
                black_box(
                    store
                        .store
                        .update(&ctx, "Patient", &id, body, None)
                        .expect("update"),
                )
            },
            BatchSize::SmallInput,
        );
    });
    drop(store);

    // Database::update commits the store, catches the index up and commits the index before
    // it returns (read-your-writes).
    let bdb = BenchDatabase::create().expect("create bench database");
    for result in bdb.db.load_many(&ctx, upserts(parsed)).expect("preload") {
        result.expect("resource written");
    }
    bdb.db.flush_index().expect("flush_index");
    let mut i = 0usize;
    group.bench_function("database_update_with_index_commit", |b| {
        b.iter_batched(
            || {
                i += 1;
                next_version(&patients, i)
            },
            |(id, body)| {
                black_box(
                    bdb.db
                        .update(&ctx, "Patient", &id, body, None)
                        .expect("update"),
                )
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn search(c: &mut Criterion) {
    let ctx = bench_context();
    let cohort = Cohort::default();
    let patients = search_patients();
    // The fixture is built once per process: the patients in load_many calls of about 1,000
    // resources, then one index commit.
    let bdb = BenchDatabase::create().expect("create bench database");
    let mut stream = CohortStream::new(cohort);
    let total: usize = (0..patients)
        .map(|p| cohort.patient(p).resources().len())
        .sum();
    let mut loaded = 0;
    while loaded < total {
        let n = (total - loaded).min(1_000);
        let items = upserts(stream.take(n));
        for result in bdb.db.load_many(&ctx, items).expect("load_many") {
            result.expect("resource written");
        }
        loaded += n;
    }
    bdb.db.flush_index().expect("flush_index");
    let family = family_of(cohort.patient(0).patient()).expect("patient 0 has a family name");
    let patient_id = cohort.patient(0).patient().id.clone();

    let mut group = c.benchmark_group("search");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for (name, url) in query_searches(&family, &patient_id) {
        let request = parse_search_url(
            &bdb.db.registry().expect("registry"),
            &url,
            Handling::Strict,
        )
        .map_err(|e| format!("{url}: {e}"))
        .expect("a valid search");
        let first = bdb.db.search(&ctx, &request).expect("search");
        if measuring() {
            eprintln!(
                "search/{name}: {url} -> total {:?}, {} entries ({total} resources, {patients} patients)",
                first.total,
                first.entries.len()
            );
        }
        group.bench_function(name, |b| {
            b.iter(|| black_box(bdb.db.search(&ctx, &request).expect("search")));
        });
    }
    group.finish();
}

criterion_group!(benches, ingest, update_single, search);
criterion_main!(benches);
