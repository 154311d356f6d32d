//! The [`Database`] applications embed: the engine's store plus the search index, with the one
//! write path that keeps them in line.
//!
//! Architecture invariant: every write goes through [`Database`]; the store is the source of
//! truth and the index follows its change feed. A search first brings the index up to every
//! store change committed before it started (read-your-writes), so writes do not wait for an
//! index commit: after its store commit a write puts its changes into the index writer, and
//! the index commits when a search (or a condition) needs it, every [`COMMIT_INTERVAL`], or
//! every [`DEFERRED_COMMIT_EVERY`] changes. After a crash, opening the database catches up
//! from the last index commit, so the index never stays behind the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, TryLockError};
use std::time::{Duration, Instant};

use fhirkeep_engine::crypto::{KdfParams, KeySource};
use fhirkeep_engine::store::{
    AccessContext, DeleteOutcome, DurableTicket, FeedItem, ReadAudit, Store, StoreBuilder,
    StoredResource, UpdateOutcome, Upsert, WriteTxn,
};
use serde_json::Value;

use crate::directory::RedbDirectory;
use crate::extract::extract;
use crate::index::{DocumentChange, SearchIndex};
use crate::registry::Registry;
use crate::{Error, Result};
use rayon::prelude::*;

/// The auxiliary encrypted file that holds the index.
const INDEX_FILE: &str = "index";

/// How many changes the index takes per catch-up step.
const SYNC_BATCH: usize = 2_000;

/// Limits on what one search may cost.
#[derive(Debug, Clone, Copy)]
pub struct SearchLimits {
    /// Page size when `_count` is not given.
    pub default_count: usize,
    /// The largest page (`_count` above it is capped).
    pub max_count: usize,
    /// The most resources a chained or `_has` inner search may match.
    pub max_inner_matches: usize,
    /// The most resources `_include`/`_revinclude` may add to one page.
    pub max_includes: usize,
}

impl Default for SearchLimits {
    fn default() -> Self {
        SearchLimits {
            default_count: 50,
            max_count: 1_000,
            max_inner_matches: 50_000,
            max_includes: 1_000,
        }
    }
}

/// Opens or creates a [`Database`].
#[derive(Debug)]
pub struct DatabaseBuilder {
    store: StoreBuilder,
    limits: SearchLimits,
}

impl DatabaseBuilder {
    /// The key (passphrase or key file).
    pub fn key(mut self, key: KeySource) -> Self {
        self.store = self.store.key(key);
        self
    }

    /// Argon2id parameters for a new database with a passphrase.
    pub fn kdf(mut self, kdf: KdfParams) -> Self {
        self.store = self.store.kdf(kdf);
        self
    }

    /// How reads are audited.
    pub fn read_audit(mut self, mode: ReadAudit) -> Self {
        self.store = self.store.read_audit(mode);
        self
    }

    /// Authenticate every page of the store when opening.
    pub fn verify_on_open(mut self, enabled: bool) -> Self {
        self.store = self.store.verify_on_open(enabled);
        self
    }

    /// Search limits.
    pub fn limits(mut self, limits: SearchLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Creates a new database (fails if one exists).
    pub fn create(self) -> Result<Database> {
        let limits = self.limits;
        Database::with_store(self.store.create()?, limits)
    }

    /// Opens an existing database.
    pub fn open(self) -> Result<Database> {
        let limits = self.limits;
        Database::with_store(self.store.open()?, limits)
    }

    /// Opens the database, creating it if absent.
    pub fn open_or_create(self) -> Result<Database> {
        let limits = self.limits;
        Database::with_store(self.store.open_or_create()?, limits)
    }
}

/// A FHIR database: the encrypted store and its encrypted search index.
pub struct Database {
    store: Store,
    index: SearchIndex,
    registry: RwLock<Registry>,
    /// Serializes store writes, so that conditional interactions see a search result that no
    /// other write changes before theirs commits. Ordinary writes release it after their
    /// store commit and wait for the index under `index_lock` (group commit).
    write_lock: Mutex<()>,
    /// Serializes index catch-up and commits. Taken after `write_lock` when both are held,
    /// never before it, so the two cannot deadlock.
    index_lock: Mutex<()>,
    /// Single-resource writes waiting for the next group commit (see [`Database::grouped`]).
    queue: Mutex<Vec<Pending>>,
    /// Changes put into the index writer but not yet committed (bulk loads defer commits).
    progress: Mutex<IndexProgress>,
    /// Versions a bulk load just wrote, for the next catch-up to index without reading them
    /// back from the store (see [`Database::load_many`]).
    handoff: Mutex<Handoff>,
    /// Transaction Bundles between asking for the write lock and their deferred commit, and
    /// the signal that one left or a sync finished (see [`Database::sync_shared`]).
    syncing: (Mutex<InFlightSet>, Condvar),
    /// How long the last sync led by [`Database::sync_shared`] took, in µs.
    last_sync_micros: std::sync::atomic::AtomicU64,
    limits: SearchLimits,
}

/// The longest a committed transaction Bundle waits for the Bundles that were in flight when
/// it committed, so that one disk sync covers them all. The wait is also bounded by how long
/// the last sync took: waiting longer than a sync costs more than it saves. A sync is two
/// `fdatasync`s (1–3 ms on this machine's disk, 10 ms and more on network disks).
const SHARED_SYNC_WAIT: Duration = Duration::from_millis(50);

/// Transaction Bundles on their way to their commit, by order of arrival.
#[derive(Debug, Default)]
struct InFlightSet {
    next: u64,
    entries: std::collections::BTreeSet<u64>,
}

/// Counts a transaction Bundle as in flight until it has committed (or failed).
pub(crate) struct InFlight<'d> {
    database: &'d Database,
    entry: u64,
    left: bool,
}

impl InFlight<'_> {
    /// The Bundle has committed or failed: others stop waiting for it.
    pub(crate) fn leave(mut self) {
        self.leave_once();
    }

    fn leave_once(&mut self) {
        if !self.left {
            self.left = true;
            let (set, signal) = &self.database.syncing;
            if let Ok(mut set) = set.lock() {
                set.entries.remove(&self.entry);
            }
            signal.notify_all();
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.leave_once();
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct IndexProgress {
    /// The last change put into the writer, committed or not (`None`: as committed).
    applied: Option<u64>,
    /// How many changes are put but not committed.
    uncommitted: usize,
    /// The last store change the committed index is known to hold (`None`: not known, so a
    /// waiting writer catches up to find out).
    committed: Option<u64>,
    /// When the index last committed (`None`: not since this process opened it).
    last_commit: Option<Instant>,
}

impl IndexProgress {
    /// Whether a catch-up of the given visibility commits now: always to make changes
    /// visible now, otherwise when uncommitted changes have waited long enough or are enough.
    fn commit_due(&self, visibility: Visibility) -> bool {
        match visibility {
            Visibility::Now => true,
            Visibility::Bulk => self.uncommitted >= DEFERRED_COMMIT_EVERY,
            Visibility::Deferred => {
                self.uncommitted >= DEFERRED_COMMIT_EVERY
                    || (self.uncommitted > 0
                        && self
                            .last_commit
                            .is_none_or(|at| at.elapsed() >= COMMIT_INTERVAL))
            }
        }
    }
}

/// A single-resource write that can share a store transaction with others: it either fails
/// before changing anything (validation, version conflict, not found) or writes its one
/// version, so one operation's failure never leaves the shared transaction half changed.
enum GroupOp {
    Create(Value),
    Update {
        resource_type: String,
        id: String,
        resource: Value,
        expected_version: Option<u64>,
    },
    Delete {
        resource_type: String,
        id: String,
        expected_version: Option<u64>,
    },
}

/// What a [`GroupOp`] did.
enum GroupDone {
    Created(StoredResource),
    Updated(UpdateOutcome),
    Deleted(DeleteOutcome),
}

/// Where a group commit leaves one operation's result.
type GroupSlot = Arc<Mutex<Option<Result<GroupDone>>>>;

/// One caller's operation in the group-commit queue.
struct Pending {
    ctx: AccessContext,
    op: GroupOp,
    slot: GroupSlot,
}

/// Fills every slot of a group that has no result yet, so that a group commit that fails
/// (or panics) part-way answers every caller instead of leaving one without a result.
struct UnansweredSlots(Vec<GroupSlot>);

impl Drop for UnansweredSlots {
    fn drop(&mut self) {
        for slot in &self.0 {
            if let Ok(mut result) = slot.lock()
                && result.is_none()
            {
                *result = Some(Err(Error::Internal(
                    "the group commit did not finish".into(),
                )));
            }
        }
    }
}

/// When the index makes caught-up changes visible to searches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visibility {
    /// Before the call returns (searches, conditions, [`Database::flush_index`]).
    Now,
    /// When due: every [`DEFERRED_COMMIT_EVERY`] changes or [`COMMIT_INTERVAL`], whichever
    /// comes first; a search commits whatever it needs earlier.
    Deferred,
    /// A bulk load's catch-up: every [`DEFERRED_COMMIT_EVERY`] changes only, not on the
    /// clock. A commit holds the load: tantivy writes out the segment on one thread (0.5–0.8 s
    /// per 100,000 resources) while the load waits for its catch-up and the other core idles.
    /// The clock only bounds the work a crash leaves for the catch-up at the next open, which
    /// the change count bounds here; searches still commit whatever they need.
    Bulk,
}

/// The most changes the index writer holds uncommitted.
const DEFERRED_COMMIT_EVERY: usize = 200_000;

/// Versions handed from a bulk load's write to the index, by type, id and version.
type Handoff = HashMap<(String, String, u64), StoredResource>;

/// The most versions waiting in the hand-off: beyond it, a load's versions are read back
/// from the store instead (only if catch-ups stopped taking them, e.g. after an index error).
const HANDOFF_LIMIT: usize = 50_000;

/// The most versions in the hand-off that keep the writer's parsed JSON (which saves the
/// catch-up parsing the body again, but takes several times its memory).
const HANDOFF_PARSED_LIMIT: usize = 10_000;

/// The longest the index writer holds a change uncommitted while writes keep coming, so
/// that a crash leaves little for the catch-up at the next open. Why not commit per write:
/// every tantivy commit makes a segment, and merging many small segments took most of the CPU
/// of a write-heavy server (BENCHMARKS.md, "HTTP server").
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("dir", &self.store.dir())
            .finish_non_exhaustive()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // Best effort: a failure here is repaired by the catch-up at the next open.
        let ctx = AccessContext::local("fhirkeep-index");
        if let Err(error) = self
            .lock_writes()
            .and_then(|_guard| self.sync_index_locked(&ctx, Visibility::Now))
        {
            tracing::warn!(error = %error, "could not commit the search index on close");
        }
    }
}

/// What a conditional create did.
#[derive(Debug, Clone)]
pub enum ConditionalOutcome {
    /// Nothing matched: the resource was created.
    Created(StoredResource),
    /// One resource matched: it is returned and nothing was written.
    Existing(StoredResource),
}

fn is_search_parameter(stored: &StoredResource) -> bool {
    stored.resource_type == "SearchParameter" && !stored.is_deleted()
}

/// The error of a group commit, for each operation in the group (engine errors carry no
/// resource data, so their text is safe to repeat).
fn shared_failure(message: &str) -> Error {
    Error::Engine(fhirkeep_engine::Error::Storage(format!(
        "the shared commit failed: {message}"
    )))
}

fn resource_type_of(resource: &Value) -> Result<String> {
    resource
        .get("resourceType")
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| {
            Error::Engine(fhirkeep_engine::Error::InvalidResource(
                "resourceType is missing".into(),
            ))
        })
}

/// What an index catch-up did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Changes applied to the index.
    pub changes: u64,
    /// Parameter expressions that failed on some resource (the resource is still indexed
    /// for every other parameter).
    pub expression_failures: u64,
}

/// What the committed index holds, as searches last saw it (no catch-up is done to answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Documents (current, not deleted resources) in the committed index.
    pub documents: u64,
    /// Segments of the committed index (each commit adds one; merges remove them).
    pub segments: usize,
    /// The last store change the committed index holds, if known.
    pub committed_seq: Option<u64>,
}

impl Database {
    /// A builder for the database in `dir`.
    pub fn builder(dir: impl Into<PathBuf>) -> DatabaseBuilder {
        DatabaseBuilder {
            store: Store::builder(dir),
            limits: SearchLimits::default(),
        }
    }

    fn with_store(store: Store, limits: SearchLimits) -> Result<Database> {
        let open_index = |store: &Store| -> Result<Option<SearchIndex>> {
            let directory = RedbDirectory::new(store.open_aux_database(INDEX_FILE)?)?;
            SearchIndex::open(Box::new(directory))
        };
        let index = match open_index(&store)? {
            Some(index) => index,
            None => {
                // Built by a version with another schema: the index is derived data, so it
                // is deleted and rebuilt from the store below.
                tracing::info!("the search index has another schema: rebuilding it");
                store.delete_aux_database(INDEX_FILE)?;
                open_index(&store)?.ok_or_else(|| {
                    Error::Internal("a new index does not have the current schema".into())
                })?
            }
        };
        let database = Database {
            store,
            index,
            registry: RwLock::new(Registry::r4()?),
            write_lock: Mutex::new(()),
            index_lock: Mutex::new(()),
            queue: Mutex::new(Vec::new()),
            progress: Mutex::new(IndexProgress {
                last_commit: Some(Instant::now()),
                ..IndexProgress::default()
            }),
            handoff: Mutex::new(Handoff::new()),
            syncing: (Mutex::new(InFlightSet::default()), Condvar::new()),
            last_sync_micros: std::sync::atomic::AtomicU64::new(0),
            limits,
        };
        let ctx = AccessContext::local("fhirkeep-index");
        database.load_custom_parameters(&ctx)?;
        {
            let _guard = database.lock_writes()?;
            database.sync_index_locked(&ctx, Visibility::Now)?;
        }
        Ok(database)
    }

    /// The underlying store, for reads, history and audit (which do not touch the index).
    /// Writing through it directly would leave the index behind until the next write or
    /// search; use the write methods here instead.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The database directory.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// Search limits.
    pub fn limits(&self) -> SearchLimits {
        self.limits
    }

    pub(crate) fn index(&self) -> &SearchIndex {
        &self.index
    }

    /// The search parameters in use (official R4 plus stored SearchParameters).
    pub fn registry(&self) -> Result<RwLockReadGuard<'_, Registry>> {
        self.registry
            .read()
            .map_err(|_| Error::Internal("registry lock poisoned".into()))
    }

    pub(crate) fn lock_writes(&self) -> Result<MutexGuard<'_, ()>> {
        self.write_lock
            .lock()
            .map_err(|_| Error::Internal("write lock poisoned".into()))
    }

    fn lock_index(&self) -> Result<MutexGuard<'_, ()>> {
        self.index_lock
            .lock()
            .map_err(|_| Error::Internal("index lock poisoned".into()))
    }

    /// Creates a resource with a server-assigned id.
    pub fn create(&self, ctx: &AccessContext, resource: Value) -> Result<StoredResource> {
        match self.grouped(ctx, GroupOp::Create(resource))? {
            GroupDone::Created(stored) => Ok(stored),
            _ => Err(Error::Internal("a create answered as another write".into())),
        }
    }

    /// Updates (or creates with a client id) `Type/id`, optionally only if the current
    /// version is `expected_version`.
    pub fn update(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<u64>,
    ) -> Result<UpdateOutcome> {
        let op = GroupOp::Update {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            resource,
            expected_version,
        };
        match self.grouped(ctx, op)? {
            GroupDone::Updated(outcome) => Ok(outcome),
            _ => Err(Error::Internal(
                "an update answered as another write".into(),
            )),
        }
    }

    /// Deletes `Type/id` (a tombstone version).
    pub fn delete(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<DeleteOutcome> {
        let op = GroupOp::Delete {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            expected_version,
        };
        match self.grouped(ctx, op)? {
            GroupDone::Deleted(outcome) => Ok(outcome),
            _ => Err(Error::Internal("a delete answered as another write".into())),
        }
    }

    /// Creates or updates many resources with their own ids in one transaction (bulk load).
    /// Each item succeeds or fails on its own; the index catches up once.
    pub fn update_many(
        &self,
        ctx: &AccessContext,
        items: Vec<Upsert>,
    ) -> Result<Vec<fhirkeep_engine::Result<UpdateOutcome>>> {
        self.write(ctx, |txn| Ok(txn.update_many(items)?))
    }

    /// Like [`Database::update_many`], for bulk loads: while this batch commits in the store,
    /// the index catches up with the batches before it on the other cores, taking the
    /// versions they wrote from the write itself (handed over in memory) rather than reading
    /// and decompressing them back from the store. Searches still see every loaded batch
    /// (they catch the index up first); [`Database::flush_index`] does that work ahead of the
    /// first search. Crash safety is unchanged: the store is durable, and reopening catches
    /// the index up.
    pub fn load_many(
        &self,
        ctx: &AccessContext,
        items: Vec<Upsert>,
    ) -> Result<Vec<fhirkeep_engine::Result<UpdateOutcome>>> {
        let _guard = self.lock_writes()?;
        let index_ctx = AccessContext::local("fhirkeep-index");
        let (written, caught_up) = std::thread::scope(|scope| {
            // The catch-up reads committed changes only (its own read transaction), so it
            // cannot see this batch half written; whatever of it is committed before the
            // catch-up looks is indexed now, the rest next time.
            let catch_up = scope.spawn(|| {
                crate::priority::lower_this_thread();
                self.sync_index_locked(&index_ctx, Visibility::Bulk)
            });
            let written = self.store.write(ctx, |txn| txn.update_many(items));
            let caught_up = catch_up.join().unwrap_or_else(|_| {
                Err(Error::Internal("the index catch-up thread panicked".into()))
            });
            (written, caught_up)
        });
        let written = written?;
        caught_up?;
        self.hand_off(written.iter().flatten().map(|outcome| &outcome.resource))?;
        Ok(written)
    }

    /// Keeps versions just written (and durable) for the next index catch-up, which then
    /// indexes them from here instead of reading them back: a B-tree descent per version and
    /// decompressing its body again. What no catch-up takes is dropped by the next one.
    pub(crate) fn hand_off<'a>(
        &self,
        written: impl Iterator<Item = &'a StoredResource>,
    ) -> Result<()> {
        let mut handoff = self.lock_handoff()?;
        for stored in written {
            if handoff.len() >= HANDOFF_LIMIT {
                break;
            }
            let key = (
                stored.resource_type.clone(),
                stored.id.clone(),
                stored.version,
            );
            let mut stored = stored.clone();
            if handoff.len() >= HANDOFF_PARSED_LIMIT {
                stored.drop_parsed();
            }
            handoff.insert(key, stored);
        }
        Ok(())
    }

    fn lock_handoff(&self) -> Result<MutexGuard<'_, Handoff>> {
        self.handoff
            .lock()
            .map_err(|_| Error::Internal("index hand-off lock poisoned".into()))
    }

    /// Brings the index up to everything written so far and commits it (after
    /// [`Database::load_many`], so that the first search does not pay for the catch-up).
    pub fn flush_index(&self) -> Result<()> {
        let _guard = self.lock_writes()?;
        let index_ctx = AccessContext::local("fhirkeep-index");
        self.sync_index_locked(&index_ctx, Visibility::Now)?;
        Ok(())
    }

    fn commit_index(&self) -> Result<()> {
        let mut progress = self.lock_progress()?;
        if progress.uncommitted > 0 {
            self.index.commit(progress.applied)?;
            progress.uncommitted = 0;
            progress.committed = progress.applied;
            progress.last_commit = Some(Instant::now());
        }
        Ok(())
    }

    fn lock_progress(&self) -> Result<MutexGuard<'_, IndexProgress>> {
        self.progress
            .lock()
            .map_err(|_| Error::Internal("index progress lock poisoned".into()))
    }

    /// Conditional create (`If-None-Exist`): creates `resource` unless `condition` (a search
    /// query string for the resource's type, e.g. `identifier=http://x|1`) matches. One match
    /// is returned as is; several are [`Error::MultipleMatches`].
    pub fn conditional_create(
        &self,
        ctx: &AccessContext,
        resource: Value,
        condition: &str,
    ) -> Result<ConditionalOutcome> {
        let resource_type = resource_type_of(&resource)?;
        let guard = self.lock_writes()?;
        match self
            .condition_matches(&resource_type, condition)?
            .as_slice()
        {
            [] => {
                let (created, seq) = self.commit_locked(ctx, |txn| Ok(txn.create(resource)?))?;
                drop(guard);
                self.index_after_write(seq)?;
                Ok(ConditionalOutcome::Created(created))
            }
            [key] => {
                let id = key.split_once('/').map_or(key.as_str(), |(_, id)| id);
                Ok(ConditionalOutcome::Existing(self.store.read(
                    ctx,
                    &resource_type,
                    id,
                )?))
            }
            many => Err(Error::MultipleMatches(many.len())),
        }
    }

    /// Conditional update (`PUT Type?condition`): updates the one match, or creates when
    /// nothing matches (with the resource's own id if it has one). Several matches are
    /// [`Error::MultipleMatches`]; a resource id that differs from the match's is refused.
    /// With `expected_version` (`If-Match`), the match must be at that version (a create
    /// expects version 0).
    pub fn conditional_update(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        condition: &str,
        resource: Value,
        expected_version: Option<u64>,
    ) -> Result<UpdateOutcome> {
        if resource_type_of(&resource)? != resource_type {
            return Err(Error::Unprocessable(
                "the resource type does not match the URL".into(),
            ));
        }
        let body_id = resource.get("id").and_then(Value::as_str).map(String::from);
        let guard = self.lock_writes()?;
        let id = match self.condition_matches(resource_type, condition)?.as_slice() {
            [] => body_id.unwrap_or_else(fhirkeep_engine::resource::new_server_id),
            [key] => {
                let id = key
                    .split_once('/')
                    .map_or(key.as_str(), |(_, id)| id)
                    .to_string();
                if body_id.as_deref().is_some_and(|b| b != id) {
                    return Err(Error::Unprocessable(
                        "the resource id differs from the id of the resource the condition matched"
                            .into(),
                    ));
                }
                id
            }
            many => return Err(Error::MultipleMatches(many.len())),
        };
        let (outcome, seq) = self.commit_locked(ctx, |txn| {
            Ok(txn.update(resource_type, &id, resource, expected_version)?)
        })?;
        drop(guard);
        self.index_after_write(seq)?;
        Ok(outcome)
    }

    /// Conditional delete (`DELETE Type?condition`): deletes the one match; nothing when
    /// nothing matches (returns `None`); several matches are [`Error::MultipleMatches`].
    pub fn conditional_delete(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        condition: &str,
    ) -> Result<Option<DeleteOutcome>> {
        let guard = self.lock_writes()?;
        match self.condition_matches(resource_type, condition)?.as_slice() {
            [] => Ok(None),
            [key] => {
                let id = key
                    .split_once('/')
                    .map_or(key.as_str(), |(_, id)| id)
                    .to_string();
                let (outcome, seq) =
                    self.commit_locked(ctx, |txn| Ok(txn.delete(resource_type, &id, None)?))?;
                drop(guard);
                self.index_after_write(seq)?;
                Ok(Some(outcome))
            }
            many => Err(Error::MultipleMatches(many.len())),
        }
    }

    /// The keys a conditional interaction's condition matches (strict parsing; an empty
    /// condition is refused rather than matching everything). The index is first brought up
    /// to the last committed store change: with group commit, earlier writers may have
    /// returned their write lock before the index holds their change, and a condition
    /// evaluated without them could, for example, create a duplicate for `If-None-Exist`.
    pub(crate) fn condition_matches(
        &self,
        resource_type: &str,
        condition: &str,
    ) -> Result<Vec<String>> {
        let condition = condition.trim_start_matches('?');
        if condition.trim().is_empty() {
            return Err(Error::InvalidSearch(
                "a condition needs at least one parameter".into(),
            ));
        }
        // Writes committed deferred (transaction Bundles waiting for their shared sync) are
        // not in the change feed yet; the condition must see them.
        self.store.wait_all_durable()?;
        self.wait_indexed(self.store.last_change_seq()?)?;
        let request = crate::params::parse_search_url(
            &*self.registry()?,
            &format!("{resource_type}?{condition}"),
            crate::params::Handling::Strict,
        )?;
        if request.criteria.is_empty() {
            return Err(Error::InvalidSearch(
                "a condition needs at least one search criterion".into(),
            ));
        }
        self.matching_keys(&request)
    }

    /// Group commit of single-resource writes: the caller queues its operation and takes the
    /// write lock; whoever holds it applies every queued operation in one store transaction
    /// (each audited under its own caller's context) and commits once, so concurrent writers
    /// share one durable commit (two fsyncs) instead of paying one each. Results are filled in
    /// under the write lock, so once a caller holds the lock its operation either has its
    /// result (an earlier holder took it) or is still queued (and this caller takes it).
    fn grouped(&self, ctx: &AccessContext, op: GroupOp) -> Result<GroupDone> {
        let slot: GroupSlot = Arc::new(Mutex::new(None));
        self.lock_queue()?.push(Pending {
            ctx: ctx.clone(),
            op,
            slot: Arc::clone(&slot),
        });
        let guard = self.lock_writes()?;
        let batch = std::mem::take(&mut *self.lock_queue()?);
        let committed = if batch.is_empty() {
            None
        } else {
            Some(self.commit_group(batch))
        };
        drop(guard);
        if let Some(Some(seq)) = committed {
            self.index_after_write(seq)?;
        }
        let result = slot
            .lock()
            .map_err(|_| Error::Internal("a group commit slot is poisoned".into()))?
            .take();
        result.unwrap_or_else(|| Err(Error::Internal("a write got no result".into())))
    }

    /// Applies `batch` in one store transaction and commits it; every operation's slot gets
    /// its result. Returns the store's last change seq when the commit succeeded.
    fn commit_group(&self, batch: Vec<Pending>) -> Option<u64> {
        let unanswered = UnansweredSlots(batch.iter().map(|p| Arc::clone(&p.slot)).collect());
        let answer = |slot: &GroupSlot, result: Result<GroupDone>| {
            if let Ok(mut place) = slot.lock() {
                *place = Some(result);
            }
        };
        let first_ctx = batch.first().map(|p| p.ctx.clone())?;
        let mut txn = match self.store.begin_write(&first_ctx) {
            Ok(txn) => txn,
            Err(error) => {
                let message = error.to_string();
                for pending in &batch {
                    answer(&pending.slot, Err(shared_failure(&message)));
                }
                return None;
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        for Pending { ctx, op, slot } in batch {
            txn.set_context(ctx);
            let result = match op {
                GroupOp::Create(resource) => txn.create(resource).map(GroupDone::Created),
                GroupOp::Update {
                    resource_type,
                    id,
                    resource,
                    expected_version,
                } => txn
                    .update(&resource_type, &id, resource, expected_version)
                    .map(GroupDone::Updated),
                GroupOp::Delete {
                    resource_type,
                    id,
                    expected_version,
                } => txn
                    .delete(&resource_type, &id, expected_version)
                    .map(GroupDone::Deleted),
            };
            results.push((slot, result.map_err(Error::from)));
        }
        let wrote = txn.write_count() > 0;
        match txn.commit() {
            Ok(()) => {
                for (slot, result) in results {
                    answer(&slot, result);
                }
            }
            Err(error) => {
                // Nothing of the group is stored: every operation that would have written
                // fails with the commit's error; refusals keep their own answer.
                let message = error.to_string();
                for (slot, result) in results {
                    answer(&slot, result.and_then(|_| Err(shared_failure(&message))));
                }
                return None;
            }
        }
        drop(unanswered);
        if !wrote {
            return None;
        }
        self.store.last_change_seq().ok()
    }

    fn lock_queue(&self) -> Result<MutexGuard<'_, Vec<Pending>>> {
        self.queue
            .lock()
            .map_err(|_| Error::Internal("group commit queue poisoned".into()))
    }

    /// Runs `body` in one store write transaction (all or nothing), then brings the index in
    /// line. The closure must not call other write methods of this database.
    pub fn write<T>(
        &self,
        ctx: &AccessContext,
        body: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>,
    ) -> Result<T> {
        let guard = self.lock_writes()?;
        let (value, seq) = self.commit_locked(ctx, body)?;
        // The next writer's store commit can start while this one indexes.
        drop(guard);
        self.index_after_write(seq)?;
        Ok(value)
    }

    /// Marks a transaction Bundle as in flight until the returned guard leaves (or drops).
    pub(crate) fn enter_in_flight(&self) -> Result<InFlight<'_>> {
        let mut set = self
            .syncing
            .0
            .lock()
            .map_err(|_| Error::Internal("sync lock poisoned".into()))?;
        let entry = set.next;
        set.next += 1;
        set.entries.insert(entry);
        Ok(InFlight {
            database: self,
            entry,
            left: false,
        })
    }

    /// Makes a deferred commit durable, sharing the disk sync with the other transaction
    /// Bundles: waits (at most [`SHARED_SYNC_WAIT`]) until every Bundle that was in flight
    /// when this one committed has committed too, then syncs once for all of them, unless a
    /// sync covering this commit came first. Bundles arriving later do not prolong the wait.
    ///
    /// Why: redb holds its writer lock through a sync, so no commit overlaps one; with a sync
    /// per Bundle, small Bundles from several clients are bound by the disk, not the CPU.
    pub(crate) fn sync_shared(&self, ticket: DurableTicket) -> Result<()> {
        let (set, signal) = &self.syncing;
        let last_sync = Duration::from_micros(
            self.last_sync_micros
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let deadline = Instant::now() + SHARED_SYNC_WAIT.min(last_sync);
        {
            let mut set = set
                .lock()
                .map_err(|_| Error::Internal("sync lock poisoned".into()))?;
            let wait_for = set.entries.last().copied();
            loop {
                if self.store.last_change_seq()? >= ticket.seq() {
                    return Ok(());
                }
                let now = Instant::now();
                let others_ahead = wait_for
                    .is_some_and(|last| set.entries.first().is_some_and(|first| *first <= last));
                if !others_ahead || now >= deadline {
                    break;
                }
                set = signal
                    .wait_timeout(set, deadline - now)
                    .map_err(|_| Error::Internal("sync lock poisoned".into()))?
                    .0;
            }
        }
        let started = Instant::now();
        self.store.wait_durable(ticket)?;
        self.last_sync_micros.store(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        signal.notify_all();
        Ok(())
    }

    /// Runs `body` in one store write transaction and commits it, without touching the index;
    /// the caller holds the write lock and then calls [`Database::wait_indexed`] with the
    /// returned store change sequence (after releasing the write lock, for group commit).
    pub(crate) fn commit_locked<T>(
        &self,
        ctx: &AccessContext,
        body: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>,
    ) -> Result<(T, u64)> {
        let (value, txn) = self.run_in_txn(ctx, body)?;
        txn.commit()?;
        // Under the write lock no other write commits, so this is this write's last change
        // (or an earlier one if it changed nothing).
        let seq = self.store.last_change_seq()?;
        Ok((value, seq))
    }

    /// Like [`Database::commit_locked`], committing deferred: the caller lets go of the write
    /// lock, then waits for the ticket ([`fhirkeep_engine::store::Store::wait_durable`]) before
    /// answering, so that concurrent writers share disk syncs.
    pub(crate) fn commit_locked_deferred<T>(
        &self,
        ctx: &AccessContext,
        body: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>,
    ) -> Result<(T, DurableTicket)> {
        let (value, txn) = self.run_in_txn(ctx, body)?;
        Ok((value, txn.commit_deferred()?))
    }

    /// Runs `body` in a new store write transaction, aborting it if `body` fails.
    fn run_in_txn<T>(
        &self,
        ctx: &AccessContext,
        body: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>,
    ) -> Result<(T, WriteTxn<'_>)> {
        let mut txn = self.store.begin_write(ctx)?;
        match body(&mut txn) {
            Ok(value) => Ok((value, txn)),
            Err(e) => {
                txn.abort()?;
                Err(e)
            }
        }
    }

    /// After a write's store commit (which made it durable): puts the changes committed so far
    /// into the index writer, committing the index only when due ([`Visibility::Deferred`]).
    /// When another thread holds the index, it, the next write or the next search puts this
    /// change (every one of them catches up with everything committed), so the writer does not
    /// queue behind it. An index failure here is repaired by the next catch-up.
    pub(crate) fn index_after_write(&self, seq: u64) -> Result<()> {
        if seq == 0 {
            return Ok(());
        }
        let _index = match self.index_lock.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => return Ok(()),
            Err(TryLockError::Poisoned(_)) => {
                return Err(Error::Internal("index lock poisoned".into()));
            }
        };
        let progress = *self.lock_progress()?;
        if progress
            .applied
            .or(progress.committed)
            .is_some_and(|done| done >= seq)
            && !progress.commit_due(Visibility::Deferred)
        {
            return Ok(());
        }
        let index_ctx = AccessContext::local("fhirkeep-index");
        self.sync_index_held(&index_ctx, Visibility::Deferred)?;
        Ok(())
    }

    /// A searcher over an index commit that holds every store change committed before this
    /// call (read-your-writes for searches), committing the index first if needed.
    pub(crate) fn current_searcher(&self) -> Result<tantivy::Searcher> {
        self.wait_indexed(self.store.last_change_seq()?)?;
        Ok(self.index.searcher())
    }

    /// Returns once the committed index holds every store change up to `seq`: the first
    /// caller to get the index lock catches up with everything committed so far and commits
    /// the index once for all; callers it covered return without index work.
    pub(crate) fn wait_indexed(&self, seq: u64) -> Result<()> {
        if seq == 0 {
            return Ok(());
        }
        let _index = self.lock_index()?;
        if self
            .lock_progress()?
            .committed
            .is_some_and(|done| done >= seq)
        {
            return Ok(());
        }
        let index_ctx = AccessContext::local("fhirkeep-index");
        self.sync_index_held(&index_ctx, Visibility::Now)?;
        Ok(())
    }

    /// What the committed index holds right now, without catching it up (a search would).
    pub fn index_stats(&self) -> Result<IndexStats> {
        let searcher = self.index.searcher();
        Ok(IndexStats {
            documents: searcher.num_docs(),
            segments: searcher.segment_readers().len(),
            committed_seq: self.lock_progress()?.committed,
        })
    }

    /// Brings the index in line with the store (normally automatic).
    pub fn sync_index(&self, ctx: &AccessContext) -> Result<SyncReport> {
        let _guard = self.lock_writes()?;
        self.sync_index_locked(ctx, Visibility::Now)
    }

    /// Rebuilds the index from scratch from the store.
    pub fn reindex(&self, ctx: &AccessContext) -> Result<SyncReport> {
        // Every stored SearchParameter is known before the first resource is indexed again,
        // so old resources get the parameters added after them.
        self.load_custom_parameters(ctx)?;
        let _guard = self.lock_writes()?;
        let _index = self.lock_index()?;
        self.index.clear()?;
        self.index.commit(None)?;
        *self.lock_progress()? = IndexProgress::default();
        self.sync_index_held(ctx, Visibility::Now)
    }

    /// Catches the index up under the index lock.
    fn sync_index_locked(&self, ctx: &AccessContext, visibility: Visibility) -> Result<SyncReport> {
        let _index = self.lock_index()?;
        self.sync_index_held(ctx, visibility)
    }

    /// Catches the index up; the caller holds the index lock.
    fn sync_index_held(&self, ctx: &AccessContext, visibility: Visibility) -> Result<SyncReport> {
        let result = self.catch_up(ctx, visibility);
        if result.is_err() {
            // Drop what the writer holds; the next catch-up starts again from the last commit.
            self.index.rollback()?;
            *self.lock_progress()? = IndexProgress::default();
        }
        result
    }

    fn catch_up(&self, ctx: &AccessContext, visibility: Visibility) -> Result<SyncReport> {
        // An index of another schema never gets here: opening refuses it, and it is rebuilt.
        let state = self.index.state()?;
        let mut progress = *self.lock_progress()?;
        let mut after = progress.applied.or(state.store_seq);
        let mut report = SyncReport::default();
        // Asking for the last seq first is not audited and saves a feed read (and its audit
        // leaf) when the index is already in line.
        let mut more = self.store.last_change_seq()? > after.unwrap_or(0);
        // Taken whole: what this catch-up does not use was indexed already (or is read back).
        let mut handed = std::mem::take(&mut *self.lock_handoff()?);
        while more {
            let page = self
                .store
                .changes_after_except(ctx, after, SYNC_BATCH, |t, id, v| {
                    handed.contains_key(&(t.to_owned(), id.to_owned(), v))
                })?;
            more = page.more;
            if page.changes.is_empty() {
                break;
            }
            let changes = page
                .changes
                .into_iter()
                .map(|(seq, item)| match item {
                    FeedItem::Read(stored) => Ok((seq, stored)),
                    FeedItem::Known(key) => handed
                        .remove(&(key.resource_type, key.id, key.version))
                        .map(|stored| (seq, stored))
                        .ok_or_else(|| Error::Internal("a handed-off version is missing".into())),
                })
                .collect::<Result<Vec<_>>>()?;
            let last_seq = changes.last().map(|(seq, _)| *seq);
            // A stored SearchParameter is in effect for itself and every later change, so
            // the page is cut into runs that each start with one and share a registry.
            let mut rest = changes;
            while let Some(first) = rest.first() {
                let run_len = 1 + rest[1..]
                    .iter()
                    .position(|(_, stored)| is_search_parameter(stored))
                    .unwrap_or(rest.len() - 1);
                if is_search_parameter(&first.1) {
                    self.add_parameter(&first.1.to_json()?);
                }
                let tail = rest.split_off(run_len);
                let run = std::mem::replace(&mut rest, tail);
                let run_len = run.len();
                let registry = self.registry()?;
                // Each version is consumed where it is indexed, so that the (large) parsed
                // resources are freed in parallel rather than by this thread afterwards.
                let extract_run = || {
                    run.into_par_iter()
                        .map(|(_, stored)| self.document_change(&registry, stored))
                        .collect::<Result<Vec<_>>>()
                };
                let prepared = match crate::priority::index_pool() {
                    Some(pool) => pool.install(extract_run),
                    None => extract_run(),
                }?;
                drop(registry);
                report.expression_failures += prepared.iter().map(|(_, f)| *f).sum::<u64>();
                self.index
                    .apply(prepared.into_iter().map(|(change, _)| change))?;
                report.changes += run_len as u64;
                progress.uncommitted += run_len;
            }
            after = last_seq.or(after);
            progress.applied = after;
            *self.lock_progress()? = progress;
            // A long catch-up commits on the way as a deferred one would (a bulk load's only
            // by count), so that a crash in the middle leaves less to redo.
            let on_the_way = match visibility {
                Visibility::Bulk => Visibility::Bulk,
                Visibility::Now | Visibility::Deferred => Visibility::Deferred,
            };
            if progress.commit_due(on_the_way) {
                self.commit_index()?;
                progress = *self.lock_progress()?;
            }
        }
        if progress.commit_due(visibility) {
            self.commit_index()?;
            // Everything up to `after` is put and now committed.
            self.lock_progress()?.committed = after;
        }
        Ok(report)
    }

    /// The index change for one stored version, with the number of parameters whose
    /// expression failed on it. Runs on any thread.
    fn document_change(
        &self,
        registry: &Registry,
        stored: StoredResource,
    ) -> Result<(DocumentChange, u64)> {
        let key = format!("{}/{}", stored.resource_type, stored.id);
        let replaces = stored.version > 1;
        if stored.is_deleted() {
            return Ok((
                DocumentChange {
                    key,
                    replaces: true,
                    document: None,
                },
                0,
            ));
        }
        let json = stored.shared_json()?;
        let (entries, failures) = extract(registry, &stored.resource_type, &json);
        drop(json);
        let document = self.index.document(&key, &stored.resource_type, &entries);
        drop(stored);
        Ok((
            DocumentChange {
                key,
                replaces,
                document: Some(document),
            },
            failures as u64,
        ))
    }

    fn add_parameter(&self, definition: &Value) {
        if definition.get("status").and_then(Value::as_str) == Some("retired") {
            return;
        }
        if let Ok(mut registry) = self.registry.write()
            && let Err(e) = registry.add_definition(definition)
        {
            // The definition is stored as given; it just does not take part in search.
            tracing::warn!(error = %e, "a stored SearchParameter cannot be used for search");
        }
    }

    /// Learns every stored SearchParameter (from the store, not the index, so that it works
    /// before the index is built).
    fn load_custom_parameters(&self, ctx: &AccessContext) -> Result<()> {
        let mut query = fhirkeep_engine::store::HistoryQuery {
            count: Some(1_000),
            ..Default::default()
        };
        let mut seen = std::collections::HashSet::new();
        loop {
            let page = self.store.history_type(ctx, "SearchParameter", &query)?;
            // Newest first: the first version seen of each id is its current one.
            for stored in &page.entries {
                if seen.insert(stored.id.clone()) && !stored.is_deleted() {
                    self.add_parameter(&stored.to_json()?);
                }
            }
            match page.next {
                Some(cursor) => query.cursor = Some(cursor),
                None => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(uncommitted: usize, since_commit: Duration) -> IndexProgress {
        IndexProgress {
            uncommitted,
            last_commit: Instant::now().checked_sub(since_commit),
            ..IndexProgress::default()
        }
    }

    #[test]
    fn a_bulk_load_commits_by_count_and_other_writes_also_by_the_clock() {
        let fresh = progress(1_000, Duration::ZERO);
        let stale = progress(1_000, COMMIT_INTERVAL + Duration::from_secs(1));
        let many = progress(DEFERRED_COMMIT_EVERY, Duration::ZERO);
        let none = progress(0, COMMIT_INTERVAL + Duration::from_secs(1));
        assert!(!fresh.commit_due(Visibility::Deferred));
        assert!(stale.commit_due(Visibility::Deferred));
        assert!(many.commit_due(Visibility::Deferred));
        assert!(!none.commit_due(Visibility::Deferred));
        assert!(!fresh.commit_due(Visibility::Bulk));
        assert!(!stale.commit_due(Visibility::Bulk));
        assert!(many.commit_due(Visibility::Bulk));
        for made_visible in [fresh, stale, many, none] {
            assert!(made_visible.commit_due(Visibility::Now));
        }
    }
}
