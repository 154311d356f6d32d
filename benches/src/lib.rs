//! Shared helpers for the fhirkeep benchmarks: throw-away stores (encrypted or plaintext) in
//! temporary directories, and loading the benchmark data set into them.
//!
//! The data set itself is [`fhirkeep_synth::Dataset`], re-exported here with its companions
//! under the names the benches have always used: resources in blocks of 50 (4 Patients,
//! 6 Encounters, 5 Conditions, 35 Observations), each a pure function of `(seed, index)`, with
//! UUID-shaped ids (or sequential ones, for comparison). Its output is pinned byte for byte in
//! `fhirkeep-synth`, so figures in BENCHMARKS.md stay comparable.

use std::ops::Range;
use std::path::{Path, PathBuf};

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::{AccessContext, ReadAudit, Store};
pub use fhirkeep_synth::{
    BLOCK, DEFAULT_SEED, Dataset, GeneratedResource, Kind, ParsedResource, SplitMix64,
};

/// Whether pages are encrypted (the product) or stored as plaintext (the baseline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// AES-256-GCM page encryption, as shipped.
    Encrypted,
    /// The same engine with pages stored unencrypted (`bench-plaintext` feature).
    Plaintext,
}

impl Backend {
    /// Both backends, encrypted first.
    pub const BOTH: [Backend; 2] = [Backend::Encrypted, Backend::Plaintext];

    /// `encrypted` or `plaintext`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Encrypted => "encrypted",
            Backend::Plaintext => "plaintext",
        }
    }
}

/// Environment variable naming the directory benchmark databases are created in (default: the
/// system temporary directory). It should be on the disk you want to measure: `fsync` on tmpfs
/// is free.
pub const BENCH_DIR_ENV: &str = "FHIRKEEP_BENCH_DIR";

/// A store in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct BenchStore {
    /// The open store (dropped before the directory is removed).
    pub store: Store,
    backend: Backend,
    db_dir: PathBuf,
    key_path: PathBuf,
    _tmp: tempfile::TempDir,
}

/// Options for [`BenchStore::create_with`].
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// redb page cache in bytes (the engine's default is 256 MiB).
    pub cache_size: usize,
    /// How reads are audited.
    pub read_audit: ReadAudit,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_size: 256 << 20,
            read_audit: ReadAudit::default(),
        }
    }
}

impl BenchStore {
    /// A new, empty store with default options.
    pub fn create(backend: Backend) -> fhirkeep_engine::Result<Self> {
        Self::create_with(backend, StoreOptions::default())
    }

    /// A new, empty store. The key file lives next to (not inside) the database directory, so
    /// [`BenchStore::bytes_on_disk`] counts only `fhirkeep.redb` and `fhirkeep.keys`.
    pub fn create_with(backend: Backend, options: StoreOptions) -> fhirkeep_engine::Result<Self> {
        let tmp = match std::env::var_os(BENCH_DIR_ENV) {
            Some(dir) => tempfile::Builder::new()
                .prefix("fhirkeep-bench-")
                .tempdir_in(dir)?,
            None => tempfile::Builder::new()
                .prefix("fhirkeep-bench-")
                .tempdir()?,
        };
        let key_path = tmp.path().join("bench.key");
        create_key_file(&key_path)?;
        let db_dir = tmp.path().join("db");
        let store = builder(backend, &db_dir, &key_path, options).create()?;
        Ok(BenchStore {
            store,
            backend,
            db_dir,
            key_path,
            _tmp: tmp,
        })
    }

    /// Closes the store and opens the same database again with other options (cold cache).
    pub fn reopen_with(self, options: StoreOptions) -> fhirkeep_engine::Result<Self> {
        let BenchStore {
            store,
            backend,
            db_dir,
            key_path,
            _tmp,
        } = self;
        drop(store);
        let store = builder(backend, &db_dir, &key_path, options).open()?;
        Ok(BenchStore {
            store,
            backend,
            db_dir,
            key_path,
            _tmp,
        })
    }

    /// Which backend this store uses.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database directory (holding `fhirkeep.redb` and `fhirkeep.keys`).
    pub fn db_dir(&self) -> &Path {
        &self.db_dir
    }

    /// Bytes the database occupies: apparent sizes of every file in its directory.
    pub fn bytes_on_disk(&self) -> std::io::Result<u64> {
        dir_size(&self.db_dir)
    }
}

fn builder(
    backend: Backend,
    db_dir: &Path,
    key_path: &Path,
    options: StoreOptions,
) -> fhirkeep_engine::store::StoreBuilder {
    let builder = Store::builder(db_dir)
        .key(KeySource::KeyFile(key_path.to_owned()))
        .cache_size(options.cache_size)
        .read_audit(options.read_audit);
    match backend {
        Backend::Encrypted => builder,
        Backend::Plaintext => builder.plaintext_for_benchmarks(),
    }
}

/// Sum of the apparent sizes of all files under `dir` (recursively).
pub fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Sum of the allocated sizes (512-byte blocks) of all files under `dir` (recursively).
#[cfg(unix)]
pub fn dir_allocated(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_allocated(&entry.path())?;
        } else {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

/// The access context benchmarks use.
pub fn bench_context() -> AccessContext {
    AccessContext::new("bench", "bench", "local", "r1")
}

/// Writes `batch` (consumed) in one durable commit, each resource as an update-as-create with
/// its client id, through the batch API (`WriteTxn::update_many`) that bulk loaders use.
pub fn write_batch(
    store: &Store,
    ctx: &AccessContext,
    batch: Vec<ParsedResource>,
) -> fhirkeep_engine::Result<()> {
    let items = batch
        .into_iter()
        .map(|r| fhirkeep_engine::store::Upsert {
            resource_type: r.resource_type.to_owned(),
            id: Some(r.id),
            resource: r.body,
            expected_version: None,
        })
        .collect();
    store.write(ctx, |txn| {
        for result in txn.update_many(items)? {
            result?;
        }
        Ok(())
    })
}

/// Generates and writes resources `range` in commits of `batch_size`.
pub fn load(
    store: &Store,
    dataset: &Dataset,
    range: Range<u64>,
    batch_size: u64,
) -> fhirkeep_engine::Result<()> {
    let ctx = bench_context();
    let mut start = range.start;
    while start < range.end {
        let end = (start + batch_size.max(1)).min(range.end);
        let batch = dataset
            .parsed_batch(start..end)
            .map_err(|e| fhirkeep_engine::Error::InvalidResource(e.to_string()))?;
        write_batch(store, &ctx, batch)?;
        start = end;
    }
    Ok(())
}

/// A query-layer [`Database`](fhirkeep_query::Database) (encrypted store plus encrypted search
/// index) in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct BenchDatabase {
    /// The open database (dropped before the directory is removed).
    pub db: fhirkeep_query::Database,
    db_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl BenchDatabase {
    /// A new, empty database in [`BENCH_DIR_ENV`] (or the system temporary directory), its key
    /// file next to (not inside) the database directory.
    pub fn create() -> fhirkeep_query::Result<Self> {
        let tmp = match std::env::var_os(BENCH_DIR_ENV) {
            Some(dir) => tempfile::Builder::new()
                .prefix("fhirkeep-bench-")
                .tempdir_in(dir),
            None => tempfile::Builder::new().prefix("fhirkeep-bench-").tempdir(),
        }
        .map_err(fhirkeep_engine::Error::Io)?;
        let key_path = tmp.path().join("bench.key");
        create_key_file(&key_path)?;
        let db_dir = tmp.path().join("db");
        let db = fhirkeep_query::Database::builder(&db_dir)
            .key(KeySource::KeyFile(key_path))
            .create()?;
        Ok(BenchDatabase {
            db,
            db_dir,
            _tmp: Some(tmp),
        })
    }

    /// The database kept in `dir` (key file `dir/bench.key`, database `dir/db`), created if
    /// it does not exist, and never removed: a large data set is loaded once and measured
    /// many times. The flag says whether it already existed.
    pub fn keep_in(dir: &Path) -> fhirkeep_query::Result<(Self, bool)> {
        std::fs::create_dir_all(dir).map_err(fhirkeep_engine::Error::Io)?;
        let key_path = dir.join("bench.key");
        let db_dir = dir.join("db");
        let existed = db_dir.join("fhirkeep.redb").exists();
        if !key_path.exists() {
            create_key_file(&key_path)?;
        }
        let builder = fhirkeep_query::Database::builder(&db_dir).key(KeySource::KeyFile(key_path));
        let db = if existed {
            builder.open()?
        } else {
            builder.create()?
        };
        Ok((
            BenchDatabase {
                db,
                db_dir,
                _tmp: None,
            },
            existed,
        ))
    }

    /// The database directory (`fhirkeep.redb`, `fhirkeep.keys`, `index.redb`).
    pub fn db_dir(&self) -> &Path {
        &self.db_dir
    }

    /// Apparent size of the store file `fhirkeep.redb`.
    pub fn store_file_bytes(&self) -> std::io::Result<u64> {
        Ok(std::fs::metadata(self.db_dir.join("fhirkeep.redb"))?.len())
    }

    /// Apparent size of the search index file `index.redb`.
    pub fn index_file_bytes(&self) -> std::io::Result<u64> {
        Ok(std::fs::metadata(self.db_dir.join("index.redb"))?.len())
    }
}

/// The resources of patients `range` of `cohort` (each patient's record in order), parsed.
pub fn cohort_parsed(
    cohort: &fhirkeep_synth::Cohort,
    range: Range<u64>,
) -> serde_json::Result<Vec<ParsedResource>> {
    cohort
        .patients(range)
        .flat_map(fhirkeep_synth::PatientRecord::into_resources)
        .map(|r| {
            Ok(ParsedResource {
                body: r.to_value()?,
                resource_type: r.resource_type,
                id: r.id,
            })
        })
        .collect()
}

/// `batch` as update-as-create items with their client ids, for
/// [`Database::load_many`](fhirkeep_query::Database::load_many).
pub fn upserts(batch: Vec<ParsedResource>) -> Vec<fhirkeep_engine::store::Upsert> {
    batch
        .into_iter()
        .map(|r| fhirkeep_engine::store::Upsert {
            resource_type: r.resource_type.to_owned(),
            id: Some(r.id),
            resource: r.body,
            expected_version: None,
        })
        .collect()
}

/// The query-layer benchmark searches, as `(name, search URL)`, for a database holding a
/// [`fhirkeep_synth::Cohort`]. `family` is a family name present in the data (the chained and
/// string-prefix searches use it; take it from the first patient).
pub fn query_searches(family: &str, patient_id: &str) -> Vec<(&'static str, String)> {
    let prefix: String = family.chars().take(3).collect();
    vec![
        // The count goal: matches counted per second, no resource read.
        (
            "count_token",
            "Observation?code=http://loinc.org|8867-4&_summary=count".to_owned(),
        ),
        // The first-page goal: a common code within half a year.
        (
            "code_date_first_page",
            "Observation?code=http://loinc.org|8867-4&date=ge2023-01-01&date=lt2023-07-01"
                .to_owned(),
        ),
        // `Patient/$everything`-shaped: one patient's whole compartment, first page of 100.
        (
            "compartment_everything",
            format!("Patient/{patient_id}/*?_count=100"),
        ),
        (
            "token_code",
            "Observation?code=http://loinc.org|4548-4".to_owned(),
        ),
        (
            "date_range",
            "Observation?date=ge2023-03-01&date=lt2023-04-01".to_owned(),
        ),
        // The same month as an equality: one precomputed bucket term, for contrast.
        ("date_eq_month", "Observation?date=2023-03".to_owned()),
        ("string_prefix_name", format!("Patient?name={prefix}")),
        (
            "chain_patient_family",
            format!("Observation?patient.family={family}"),
        ),
        (
            "sort_date_desc_count10",
            "Observation?code=http://loinc.org|8867-4&_sort=-date&_count=10".to_owned(),
        ),
        (
            "include_subject",
            "Observation?code=http://loinc.org|4548-4&_include=Observation:subject".to_owned(),
        ),
        (
            "revinclude_encounters",
            format!("Patient?family={family}&_revinclude=Encounter:subject"),
        ),
        (
            "all_observations_count10",
            "Observation?_count=10".to_owned(),
        ),
    ]
}

/// The first `family` of a generated Patient's first `name`.
pub fn family_of(patient: &fhirkeep_synth::GeneratedResource) -> Option<String> {
    let value = patient.to_value().ok()?;
    value
        .get("name")?
        .get(0)?
        .get("family")?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_round_trip_generated_data() {
        for backend in Backend::BOTH {
            let bs = BenchStore::create(backend).unwrap();
            let ds = Dataset::default();
            load(&bs.store, &ds, 0..120, 50).unwrap();
            let (t, id) = ds.key(77);
            let got = bs.store.read(&bench_context(), t, &id).unwrap();
            assert_eq!(got.id, id);
            assert!(bs.bytes_on_disk().unwrap() > 0);
            let bs = bs
                .reopen_with(StoreOptions {
                    read_audit: ReadAudit::Durable,
                    ..StoreOptions::default()
                })
                .unwrap();
            assert_eq!(bs.store.read(&bench_context(), t, &id).unwrap().id, id);
        }
    }
}
