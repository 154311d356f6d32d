//! The change feed: every committed version in commit order, for indexes derived from the
//! store (the search index) to catch up from where they left off.
//!
//! Change seqs start at 1 and grow by one per written version, in commit order (a write
//! transaction takes its seqs under redb's writer lock, from the last committed one), so a
//! reader that has applied every change up to `N` has seen everything once it has read
//! every change after `N`; later commits only add seqs above the last one it saw. An index
//! stores the last seq it applied, durably with its own data, and asks for
//! [`Store::changes_after`] that seq (`None` or `Some(0)` for an empty index).

use redb::ReadableDatabase;

use super::record::{BODIES, CHANGES, Change, VERSIONS};
use super::{AccessContext, Store, StoredResource, version_of_change};
use crate::Result;
use crate::audit::{AuditAction, AuditRecord};

/// The audit action of a change-feed read.
const INDEX_SYNC_ACTION: &str = "index-sync";

/// One page of the change feed, oldest first.
#[derive(Debug, Clone)]
pub struct ChangePage {
    /// `(change seq, version)` in increasing seq order. A deletion is its tombstone:
    /// [`StoredResource::is_deleted`], kind [`super::VersionKind::Deleted`], empty body.
    pub changes: Vec<(u64, StoredResource)>,
    /// Where to continue: pass it as `after` to the next call. The seq of the last change
    /// returned, or the `after` given (0 for `None`) if none was.
    pub next_after: u64,
    /// Whether there were durable changes after `next_after` when this page was read (more
    /// may be committed at any time; ask [`Store::last_change_seq`]).
    pub more: bool,
}

/// Which version a change wrote, for a change whose content the reader already has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionKey {
    /// The resource type.
    pub resource_type: String,
    /// The logical id.
    pub id: String,
    /// The version id.
    pub version: u64,
}

/// One change of [`Store::changes_after_except`].
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// The version, read from the store.
    Read(StoredResource),
    /// Only which version: the caller said it has its content.
    Known(VersionKey),
}

/// A page of [`Store::changes_after_except`]: like [`ChangePage`], with the changes the caller
/// already has named only.
#[derive(Debug, Clone)]
pub struct FeedPage {
    /// `(change seq, item)` in increasing seq order.
    pub changes: Vec<(u64, FeedItem)>,
    /// As [`ChangePage::next_after`].
    pub next_after: u64,
    /// As [`ChangePage::more`].
    pub more: bool,
}

/// blake3 of a canonical text form of a change-feed request, for its audit leaf.
fn digest(after: u64, limit: usize) -> [u8; 32] {
    let text = format!("change-feed-v1\0after={after}\0limit={limit}");
    *blake3::hash(text.as_bytes()).as_bytes()
}

impl Store {
    /// The seq of the newest durable change, 0 for a store without any (seqs start at 1).
    /// Not audited: it reveals only how many versions were written.
    ///
    /// The feed ends at the last *durable* change: a deferred commit
    /// ([`super::WriteTxn::commit_deferred`]) joins it once synced, so that nothing derived
    /// from the feed (an index that records how far it got) can run ahead of what a crash
    /// leaves in the store.
    pub fn last_change_seq(&self) -> Result<u64> {
        Ok(self
            .inner
            .durable_seq
            .load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Up to `limit` durable changes with seq > `after` (`None`: from the first, like
    /// `Some(0)`), oldest first, each with the version it wrote; see [`ChangePage`].
    ///
    /// Every call records one audit leaf, action `index-sync`, with the outcome and a hash of
    /// `(after, limit)` (no resource content), through the read-audit path, like history.
    pub fn changes_after(
        &self,
        ctx: &AccessContext,
        after: Option<u64>,
        limit: usize,
    ) -> Result<ChangePage> {
        let page = self.changes_after_except(ctx, after, limit, |_, _, _| false)?;
        // Nothing is known here, so every item was read.
        let changes = page
            .changes
            .into_iter()
            .filter_map(|(seq, item)| match item {
                FeedItem::Read(stored) => Some((seq, stored)),
                FeedItem::Known(_) => None,
            })
            .collect();
        Ok(ChangePage {
            changes,
            next_after: page.next_after,
            more: page.more,
        })
    }

    /// Like [`Store::changes_after`], without reading the versions for which `known(type,
    /// id, version)` is true (the caller has their content, e.g. from the write that made
    /// them): those are [`FeedItem::Known`]. Versions are immutable, so a caller's copy of a
    /// version is the stored one. Audited like [`Store::changes_after`].
    pub fn changes_after_except(
        &self,
        ctx: &AccessContext,
        after: Option<u64>,
        limit: usize,
        known: impl Fn(&str, &str, u64) -> bool,
    ) -> Result<FeedPage> {
        let after = after.unwrap_or(0);
        let result = self.changes_after_inner(after, limit, known);
        self.inner.enqueue_read_leaf(AuditRecord {
            time_micros: super::now_micros(),
            actor: ctx.actor(),
            request_id: ctx.request_id.clone(),
            action: AuditAction::Other(INDEX_SYNC_ACTION.into()),
            resource_type: None,
            id: None,
            version: None,
            outcome: super::outcome_of(&result),
            content_hash: None,
            query_hash: Some(digest(after, limit)),
        })?;
        result
    }

    fn changes_after_inner(
        &self,
        after: u64,
        limit: usize,
        known: impl Fn(&str, &str, u64) -> bool,
    ) -> Result<FeedPage> {
        let mut page = FeedPage {
            changes: Vec::new(),
            next_after: after,
            more: false,
        };
        let Some(first) = after.checked_add(1) else {
            return Ok(page);
        };
        // Read before the transaction opens: whatever it names is in the snapshot.
        let durable = self.last_change_seq()?;
        if first > durable {
            return Ok(page);
        }
        let txn = self.inner.db.begin_read()?;
        let changes = txn.open_table(CHANGES)?;
        let versions = txn.open_table(VERSIONS)?;
        let bodies = txn.open_table(BODIES)?;
        for entry in changes.range(first..=durable)? {
            let (key, value) = entry?;
            if page.changes.len() >= limit {
                page.more = true;
                break;
            }
            let seq = key.value();
            let change = Change::decode(value.value())?;
            if known(&change.resource_type, &change.id, change.version) {
                page.changes.push((
                    seq,
                    FeedItem::Known(VersionKey {
                        resource_type: change.resource_type,
                        id: change.id,
                        version: change.version,
                    }),
                ));
                page.next_after = seq;
                continue;
            }
            let stored = version_of_change(&versions, &bodies, seq, &change)?;
            page.changes.push((seq, FeedItem::Read(stored)));
            page.next_after = seq;
        }
        Ok(page)
    }
}
