//! Reading the resources a search found, under one audit leaf for the whole search.

use super::{AccessContext, Lookup, Store, StoredResource, now_micros, outcome_of};
use crate::Result;
use crate::audit::{AuditAction, AuditRecord};
use crate::resource::{check_id, check_resource_type};

impl Store {
    /// Reads the current versions of `keys` (type, id) for a search or an operation that
    /// returns many resources, and records ONE audit leaf: `action` with `query_digest`
    /// (a hash of the request, never its values). Resources that are missing or deleted
    /// come back as `None`, in the order of `keys`.
    pub fn read_many(
        &self,
        ctx: &AccessContext,
        action: AuditAction,
        query_digest: [u8; 32],
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<StoredResource>>> {
        let result = (|| {
            let versions = self.inner.versions_snapshot()?;
            let mut out = Vec::with_capacity(keys.len());
            for (resource_type, id) in keys {
                check_resource_type(resource_type)?;
                check_id(id)?;
                let found =
                    versions.find(&self.inner.pending, resource_type, id, Lookup::Current)?;
                out.push(found.map(|(_, s)| s).filter(|s| !s.is_deleted()));
            }
            Ok(out)
        })();
        self.inner.enqueue_read_leaf(AuditRecord {
            time_micros: now_micros(),
            actor: ctx.actor(),
            request_id: ctx.request_id.clone(),
            action,
            resource_type: None,
            id: None,
            version: None,
            outcome: outcome_of(&result),
            content_hash: None,
            query_hash: Some(query_digest),
        })?;
        result
    }
}
