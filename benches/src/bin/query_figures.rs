//! Prints the query layer's headline figures as markdown: indexed bulk ingest
//! (`Database::load_many` in batches, then `flush_index`) against store-only ingest of the
//! same cohort data in the same run, bytes on disk of the store and index files, single-write
//! latency with and without the index, and warm search latencies (median and p95).
//!
//! ```text
//! cargo run --release -p fhirkeep-benches --bin query_figures -- [--patients N] [--batch B]
//!     [--runs R] [--updates U] [--seed S] [--keep DIR] [--no-baseline] [--space]
//!     [--time-ordered-ids] [--huge-pages]
//! ```
//!
//! `--keep DIR` keeps the indexed database in `DIR` and, when it exists already, skips every
//! load and measures searches and single writes on it (a large data set is loaded once).
//! `--no-baseline` skips the two store-only loads. `--space` (with `--keep`) then prints what
//! the index is made of (tantivy's space usage by part and field) and compacts the kept
//! database, printing each file's size before and after, per resource.
//! `--time-ordered-ids` generates UUIDv7-shaped ids rising in load order (as server-assigned
//! ids are) instead of random UUIDv4 ids.
//!
//! The store-only load runs before and after the indexed load (A-B-A), each into a new store,
//! so a drift of the shared machine shows as a difference between the two baselines and the
//! ratio is taken against their mean. Searches run round-robin (run `i` of every search, then
//! run `i + 1`), after five warm-up runs each.
//!
//! Databases are created in `$FHIRKEEP_BENCH_DIR` (default: the system temporary directory).

/// The same allocator as the `fhirkeep` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use fhirkeep_benches::{
    BENCH_DIR_ENV, Backend, BenchDatabase, BenchStore, DEFAULT_SEED, GeneratedResource,
    ParsedResource, bench_context, family_of, query_searches, upserts, write_batch,
};
use fhirkeep_query::params::{Handling, parse_search_url};
use fhirkeep_synth::Cohort;
use serde_json::Value;

#[derive(Debug, Clone)]
struct Args {
    /// Keep transparent huge pages on (the binaries turn them off, see
    /// `fhirkeep_engine::process`), to measure the difference.
    huge_pages: bool,
    patients: u64,
    batch: usize,
    runs: usize,
    updates: usize,
    seed: u64,
    /// Keep the indexed database here; if it exists, skip every load and only measure.
    keep: Option<std::path::PathBuf>,
    /// Skip the store-only loads before and after the indexed one.
    no_baseline: bool,
    /// Run only the searches whose name contains this (for profiling one of them).
    only: Option<String>,
    /// After the run, report the index's space usage and compact the kept database.
    space: bool,
    /// UUIDv7-shaped ids rising in load order instead of random UUIDv4 ids.
    time_ordered_ids: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        huge_pages: false,
        patients: 1_000,
        batch: 1_000,
        runs: 50,
        updates: 50,
        seed: DEFAULT_SEED,
        keep: None,
        no_baseline: false,
        only: None,
        space: false,
        time_ordered_ids: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            v.replace('_', "")
                .parse::<u64>()
                .map_err(|e| format!("{name} {v}: {e}"))
        };
        let size = |v: u64| usize::try_from(v).map_err(|e| e.to_string());
        match flag.as_str() {
            "--patients" => args.patients = value("--patients")?,
            "--batch" => args.batch = size(value("--batch")?.max(1))?,
            "--runs" => args.runs = size(value("--runs")?.max(1))?,
            "--updates" => args.updates = size(value("--updates")?)?,
            "--seed" => args.seed = value("--seed")?,
            "--keep" => args.keep = Some(it.next().ok_or("--keep needs a directory")?.into()),
            "--no-baseline" => args.no_baseline = true,
            "--space" => args.space = true,
            "--time-ordered-ids" => args.time_ordered_ids = true,
            "--only" => args.only = Some(it.next().ok_or("--only needs a search name")?),
            "--huge-pages" => args.huge_pages = true,
            "-h" | "--help" => {
                return Err(
                    "usage: query_figures [--patients N] [--batch B] [--runs R] \
                            [--updates U] [--seed S] [--keep DIR] [--no-baseline] [--only NAME] \
                            [--space] [--time-ordered-ids] [--huge-pages]"
                        .into(),
                );
            }
            // cargo bench passes --bench to every bench target; ignore it.
            "--bench" => {}
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    if args.patients == 0 {
        return Err("--patients must be at least 1".into());
    }
    if args.space && args.keep.is_none() {
        return Err("--space needs --keep DIR".into());
    }
    Ok(args)
}

#[derive(Debug, Default, Clone)]
struct Samples(Vec<Duration>);

impl Samples {
    fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    fn quantile(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        let last = v.len() - 1;
        let at = ((last as f64) * q).round() as usize;
        v[at.min(last)]
    }
}

/// CPU time of the whole process so far (all threads).
fn process_cpu() -> Duration {
    cpu_time::ProcessTime::now().as_duration()
}

fn per_second(count: u64, time: Duration) -> f64 {
    count as f64 / time.as_secs_f64().max(1e-9)
}

fn fmt_int(x: f64) -> String {
    let s = (x.round() as u64).to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency with a unit that keeps three significant digits.
fn lat(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else if us < 100_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.0} ms", us / 1e3)
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if !args.huge_pages
        && let Err(e) = fhirkeep_engine::process::disable_transparent_huge_pages()
    {
        eprintln!("warning: transparent huge pages stay on: {e}");
    }
    let result = run(&args).and_then(|()| match (&args.keep, args.space) {
        (Some(dir), true) => space(dir),
        _ => Ok(()),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("query_figures failed: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn parse(batch: &[GeneratedResource]) -> AnyResult<Vec<ParsedResource>> {
    Ok(batch
        .iter()
        .map(|r| {
            Ok(ParsedResource {
                body: r.to_value()?,
                resource_type: r.resource_type,
                id: r.id.clone(),
            })
        })
        .collect::<serde_json::Result<_>>()?)
}

/// Store-only load of `resources` in commits of `batch` into a new store.
fn load_store_only(
    resources: &[GeneratedResource],
    batch: usize,
) -> AnyResult<(BenchStore, Samples)> {
    let ctx = bench_context();
    let store = BenchStore::create(Backend::Encrypted)?;
    let mut times = Samples::default();
    for chunk in resources.chunks(batch) {
        let parsed = parse(chunk)?;
        let t = Instant::now();
        write_batch(&store.store, &ctx, parsed)?;
        times.0.push(t.elapsed());
    }
    store.store.flush_audit()?;
    Ok((store, times))
}

/// What the indexed load measured (absent when an existing database was reused).
struct LoadFigures {
    times: Samples,
    flush: Duration,
    store_bytes: u64,
    index_bytes: u64,
}

fn run(args: &Args) -> AnyResult<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let bench_dir =
        std::env::var(BENCH_DIR_ENV).unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    eprintln!(
        "query_figures: {} patients, batches of {}, {} search runs, {} cores ({}), databases in {}",
        args.patients,
        args.batch,
        args.runs,
        cores,
        cpu_model(),
        args.keep
            .as_ref()
            .map_or(bench_dir, |d| d.display().to_string())
    );
    let ctx = bench_context();
    let mut cohort = Cohort::new(args.seed);
    if args.time_ordered_ids {
        cohort = cohort.with_time_ordered_ids();
    }
    let first_patient = cohort.patient(0);
    let family = family_of(first_patient.patient()).ok_or("patient 0 has no family name")?;
    // The compartment fetch takes the patient with the largest record among the first 50: a
    // heavy patient, not the cohort's first (which may have a handful of resources).
    let heavy_patient_id = (0..args.patients.min(50))
        .map(|p| cohort.patient(p))
        .max_by_key(|record| record.resources().len())
        .map(|record| record.patient().id.clone())
        .ok_or("no patients")?;
    let patient_ids: Vec<String> = (0..args.patients.min(args.updates.max(1) as u64))
        .map(|p| cohort.patient(p).patient().id.clone())
        .collect();

    let (bdb, existed) = match &args.keep {
        Some(dir) => BenchDatabase::keep_in(dir)?,
        None => (BenchDatabase::create()?, false),
    };

    // ---- Data: every resource of the cohort, as JSON text (parsed per batch, untimed). ----
    let mut n = 0u64;
    let mut json_bytes = 0u64;
    let mut baseline: Option<(Samples, Samples, u64)> = None;
    let mut load: Option<LoadFigures> = None;
    let mut store_c = None;
    if !existed {
        let t = Instant::now();
        let resources: Vec<GeneratedResource> = cohort
            .patients(0..args.patients)
            .flat_map(fhirkeep_synth::PatientRecord::into_resources)
            .collect();
        n = resources.len() as u64;
        json_bytes = resources.iter().map(|r| r.json.len() as u64).sum();
        eprintln!(
            "  generated {n} resources ({:.1} s), mean JSON {:.0} bytes",
            t.elapsed().as_secs_f64(),
            json_bytes as f64 / n as f64
        );

        // ---- A: store only. ----
        let store_a = if args.no_baseline {
            None
        } else {
            let (store_a, times) = load_store_only(&resources, args.batch)?;
            let bytes = store_a.bytes_on_disk()?;
            eprintln!(
                "  store-only (before): {} resources/s",
                fmt_int(per_second(n, times.total()))
            );
            Some((times, bytes))
        };

        // ---- B: store and index, load_many per batch, one flush_index at the end. ----
        let mut times = Samples::default();
        let mut load_cpu = Duration::ZERO;
        let mut last_report = Instant::now();
        for (k, chunk) in resources.chunks(args.batch).enumerate() {
            let items = upserts(parse(chunk)?);
            let t = Instant::now();
            let cpu = process_cpu();
            for result in bdb.db.load_many(&ctx, items)? {
                result?;
            }
            times.0.push(t.elapsed());
            load_cpu += process_cpu().saturating_sub(cpu);
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!("  indexed {} / {n} ...", (k + 1) * args.batch);
                last_report = Instant::now();
            }
        }
        let t = Instant::now();
        let cpu = process_cpu();
        bdb.db.flush_index()?;
        let flush = t.elapsed();
        load_cpu += process_cpu().saturating_sub(cpu);
        bdb.db.store().flush_audit()?;
        // The CPU time of the timed part tells a slow machine from a slow build; the busy
        // cores tell whether the work spreads over both.
        let timed = times.total() + flush;
        eprintln!(
            "  indexed: {} resources/s (flush {:.1} s; {:.1} s of CPU, {:.2} cores busy)",
            fmt_int(per_second(n, timed)),
            flush.as_secs_f64(),
            load_cpu.as_secs_f64(),
            load_cpu.as_secs_f64() / timed.as_secs_f64()
        );
        load = Some(LoadFigures {
            times,
            flush,
            store_bytes: bdb.store_file_bytes()?,
            index_bytes: bdb.index_file_bytes()?,
        });

        // ---- C: store only again (drift check). ----
        if let Some((times_a, bytes_a)) = store_a {
            let (store, times_c) = load_store_only(&resources, args.batch)?;
            eprintln!(
                "  store-only (after): {} resources/s",
                fmt_int(per_second(n, times_c.total()))
            );
            baseline = Some((times_a, times_c, bytes_a));
            store_c = Some(store);
        }
    }

    // ---- Single writes: Database::update (index commit per write) vs store only. ----
    let mut update_db = Samples::default();
    let mut update_store = Samples::default();
    let mut patient_bodies: Vec<(String, Value)> = Vec::new();
    for id in &patient_ids {
        let stored = bdb.db.store().read(&ctx, "Patient", id)?;
        patient_bodies.push((id.clone(), stored.to_json()?));
    }
    for i in 0..args.updates {
        let (id, body) = &patient_bodies[i % patient_bodies.len()];
        let mut body = body.clone();
        if let Some(object) = body.as_object_mut() {
            object.remove("meta");
            object.insert("active".into(), Value::Bool(i.is_multiple_of(2)));
        }
        let order = if i.is_multiple_of(2) { [0, 1] } else { [1, 0] };
        for which in order {
            let body = body.clone();
            let t = Instant::now();
            if which == 0 {
                bdb.db.update(&ctx, "Patient", id, body, None)?;
                update_db.0.push(t.elapsed());
            } else if let Some(store) = &store_c {
                store.store.update(&ctx, "Patient", id, body, None)?;
                update_store.0.push(t.elapsed());
            }
        }
    }
    drop(store_c);

    // ---- Searches: warm, round-robin. ----
    let mut searches = query_searches(&family, &heavy_patient_id);
    if let Some(only) = &args.only {
        searches.retain(|(name, _)| name.contains(only.as_str()));
    }
    let mut requests = Vec::new();
    for (name, url) in &searches {
        let request = parse_search_url(&*bdb.db.registry()?, url, Handling::Strict)
            .map_err(|e| format!("{url}: {e}"))?;
        let mut first = None;
        for _ in 0..5 {
            first = Some(bdb.db.search(&ctx, &request)?);
        }
        let first = first.ok_or("no warm-up run")?;
        let matches = first
            .entries
            .iter()
            .filter(|e| e.mode == fhirkeep_query::EntryMode::Match)
            .count();
        let included = first.entries.len() - matches;
        requests.push((*name, url.clone(), request, first.total, matches, included));
    }
    let mut search_times = vec![Samples::default(); requests.len()];
    for _ in 0..args.runs {
        for (i, (_, _, request, _, _, _)) in requests.iter().enumerate() {
            let t = Instant::now();
            let result = bdb.db.search(&ctx, request)?;
            search_times[i].0.push(t.elapsed());
            std::hint::black_box(result);
        }
    }
    let resources_in_db = bdb.db.store().last_change_seq()?;

    // ---- Report. ----
    let per_res = |b: u64| b as f64 / n.max(1) as f64;
    println!();
    println!(
        "fhirkeep query-layer figures: {} patients, {} changes in the store, batches of {}, \
         {} cores, {}",
        args.patients,
        fmt_int(resources_in_db as f64),
        args.batch,
        cores,
        cpu_model()
    );
    if let Some(load) = &load {
        let rate_indexed = per_second(n, load.times.total() + load.flush);
        println!();
        println!(
            "Loaded {} resources (mean JSON {:.0} B).",
            fmt_int(n as f64),
            json_bytes as f64 / n as f64
        );
        println!();
        println!("| ingest figure | value |");
        println!("|---|---:|");
        if let Some((times_a, times_c, _)) = &baseline {
            println!(
                "| store only, `update_many` commits of {} (resources/s), before / after | {} / {} |",
                args.batch,
                fmt_int(per_second(n, times_a.total())),
                fmt_int(per_second(n, times_c.total()))
            );
        }
        println!(
            "| store + index, `load_many` batches of {} + one `flush_index` (resources/s) | {} |",
            args.batch,
            fmt_int(rate_indexed)
        );
        if let Some((times_a, times_c, _)) = &baseline {
            let rate_store =
                (per_second(n, times_a.total()) + per_second(n, times_c.total())) / 2.0;
            println!(
                "| indexed / store-only time (mean of before and after) | {:.2}× |",
                rate_store / rate_indexed
            );
            println!(
                "| store-only commit of {}: median / p95 | {} / {} |",
                args.batch,
                lat(times_a.quantile(0.5)),
                lat(times_a.quantile(0.95))
            );
        }
        println!(
            "| `load_many` of {}: median / p95 | {} / {} |",
            args.batch,
            lat(load.times.quantile(0.5)),
            lat(load.times.quantile(0.95))
        );
        println!("| final `flush_index` | {} |", lat(load.flush));
        println!(
            "| store file per resource (`fhirkeep.redb`) | {} B |",
            fmt_int(per_res(load.store_bytes))
        );
        if let Some((_, _, bytes_a)) = &baseline {
            println!(
                "| ... of the store-only run | {} B |",
                fmt_int(per_res(*bytes_a))
            );
        }
        println!(
            "| index file per resource (`index.redb`) | {} B ({:.2}× the store file) |",
            fmt_int(per_res(load.index_bytes)),
            load.index_bytes as f64 / load.store_bytes.max(1) as f64
        );
        println!(
            "| **disk per resource, store + index + audit** | **{} B** |",
            fmt_int(per_res(load.store_bytes + load.index_bytes))
        );
    }
    if args.updates > 0 {
        println!();
        println!("| single write | median | p95 |");
        println!("|---|---:|---:|");
        println!(
            "| `Database::update` (store commit, then the index catches up; it commits at the next search) | {} | {} |",
            lat(update_db.quantile(0.5)),
            lat(update_db.quantile(0.95))
        );
        if !update_store.0.is_empty() {
            println!(
                "| store only | {} | {} |",
                lat(update_store.quantile(0.5)),
                lat(update_store.quantile(0.95))
            );
        }
    }
    println!();
    println!(
        "Search latency, warm, {} runs each (round-robin, after 5 warm-up runs), one thread:",
        args.runs
    );
    println!();
    println!("| search | matches (total) | entries returned (incl.) | median | p95 | p99 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for ((name, url, _, total, matches, included), times) in requests.iter().zip(&search_times) {
        println!(
            "| {name}: `{}` | {} | {matches} (+{included}) | {} | {} | {} |",
            // A pipe inside a table cell must be escaped, even in a code span.
            url.replace('|', "\\|"),
            total.map_or_else(|| "-".to_owned(), |t| fmt_int(t as f64)),
            lat(times.quantile(0.5)),
            lat(times.quantile(0.95)),
            lat(times.quantile(0.99))
        );
        if *name == "count_token"
            && let Some(total) = total
        {
            println!(
                "| ... counted matches per second (median) | {} | | | | |",
                fmt_int(per_second(*total as u64, times.quantile(0.5)))
            );
        }
    }
    Ok(())
}

/// The index's space usage by part and field, then a compaction of the kept database in
/// `dir` with each file's size before and after; all per current resource (index document).
fn space(dir: &std::path::Path) -> AnyResult<()> {
    let ctx = bench_context();
    let mut store = fhirkeep_engine::store::Store::builder(dir.join("db"))
        .key(fhirkeep_engine::crypto::KeySource::KeyFile(
            dir.join("bench.key"),
        ))
        .open()?;
    let (docs, rows) = {
        let directory =
            fhirkeep_query::directory::RedbDirectory::new(store.open_aux_database("index")?)?;
        let index = fhirkeep_query::index::SearchIndex::open(Box::new(directory))?
            .ok_or("the kept index has another schema")?;
        (index.searcher().num_docs(), index.space_usage()?)
    };
    let per_doc = |b: u64| b as f64 / docs.max(1) as f64;
    let total: u64 = rows.iter().map(|r| r.2).sum();
    println!();
    println!(
        "Index space usage, {} documents: {:.0} B per document in tantivy's files",
        fmt_int(docs as f64),
        per_doc(total)
    );
    println!();
    println!("| part | field | bytes | per document |");
    println!("|---|---|---:|---:|");
    for (part, field, bytes) in rows.iter().filter(|r| r.2 > 0) {
        println!(
            "| {part} | {field} | {} | {:.1} B |",
            fmt_int(*bytes as f64),
            per_doc(*bytes)
        );
    }
    let report = store.compact(&ctx)?;
    println!();
    println!("| file | before | after `compact` | per document before / after |");
    println!("|---|---:|---:|---:|");
    for (file, before, after) in &report.files {
        println!(
            "| {file} | {} | {} | {:.0} B / {:.0} B |",
            fmt_int(*before as f64),
            fmt_int(*after as f64),
            per_doc(*before),
            per_doc(*after)
        );
    }
    let (before, after) = report.totals();
    println!(
        "| **all** | {} | {} | **{:.0} B / {:.0} B** |",
        fmt_int(before as f64),
        fmt_int(after as f64),
        per_doc(before),
        per_doc(after)
    );
    Ok(())
}
