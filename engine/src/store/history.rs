//! History of a resource, of a type, and of the whole store, newest first, with cursors.

use chrono::{DateTime, Utc};
use redb::ReadableDatabase;

use std::sync::RwLock;

use super::pending::{SharedPending, SnapshotPending};
use super::record::{BODIES, CHANGES, Change, META, TYPE_CHANGES, VERSIONS, VersionRecord};
use super::{AccessContext, Store, StoredResource};
use crate::audit::{AuditAction, AuditRecord};
use crate::resource::{check_id, check_resource_type};
use crate::{Error, Result};

/// Filters and paging for a history request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only versions written at or after this instant (FHIR `_since`).
    pub since: Option<DateTime<Utc>>,
    /// Only versions that were current at this instant (FHIR `_at`).
    pub at: Option<DateTime<Utc>>,
    /// Page size (FHIR `_count`); `None` means no limit.
    pub count: Option<usize>,
    /// Continue below this cursor (from [`HistoryPage::next`]).
    pub cursor: Option<u64>,
}

/// One page of history, newest first.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// The versions, newest first; deletions have [`StoredResource::is_deleted`].
    pub entries: Vec<StoredResource>,
    /// Cursor for the next (older) page, if there may be one.
    pub next: Option<u64>,
}

impl HistoryQuery {
    /// blake3 of a canonical text form of the query, for the audit log.
    pub fn digest(&self) -> [u8; 32] {
        let part = |value: Option<i128>| value.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let text = format!(
            "history-query-v1\0since={}\0at={}\0count={}\0cursor={}",
            part(self.since.map(|t| i128::from(t.timestamp_micros()))),
            part(self.at.map(|t| i128::from(t.timestamp_micros()))),
            part(self.count.and_then(|c| i128::try_from(c).ok())),
            part(self.cursor.map(i128::from)),
        );
        *blake3::hash(text.as_bytes()).as_bytes()
    }

    fn admits(&self, micros: i64) -> bool {
        self.since
            .is_none_or(|since| micros >= since.timestamp_micros())
            && self.at.is_none_or(|at| micros <= at.timestamp_micros())
    }

    fn limit(&self) -> usize {
        self.count.unwrap_or(usize::MAX)
    }
}

impl Store {
    /// History of one resource: every version, including the deletion tombstones.
    pub fn history_instance(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage> {
        let result = self.history_instance_inner(resource_type, id, query);
        let target = (check_resource_type(resource_type).is_ok() && check_id(id).is_ok())
            .then(|| (resource_type.to_owned(), id.to_owned()));
        let (resource_type, id) = target.map_or((None, None), |(t, i)| (Some(t), Some(i)));
        self.audit_history(
            ctx,
            AuditAction::HistoryInstance,
            resource_type,
            id,
            query,
            &result,
        )?;
        result
    }

    fn history_instance_inner(
        &self,
        resource_type: &str,
        id: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage> {
        check_resource_type(resource_type)?;
        check_id(id)?;
        let txn = self.inner.db.begin_read()?;
        let versions = txn.open_table(VERSIONS)?;
        let bodies = txn.open_table(BODIES)?;
        let changes = txn.open_table(CHANGES)?;
        let snapshot = SnapshotPending::of(&txn.open_table(META)?, &changes)?;
        let pending = snapshot.candidates(&self.inner.pending, &changes, resource_type, id)?;
        let upper = query.cursor.map_or(u64::MAX, |c| c.saturating_sub(1));
        let mut entries = Vec::new();
        let mut next = None;
        let mut newer_micros: Option<i64> = None;
        let mut any = false;
        // Newest first; `false` stops the walk.
        let mut visit = |version: u64, record: &VersionRecord<'_>| -> Result<bool> {
            any = true;
            let superseded_by = newer_micros.replace(record.last_updated_micros);
            if version > upper {
                return Ok(true);
            }
            if !query.admits(record.last_updated_micros) {
                let before_since = query
                    .since
                    .is_some_and(|s| record.last_updated_micros < s.timestamp_micros());
                return Ok(!before_since);
            }
            if let Some(at) = query.at {
                // Current at `at` only if the next version came after it.
                if superseded_by.is_some_and(|newer| newer <= at.timestamp_micros()) {
                    return Ok(true);
                }
            }
            if entries.len() == query.limit() {
                next = Some(version + 1);
                return Ok(false);
            }
            entries.push(StoredResource::from_record(
                resource_type,
                id,
                version,
                record,
                &bodies,
            )?);
            Ok(true)
        };
        // The stored versions and the pending ones (all newer than any stored one, unless a
        // later version went to `versions` at once), interleaved newest first.
        let mut stored = versions
            .range((resource_type, id, 0)..=(resource_type, id, u64::MAX))?
            .rev()
            .peekable();
        let mut pending = pending.iter().rev().copied().peekable();
        loop {
            let take_pending = match (stored.peek(), pending.peek()) {
                (None, None) => break,
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(Ok((key, _))), Some(newest)) => newest.version > key.value().2,
                // The error comes out of `next` below.
                (Some(Err(_)), Some(_)) => false,
            };
            let go_on = if take_pending {
                let Some(version) = pending.next() else { break };
                visit(version.version, &version.version_record())?
            } else {
                let Some(entry) = stored.next() else { break };
                let (key, value) = entry?;
                visit(key.value().2, &VersionRecord::decode(value.value())?)?
            };
            if !go_on {
                break;
            }
        }
        if !any {
            return Err(Error::NotFound);
        }
        Ok(HistoryPage { entries, next })
    }

    /// History of every resource of one type.
    pub fn history_type(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage> {
        let result = check_resource_type(resource_type).and_then(|()| {
            let txn = self.inner.db.begin_read()?;
            let type_changes = txn.open_table(TYPE_CHANGES)?;
            let upper = query.cursor.unwrap_or(u64::MAX);
            let seqs = type_changes
                .range((resource_type, 0)..(resource_type, upper))?
                .rev()
                .map(|entry| entry.map(|(key, _)| key.value().1).map_err(Error::from));
            collect_changes(&self.inner.pending, &txn, seqs, query)
        });
        let known_type = check_resource_type(resource_type)
            .is_ok()
            .then(|| resource_type.to_owned());
        self.audit_history(
            ctx,
            AuditAction::HistoryType,
            known_type,
            None,
            query,
            &result,
        )?;
        result
    }

    /// History of the whole store.
    pub fn history_system(&self, ctx: &AccessContext, query: &HistoryQuery) -> Result<HistoryPage> {
        let result = (|| {
            let txn = self.inner.db.begin_read()?;
            let changes = txn.open_table(CHANGES)?;
            let upper = query.cursor.unwrap_or(u64::MAX);
            let seqs = changes
                .range(0..upper)?
                .rev()
                .map(|entry| entry.map(|(key, _)| key.value()).map_err(Error::from));
            collect_changes(&self.inner.pending, &txn, seqs, query)
        })();
        self.audit_history(ctx, AuditAction::HistorySystem, None, None, query, &result)?;
        result
    }

    fn audit_history(
        &self,
        ctx: &AccessContext,
        action: AuditAction,
        resource_type: Option<String>,
        id: Option<String>,
        query: &HistoryQuery,
        result: &Result<HistoryPage>,
    ) -> Result<()> {
        self.inner.enqueue_read_leaf(AuditRecord {
            time_micros: super::now_micros(),
            actor: ctx.actor(),
            request_id: ctx.request_id.clone(),
            action,
            resource_type,
            id,
            version: None,
            outcome: super::outcome_of(result),
            content_hash: None,
            query_hash: Some(query.digest()),
        })
    }
}

/// Walks change seqs newest first, applying `since`, `at` and `count`.
fn collect_changes(
    shared: &RwLock<SharedPending>,
    txn: &redb::ReadTransaction,
    seqs: impl Iterator<Item = Result<u64>>,
    query: &HistoryQuery,
) -> Result<HistoryPage> {
    let changes = txn.open_table(CHANGES)?;
    let versions = txn.open_table(VERSIONS)?;
    let bodies = txn.open_table(BODIES)?;
    let snapshot = SnapshotPending::of(&txn.open_table(META)?, &changes)?;
    let mut entries = Vec::new();
    let mut next = None;
    for seq in seqs {
        let seq = seq?;
        let change_bytes = changes
            .get(seq)?
            .ok_or_else(|| Error::Corrupted("history index names a missing change".into()))?;
        let change = Change::decode(change_bytes.value())?;
        if !query.admits(change.last_updated_micros) {
            if query
                .since
                .is_some_and(|s| change.last_updated_micros < s.timestamp_micros())
            {
                break;
            }
            continue;
        }
        if let Some(at) = query.at {
            let (resource_type, id) = (change.resource_type.as_str(), change.id.as_str());
            let newer = change.version + 1;
            let pending = snapshot.candidates(shared, &changes, resource_type, id)?;
            let newer_micros = match pending.iter().find(|p| p.version == newer) {
                Some(pending) => Some(pending.last_updated_micros),
                None => match versions.get((resource_type, id, newer))? {
                    Some(guard) => Some(VersionRecord::decode(guard.value())?.last_updated_micros),
                    None => None,
                },
            };
            if newer_micros.is_some_and(|newer| newer <= at.timestamp_micros()) {
                continue;
            }
        }
        if entries.len() == query.limit() {
            next = Some(seq + 1);
            break;
        }
        entries.push(super::version_of_change(&versions, &bodies, seq, &change)?);
    }
    Ok(HistoryPage { entries, next })
}

impl HistoryPage {
    /// This page as a FHIR `history` Bundle (entries newest first; deletions carry no resource).
    pub fn to_bundle(&self) -> Result<serde_json::Value> {
        use serde_json::{Value, json};
        let mut entries = Vec::with_capacity(self.entries.len());
        for stored in &self.entries {
            let url = format!("{}/{}", stored.resource_type, stored.id);
            let (method, request_url, status) = match stored.kind {
                super::VersionKind::Created => {
                    ("POST", stored.resource_type.clone(), "201 Created")
                }
                super::VersionKind::CreatedWithId => ("PUT", url.clone(), "201 Created"),
                super::VersionKind::Updated => ("PUT", url.clone(), "200 OK"),
                super::VersionKind::Deleted => ("DELETE", url.clone(), "204 No Content"),
            };
            let mut entry = json!({
                "fullUrl": url,
                "request": {"method": method, "url": request_url},
                "response": {
                    "status": status,
                    "etag": format!("W/\"{}\"", stored.version),
                    "lastModified": stored.last_updated_text(),
                },
            });
            if !stored.is_deleted()
                && let Value::Object(map) = &mut entry
            {
                map.insert("resource".into(), stored.to_json()?);
            }
            entries.push(entry);
        }
        Ok(json!({
            "resourceType": "Bundle",
            "type": "history",
            "total": self.entries.len(),
            "entry": entries,
        }))
    }
}
