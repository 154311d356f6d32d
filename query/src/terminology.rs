//! `:in` and `:not-in`: the codes of a ValueSet stored in the database, from its expansion or
//! by expanding its `compose` against stored CodeSystems (enumerated concepts and whole code
//! systems; filters are not evaluated and are reported as unsupported).

use std::collections::BTreeSet;

use fhirkeep_engine::audit::AuditAction;
use fhirkeep_engine::store::AccessContext;
use serde_json::Value;

use crate::database::Database;
use crate::params::{Handling, parse_search_url};
use crate::{Error, Result};

/// The most codes one `:in` may expand to.
const MAX_CODES: usize = 10_000;

impl Database {
    /// The `system|code` pairs of the ValueSet with canonical `url` (or `ValueSet/id`).
    pub(crate) fn value_set_codes(&self, ctx: &AccessContext, url: &str) -> Result<Vec<String>> {
        let value_set = self.find_by_url(ctx, "ValueSet", url)?.ok_or_else(|| {
            Error::InvalidSearch("the ValueSet named by :in/:not-in is not stored here".into())
        })?;
        let mut codes = BTreeSet::new();
        if let Some(contains) = value_set.get("expansion").and_then(|e| e.get("contains")) {
            collect_expansion(contains, &mut codes, 0);
        }
        if codes.is_empty()
            && let Some(includes) = value_set
                .get("compose")
                .and_then(|c| c.get("include"))
                .and_then(Value::as_array)
        {
            for include in includes {
                if include.get("filter").is_some() || include.get("valueSet").is_some() {
                    return Err(Error::InvalidSearch(
                        ":in/:not-in: ValueSets with filters or imported value sets are not supported".into(),
                    ));
                }
                let Some(system) = include.get("system").and_then(Value::as_str) else {
                    continue;
                };
                match include.get("concept").and_then(Value::as_array) {
                    Some(concepts) => {
                        for concept in concepts {
                            if let Some(code) = concept.get("code").and_then(Value::as_str) {
                                codes.insert(format!("{system}|{code}"));
                            }
                        }
                    }
                    None => {
                        let code_system = self.find_by_url(ctx, "CodeSystem", system)?.ok_or_else(|| {
                            Error::InvalidSearch(
                                ":in/:not-in: the ValueSet includes a code system that is not stored here".into(),
                            )
                        })?;
                        if let Some(concepts) = code_system.get("concept") {
                            collect_concepts(system, concepts, &mut codes, 0);
                        }
                    }
                }
                if codes.len() > MAX_CODES {
                    break;
                }
            }
        }
        if codes.len() > MAX_CODES {
            return Err(Error::InvalidSearch(format!(
                ":in/:not-in: the ValueSet has more than {MAX_CODES} codes"
            )));
        }
        Ok(codes.into_iter().collect())
    }

    /// The current resource of `resource_type` whose `url` is `url` (a `Type/id` reference
    /// is read directly).
    fn find_by_url(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        url: &str,
    ) -> Result<Option<Value>> {
        if let Some(id) = url.strip_prefix(&format!("{resource_type}/")) {
            return match self.store().read(ctx, resource_type, id) {
                Ok(found) => Ok(Some(found.to_json()?)),
                Err(fhirkeep_engine::Error::NotFound | fhirkeep_engine::Error::Gone { .. }) => {
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            };
        }
        let (canonical, _version) = url.split_once('|').unwrap_or((url, ""));
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("url", canonical)
            .finish();
        let request = parse_search_url(
            &*self.registry()?,
            &format!("{resource_type}?{query}"),
            Handling::Strict,
        )?;
        let keys = self.matching_keys(&request)?;
        let Some(key) = keys.first() else {
            return Ok(None);
        };
        let Some((t, id)) = key.split_once('/') else {
            return Ok(None);
        };
        let found =
            self.store()
                .read_many(ctx, AuditAction::Search, request.digest(), &[(t, id)])?;
        Ok(match found.into_iter().next().flatten() {
            Some(stored) => Some(stored.to_json()?),
            None => None,
        })
    }
}

fn collect_expansion(contains: &Value, codes: &mut BTreeSet<String>, depth: usize) {
    if depth > 32 || codes.len() > MAX_CODES {
        return;
    }
    for item in contains.as_array().into_iter().flatten() {
        if let (Some(system), Some(code)) = (
            item.get("system").and_then(Value::as_str),
            item.get("code").and_then(Value::as_str),
        ) {
            codes.insert(format!("{system}|{code}"));
        }
        if let Some(children) = item.get("contains") {
            collect_expansion(children, codes, depth + 1);
        }
    }
}

fn collect_concepts(system: &str, concepts: &Value, codes: &mut BTreeSet<String>, depth: usize) {
    if depth > 32 || codes.len() > MAX_CODES {
        return;
    }
    for concept in concepts.as_array().into_iter().flatten() {
        if let Some(code) = concept.get("code").and_then(Value::as_str) {
            codes.insert(format!("{system}|{code}"));
        }
        if let Some(children) = concept.get("concept") {
            collect_concepts(system, children, codes, depth + 1);
        }
    }
}
