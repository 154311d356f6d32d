//! Write transactions: several creates, updates and deletes that commit atomically.

use redb::ReadableTable;
use serde_json::Value;

use super::pending::{NewPending, PendingIndex, PendingVersion, SharedPending};
use super::record::META;
use super::record::{
    BODIES, CHANGES, Change, EncodedVersion, MAX_BODY, PendingRecord, TYPE_CHANGES, VERSIONS,
    VersionKind, VersionRecord, encode_record, set_record_change_seq,
};
use super::{
    AccessContext, Lookup, Store, StoredResource, VersionSources, find_version, format_instant,
    micros_to_datetime, outcome_of,
};
use crate::audit::{AuditAction, AuditRecord};
use crate::resource::{check_id, check_resource_type, inspect, stamp};
use crate::{Error, Result};

/// The result of an update.
#[derive(Debug, Clone)]
pub struct UpdateOutcome {
    /// The version written.
    pub resource: StoredResource,
    /// True when the update created the resource (update-as-create, or re-creation after delete).
    pub created: bool,
}

/// The result of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// Version id of the tombstone.
    pub version: u64,
    /// True when the resource was already deleted (no new version was written).
    pub already_deleted: bool,
}

/// A write transaction. Nothing is visible to others, nor durable, until [`WriteTxn::commit`];
/// dropping it aborts every write in it (and their audit leaves).
pub struct WriteTxn<'s> {
    store: &'s Store,
    txn: redb::WriteTransaction,
    ctx: AccessContext,
    next_change: u64,
    last_micros: i64,
    writes: usize,
    write_leaves: Vec<AuditRecord>,
    /// The last change seq committed before this transaction began.
    committed_through: u64,
    /// The `merged_through` of the state this transaction began from (`pending.rs`).
    merged_through: u64,
    /// This transaction's own pending versions, which the shared cache gets at commit.
    own_pending: PendingIndex,
    new_pending: Vec<NewPending>,
}

impl std::fmt::Debug for WriteTxn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTxn")
            .field("writes", &self.writes)
            .finish_non_exhaustive()
    }
}

impl<'s> WriteTxn<'s> {
    pub(super) fn begin(store: &'s Store, ctx: AccessContext) -> Result<Self> {
        let txn = store.inner.begin_write_txn()?;
        let committed_through = {
            let changes = txn.open_table(CHANGES)?;
            changes.last()?.map_or(0, |(key, _)| key.value())
        };
        let merged_through = super::pending::merged_through(&txn.open_table(META)?)?;
        Ok(WriteTxn {
            store,
            txn,
            ctx,
            next_change: committed_through + 1,
            last_micros: 0,
            writes: 0,
            write_leaves: Vec::new(),
            committed_through,
            merged_through,
            own_pending: PendingIndex::default(),
            new_pending: Vec::new(),
        })
    }

    /// Creates a resource with a new random id (any `id` in the body is replaced).
    pub fn create(&mut self, resource: Value) -> Result<StoredResource> {
        let result = self.create_inner(resource);
        self.audit_failure(AuditAction::Create, &result, None)?;
        result
    }

    fn create_inner(&mut self, resource: Value) -> Result<StoredResource> {
        let resource_type = inspect(&resource)?.resource_type.to_owned();
        let item = Upsert {
            resource_type,
            id: None,
            resource,
            expected_version: None,
        };
        let plan = self.plan(item, &std::collections::HashMap::new())?;
        Ok(self.write_plan(plan)?.resource)
    }

    /// Updates a resource, or creates it with the caller's id when it does not exist.
    ///
    /// With `expected_version`, the write happens only if that is the current version
    /// (otherwise [`Error::VersionConflict`]; for a resource that does not exist the current
    /// version is reported as 0).
    pub fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<u64>,
    ) -> Result<UpdateOutcome> {
        let result = self.update_inner(resource_type, id, resource, expected_version);
        let target = Some((resource_type, id));
        self.audit_failure(AuditAction::Update, &result, target)?;
        result
    }

    fn update_inner(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<u64>,
    ) -> Result<UpdateOutcome> {
        let item = Upsert {
            resource_type: resource_type.to_owned(),
            id: Some(id.to_owned()),
            resource,
            expected_version,
        };
        let plan = self.plan(item, &std::collections::HashMap::new())?;
        self.write_plan(plan)
    }

    /// Prepares and inserts one planned version (the single-resource path).
    fn write_plan(&mut self, mut plan: Plan) -> Result<UpdateOutcome> {
        let prepared = plan.prepare()?;
        let stored = self.insert_prepared(prepared, plan.action)?;
        Ok(UpdateOutcome {
            resource: stored,
            created: plan.created,
        })
    }

    /// Deletes a resource (a tombstone version; history keeps every earlier version).
    pub fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<DeleteOutcome> {
        let result = self.delete_inner(resource_type, id, expected_version);
        self.audit_failure(AuditAction::Delete, &result, Some((resource_type, id)))?;
        result
    }

    fn delete_inner(
        &mut self,
        resource_type: &str,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<DeleteOutcome> {
        check_resource_type(resource_type)?;
        check_id(id)?;
        let (current, deleted) = self
            .current_version(resource_type, id)?
            .ok_or(Error::NotFound)?;
        if let Some(expected) = expected_version
            && expected != current
        {
            return Err(Error::VersionConflict { expected, current });
        }
        if deleted {
            // Nothing is written, but the request is on record.
            let outcome: Result<()> = Err(Error::Gone { version: current });
            self.buffer_leaf(
                AuditAction::Delete,
                &outcome,
                Some((resource_type, id)),
                |_| Some((current, [0; 32])),
            );
            return Ok(DeleteOutcome {
                version: current,
                already_deleted: true,
            });
        }
        let stored = self.put(
            resource_type,
            id,
            current + 1,
            VersionKind::Deleted,
            None,
            AuditAction::Delete,
        )?;
        Ok(DeleteOutcome {
            version: stored.version,
            already_deleted: false,
        })
    }

    /// Reads the current version as this transaction sees it (including its own writes).
    /// The read is audited like any other, whether or not the transaction commits.
    pub fn read(&self, resource_type: &str, id: &str) -> Result<StoredResource> {
        let result = self.read_inner(resource_type, id);
        self.buffer_leaf(AuditAction::Read, &result, Some((resource_type, id)), |r| {
            r.as_ref().ok().map(|s| (s.version, s.content_hash))
        });
        result
    }

    fn read_inner(&self, resource_type: &str, id: &str) -> Result<StoredResource> {
        check_resource_type(resource_type)?;
        check_id(id)?;
        let stored = self.current(resource_type, id)?.ok_or(Error::NotFound)?;
        if stored.is_deleted() {
            return Err(Error::Gone {
                version: stored.version,
            });
        }
        Ok(stored)
    }

    fn current(&self, resource_type: &str, id: &str) -> Result<Option<StoredResource>> {
        let versions = self.txn.open_table(VERSIONS)?;
        let bodies = self.txn.open_table(BODIES)?;
        let pending = self.pending_versions(resource_type, id);
        let sources = VersionSources {
            versions: &versions,
            bodies: &bodies,
            pending: &pending,
        };
        Ok(find_version(&sources, resource_type, id, Lookup::Current)?.map(|(_, s)| s))
    }

    /// The pending versions of `Type/id` this transaction sees: committed before it began
    /// and not merged, and its own. Oldest first.
    fn pending_versions(&self, resource_type: &str, id: &str) -> Vec<PendingVersion> {
        let mut pending = SharedPending::candidates_for_writer(
            &self.store.inner.pending,
            resource_type,
            id,
            self.merged_through,
            self.committed_through,
        );
        if !self.own_pending.is_empty() {
            pending.extend(self.own_pending.candidates(resource_type, id, 0, u64::MAX));
        }
        pending
    }

    /// `current`, the newest version in `versions` and whether it is a deletion, with the
    /// resource's pending versions: the newest of all. A pending version is never a deletion
    /// (a tombstone has no body, and goes to `versions` at once).
    fn with_pending(
        &self,
        resource_type: &str,
        id: &str,
        current: Option<(u64, bool)>,
    ) -> Option<(u64, bool)> {
        let newest_pending = self.pending_versions(resource_type, id).last().copied();
        match (current, newest_pending) {
            (Some((version, _)), Some(pending)) if pending.version > version => {
                Some((pending.version, false))
            }
            (None, Some(pending)) => Some((pending.version, false)),
            (current, _) => current,
        }
    }

    /// The current version id and whether it is a deletion, as this transaction sees it:
    /// from the record alone, without its body (what version decisions need).
    fn current_version(&self, resource_type: &str, id: &str) -> Result<Option<(u64, bool)>> {
        let versions = self.txn.open_table(VERSIONS)?;
        let mut range = versions.range((resource_type, id, 0)..=(resource_type, id, u64::MAX))?;
        let stored = match range.next_back() {
            Some(entry) => {
                let (key, value) = entry?;
                let record = VersionRecord::decode(value.value())?;
                Some((key.value().2, record.kind == VersionKind::Deleted))
            }
            None => None,
        };
        Ok(self.with_pending(resource_type, id, stored))
    }

    /// The current version of `Type/id` (as [`WriteTxn::current_version`]) and whether its
    /// next version lands among dense keys, from one descent of `versions` in the common
    /// cases (a new id, or one with a few versions).
    ///
    /// Where the key lands decides where the body goes (record.rs says why). After every key
    /// of its type, or among ids that share a long prefix with it (sequential ids written
    /// about in order), inserts keep hitting the same few leaves: the body stays inline, where
    /// a read finds it with one look-up. Anything else (random ids) lands in a random leaf,
    /// which stays small with the body in `bodies`.
    fn locate(&self, resource_type: &str, id: &str) -> Result<Located> {
        // Versions walked forward before a resource counts as long-lived and is looked up
        // from its end instead.
        const WALK: usize = 8;
        let versions = self.txn.open_table(VERSIONS)?;
        let mut range = versions.range((resource_type, id, 0)..)?;
        let mut current = None;
        for _ in 0..WALK {
            let Some(entry) = range.next() else {
                // Nothing sorts after this id: it appends.
                return Ok(Located {
                    current: self.with_pending(resource_type, id, current),
                    dense: true,
                });
            };
            let (key, value) = entry?;
            let (next_type, next_id, version) = key.value();
            if next_type != resource_type || next_id != id {
                return Ok(Located {
                    current: self.with_pending(resource_type, id, current),
                    dense: is_dense_neighbour(resource_type, id, next_type, next_id),
                });
            }
            let record = VersionRecord::decode(value.value())?;
            current = Some((version, record.kind == VersionKind::Deleted));
        }
        drop(range);
        drop(versions);
        // Includes the pending versions.
        let current = self.current_version(resource_type, id)?;
        let versions = self.txn.open_table(VERSIONS)?;
        let after_last = (
            std::ops::Bound::Excluded((resource_type, id, u64::MAX)),
            std::ops::Bound::Unbounded,
        );
        let dense = match versions.range(after_last)?.next() {
            None => true,
            Some(next) => {
                let (next_key, _) = next?;
                let (next_type, next_id, _) = next_key.value();
                is_dense_neighbour(resource_type, id, next_type, next_id)
            }
        };
        Ok(Located { current, dense })
    }

    /// Writes one version, its change rows and its audit leaf.
    fn put(
        &mut self,
        resource_type: &str,
        id: &str,
        version: u64,
        kind: VersionKind,
        resource: Option<Value>,
        action: AuditAction,
    ) -> Result<StoredResource> {
        let micros = self.store.inner.tick();
        let prepared = prepare(resource_type, id, version, kind, micros, resource)?;
        self.insert_prepared(prepared, action)
    }

    /// Inserts a prepared version with its change rows, and queues its audit leaf.
    fn insert_prepared(
        &mut self,
        prepared: Prepared,
        action: AuditAction,
    ) -> Result<StoredResource> {
        let mut versions = self.txn.open_table(VERSIONS)?;
        let mut bodies = self.txn.open_table(BODIES)?;
        let mut changes = self.txn.open_table(CHANGES)?;
        let mut type_changes = self.txn.open_table(TYPE_CHANGES)?;
        let mut tables = Tables {
            versions: &mut versions,
            bodies: &mut bodies,
            changes: &mut changes,
            type_changes: &mut type_changes,
        };
        let (stored, pending) = insert_into(&mut tables, self.next_change, prepared)?;
        drop((versions, bodies, changes, type_changes));
        self.record_written(&stored, action, pending);
        Ok(stored)
    }

    /// Queues the leaf of a written version and advances the transaction's counters.
    fn record_written(&mut self, stored: &StoredResource, action: AuditAction, pending: bool) {
        if pending {
            let version = PendingVersion {
                version: stored.version,
                seq: self.next_change,
                last_updated_micros: stored.last_updated.timestamp_micros(),
                record: PendingRecord {
                    kind: stored.kind,
                    content_hash: stored.content_hash,
                },
            };
            self.own_pending
                .insert(&stored.resource_type, &stored.id, version);
            self.new_pending.push(NewPending {
                resource_type: stored.resource_type.clone(),
                id: stored.id.clone(),
                pending: version,
            });
        }
        // The leaf joins this transaction at commit (one batch append); it is never separated
        // from its write: both commit, or both vanish with an abort.
        self.write_leaves.push(AuditRecord {
            time_micros: stored.last_updated.timestamp_micros(),
            actor: self.ctx.actor(),
            request_id: self.ctx.request_id.clone(),
            action,
            resource_type: Some(stored.resource_type.clone()),
            id: Some(stored.id.clone()),
            version: Some(stored.version),
            outcome: crate::audit::AuditOutcome::Success,
            content_hash: Some(stored.content_hash),
            query_hash: None,
        });
        self.next_change += 1;
        self.last_micros = stored.last_updated.timestamp_micros();
        self.writes += 1;
    }

    /// Creates or updates many resources in one go: validation and version decisions in
    /// order, the CPU-heavy part (stamping, serializing, hashing, compressing) on helper
    /// threads while the decisions and the inserts go on, then the inserts in order. Each
    /// item gets its own result, exactly as [`WriteTxn::update`] (or [`WriteTxn::create`] for
    /// an item without an id) would give it; a refused item writes nothing. An `Err` of the
    /// whole call is a storage failure: abort the transaction.
    pub fn update_many(&mut self, items: Vec<Upsert>) -> Result<Vec<Result<UpdateOutcome>>> {
        let helpers = preparing_helpers(items.len());
        let mut results: Vec<Option<Result<UpdateOutcome>>> = Vec::with_capacity(items.len());
        let mut written = Vec::with_capacity(items.len());
        // Plans travel to whoever prepares them first: a helper, or this thread when it would
        // otherwise wait for an insert's turn. Why a pipeline: the decisions and the inserts
        // are B-tree work that must stay on this thread, in order; preparing is as much work
        // again and needs neither, so on two cores both halves run side by side.
        let (plan_sender, plan_receiver) = std::sync::mpsc::channel::<(usize, Plan)>();
        let (done_sender, done_receiver) = std::sync::mpsc::channel::<PreparedItem>();
        let queue = std::sync::Mutex::new(plan_receiver);
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..helpers)
                .map(|_| {
                    let done_sender = done_sender.clone();
                    let queue = &queue;
                    scope.spawn(move || {
                        while let Some(job) = next_plan(queue, true) {
                            if done_sender.send(prepare_item(job)).is_err() {
                                break;
                            }
                        }
                    })
                })
                .collect();
            drop(done_sender);

            // Versions decided earlier in this batch, which the table does not show yet.
            let mut decided: std::collections::HashMap<(String, String), (u64, bool)> =
                std::collections::HashMap::new();
            // Item index of each plan, in plan order (the order of the inserts).
            let mut planned_items = Vec::with_capacity(items.len());
            for item in items {
                let index = results.len();
                results.push(None);
                let target = (item.resource_type.clone(), item.id.clone());
                match self.plan(item, &decided) {
                    Ok(plan) => {
                        decided.insert(
                            (plan.resource_type.clone(), plan.id.clone()),
                            (plan.version, plan.body_inline),
                        );
                        // Cannot fail: the receiver lives in `queue` until this call ends.
                        let _ = plan_sender.send((planned_items.len(), plan));
                        planned_items.push(index);
                    }
                    Err(error) => {
                        let error: Result<UpdateOutcome> = Err(error);
                        let (resource_type, id) = &target;
                        let action = if id.is_some() {
                            AuditAction::Update
                        } else {
                            AuditAction::Create
                        };
                        let named = id.as_deref().map(|id| (resource_type.as_str(), id));
                        self.buffer_leaf(action, &error, named, |r| match r {
                            Err(Error::VersionConflict { current, .. }) => {
                                Some((*current, [0; 32]))
                            }
                            _ => None,
                        });
                        results[index] = Some(error);
                    }
                }
            }
            drop(plan_sender);

            let mut insert_in_order = || -> Result<()> {
                let mut versions = self.txn.open_table(VERSIONS)?;
                let mut bodies = self.txn.open_table(BODIES)?;
                let mut changes = self.txn.open_table(CHANGES)?;
                let mut type_changes = self.txn.open_table(TYPE_CHANGES)?;
                let mut ready: Vec<Option<PreparedItem>> =
                    (0..planned_items.len()).map(|_| None).collect();
                for (turn, &index) in planned_items.iter().enumerate() {
                    let Some(item) = wait_for_turn(turn, &mut ready, &queue, &done_receiver) else {
                        // Only a helper that panicked loses an item; it is reported, not written.
                        results[index] =
                            Some(Err(Error::Storage("batch item was not processed".into())));
                        continue;
                    };
                    match item.prepared {
                        Ok(prepared) => {
                            let mut tables = Tables {
                                versions: &mut versions,
                                bodies: &mut bodies,
                                changes: &mut changes,
                                type_changes: &mut type_changes,
                            };
                            let (stored, pending) = insert_into(
                                &mut tables,
                                self.next_change + written.len() as u64,
                                prepared,
                            )?;
                            written.push((index, item.action, item.created, stored, pending));
                        }
                        Err(error) => {
                            // Refused while prepared (too large): on record like any refusal.
                            let error: Result<UpdateOutcome> = Err(error);
                            let (resource_type, id) = &item.target;
                            self.buffer_leaf(
                                item.action,
                                &error,
                                Some((resource_type, id)),
                                |_| None,
                            );
                            results[index] = Some(error);
                        }
                    }
                }
                Ok(())
            };
            let inserted = insert_in_order();
            for worker in workers {
                // Preparing never panics on any input; if a helper did, its item was
                // reported above rather than taking the process down.
                let _ = worker.join();
            }
            inserted
        })?;
        for (index, action, created, stored, pending) in written {
            self.record_written(&stored, action, pending);
            results[index] = Some(Ok(UpdateOutcome {
                resource: stored,
                created,
            }));
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Error::Storage("batch item was not processed".into())))
            })
            .collect())
    }

    /// Validates one batch item and decides its version, kind and timestamp.
    fn plan(
        &mut self,
        item: Upsert,
        decided: &std::collections::HashMap<(String, String), (u64, bool)>,
    ) -> Result<Plan> {
        let Upsert {
            resource_type,
            id,
            resource,
            expected_version,
        } = item;
        let Some(id) = id else {
            let head = inspect(&resource)?;
            if head.resource_type != resource_type {
                return Err(Error::InvalidResource(
                    "resourceType in the body does not match the type being created".into(),
                ));
            }
            return Ok(Plan {
                resource_type,
                id: crate::resource::new_server_id(),
                version: 1,
                kind: VersionKind::Created,
                action: AuditAction::Create,
                created: true,
                micros: self.store.inner.tick(),
                // New server ids are time-ordered: they append to their type.
                body_inline: true,
                resource,
            });
        };
        validate_update(&resource_type, &id, &resource)?;
        let (current_version, deleted, body_inline) =
            match decided.get(&(resource_type.clone(), id.clone())) {
                Some(&(version, body_inline)) => (version, false, body_inline),
                None => {
                    let located = self.locate(&resource_type, &id)?;
                    let (version, deleted) = located.current.unwrap_or((0, false));
                    (version, deleted, located.dense)
                }
            };
        if let Some(expected) = expected_version
            && expected != current_version
        {
            return Err(Error::VersionConflict {
                expected,
                current: current_version,
            });
        }
        let created = current_version == 0 || deleted;
        Ok(Plan {
            resource_type,
            id,
            version: current_version + 1,
            kind: if created {
                VersionKind::CreatedWithId
            } else {
                VersionKind::Updated
            },
            action: if created {
                AuditAction::Create
            } else {
                AuditAction::Update
            },
            created,
            micros: self.store.inner.tick(),
            body_inline,
            resource,
        })
    }

    /// A refused write is audited outside this transaction, so the record survives an abort.
    fn audit_failure<T>(
        &self,
        action: AuditAction,
        result: &Result<T>,
        target: Option<(&str, &str)>,
    ) -> Result<()> {
        if result.is_ok() {
            return Ok(());
        }
        self.buffer_leaf(action, result, target, |r| match r {
            Err(Error::VersionConflict { current, .. }) => Some((*current, [0; 32])),
            _ => None,
        });
        Ok(())
    }

    /// Queues a leaf that must not depend on this transaction committing (reads, refusals).
    fn buffer_leaf<T>(
        &self,
        action: AuditAction,
        result: &Result<T>,
        target: Option<(&str, &str)>,
        version_of: impl FnOnce(&Result<T>) -> Option<(u64, [u8; 32])>,
    ) {
        let (resource_type, id) = match target {
            Some((t, i))
                if crate::resource::is_resource_type(t) && crate::resource::is_valid_id(i) =>
            {
                (Some(t.to_owned()), Some(i.to_owned()))
            }
            _ => (None, None),
        };
        let found = version_of(result);
        self.store.inner.buffer_leaf(AuditRecord {
            time_micros: super::now_micros(),
            actor: self.ctx.actor(),
            request_id: self.ctx.request_id.clone(),
            action,
            resource_type,
            id,
            version: found.map(|(v, _)| v),
            outcome: outcome_of(result),
            content_hash: found.map(|(_, h)| h).filter(|h| *h != [0; 32]),
            query_hash: None,
        });
    }

    /// Records the operations that follow as made by `ctx`: several callers' single writes
    /// may share one transaction (a group commit, one durable commit for all), and each
    /// audit leaf names the caller whose operation it records.
    pub fn set_context(&mut self, ctx: AccessContext) {
        self.ctx = ctx;
    }

    /// Number of versions written so far in this transaction.
    pub fn write_count(&self) -> usize {
        self.writes
    }

    /// Commits every write and its audit leaves durably, together with buffered read leaves,
    /// and signs a new tree head.
    pub fn commit(self) -> Result<()> {
        let written_through = self.written_through();
        self.store.inner.commit_audited(
            self.txn,
            self.write_leaves,
            &self.new_pending,
            written_through,
            super::CommitSync::Now,
        )?;
        self.store.inner.merge_if_due();
        Ok(())
    }

    /// Commits every write and its audit leaves without waiting for the disk: the writes are
    /// visible to this process at once (reads, later transactions) but not yet durable, and
    /// not yet in the change feed. Pass the ticket to [`Store::wait_durable`] before telling
    /// anyone the write happened. Until then a crash loses this commit (and its leaves) as a
    /// whole, never part of it, and never a commit made durable before it.
    ///
    /// Why: a synced commit costs two disk syncs; writers that commit deferred and then wait
    /// share one sync among everything committed meanwhile (group commit), and the caller
    /// can let go of its own locks before waiting.
    pub fn commit_deferred(mut self) -> Result<DurableTicket> {
        let written_through = self.written_through();
        let Some(seq) = written_through else {
            // Nothing written: a plain commit keeps read leaves' durability as it was.
            self.commit()?;
            return Ok(DurableTicket { seq: 0 });
        };
        self.txn.set_durability(redb::Durability::None)?;
        self.store.inner.commit_audited(
            self.txn,
            self.write_leaves,
            &self.new_pending,
            written_through,
            super::CommitSync::Deferred,
        )?;
        self.store.inner.merge_if_due();
        Ok(DurableTicket { seq })
    }

    /// The last change seq this transaction wrote, if it wrote any.
    fn written_through(&self) -> Option<u64> {
        (self.writes > 0).then(|| self.next_change - 1)
    }

    /// Discards every write of this transaction.
    pub fn abort(self) -> Result<()> {
        self.txn.abort()?;
        Ok(())
    }
}

/// A deferred commit ([`WriteTxn::commit_deferred`]), durable once [`Store::wait_durable`]
/// returns for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a deferred commit is not durable until Store::wait_durable returns"]
pub struct DurableTicket {
    seq: u64,
}

impl DurableTicket {
    /// The last change seq of the commit (0 if it wrote nothing).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// One item of [`WriteTxn::update_many`]: an update (or update-as-create) of `Type/id`, or,
/// without an id, a create with a server-assigned id.
#[derive(Debug, Clone)]
pub struct Upsert {
    /// The resource type (must match the body's `resourceType`).
    pub resource_type: String,
    /// The id to write, or `None` for a create with a new server id.
    pub id: Option<String>,
    /// The resource JSON.
    pub resource: Value,
    /// Write only if this is the current version (0: only if it does not exist).
    pub expected_version: Option<u64>,
}

/// A batch item whose version and timestamp are decided.
#[derive(Debug)]
struct Plan {
    resource_type: String,
    id: String,
    version: u64,
    kind: VersionKind,
    action: AuditAction,
    created: bool,
    micros: i64,
    /// Whether the body stays in the version record (see [`WriteTxn::locate`]).
    body_inline: bool,
    resource: Value,
}

impl Plan {
    /// Stamps, serializes, hashes and compresses the planned version (no table access).
    fn prepare(&mut self) -> Result<Prepared> {
        let mut prepared = prepare(
            &self.resource_type,
            &self.id,
            self.version,
            self.kind,
            self.micros,
            Some(std::mem::take(&mut self.resource)),
        )?;
        prepared.body_inline = self.body_inline;
        Ok(prepared)
    }
}

/// A version ready to insert: the encoded record and what readers get back.
#[derive(Debug)]
struct Prepared {
    encoded: EncodedVersion,
    stored: StoredResource,
    /// Whether the body stays in the version record (see [`WriteTxn::locate`]).
    body_inline: bool,
}

/// Where the next version of a resource goes, as [`WriteTxn::locate`] finds it.
struct Located {
    /// The current version and whether it is a deletion; `None` if there is none.
    current: Option<(u64, bool)>,
    /// Whether the next version lands among dense keys.
    dense: bool,
}

struct Tables<'a, 't> {
    versions: &'a mut redb::Table<'t, (&'static str, &'static str, u64), &'static [u8]>,
    bodies: &'a mut redb::Table<'t, u64, &'static [u8]>,
    changes: &'a mut redb::Table<'t, u64, &'static [u8]>,
    type_changes: &'a mut redb::Table<'t, (&'static str, u64), ()>,
}

/// The checks an update makes before anything is read or written.
fn validate_update(resource_type: &str, id: &str, resource: &Value) -> Result<()> {
    check_resource_type(resource_type)?;
    check_id(id)?;
    let head = inspect(resource)?;
    if head.resource_type != resource_type {
        return Err(Error::InvalidResource(
            "resourceType in the body does not match the type being updated".into(),
        ));
    }
    if head.id.is_some_and(|body_id| body_id != id) {
        return Err(Error::InvalidResource(
            "id in the body does not match the id being updated".into(),
        ));
    }
    Ok(())
}

/// Stamps `id` and `meta`, serializes, hashes and compresses one version (no table access).
/// The stamped resource is kept with the version, so that whoever indexes it next need not
/// parse the body again.
fn prepare(
    resource_type: &str,
    id: &str,
    version: u64,
    kind: VersionKind,
    micros: i64,
    resource: Option<Value>,
) -> Result<Prepared> {
    let last_updated = micros_to_datetime(micros)?;
    let (body, parsed) = match resource {
        Some(mut resource) => {
            stamp(&mut resource, id, version, &format_instant(last_updated));
            let body = serde_json::to_vec(&resource)
                .map_err(|_| Error::InvalidResource("resource cannot be serialized".into()))?;
            (body, Some(std::sync::Arc::new(resource)))
        }
        None => (Vec::new(), None),
    };
    if body.len() > MAX_BODY {
        return Err(Error::InvalidResource(format!(
            "resource is larger than {} MiB",
            MAX_BODY >> 20
        )));
    }
    let content_hash = *blake3::hash(&body).as_bytes();
    // The change seq field is filled in at insert time, when the order is final.
    let encoded = encode_record(kind, micros, 0, &content_hash, &body)?;
    Ok(Prepared {
        encoded,
        stored: StoredResource {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version,
            last_updated,
            kind,
            content_hash,
            body,
            parsed,
        },
        body_inline: true,
    })
}

/// Ids that share this many leading bytes with the id after them are dense, not random:
/// neighbouring random UUIDs share about log16(n) hex digits, 8 only at billions of ids.
const DENSE_PREFIX: usize = 8;

/// Whether a version of `Type/id` written just before the key `next_type/next_id` lands among
/// dense keys: the last of its type, or beside an id that shares a long prefix with it.
fn is_dense_neighbour(resource_type: &str, id: &str, next_type: &str, next_id: &str) -> bool {
    next_type != resource_type || shared_prefix(next_id, id) >= DENSE_PREFIX
}

fn shared_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

/// Writes a prepared version under change seq `change_seq`; returns it, and whether it is
/// pending (written only to the change table, see `pending.rs`).
fn insert_into(
    tables: &mut Tables<'_, '_>,
    change_seq: u64,
    mut prepared: Prepared,
) -> Result<(StoredResource, bool)> {
    set_record_change_seq(&mut prepared.encoded.record, change_seq);
    let stored = prepared.stored;
    let key = (
        stored.resource_type.as_str(),
        stored.id.as_str(),
        stored.version,
    );
    // Among dense keys (and for tombstones, which have no body) the record goes to `versions`
    // at once; among random keys the change row carries it until a merge.
    let pending = !(prepared.body_inline || prepared.encoded.body.is_empty());
    if pending {
        tables
            .bodies
            .insert(change_seq, prepared.encoded.body.as_slice())?;
    } else {
        let record = prepared.encoded.into_inline_record();
        tables.versions.insert(key, record.as_slice())?;
    }
    let change = Change {
        resource_type: stored.resource_type.clone(),
        id: stored.id.clone(),
        version: stored.version,
        last_updated_micros: stored.last_updated.timestamp_micros(),
        pending: pending.then_some(PendingRecord {
            kind: stored.kind,
            content_hash: stored.content_hash,
        }),
    };
    tables
        .changes
        .insert(change_seq, change.encode().as_slice())?;
    tables
        .type_changes
        .insert((stored.resource_type.as_str(), change_seq), ())?;
    Ok((stored, pending))
}

/// A prepared plan on its way back to the inserting thread.
struct PreparedItem {
    /// Position of the plan in insert order.
    turn: usize,
    action: AuditAction,
    created: bool,
    prepared: Result<Prepared>,
    /// `Type` and `id` of the plan, for the audit leaf of a refusal.
    target: (String, String),
}

fn prepare_item((turn, mut plan): (usize, Plan)) -> PreparedItem {
    let prepared = plan.prepare();
    PreparedItem {
        turn,
        action: plan.action,
        created: plan.created,
        prepared,
        target: (plan.resource_type, plan.id),
    }
}

/// Helper threads that prepare a batch of `items` beside the inserting thread: one fewer than
/// the machine's cores (at most 3), none for a batch too small to pay for a thread.
fn preparing_helpers(items: usize) -> usize {
    const SMALLEST_SHARED_BATCH: usize = 64;
    if items < SMALLEST_SHARED_BATCH {
        return 0;
    }
    crate::process::available_cores().min(4) - 1
}

/// The next plan to prepare; `wait` blocks until one comes or the planning is over.
fn next_plan(
    queue: &std::sync::Mutex<std::sync::mpsc::Receiver<(usize, Plan)>>,
    wait: bool,
) -> Option<(usize, Plan)> {
    // A helper that panicked while holding the lock left the queue itself intact.
    let queue = queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if wait {
        queue.recv().ok()
    } else {
        queue.try_recv().ok()
    }
}

/// The prepared item of insert turn `turn`: already back from a helper, or prepared here
/// (this thread takes plans from the queue rather than wait), or awaited from the helper
/// that holds it. `None` only if it was lost with a helper that panicked.
fn wait_for_turn(
    turn: usize,
    ready: &mut [Option<PreparedItem>],
    queue: &std::sync::Mutex<std::sync::mpsc::Receiver<(usize, Plan)>>,
    done: &std::sync::mpsc::Receiver<PreparedItem>,
) -> Option<PreparedItem> {
    loop {
        if let Some(item) = ready.get_mut(turn).and_then(Option::take) {
            return Some(item);
        }
        if let Ok(item) = done.try_recv() {
            let slot = item.turn;
            ready[slot] = Some(item);
            continue;
        }
        if let Some(job) = next_plan(queue, false) {
            let item = prepare_item(job);
            let slot = item.turn;
            ready[slot] = Some(item);
            continue;
        }
        // Every plan is taken; the one for this turn is with a helper.
        let item = done.recv().ok()?;
        let slot = item.turn;
        ready[slot] = Some(item);
    }
}
