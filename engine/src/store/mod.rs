//! The resource store: opening a database, reads, history, and the audit of every access.
//!
//! A [`Store`] owns one encrypted redb file (`DIR/fhirkeep.redb`) and its key header
//! (`DIR/fhirkeep.keys`). Writes go through a [`WriteTxn`]; every operation, read or write,
//! appends a leaf to the Merkle audit log. A write's leaves commit in the write's own
//! transaction. Read leaves are either made durable before the data is returned
//! ([`ReadAudit::Durable`]) or group-committed ([`ReadAudit::GroupCommit`]): buffered in
//! memory and committed by the next write or by a background flush at most `max_delay`
//! later. A crash can lose the read leaves of that window, never a write's leaf.

mod auxiliary;
mod compact;
mod copy;
mod feed;
mod history;
mod pending;
mod record;
mod redb_error;
mod search_read;
mod space;
mod txn;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use redb::{ReadableDatabase, ReadableTable, StorageBackend};
use serde_json::Value;

use crate::audit::{
    self, AuditAction, AuditActor, AuditOutcome, AuditRecord, ConsistencyProof, InclusionProof,
    SignedTreeHead, VerifyReport,
};
use crate::crypto::page::PageFormat;
use crate::crypto::{EncryptedBackend, FileReport, KdfParams, KeySource, Keyring};
use crate::resource::{check_id, check_resource_type};
use crate::{Error, Result};

pub use auxiliary::AuxFileReport;
pub use compact::{COMPACT_ACTION, CompactReport};
pub use feed::{ChangePage, FeedItem, FeedPage, VersionKey};
pub use history::{HistoryPage, HistoryQuery};
pub use record::VersionKind;
use record::{VERSIONS, VersionRecord};
pub use space::{SPACE_ACTION, TableSpace};
pub use txn::{DeleteOutcome, DurableTicket, UpdateOutcome, Upsert, WriteTxn};

/// Pending versions (`pending.rs`) that make a merge due, unless the builder says otherwise.
const DEFAULT_MERGE_THRESHOLD: usize = 65_536;

/// File name of the encrypted redb database inside a database directory.
pub const DATABASE_FILE: &str = "fhirkeep.redb";

/// Who is asking, from where, under which request: recorded in every audit leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessContext {
    /// The authenticated user or system (e.g. a token's `sub`).
    pub subject: String,
    /// The client application (e.g. a token's `client_id`, or the CLI command).
    pub client: String,
    /// Network source address, or `local` for in-process callers.
    pub source: String,
    /// Request id correlating the leaf with logs.
    pub request_id: String,
}

impl AccessContext {
    /// A context for an authenticated caller.
    pub fn new(
        subject: impl Into<String>,
        client: impl Into<String>,
        source: impl Into<String>,
        request_id: impl Into<String>,
    ) -> Self {
        AccessContext {
            subject: subject.into(),
            client: client.into(),
            source: source.into(),
            request_id: request_id.into(),
        }
    }

    /// A context for a local, in-process tool (CLI, embedding application) with a fresh request id.
    pub fn local(client: impl Into<String>) -> Self {
        let subject = std::env::var("USER").unwrap_or_else(|_| "local".into());
        AccessContext::new(subject, client, "local", uuid::Uuid::new_v4().to_string())
    }

    fn actor(&self) -> AuditActor {
        AuditActor {
            subject: self.subject.clone(),
            client: self.client.clone(),
            source: self.source.clone(),
        }
    }
}

/// How reads are audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAudit {
    /// Each read's leaf is committed durably before the read returns data (one fsync per read).
    Durable,
    /// Read leaves are buffered and committed together, at most `max_delay` after the read.
    GroupCommit {
        /// Longest time a read leaf waits in memory; the crash-loss window.
        max_delay: Duration,
    },
}

impl Default for ReadAudit {
    fn default() -> Self {
        // Short: a crash loses at most this much of the read audit, and small frequent
        // flushes keep each one from stalling requests (a 200 ms window put a p99 of ~9 ms on
        // reads by id at 15,000 requests/s on 2 cores; 20 ms, ~3.5 ms).
        ReadAudit::GroupCommit {
            max_delay: Duration::from_millis(20),
        }
    }
}

/// One stored version of a resource, as readers get it.
#[derive(Debug, Clone)]
pub struct StoredResource {
    /// The resource type.
    pub resource_type: String,
    /// The logical id.
    pub id: String,
    /// The version id (1, 2, ...).
    pub version: u64,
    /// When this version was written (engine clock, strictly increasing per database).
    pub last_updated: DateTime<Utc>,
    /// How this version came to be.
    pub kind: VersionKind,
    /// blake3 of [`Self::json_bytes`], as recorded in the audit log.
    pub content_hash: [u8; 32],
    body: Vec<u8>,
    /// The body parsed, kept from the write that made this version (the writer had it
    /// parsed already); `None` for versions read back from the file.
    parsed: Option<Arc<Value>>,
}

/// Two versions are equal when their stored parts are: `parsed` is the body, parsed.
impl PartialEq for StoredResource {
    fn eq(&self, other: &Self) -> bool {
        self.resource_type == other.resource_type
            && self.id == other.id
            && self.version == other.version
            && self.last_updated == other.last_updated
            && self.kind == other.kind
            && self.content_hash == other.content_hash
            && self.body == other.body
    }
}

impl Eq for StoredResource {}

impl StoredResource {
    /// The resource JSON, with `id` and `meta` set by the engine; empty for a deletion.
    pub fn json_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The resource JSON bytes, taken out of the version (empty for a deletion).
    pub fn into_json_bytes(self) -> Vec<u8> {
        self.body
    }

    /// The resource JSON parsed; `Value::Null` for a deletion.
    pub fn to_json(&self) -> Result<Value> {
        if let Some(parsed) = &self.parsed {
            return Ok(Value::clone(parsed));
        }
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body)
            .map_err(|_| Error::Corrupted("stored resource is not valid JSON".into()))
    }

    /// The resource JSON parsed, shared: the writer's own copy for a version this process
    /// just wrote (no parsing), else parsed from the body. `Value::Null` for a deletion.
    pub fn shared_json(&self) -> Result<Arc<Value>> {
        match &self.parsed {
            Some(parsed) => Ok(Arc::clone(parsed)),
            None => self.to_json().map(Arc::new),
        }
    }

    /// Drops the writer's parsed copy (see [`Self::shared_json`]), which takes several
    /// times the body's memory, for a version kept a while.
    pub fn drop_parsed(&mut self) {
        self.parsed = None;
    }

    /// Whether this version is a deletion tombstone.
    pub fn is_deleted(&self) -> bool {
        self.kind == VersionKind::Deleted
    }

    /// `meta.lastUpdated` as FHIR instant text.
    pub fn last_updated_text(&self) -> String {
        format_instant(self.last_updated)
    }

    /// The version `record` describes; its body is taken from `bodies` if the record does
    /// not hold it (record format 3).
    fn from_record(
        resource_type: &str,
        id: &str,
        version: u64,
        record: &VersionRecord<'_>,
        bodies: &impl ReadableTable<u64, &'static [u8]>,
    ) -> Result<Self> {
        Ok(StoredResource {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version,
            last_updated: micros_to_datetime(record.last_updated_micros)?,
            kind: record.kind,
            content_hash: record.content_hash,
            body: record.body(bodies)?,
            parsed: None,
        })
    }
}

/// What `fhirkeep check` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Page-level authentication of the whole file.
    pub pages: FileReport,
    /// redb's own structural and checksum check.
    pub redb_integrity_ok: bool,
    /// The audit log recomputed from its leaves.
    pub audit: VerifyReport,
    /// Versions whose body, content hash and change row were checked against each other.
    pub versions: u64,
    /// Each auxiliary file found in the directory (derived data such as the search index),
    /// by name.
    pub aux_files: Vec<AuxFileReport>,
    /// Harmless findings worth knowing (e.g. free pages torn by a crash).
    pub warnings: Vec<String>,
}

/// Configures and opens a [`Store`].
#[derive(Debug)]
pub struct StoreBuilder {
    dir: PathBuf,
    key: Option<KeySource>,
    kdf: KdfParams,
    cache_size: usize,
    read_audit: ReadAudit,
    verify_on_open: bool,
    merge_threshold: usize,
    #[cfg(feature = "bench-plaintext")]
    plaintext: bool,
}

impl StoreBuilder {
    /// Stores pages unencrypted, to measure the cost of encryption. Benchmarks only: the
    /// `bench-plaintext` feature must never be enabled in a product build.
    #[cfg(feature = "bench-plaintext")]
    #[doc(hidden)]
    pub fn plaintext_for_benchmarks(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// Where the key comes from: a passphrase or a key file.
    pub fn key(mut self, key: KeySource) -> Self {
        self.key = Some(key);
        self
    }

    /// Argon2id parameters used when a database is created with a passphrase.
    pub fn kdf(mut self, kdf: KdfParams) -> Self {
        self.kdf = kdf;
        self
    }

    /// Bytes of decrypted pages kept in memory (default 256 MiB).
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = bytes;
        self
    }

    /// Verifies, while opening, the checksum of every page of the committed trees (reads the
    /// whole file: slow on large databases). Each page is authenticated anyway; this also
    /// catches a page *replayed* from an older copy of the same database, which authenticates
    /// but no longer matches the checksum its parent holds. Default: off.
    pub fn verify_on_open(mut self, enabled: bool) -> Self {
        self.verify_on_open = enabled;
        self
    }

    /// How many versions written among random keys may wait in the change table before a
    /// merge moves them into the versions table (default 65,536; at least 1). Larger batches
    /// make each leaf of the versions table rewritten less often, and cost about 200 bytes of
    /// memory per waiting version (twice the threshold at most). Reads are exact either way.
    pub fn merge_threshold(mut self, versions: usize) -> Self {
        self.merge_threshold = versions.max(1);
        self
    }

    /// How reads are audited (default: group commit within 20 ms).
    pub fn read_audit(mut self, mode: ReadAudit) -> Self {
        self.read_audit = mode;
        self
    }

    fn key_source(&self) -> Result<&KeySource> {
        self.key.as_ref().ok_or(Error::NoKeySource)
    }

    /// Creates a new database in the directory (created if missing). Fails if one exists.
    pub fn create(self) -> Result<Store> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(DATABASE_FILE);
        if path.exists() {
            return Err(Error::AlreadyExists(self.dir.clone()));
        }
        let keyring = Keyring::create(&self.dir, self.key_source()?, self.kdf)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        restrict_permissions(&path)?;
        let backend = redb::backends::FileBackend::new(file)?;
        self.finish(backend, keyring)
    }

    /// Opens an existing database. A wrong key fails here, before any page is read.
    pub fn open(self) -> Result<Store> {
        let path = self.dir.join(DATABASE_FILE);
        let keyring = Keyring::open(&self.dir, self.key_source()?)?;
        if !path.exists() {
            return Err(Error::DatabaseNotFound(self.dir.clone()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        // Every database that was created holds its header copies after the preamble. A file
        // shorter than that was cut down (or its creation never finished): opening it would
        // start an empty database and a new audit log in its place.
        if file.metadata()?.len() <= crate::crypto::page::PAGE_SIZE as u64 {
            return Err(Error::Corrupted(format!(
                "the data file {DATABASE_FILE} holds no database (it is empty or only a preamble): \
                 it was truncated, or its creation did not finish; restore it from a backup"
            )));
        }
        let backend = redb::backends::FileBackend::new(file)?;
        self.finish(backend, keyring)
    }

    /// Opens the database if it exists, creates it otherwise.
    pub fn open_or_create(self) -> Result<Store> {
        if self.dir.join(DATABASE_FILE).exists() {
            self.open()
        } else {
            self.create()
        }
    }

    /// Opens or creates over a caller-supplied physical backend (crash, fault-injection and
    /// fuzz tests). The keyring must come from [`Keyring::create`] or [`Keyring::open`] on
    /// this builder's directory.
    #[cfg(any(test, feature = "fault-injection"))]
    #[doc(hidden)]
    pub fn open_on_backend<B: StorageBackend>(
        self,
        backend: B,
        keyring: Arc<Keyring>,
    ) -> Result<Store> {
        self.finish(backend, keyring)
    }

    fn finish<B: StorageBackend>(self, backend: B, keyring: Arc<Keyring>) -> Result<Store> {
        let mut builder = redb::Builder::new();
        builder.set_cache_size(self.cache_size);
        builder.set_check_integrity_on_open(self.verify_on_open);
        #[cfg(feature = "bench-plaintext")]
        let db = if self.plaintext {
            builder.create_with_backend(backend)?
        } else {
            builder.create_with_backend(EncryptedBackend::new(backend, Arc::clone(&keyring))?)?
        };
        #[cfg(not(feature = "bench-plaintext"))]
        let db =
            builder.create_with_backend(EncryptedBackend::new(backend, Arc::clone(&keyring))?)?;
        let inner = Arc::new(Inner {
            read_snapshot: ReadSnapshot::default(),
            db,
            dir: self.dir,
            read_audit: self.read_audit,
            pending_reads: Mutex::new(Vec::new()),
            spare_read_buffer: Mutex::new(Vec::new()),
            reads_in_flight: AtomicUsize::new(0),
            clock: AtomicI64::new(0),
            aux_cache_size: (self.cache_size / 4).max(8 << 20),
            watermarks: Mutex::new(Watermarks::default()),
            durable_seq: AtomicU64::new(0),
            sync_leader: Mutex::new(()),
            counters: CounterGuard(keyring),
            pending: RwLock::new(pending::SharedPending::default()),
            merge_threshold: self.merge_threshold,
        });
        inner.initialize()?;
        let flusher = Some(Flusher::start(&inner, flush_delay(self.read_audit)));
        Ok(Store { inner, flusher })
    }
}

/// Persists the nonce counters after the database (declared before it) has closed.
#[derive(Debug)]
struct CounterGuard(Arc<Keyring>);

impl Drop for CounterGuard {
    fn drop(&mut self) {
        // Best effort: on failure the next open starts from the reserved high-water mark,
        // which only wastes nonce budget.
        let _ = self.0.persist_counters();
    }
}

/// The tables of one committed state that reads of versions need (opened in one read
/// transaction), kept open for the reads that follow it.
struct VersionTables {
    versions: redb::ReadOnlyTable<(&'static str, &'static str, u64), &'static [u8]>,
    bodies: redb::ReadOnlyTable<u64, &'static [u8]>,
    changes: redb::ReadOnlyTable<u64, &'static [u8]>,
    pending: pending::SnapshotPending,
}

impl VersionTables {
    fn open(txn: &redb::ReadTransaction) -> Result<Self> {
        let changes = txn.open_table(record::CHANGES)?;
        let pending = pending::SnapshotPending::of(&txn.open_table(record::META)?, &changes)?;
        Ok(VersionTables {
            versions: txn.open_table(VERSIONS)?,
            bodies: txn.open_table(record::BODIES)?,
            changes,
            pending,
        })
    }

    /// The version of `Type/id` that `which` names, as this snapshot holds it.
    fn find(
        &self,
        shared: &RwLock<pending::SharedPending>,
        resource_type: &str,
        id: &str,
        which: Lookup,
    ) -> Result<Option<(u64, StoredResource)>> {
        let candidates = self
            .pending
            .candidates(shared, &self.changes, resource_type, id)?;
        find_version(
            &VersionSources {
                versions: &self.versions,
                bodies: &self.bodies,
                pending: &candidates,
            },
            resource_type,
            id,
            which,
        )
    }
}

/// The read snapshot reads share; see [`Inner::versions_snapshot`].
#[derive(Default)]
struct ReadSnapshot {
    /// Bumped after every commit.
    generation: AtomicU64,
    /// The shared table and the generation it was opened at.
    current: Mutex<Option<(u64, Arc<VersionTables>)>>,
}

impl std::fmt::Debug for ReadSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadSnapshot")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner {
    /// Declared before `db` so that it is dropped first: redb closes a file cleanly only
    /// when no read transaction is left.
    read_snapshot: ReadSnapshot,
    db: redb::Database,
    dir: PathBuf,
    read_audit: ReadAudit,
    pending_reads: Mutex<Vec<AuditRecord>>,
    /// The buffer the last commit took, emptied, with its capacity kept: swapped in for
    /// the one a commit takes, so that the buffer does not regrow (and fault in fresh
    /// pages) every flush interval under a steady read load.
    spare_read_buffer: Mutex<Vec<AuditRecord>>,
    /// Commits that have taken buffered read leaves and not finished yet; `flush_audit`
    /// waits for them (through redb's writer lock) so that it never returns while taken
    /// leaves are still uncommitted.
    reads_in_flight: AtomicUsize,
    /// Last timestamp handed out, in µs since the epoch; loaded from the store on open.
    clock: AtomicI64,
    /// redb cache of each auxiliary database opened through this store.
    aux_cache_size: usize,
    /// How far commits and durable commits reach in change seqs; held across each commit so
    /// that a durable commit covers exactly the commits before it.
    watermarks: Mutex<Watermarks>,
    /// `watermarks.durable`, for readers of the change feed that should not take the lock.
    durable_seq: AtomicU64,
    /// One thread at a time makes deferred commits durable ([`Store::wait_durable`]); the
    /// others find their commit covered when they get it.
    sync_leader: Mutex<()>,
    /// The keyring (shared with auxiliary databases) and its counters, persisted on close.
    counters: CounterGuard,
    /// The pending versions of the database by `Type/id` (`pending.rs`).
    pending: RwLock<pending::SharedPending>,
    /// Pending versions that make a merge due.
    merge_threshold: usize,
}

/// The last change seq committed, and the last one durable (on disk after a sync).
#[derive(Debug, Default, Clone, Copy)]
struct Watermarks {
    committed: u64,
    durable: u64,
    /// A deferred commit took buffered read leaves, and no synced commit has come since:
    /// the flusher owes those leaves a sync.
    unsynced_leaves: bool,
}

/// Whether a commit syncs the disk before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitSync {
    /// Durable when the commit returns (the default of every write).
    Now,
    /// Visible to this process at once, durable at the next synced commit
    /// ([`WriteTxn::commit_deferred`]).
    Deferred,
}

/// An open fhirkeep database.
#[derive(Debug)]
pub struct Store {
    inner: Arc<Inner>,
    flusher: Option<Flusher>,
}

impl Store {
    /// Starts configuring a store in `dir`.
    pub fn builder(dir: impl Into<PathBuf>) -> StoreBuilder {
        StoreBuilder {
            dir: dir.into(),
            key: None,
            kdf: KdfParams::default(),
            cache_size: 256 << 20,
            read_audit: ReadAudit::default(),
            verify_on_open: false,
            merge_threshold: DEFAULT_MERGE_THRESHOLD,
            #[cfg(feature = "bench-plaintext")]
            plaintext: false,
        }
    }

    /// The database directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// A 32-byte secret for `purpose` (e.g. `"smart token issuer v1"`), derived from the
    /// database's key hierarchy ([`Keyring::derive_subkey`]): the same for every open of this
    /// database, unchanged by data-key rotation and passphrase changes, and never stored.
    /// Different purposes give independent secrets; the engine uses its own purposes, so pick
    /// a name of your own.
    pub fn derive_secret(&self, purpose: &str) -> zeroize::Zeroizing<[u8; 32]> {
        self.inner.counters.0.derive_subkey(purpose)
    }

    /// Begins a write transaction: every write in it commits atomically, with its audit leaves.
    ///
    /// redb has one writer at a time, so while a `WriteTxn` is open, store calls that need a
    /// write of their own (reads under [`ReadAudit::Durable`], [`Store::flush_audit`],
    /// [`Store::audit_head`], another `begin_write`) wait until it ends. On the thread that holds
    /// it they would wait forever: read through [`WriteTxn::read`] instead.
    pub fn begin_write(&self, ctx: &AccessContext) -> Result<WriteTxn<'_>> {
        WriteTxn::begin(self, ctx.clone())
    }

    /// Returns once the deferred commit of `ticket` ([`WriteTxn::commit_deferred`]) is
    /// durable, syncing the disk if no other commit has done so since. Many threads waiting
    /// at once share one sync.
    pub fn wait_durable(&self, ticket: DurableTicket) -> Result<()> {
        self.inner.wait_durable(ticket.seq())
    }

    /// Returns once every commit made so far is durable (and so in the change feed). A
    /// conditional write calls this before its search, so that the condition sees writes
    /// committed deferred by others and still waiting for their sync.
    pub fn wait_all_durable(&self) -> Result<()> {
        let committed = lock(&self.inner.watermarks).committed;
        self.inner.wait_durable(committed)
    }

    /// Runs `body` in one write transaction and commits it if `body` succeeds.
    pub fn write<T>(
        &self,
        ctx: &AccessContext,
        body: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut txn = self.begin_write(ctx)?;
        let value = body(&mut txn)?;
        txn.commit()?;
        Ok(value)
    }

    /// Creates a resource with a server-assigned id.
    pub fn create(&self, ctx: &AccessContext, resource: Value) -> Result<StoredResource> {
        self.write(ctx, |txn| txn.create(resource))
    }

    /// Updates (or creates with the client's id) a resource, optionally only if the current
    /// version is `expected_version`.
    pub fn update(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<u64>,
    ) -> Result<UpdateOutcome> {
        self.write(ctx, |txn| {
            txn.update(resource_type, id, resource, expected_version)
        })
    }

    /// Deletes a resource by writing a tombstone version.
    pub fn delete(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<DeleteOutcome> {
        self.write(ctx, |txn| txn.delete(resource_type, id, expected_version))
    }

    /// Reads the current version. A deleted resource is [`Error::Gone`].
    pub fn read(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
    ) -> Result<StoredResource> {
        let result = self.lookup(resource_type, id, Lookup::Current);
        self.audit_access(ctx, AuditAction::Read, resource_type, id, &result)?;
        result
    }

    /// Reads one version. A tombstone version reads as [`Error::Gone`].
    pub fn vread(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
        version: u64,
    ) -> Result<StoredResource> {
        let result = self.lookup(resource_type, id, Lookup::Version(version));
        self.audit_access(ctx, AuditAction::VRead, resource_type, id, &result)?;
        result
    }

    /// Reads the version that was current at `instant` (point-in-time read).
    pub fn read_as_of(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
        instant: DateTime<Utc>,
    ) -> Result<StoredResource> {
        let result = self.lookup(resource_type, id, Lookup::AsOf(instant.timestamp_micros()));
        self.audit_access(
            ctx,
            AuditAction::PointInTimeRead,
            resource_type,
            id,
            &result,
        )?;
        result
    }

    fn lookup(&self, resource_type: &str, id: &str, which: Lookup) -> Result<StoredResource> {
        check_resource_type(resource_type)?;
        check_id(id)?;
        let versions = self.inner.versions_snapshot()?;
        let found = versions.find(&self.inner.pending, resource_type, id, which)?;
        let (version, stored) = found.ok_or(Error::NotFound)?;
        if stored.is_deleted() {
            return Err(Error::Gone { version });
        }
        Ok(stored)
    }

    /// Records an access made by a layer above the engine (e.g. a search, whose parameters are
    /// passed as a hash). Follows the read-audit mode.
    pub fn record_access(&self, ctx: &AccessContext, record: AccessRecord) -> Result<()> {
        let leaf = AuditRecord {
            time_micros: now_micros(),
            actor: ctx.actor(),
            request_id: ctx.request_id.clone(),
            action: record.action,
            resource_type: record.resource_type,
            id: record.id,
            version: record.version,
            outcome: record.outcome,
            content_hash: None,
            query_hash: record.query_hash,
        };
        self.inner.enqueue_read_leaf(leaf)
    }

    fn audit_access(
        &self,
        ctx: &AccessContext,
        action: AuditAction,
        resource_type: &str,
        id: &str,
        result: &Result<StoredResource>,
    ) -> Result<()> {
        let well_formed =
            crate::resource::is_resource_type(resource_type) && crate::resource::is_valid_id(id);
        let (version, content_hash) = match result {
            Ok(stored) => (Some(stored.version), Some(stored.content_hash)),
            Err(Error::Gone { version }) => (Some(*version), None),
            Err(_) => (None, None),
        };
        let leaf = AuditRecord {
            time_micros: now_micros(),
            actor: ctx.actor(),
            request_id: ctx.request_id.clone(),
            action,
            resource_type: well_formed.then(|| resource_type.to_owned()),
            id: well_formed.then(|| id.to_owned()),
            version,
            outcome: outcome_of(result),
            content_hash,
            query_hash: None,
        };
        self.inner.enqueue_read_leaf(leaf)
    }

    /// Commits buffered read leaves now.
    pub fn flush_audit(&self) -> Result<()> {
        self.inner.flush_pending()
    }

    /// The newest stored signed tree head, without signing a new one.
    pub fn latest_audit_head(&self) -> Result<Option<SignedTreeHead>> {
        let txn = self.inner.db.begin_read()?;
        audit::log::latest_head(&txn)
    }

    /// The newest signed tree head, signing a fresh one if leaves were added since.
    pub fn audit_head(&self) -> Result<SignedTreeHead> {
        let txn = self.inner.begin_write_txn()?;
        self.inner
            .commit_audited(txn, Vec::new(), &[], None, CommitSync::Now)
    }

    /// Replaces the key that signs the audit log's tree heads (on a schedule, or when the old
    /// one may have been exposed). The rotation is a leaf of its own that names the new public
    /// key, covered by a head the old key signs: that head is returned. An auditor who trusts
    /// the old key checks it, finds the rotation leaf in it with an inclusion proof, and from
    /// then on trusts the new key for larger heads; [`Store::verify_audit`] checks the whole
    /// chain. The old key is forgotten (its public half stays in [`Store::audit_keys`]).
    pub fn rotate_audit_key(&self, ctx: &AccessContext) -> Result<SignedTreeHead> {
        let txn = self.inner.begin_write_txn()?;
        let record = AuditRecord {
            time_micros: now_micros(),
            actor: ctx.actor(),
            request_id: ctx.request_id.clone(),
            action: AuditAction::AuditKeyRotation,
            resource_type: None,
            id: None,
            version: None,
            outcome: crate::audit::AuditOutcome::Success,
            content_hash: None,
            query_hash: None,
        };
        let head = audit::log::rotate_signing_key(&txn, record, self.inner.tick())?;
        // The one commit path: buffered leaves follow the rotation, under the new key.
        self.inner
            .commit_audited(txn, Vec::new(), &[], None, CommitSync::Now)?;
        Ok(head)
    }

    /// Every key that has signed the audit log's heads, oldest first, each with the smallest
    /// tree size it signs.
    pub fn audit_keys(&self) -> Result<Vec<audit::AuditKey>> {
        let txn = self.inner.db.begin_read()?;
        audit::log::key_schedule(&txn)
    }

    /// Number of leaves in the audit log (after flushing buffered read leaves).
    pub fn audit_size(&self) -> Result<u64> {
        self.flush_audit()?;
        let txn = self.inner.db.begin_read()?;
        audit::log::size(&txn)
    }

    /// Up to `count` audit leaves from seq `from` on whose time is within `times` (µs since
    /// the epoch), in log order (after flushing buffered read leaves), and the seq to continue
    /// from if there are more. Leaf times follow the log's order only roughly, so this reads
    /// the log in blocks, skipping those whose recorded time range misses `times`.
    pub fn audit_leaves_in_time_range(
        &self,
        times: std::ops::RangeInclusive<i64>,
        from: u64,
        count: usize,
    ) -> Result<(Vec<audit::AuditLeaf>, Option<u64>)> {
        self.flush_audit()?;
        let txn = self.inner.db.begin_read()?;
        audit::log::leaves_in_time_range(&txn, times, from, count)
    }

    /// The audit leaf with sequence number `seq`.
    pub fn audit_leaf(&self, seq: u64) -> Result<audit::AuditLeaf> {
        let txn = self.inner.db.begin_read()?;
        audit::log::leaf(&txn, seq)?.ok_or(Error::NotFound)
    }

    /// The signed head stored for exactly `size` leaves, if one was signed at that size.
    pub fn audit_head_at(&self, size: u64) -> Result<Option<SignedTreeHead>> {
        let txn = self.inner.db.begin_read()?;
        audit::log::head_at(&txn, size)
    }

    /// Proof that leaf `seq` is in the tree of `size` leaves.
    pub fn prove_inclusion(&self, seq: u64, size: u64) -> Result<InclusionProof> {
        let txn = self.inner.db.begin_read()?;
        audit::log::prove_inclusion(&txn, seq, size)
    }

    /// Proof that the tree of `old_size` leaves is a prefix of the tree of `new_size` leaves.
    pub fn prove_consistency(&self, old_size: u64, new_size: u64) -> Result<ConsistencyProof> {
        let txn = self.inner.db.begin_read()?;
        audit::log::prove_consistency(&txn, old_size, new_size)
    }

    /// Recomputes the whole audit tree from its leaves and checks every stored head.
    pub fn verify_audit(&self) -> Result<VerifyReport> {
        self.flush_audit()?;
        let txn = self.inner.db.begin_read()?;
        audit::log::verify_log(&txn)
    }

    /// Checks the current log against a head an auditor kept from earlier.
    pub fn verify_audit_against(&self, trusted: &SignedTreeHead) -> Result<()> {
        self.flush_audit()?;
        let txn = self.inner.db.begin_read()?;
        audit::log::verify_against_trusted_head(&txn, trusted)
    }

    /// Authenticates every page, runs redb's integrity check and verifies the audit log;
    /// then does the same for every auxiliary file in the directory (authenticates every
    /// block, runs redb's integrity check over it), reported per file in
    /// [`CheckReport::aux_files`].
    ///
    /// Opens the database exclusively; the first fault found is returned as an error (a
    /// fault in an auxiliary file names the file: it holds derived data only, and can be
    /// deleted with [`Store::delete_aux_database`] and rebuilt).
    /// A successful check is recorded in the audit log as a `check` leaf of `ctx`.
    pub fn check(
        ctx: &AccessContext,
        dir: impl Into<PathBuf>,
        key: KeySource,
    ) -> Result<CheckReport> {
        let dir = dir.into();
        let keyring = Keyring::open(&dir, &key)?;
        let path = dir.join(DATABASE_FILE);
        if !path.exists() {
            return Err(Error::DatabaseNotFound(dir));
        }
        let pages = crate::crypto::verify_file(&path, &keyring)?;
        let mut aux_files = auxiliary::verify_aux_files(&dir, &keyring)?;
        drop(keyring);
        let failed_pages = describe_failed_pages(&pages.failed_pages);
        if !pages.problems.is_empty() {
            let mut faults = pages.problems.clone();
            faults.extend(failed_pages);
            return Err(Error::Corrupted(faults.join("; ")));
        }
        // Blocks that fail authentication are corruption if the database reaches them. If
        // redb's full integrity walk (below) reads every reachable page without a fault, the
        // failed blocks are free pages: after a crash, torn writes to pages no commit refers
        // to are expected, and they are overwritten before they are ever read.
        let reachable_fault = |error: Error| match (&error, &failed_pages) {
            (Error::Corrupted(message), Some(pages)) => {
                Error::Corrupted(format!("{message}; {pages}"))
            }
            _ => error,
        };
        let mut store = Store::builder(&dir)
            .key(key)
            .read_audit(ReadAudit::Durable)
            .open()
            .map_err(reachable_fault)?;
        let redb_integrity_ok = store.check_redb_integrity().map_err(reachable_fault)?;
        if !redb_integrity_ok {
            return Err(reachable_fault(Error::Corrupted(
                "redb integrity check failed (checksums or tree structure)".into(),
            )));
        }
        let audit = store.verify_audit().map_err(reachable_fault)?;
        {
            let txn = store.inner.db.begin_read()?;
            audit::log::verify_time_blocks(&txn).map_err(reachable_fault)?;
        }
        let versions = store.verify_versions().map_err(reachable_fault)?;
        let mut warnings = failed_pages
            .map(|pages| {
                vec![format!(
                    "{pages}, but no data or index page refers to them: free pages, typically \
                     torn by a crash; they are overwritten before reuse"
                )]
            })
            .unwrap_or_default();
        for report in &mut aux_files {
            warnings.extend(store.check_aux_file(report)?);
        }
        if pages.format_version == PageFormat::V1.version() {
            warnings.push(
                "the data file is in page format 1 (unaligned blocks): it stays readable and \
                 writable; `fhirkeep copy` rewrites it in format 2, which writes random pages \
                 faster"
                    .into(),
            );
        }
        store.record_access(ctx, AccessRecord::succeeded(AuditAction::Check))?;
        Ok(CheckReport {
            pages,
            redb_integrity_ok,
            audit,
            versions,
            aux_files,
            warnings,
        })
    }

    /// Checks every stored version against the other tables: its body (inline, or its row in
    /// `bodies`) decompresses to JSON whose BLAKE3 is the record's content hash, its change
    /// row names it, and `bodies` holds no row that no version refers to; and every pending
    /// version (`pending.rs`) the same way, and that it is not in `versions` yet. Returns the
    /// number of versions checked.
    ///
    /// Why, beyond redb's checksums: each table is consistent on its own after a page of one
    /// of them is swapped for an older copy of itself, but the tables no longer agree.
    fn verify_versions(&self) -> Result<u64> {
        let txn = self.inner.db.begin_read()?;
        let versions = txn.open_table(VERSIONS)?;
        let bodies = txn.open_table(record::BODIES)?;
        let changes = txn.open_table(record::CHANGES)?;
        let mut checked = 0u64;
        let mut body_rows_used = 0u64;
        for entry in versions.iter()? {
            let (key, value) = entry?;
            let (resource_type, id, version) = key.value();
            let record = VersionRecord::decode(value.value())?;
            let body = record.body(&bodies)?;
            if *blake3::hash(&body).as_bytes() != record.content_hash {
                return Err(Error::Corrupted(format!(
                    "a stored body does not match its content hash (change {})",
                    record.change_seq
                )));
            }
            if record.body_in_table() && !body.is_empty() {
                body_rows_used += 1;
            }
            let names_it = match changes.get(record.change_seq)? {
                Some(change) => {
                    let change = record::Change::decode(change.value())?;
                    change.resource_type == resource_type
                        && change.id == id
                        && change.version == version
                }
                None => false,
            };
            if !names_it {
                return Err(Error::Corrupted(format!(
                    "change {} does not name the version that refers to it",
                    record.change_seq
                )));
            }
            checked += 1;
        }
        // The pending versions: the change row is the record.
        let merged_through = pending::merged_through(&txn.open_table(record::META)?)?;
        for entry in changes.range(merged_through.saturating_add(1)..)? {
            let (seq, bytes) = entry?;
            let seq = seq.value();
            let change = record::Change::decode(bytes.value())?;
            let Some(record) = change.pending_record(seq) else {
                continue;
            };
            let key = (
                change.resource_type.as_str(),
                change.id.as_str(),
                change.version,
            );
            if versions.get(key)?.is_some() {
                return Err(Error::Corrupted(format!(
                    "change {seq} is pending, but its version is in the versions table"
                )));
            }
            let body = record.body(&bodies)?;
            if *blake3::hash(&body).as_bytes() != record.content_hash {
                return Err(Error::Corrupted(format!(
                    "a stored body does not match its content hash (change {seq})"
                )));
            }
            body_rows_used += 1;
            checked += 1;
        }
        if redb::ReadableTableMetadata::len(&bodies)? != body_rows_used {
            return Err(Error::Corrupted(
                "the bodies table holds rows that no version refers to".into(),
            ));
        }
        Ok(checked)
    }

    fn flush_delay(&self) -> Duration {
        flush_delay(self.inner.read_audit)
    }

    fn check_redb_integrity(&mut self) -> Result<bool> {
        if let Some(flusher) = self.flusher.take() {
            flusher.stop();
        }
        self.inner.flush_pending()?;
        let inner = Arc::get_mut(&mut self.inner).ok_or_else(|| {
            Error::Storage("integrity check needs exclusive access to the store".into())
        })?;
        Ok(inner.db.check_integrity()?)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(flusher) = self.flusher.take() {
            flusher.stop();
        }
        // Best effort on close: a failure here loses at most the buffered read leaves,
        // which is the documented group-commit window.
        let _ = self.inner.flush_pending();
        self.inner.retire_read_snapshot();
    }
}

impl AccessRecord {
    /// A successful operation that concerns no particular resource (check, rekey, export...).
    pub fn succeeded(action: AuditAction) -> Self {
        AccessRecord {
            action,
            resource_type: None,
            id: None,
            version: None,
            outcome: AuditOutcome::Success,
            query_hash: None,
        }
    }
}

/// An access to record in the audit log on behalf of a higher layer.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// What was done.
    pub action: AuditAction,
    /// The resource type concerned, if any.
    pub resource_type: Option<String>,
    /// The resource id concerned, if any.
    pub id: Option<String>,
    /// The version concerned, if any.
    pub version: Option<u64>,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// blake3 of the normalized query (never the query itself: it may hold PHI).
    pub query_hash: Option<[u8; 32]>,
}

#[derive(Debug, Clone, Copy)]
enum Lookup {
    Current,
    Version(u64),
    AsOf(i64),
}

/// Where the versions of one snapshot are: `versions`, and the pending versions of the
/// resource looked up (`pending.rs`).
struct VersionSources<'a, V, B> {
    versions: &'a V,
    bodies: &'a B,
    /// The resource's pending versions in this snapshot, oldest first.
    pending: &'a [pending::PendingVersion],
}

type VersionsTable = (&'static str, &'static str, u64);

/// The version that change `seq` wrote: from the change row if it carries the record (a
/// pending version, merged or not: its body stays in `bodies`), else from `versions`.
fn version_of_change(
    versions: &impl ReadableTable<VersionsTable, &'static [u8]>,
    bodies: &impl ReadableTable<u64, &'static [u8]>,
    seq: u64,
    change: &record::Change,
) -> Result<StoredResource> {
    let (resource_type, id, version) = (
        change.resource_type.as_str(),
        change.id.as_str(),
        change.version,
    );
    if let Some(record) = change.pending_record(seq) {
        return StoredResource::from_record(resource_type, id, version, &record, bodies);
    }
    let bytes = versions
        .get((resource_type, id, version))?
        .ok_or_else(|| Error::Corrupted("change names a missing version".into()))?;
    let record = VersionRecord::decode(bytes.value())?;
    StoredResource::from_record(resource_type, id, version, &record, bodies)
}

fn find_version<V, B>(
    sources: &VersionSources<'_, V, B>,
    resource_type: &str,
    id: &str,
    which: Lookup,
) -> Result<Option<(u64, StoredResource)>>
where
    V: ReadableTable<VersionsTable, &'static [u8]>,
    B: ReadableTable<u64, &'static [u8]>,
{
    let found =
        |version: u64, record: &VersionRecord<'_>| -> Result<Option<(u64, StoredResource)>> {
            Ok(Some((
                version,
                StoredResource::from_record(resource_type, id, version, record, sources.bodies)?,
            )))
        };
    let from_pending =
        |pending: pending::PendingVersion| found(pending.version, &pending.version_record());
    let all_versions = (resource_type, id, 0)..=(resource_type, id, u64::MAX);
    match which {
        Lookup::Version(version) => {
            if let Some(&pending) = sources.pending.iter().find(|p| p.version == version) {
                return from_pending(pending);
            }
            match sources.versions.get((resource_type, id, version))? {
                Some(guard) => found(version, &VersionRecord::decode(guard.value())?),
                None => Ok(None),
            }
        }
        Lookup::Current => {
            let newest_pending = sources.pending.last().copied();
            let mut range = sources.versions.range(all_versions)?;
            match range.next_back() {
                Some(entry) => {
                    let (key, value) = entry?;
                    let version = key.value().2;
                    match newest_pending {
                        Some(pending) if pending.version > version => from_pending(pending),
                        _ => found(version, &VersionRecord::decode(value.value())?),
                    }
                }
                None => newest_pending.map_or(Ok(None), from_pending),
            }
        }
        Lookup::AsOf(micros) => {
            // Version ids grow with time, so the newest version at or before `micros` is the
            // newer of the newest such pending one and the newest such stored one.
            let mut pending_hit = None;
            for pending in sources.pending.iter().rev() {
                if pending.last_updated_micros <= micros {
                    pending_hit = Some((pending.version, pending.version_record()));
                    break;
                }
            }
            let range = sources.versions.range(all_versions)?;
            for entry in range.rev() {
                let (key, value) = entry?;
                let version = key.value().2;
                if let Some((pending_version, record)) = &pending_hit
                    && *pending_version > version
                {
                    return found(*pending_version, record);
                }
                let record = VersionRecord::decode(value.value())?;
                if record.last_updated_micros <= micros {
                    return found(version, &record);
                }
            }
            match pending_hit {
                Some((version, record)) => found(version, &record),
                None => Ok(None),
            }
        }
    }
}

/// "N page(s) failed authentication: a, b, ..." for a check report, if any failed.
fn describe_failed_pages(pages: &[u64]) -> Option<String> {
    if pages.is_empty() {
        return None;
    }
    let shown: Vec<String> = pages.iter().take(20).map(u64::to_string).collect();
    let more = if pages.len() > 20 { ", ..." } else { "" };
    Some(format!(
        "{} page(s) failed authentication: {}{more}",
        pages.len(),
        shown.join(", ")
    ))
}

fn outcome_of<T>(result: &Result<T>) -> AuditOutcome {
    match result {
        Ok(_) => AuditOutcome::Success,
        Err(Error::NotFound) => AuditOutcome::NotFound,
        Err(Error::Gone { .. }) => AuditOutcome::Gone,
        Err(Error::VersionConflict { .. }) => AuditOutcome::Conflict,
        Err(Error::InvalidResource(_) | Error::InvalidId | Error::UnknownResourceType(_)) => {
            AuditOutcome::Invalid
        }
        Err(_) => AuditOutcome::Error,
    }
}

impl Inner {
    fn initialize(&self) -> Result<()> {
        let txn = self.begin_write_txn()?;
        {
            let mut meta = txn.open_table(record::META)?;
            let format = meta
                .get(record::META_FORMAT)?
                .map(|guard| guard.value().to_vec());
            if let Some(bytes) = format {
                let found = <[u8; 4]>::try_from(bytes.as_slice())
                    .map(u32::from_le_bytes)
                    .map_err(|_| Error::Corrupted("format marker is malformed".into()))?;
                if !(record::OLDEST_UPGRADABLE_FORMAT..=record::FORMAT_VERSION).contains(&found) {
                    return Err(Error::Storage(format!(
                        "database format {found} is not supported by this build (it opens formats {} to {})",
                        record::OLDEST_UPGRADABLE_FORMAT,
                        record::FORMAT_VERSION
                    )));
                }
            }
            // Written in the same transaction as the upgrade below (format 1: the audit
            // leaves move into rows), so a crash leaves either format whole.
            meta.insert(
                record::META_FORMAT,
                &record::FORMAT_VERSION.to_le_bytes()[..],
            )?;
            let clock = match meta.get(record::META_CLOCK)? {
                Some(guard) => <[u8; 8]>::try_from(guard.value())
                    .map(i64::from_le_bytes)
                    .map_err(|_| Error::Corrupted("clock is malformed".into()))?,
                None => 0,
            };
            self.clock.store(clock, Ordering::SeqCst);
            txn.open_table(VERSIONS)?;
            txn.open_table(record::BODIES)?;
            let changes = txn.open_table(record::CHANGES)?;
            txn.open_table(record::TYPE_CHANGES)?;
            if meta.get(record::META_MERGED_THROUGH)?.is_none() {
                // A new database, or one of format 3 or older, whose changes carry no record:
                // nothing is pending, and opening need not look at its changes again.
                let last = changes.last()?.map_or(0, |(seq, _)| seq.value());
                meta.insert(record::META_MERGED_THROUGH, &last.to_le_bytes()[..])?;
            }
        }
        audit::log::initialize(&txn)?;
        txn.commit()?;
        self.retire_read_snapshot();
        self.reload_pending()?;
        self.reload_watermarks()
    }

    /// Loads the pending versions of the file (at open, or after a bulk copy).
    fn reload_pending(&self) -> Result<()> {
        let txn = self.db.begin_read()?;
        pending::SharedPending::reload(&self.pending, &txn)
    }

    /// Merges the pending versions into `versions` if enough have gathered. Called after a
    /// commit, whose success a failed merge does not change: its versions stay pending, read
    /// exactly as before, and the next commit tries again.
    fn merge_if_due(&self) {
        if pending::SharedPending::merge_due(&self.pending, self.merge_threshold) {
            let _ = self.merge(false);
        }
    }

    /// Moves every pending version into `versions` (`pending.rs`), in a durable commit.
    fn merge_pending(&self) -> Result<()> {
        self.merge(true)
    }

    fn merge(&self, even_if_not_due: bool) -> Result<()> {
        let txn = self.begin_write_txn()?;
        // Committers that found a merge due at once queue for the writer; the first merges,
        // and the others find nothing left to do.
        if !even_if_not_due
            && !pending::SharedPending::merge_due(&self.pending, self.merge_threshold)
        {
            txn.abort()?;
            return Ok(());
        }
        let (old_merged_through, rows) = pending::merge_into(&txn)?;
        self.commit_audited(txn, Vec::new(), &[], None, CommitSync::Now)?;
        pending::SharedPending::merged(&self.pending, old_merged_through, rows);
        Ok(())
    }

    /// Everything in the file at open (or after a bulk copy) is durable.
    fn reload_watermarks(&self) -> Result<()> {
        let txn = self.db.begin_read()?;
        let changes = txn.open_table(record::CHANGES)?;
        let last = changes.last()?.map_or(0, |(key, _)| key.value());
        let mut marks = lock(&self.watermarks);
        marks.committed = marks.committed.max(last);
        marks.durable = marks.committed;
        self.durable_seq.store(marks.durable, Ordering::SeqCst);
        Ok(())
    }

    /// Returns once every change up to `seq` is durable: if no synced commit has covered it
    /// yet, commits an empty synced transaction, which makes every deferred commit before it
    /// durable (redb persists non-durable commits with the next durable one). Callers that
    /// arrive while one sync runs are usually covered by it and return without a sync.
    fn wait_durable(&self, seq: u64) -> Result<()> {
        if self.durable_seq.load(Ordering::SeqCst) >= seq {
            return Ok(());
        }
        let _leader = lock(&self.sync_leader);
        if self.durable_seq.load(Ordering::SeqCst) >= seq {
            return Ok(());
        }
        let txn = self.begin_write_txn()?;
        self.commit_audited(txn, Vec::new(), &[], None, CommitSync::Now)
            .map(drop)
    }

    /// Reloads the engine clock from the store (after a bulk copy replaced the meta table).
    fn reload_clock(&self) -> Result<()> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(record::META)?;
        if let Some(guard) = meta.get(record::META_CLOCK)? {
            let clock = <[u8; 8]>::try_from(guard.value())
                .map(i64::from_le_bytes)
                .map_err(|_| Error::Corrupted("clock is malformed".into()))?;
            self.clock.fetch_max(clock, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The `versions` table as of the newest commit, shared by reads until the next one:
    /// opening a read transaction and the table for every read cost a quarter of a read.
    fn versions_snapshot(&self) -> Result<Arc<VersionTables>> {
        // Read before the transaction begins: a snapshot is tagged with a generation no
        // newer than the state it sees, so one that a commit overtook is never reused.
        let generation = self.read_snapshot.generation.load(Ordering::SeqCst);
        if let Some((tagged, table)) = &*lock(&self.read_snapshot.current)
            && *tagged == generation
        {
            return Ok(Arc::clone(table));
        }
        let txn = self.db.begin_read()?;
        let table = Arc::new(VersionTables::open(&txn)?);
        let mut current = lock(&self.read_snapshot.current);
        if self.read_snapshot.generation.load(Ordering::SeqCst) == generation {
            *current = Some((generation, Arc::clone(&table)));
        }
        Ok(table)
    }

    /// Called after every commit to this file, before the committer returns: reads that
    /// start from now on open a new snapshot, and the old one stops holding back the pages
    /// this commit freed.
    fn retire_read_snapshot(&self) {
        self.read_snapshot.generation.fetch_add(1, Ordering::SeqCst);
        let retired = lock(&self.read_snapshot.current).take();
        drop(retired);
    }

    /// A durable, two-phase write transaction (see docs/design.md on why 2PC).
    fn begin_write_txn(&self) -> Result<redb::WriteTransaction> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        txn.set_two_phase_commit(true);
        Ok(txn)
    }

    /// Next timestamp: wall clock, but never equal to or before the previous one.
    fn tick(&self) -> i64 {
        let now = now_micros();
        let mut previous = self.clock.load(Ordering::SeqCst);
        loop {
            let next = now.max(previous + 1);
            match self
                .clock
                .compare_exchange(previous, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(actual) => previous = actual,
            }
        }
    }

    fn enqueue_read_leaf(&self, leaf: AuditRecord) -> Result<()> {
        match self.read_audit {
            ReadAudit::Durable => {
                let txn = self.begin_write_txn()?;
                self.commit_audited(txn, vec![leaf], &[], None, CommitSync::Now)
                    .map(drop)
            }
            ReadAudit::GroupCommit { .. } => {
                lock(&self.pending_reads).push(leaf);
                Ok(())
            }
        }
    }

    /// Buffers a leaf (refused write, read inside a write transaction); it commits with the
    /// next commit or flush.
    fn buffer_leaf(&self, leaf: AuditRecord) {
        lock(&self.pending_reads).push(leaf);
    }

    /// The one way a transaction commits: buffered leaves, then `extra` leaves, are appended;
    /// the engine clock is saved; a tree head is signed; then a durable commit. If the commit
    /// fails, the buffered leaves go back to the buffer (a later commit takes them).
    /// Commits `txn` with its audit leaves (and the buffered read leaves), signing a new tree
    /// head. `written_through` is the last change seq the transaction wrote, if any; with
    /// [`CommitSync::Deferred`] the caller has set the transaction non-durable.
    fn commit_audited(
        &self,
        txn: redb::WriteTransaction,
        extra: Vec<AuditRecord>,
        new_pending: &[pending::NewPending],
        written_through: Option<u64>,
        sync: CommitSync,
    ) -> Result<SignedTreeHead> {
        let mut buffered = {
            let spare = std::mem::take(&mut *lock(&self.spare_read_buffer));
            let mut pending = lock(&self.pending_reads);
            if pending.is_empty() {
                *lock(&self.spare_read_buffer) = spare;
                Vec::new()
            } else {
                self.reads_in_flight.fetch_add(1, Ordering::SeqCst);
                std::mem::replace(&mut *pending, spare)
            }
        };
        let result = (|| {
            let extra = extra.iter();
            audit::log::append_many(&txn, buffered.iter().chain(extra), |_| {})?;
            let head = audit::log::sign_head(&txn, self.tick())?;
            let mut meta = txn.open_table(record::META)?;
            let clock = self.clock.load(Ordering::SeqCst);
            meta.insert(record::META_CLOCK, &clock.to_le_bytes()[..])?;
            drop(meta);
            // Held across the commit: redb runs one write transaction at a time, so the
            // marks move in commit order, and a synced commit covers every one before it.
            let mut marks = lock(&self.watermarks);
            // In the cache before the commit is visible (a snapshot that sees the commit finds
            // them), out again if it fails; under the marks lock, so that the next writer's
            // versions (which may reuse the seqs of a failed commit) come after.
            pending::SharedPending::publish(&self.pending, new_pending);
            if let Err(error) = txn.commit() {
                pending::SharedPending::withdraw(&self.pending, new_pending);
                return Err(error.into());
            }
            self.retire_read_snapshot();
            if let Some(seq) = written_through {
                marks.committed = marks.committed.max(seq);
            }
            if sync == CommitSync::Now {
                marks.durable = marks.committed;
                marks.unsynced_leaves = false;
                self.durable_seq.store(marks.durable, Ordering::SeqCst);
            } else if !buffered.is_empty() {
                marks.unsynced_leaves = true;
            }
            Ok(head)
        })();
        if !buffered.is_empty() {
            if result.is_err() {
                let mut pending = lock(&self.pending_reads);
                let newer = std::mem::replace(&mut *pending, buffered);
                pending.extend(newer);
            } else if buffered.capacity() <= MAX_SPARE_READ_LEAVES {
                buffered.clear();
                *lock(&self.spare_read_buffer) = buffered;
            }
            self.reads_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        result
    }

    /// One round of the background flusher: commits buffered read leaves, unless a commit
    /// that ran while this one waited for the writer took them already.
    ///
    /// Why the second look: the flusher wakes every `max_delay`, finds the leaf of a read
    /// that came during a long write (a bulk load's index catch-up reads the change feed
    /// beside every batch), and waits for the writer. That write's commit takes the leaf; a
    /// synced commit after it would add nothing but two disk syncs, on the writer's path.
    fn flush_round(&self) -> Result<()> {
        if !self.flush_owed() {
            return Ok(());
        }
        let txn = self.begin_write_txn()?;
        // Holding the writer, every commit before this one has finished and set its marks
        // (they are set under the marks lock before it lets go). One that failed puts its
        // leaves back after that; the next round takes them.
        if !self.flush_owed() {
            txn.abort()?;
            return Ok(());
        }
        self.commit_audited(txn, Vec::new(), &[], None, CommitSync::Now)
            .map(drop)
    }

    /// Whether read leaves wait for a synced commit: buffered, or committed deferred.
    fn flush_owed(&self) -> bool {
        !lock(&self.pending_reads).is_empty() || lock(&self.watermarks).unsynced_leaves
    }

    fn flush_pending(&self) -> Result<()> {
        {
            let pending = lock(&self.pending_reads);
            if pending.is_empty() && self.reads_in_flight.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
        }
        let txn = self.begin_write_txn()?;
        self.commit_audited(txn, Vec::new(), &[], None, CommitSync::Now)
            .map(drop)
    }
}

/// The largest read-leaf buffer kept for reuse (about 10 MB): a burst that outgrew it
/// gives its memory back.
const MAX_SPARE_READ_LEAVES: usize = 1 << 16;

/// How often the flusher commits buffered leaves. Refused writes are always buffered (their
/// transaction may still be open), so the flusher runs in both read-audit modes.
fn flush_delay(read_audit: ReadAudit) -> Duration {
    match read_audit {
        ReadAudit::GroupCommit { max_delay } => max_delay,
        ReadAudit::Durable => Duration::from_millis(200),
    }
}

/// Background thread that commits buffered read leaves every `max_delay`.
#[derive(Debug)]
struct Flusher {
    shared: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    stopped: Arc<AtomicBool>,
}

impl Flusher {
    fn start(inner: &Arc<Inner>, max_delay: Duration) -> Flusher {
        let weak: Weak<Inner> = Arc::downgrade(inner);
        let shared = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = Arc::new(AtomicBool::new(false));
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fhirkeep-audit-flush".into())
            .spawn(move || {
                let (stop, wake) = &*thread_shared;
                loop {
                    let guard = lock(stop);
                    // Checked under the lock before waiting, so a stop never goes unseen.
                    if *guard {
                        return;
                    }
                    let (guard, _) = wake
                        .wait_timeout(guard, max_delay)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if *guard {
                        return;
                    }
                    drop(guard);
                    let Some(inner) = weak.upgrade() else { return };
                    // A failed flush keeps nothing buffered twice; the next write or flush
                    // reports the storage error to a caller.
                    let _ = inner.flush_round();
                }
            })
            .ok();
        Flusher {
            shared,
            thread,
            stopped,
        }
    }

    fn stop(mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let (stop, wake) = &*self.shared;
        *lock(stop) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

pub(crate) fn micros_to_datetime(micros: i64) -> Result<DateTime<Utc>> {
    Utc.timestamp_micros(micros)
        .single()
        .ok_or_else(|| Error::Corrupted("timestamp out of range".into()))
}

/// FHIR `instant` text with microseconds, always UTC (`Z`).
pub fn format_instant(instant: DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn restrict_permissions(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod crash_tests;

#[cfg(test)]
mod aux_tests;
