//! Running a [`SearchRequest`]: criteria to tantivy queries, chains and `_has` as inner
//! searches, ordering and cursor paging, `_include`/`_revinclude`, and the resources read
//! from the store under one audit leaf.

use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use fhirkeep_engine::audit::{AuditAction, AuditOutcome};
use fhirkeep_engine::store::{AccessContext, AccessRecord};
use serde_json::Value;
use tantivy::DocAddress;
use tantivy::query::{Query, QueryParser};

use crate::database::Database;
use crate::extract::{ID_PARAM, SECOND_SPAN, SEP};
use crate::index::{SearchIndex, all_of, any_of, none_of, regex_escape};
use crate::params::{
    Criterion, Modifier, Prefix, SearchRequest, SortKey, SummaryMode, TotalMode, split_escaped,
    split_prefix,
};
use crate::registry::{ParamType, Registry};
use crate::summary::{apply_elements, apply_summary};
use crate::values::{
    DatePrecision, date_buckets, implied_half_width, normalize_string, ordered_f64, ordered_i64,
    parse_fhir_date, search_bucket,
};
use crate::{Error, Result};

/// How an entry came into a searchset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// It matched the criteria.
    Match,
    /// It was added by `_include`/`_revinclude`.
    Include,
}

/// One entry of a search result.
#[derive(Debug, Clone)]
pub struct SearchEntry {
    /// `Type/id`.
    pub key: String,
    /// The resource (after `_summary`/`_elements`).
    pub resource: EntryResource,
    /// Match or include.
    pub mode: EntryMode,
}

/// A search entry's resource: the stored JSON as the store returned it, or, when
/// `_summary`/`_elements` changed it, parsed. Keeping the stored bytes lets a page go out
/// without parsing and re-serializing every resource ([`SearchResult::into_bundle_json`]).
#[derive(Debug, Clone, PartialEq)]
pub enum EntryResource {
    /// The stored JSON (compact, as written by the engine).
    Stored(Vec<u8>),
    /// A parsed, possibly reduced, resource.
    Parsed(Value),
}

impl EntryResource {
    /// The resource as a JSON value.
    pub fn to_json(&self) -> Result<Value> {
        match self {
            EntryResource::Parsed(value) => Ok(value.clone()),
            EntryResource::Stored(json) => parse_stored(json),
        }
    }

    /// The resource as a JSON value, without copying a parsed one.
    pub fn into_json(self) -> Result<Value> {
        match self {
            EntryResource::Parsed(value) => Ok(value),
            EntryResource::Stored(json) => parse_stored(&json),
        }
    }
}

fn parse_stored(json: &[u8]) -> Result<Value> {
    serde_json::from_slice(json)
        .map_err(|_| Error::Internal("a stored resource is not valid JSON".into()))
}

/// One page of a search result.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// The number of matches (not counting includes), unless `_total=none`.
    pub total: Option<usize>,
    /// Matches of this page, then includes.
    pub entries: Vec<SearchEntry>,
    /// The cursor of the next page, if there is one.
    pub next_cursor: Option<String>,
    /// The cursor of the previous page, if there is one.
    pub previous_cursor: Option<String>,
    /// Parameters ignored in lenient mode.
    pub ignored: Vec<String>,
    /// The request's canonical query (for the `self` link).
    pub canonical_query: String,
    /// The searched path (`Patient`, `Patient/1/Observation`, or empty).
    pub path: String,
}

/// A match before paging: its key and its sort values.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ranked {
    sort_values: Vec<Option<String>>,
    key: String,
}

/// One page of matches and what lies around it.
#[derive(Debug)]
struct Paged {
    page: Vec<Ranked>,
    total: usize,
    has_next: bool,
    has_previous: bool,
}

/// The path a searchset's links are relative to (`Patient`, `Patient/1/Observation`, or the
/// base for a search across types).
fn result_path(request: &SearchRequest) -> String {
    match &request.compartment {
        Some((t, id)) => format!(
            "{t}/{id}/{}",
            request.resource_types.first().map_or("*", String::as_str)
        ),
        None if request.resource_types.len() == 1 => request.resource_types[0].clone(),
        None => String::new(),
    }
}

/// A page in key order without reading stored documents: each segment's `key` column gives
/// term ordinals (ordered like the keys within the segment), so only the few keys around the
/// cursor are turned into strings, however many resources match.
fn page_by_key(
    index: &SearchIndex,
    searcher: &tantivy::Searcher,
    docs: &[DocAddress],
    anchor: Option<&Anchor>,
    count: usize,
) -> Result<Paged> {
    let mut by_segment: HashMap<u32, Vec<tantivy::DocId>> = HashMap::new();
    for doc in docs {
        by_segment
            .entry(doc.segment_ord)
            .or_default()
            .push(doc.doc_id);
    }
    let (mut before_total, mut after_total) = (0usize, 0usize);
    let mut candidates: Vec<String> = Vec::new();
    let mut text = String::new();
    for (segment_ord, segment_docs) in by_segment {
        let reader = searcher.segment_reader(segment_ord);
        let column = index
            .str_column(reader, "key")?
            .ok_or_else(|| Error::Index("the key column is missing".into()))?;
        let mut ords: Vec<u64> = segment_docs
            .iter()
            .filter_map(|&doc| column.term_ords(doc).next())
            .collect();
        if anchor.is_none() && ords.len() > count {
            // A first page needs only the `count` smallest: select them in linear time and
            // sort those alone. The rest only counts (all of it lies after the page).
            ords.select_nth_unstable(count);
            after_total += ords.len() - count;
            ords.truncate(count);
        }
        ords.sort_unstable();
        let key_of = |ord: u64, out: &mut String| -> Result<()> {
            out.clear();
            column
                .ord_to_str(ord, out)
                .map_err(|e| Error::Index(format!("reading the key column: {e}")))?;
            Ok(())
        };
        // `boundary`: how many of this segment's matches come before the anchor (for a
        // forward anchor: up to and including it).
        let boundary = match anchor {
            None => 0,
            Some(anchor) => {
                let (mut low, mut high) = (0usize, ords.len());
                while low < high {
                    let mid = (low + high) / 2;
                    key_of(ords[mid], &mut text)?;
                    let before = if anchor.backward {
                        text.as_str() < anchor.entry.key.as_str()
                    } else {
                        text.as_str() <= anchor.entry.key.as_str()
                    };
                    if before {
                        low = mid + 1;
                    } else {
                        high = mid;
                    }
                }
                low
            }
        };
        before_total += boundary;
        after_total += ords.len() - boundary;
        let wanted: &[u64] = match anchor {
            Some(anchor) if anchor.backward => &ords[boundary.saturating_sub(count)..boundary],
            _ => &ords[boundary..(boundary + count).min(ords.len())],
        };
        for &ord in wanted {
            key_of(ord, &mut text)?;
            candidates.push(text.clone());
        }
    }
    candidates.sort_unstable();
    let backward = anchor.is_some_and(|a| a.backward);
    let page: Vec<String> = if backward {
        let skip = candidates.len().saturating_sub(count);
        candidates.into_iter().skip(skip).collect()
    } else {
        candidates.into_iter().take(count).collect()
    };
    let (has_previous, has_next) = if backward {
        (before_total > page.len(), after_total > 0)
    } else {
        (before_total > 0, after_total > page.len())
    };
    Ok(Paged {
        total: docs.len(),
        has_next,
        has_previous,
        page: page
            .into_iter()
            .map(|key| Ranked {
                sort_values: Vec::new(),
                key,
            })
            .collect(),
    })
}

/// A page ordered by one sort key, from the `sort` and `key` columns: within a segment,
/// term ordinals are ordered like the strings, so docs are ranked by integers and only the
/// strings around the cursor and on the page are read.
fn page_by_sort_key(
    index: &SearchIndex,
    searcher: &tantivy::Searcher,
    docs: &[DocAddress],
    sort: &SortKey,
    anchor: Option<&Anchor>,
    count: usize,
) -> Result<Paged> {
    let keys = std::slice::from_ref(sort);
    let prefix = format!("{}{SEP}", sort.code);
    let prefix_end = format!("{}{}", sort.code, char::from_u32(0x20).unwrap_or(' '));
    let mut by_segment: HashMap<u32, Vec<tantivy::DocId>> = HashMap::new();
    for doc in docs {
        by_segment
            .entry(doc.segment_ord)
            .or_default()
            .push(doc.doc_id);
    }
    let column_error = |e: std::io::Error| Error::Index(format!("reading a sort column: {e}"));
    let (mut before_total, mut after_total) = (0usize, 0usize);
    let mut candidates: Vec<Ranked> = Vec::new();
    for (segment_ord, segment_docs) in by_segment {
        let reader = searcher.segment_reader(segment_ord);
        let key_column = index
            .str_column(reader, "key")?
            .ok_or_else(|| Error::Index("the key column is missing".into()))?;
        let sort_column = index.str_column(reader, "sort")?;
        // The ordinals of this parameter's values: [low, high).
        let (low, high) = match &sort_column {
            Some(column) => {
                let (low, high) = column
                    .dictionary()
                    .term_bounds_to_ord(
                        Bound::Included(prefix.as_bytes()),
                        Bound::Excluded(prefix_end.as_bytes()),
                    )
                    .map_err(column_error)?;
                let low = match low {
                    Bound::Included(o) => o,
                    Bound::Excluded(o) => o.saturating_add(1),
                    Bound::Unbounded => 0,
                };
                let high = match high {
                    Bound::Included(o) => o.saturating_add(1),
                    Bound::Excluded(o) => o,
                    Bound::Unbounded => u64::MAX,
                };
                (low, high)
            }
            None => (0, 0),
        };
        // `_id` (only for matches of one type, see `page`): the key ordinal is the sort value,
        // since keys of one type are ordered like their ids.
        let by_id = sort.code == ID_PARAM;
        // (sort ordinal, key ordinal) per doc; None sorts last either way.
        let mut items: Vec<(Option<u64>, u64)> = Vec::with_capacity(segment_docs.len());
        for &doc in &segment_docs {
            let Some(key_ord) = key_column.term_ords(doc).next() else {
                continue;
            };
            if by_id {
                items.push((Some(key_ord), key_ord));
                continue;
            }
            let values = sort_column
                .as_ref()
                .into_iter()
                .flat_map(|c| c.term_ords(doc))
                .filter(|o| (low..high).contains(o));
            let value = if sort.descending {
                values.max()
            } else {
                values.min()
            };
            items.push((value, key_ord));
        }
        let order = |a: &(Option<u64>, u64), b: &(Option<u64>, u64)| {
            let by_value = match (a.0, b.0) {
                (Some(x), Some(y)) if sort.descending => y.cmp(&x),
                (Some(x), Some(y)) => x.cmp(&y),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            };
            by_value.then(a.1.cmp(&b.1))
        };
        if anchor.is_none() && items.len() > count {
            // A first page: select the `count` first in linear time, as in `page_by_key`.
            items.select_nth_unstable_by(count, order);
            after_total += items.len() - count;
            items.truncate(count);
        }
        items.sort_unstable_by(order);
        let resolve = |item: &(Option<u64>, u64)| -> Result<Ranked> {
            let mut key = String::new();
            key_column
                .ord_to_str(item.1, &mut key)
                .map_err(column_error)?;
            let value = match (item.0, &sort_column) {
                _ if by_id => key.split_once('/').map(|(_, id)| id.to_string()),
                (Some(ord), Some(column)) => {
                    let mut text = String::new();
                    column.ord_to_str(ord, &mut text).map_err(column_error)?;
                    text.strip_prefix(&prefix).map(String::from)
                }
                _ => None,
            };
            Ok(Ranked {
                sort_values: vec![value],
                key,
            })
        };
        let boundary = match anchor {
            None => 0,
            Some(anchor) => {
                let (mut lo, mut hi) = (0usize, items.len());
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    let ordering = compare_ranked(&resolve(&items[mid])?, &anchor.entry, keys);
                    let before = if anchor.backward {
                        ordering == Ordering::Less
                    } else {
                        ordering != Ordering::Greater
                    };
                    if before {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                lo
            }
        };
        before_total += boundary;
        after_total += items.len() - boundary;
        let wanted = match anchor {
            Some(anchor) if anchor.backward => &items[boundary.saturating_sub(count)..boundary],
            _ => &items[boundary..(boundary + count).min(items.len())],
        };
        for item in wanted {
            candidates.push(resolve(item)?);
        }
    }
    candidates.sort_by(|a, b| compare_ranked(a, b, keys));
    let backward = anchor.is_some_and(|a| a.backward);
    let page: Vec<Ranked> = if backward {
        let skip = candidates.len().saturating_sub(count);
        candidates.into_iter().skip(skip).collect()
    } else {
        candidates.into_iter().take(count).collect()
    };
    let (has_previous, has_next) = if backward {
        (before_total > page.len(), after_total > 0)
    } else {
        (before_total > 0, after_total > page.len())
    };
    Ok(Paged {
        total: docs.len(),
        has_next,
        has_previous,
        page,
    })
}

/// Server-side paging state: a cursor names the last entry of the previous page, so pages
/// stay stable while data changes, and no sort value (which may be PHI) is put in a URL.
#[derive(Debug, Default)]
struct Cursors {
    entries: HashMap<String, (Instant, [u8; 32], Anchor)>,
}

/// Where a page starts: after the last entry of the previous page, or before the first
/// entry of the next one (for `previous` links).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Anchor {
    entry: Ranked,
    backward: bool,
}

const CURSOR_TTL: Duration = Duration::from_secs(3600);
const MAX_CURSORS: usize = 10_000;

fn cursor_table() -> Result<std::sync::MutexGuard<'static, Cursors>> {
    static CURSORS: OnceLock<Mutex<Cursors>> = OnceLock::new();
    CURSORS
        .get_or_init(|| Mutex::new(Cursors::default()))
        .lock()
        .map_err(|_| Error::Internal("cursor table lock poisoned".into()))
}

impl Cursors {
    fn put(&mut self, digest: [u8; 32], last: Anchor) -> String {
        let now = Instant::now();
        self.entries
            .retain(|_, (at, _, _)| now.duration_since(*at) < CURSOR_TTL);
        if self.entries.len() >= MAX_CURSORS
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (at, _, _))| *at)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.entries.insert(token.clone(), (now, digest, last));
        token
    }

    fn get(&self, token: &str, digest: [u8; 32]) -> Result<Anchor> {
        match self.entries.get(token) {
            Some((at, d, last)) if *d == digest && at.elapsed() < CURSOR_TTL => Ok(last.clone()),
            Some((_, d, _)) if *d != digest => Err(Error::InvalidSearch(
                "_cursor belongs to a different search".into(),
            )),
            _ => Err(Error::InvalidSearch(
                "_cursor is unknown or expired; run the search again".into(),
            )),
        }
    }
}

impl Database {
    /// Runs a search and reads the page's resources (one audit leaf for the search).
    pub fn search(&self, ctx: &AccessContext, request: &SearchRequest) -> Result<SearchResult> {
        let digest = request.digest();
        let result = self.search_inner(ctx, request, digest);
        if let Err(error) = &result {
            // A refused search is still an access attempt: record it.
            let outcome = match error {
                Error::InvalidSearch(_) | Error::InvalidSearchParameter(_) => AuditOutcome::Invalid,
                _ => AuditOutcome::Error,
            };
            self.store().record_access(
                ctx,
                AccessRecord {
                    action: AuditAction::Search,
                    resource_type: None,
                    id: None,
                    version: None,
                    outcome,
                    query_hash: Some(digest),
                },
            )?;
        }
        result
    }

    fn search_inner(
        &self,
        ctx: &AccessContext,
        request: &SearchRequest,
        digest: [u8; 32],
    ) -> Result<SearchResult> {
        let searcher = self.current_searcher()?;
        let count = request
            .count
            .unwrap_or(self.limits().default_count)
            .min(self.limits().max_count);
        let anchor = match &request.cursor {
            Some(token) => Some(cursor_table()?.get(token, digest)?),
            None => None,
        };
        let summary_count = request.summary == Some(SummaryMode::Count);
        if summary_count {
            // Only the number: count in the index, read nothing, page nothing.
            let query = self.request_query(&searcher, request)?;
            let total = self.index().count(&searcher, query.as_ref())?;
            self.store()
                .read_many(ctx, AuditAction::Search, digest, &[])?;
            return Ok(SearchResult {
                total: Some(total),
                entries: Vec::new(),
                next_cursor: None,
                previous_cursor: None,
                ignored: request.ignored.clone(),
                canonical_query: request.canonical_query.clone(),
                path: result_path(request),
            });
        }
        let paged = self.page(&searcher, request, anchor.as_ref(), count)?;
        let total = paged.total;
        let page = &paged.page;
        let (mut next_cursor, mut previous_cursor) = (None, None);
        if let (Some(first), Some(last)) = (page.first(), page.last()) {
            let mut table = cursor_table()?;
            if paged.has_next {
                next_cursor = Some(table.put(
                    digest,
                    Anchor {
                        entry: last.clone(),
                        backward: false,
                    },
                ));
            }
            if paged.has_previous {
                previous_cursor = Some(table.put(
                    digest,
                    Anchor {
                        entry: first.clone(),
                        backward: true,
                    },
                ));
            }
        }

        let page_keys: Vec<String> = page.iter().map(|r| r.key.clone()).collect();
        let include_keys = self.include_keys(&searcher, request, &page_keys)?;
        let mut all_keys: Vec<(&str, &str)> =
            Vec::with_capacity(page_keys.len() + include_keys.len());
        for key in page_keys.iter().chain(include_keys.iter()) {
            if let Some(pair) = key.split_once('/') {
                all_keys.push(pair);
            }
        }
        // One audit leaf for the search, also when nothing matched.
        let found = self
            .store()
            .read_many(ctx, AuditAction::Search, digest, &all_keys)?;
        // Parsing (for `_summary`/`_elements`) is most of a large page's time: spread it over
        // the cores.
        let entries = found
            .into_par_iter()
            .enumerate()
            // A resource deleted between the index lookup and the read is left out.
            .filter_map(|(position, stored)| stored.map(|stored| (position, stored)))
            .map(|(position, stored)| {
                let key = format!("{}/{}", stored.resource_type, stored.id);
                let resource = if request.summary.is_none() && request.elements.is_none() {
                    EntryResource::Stored(stored.into_json_bytes())
                } else {
                    let mut resource = stored.to_json()?;
                    if let Some(mode) = request.summary {
                        apply_summary(&mut resource, mode);
                    }
                    if let Some(elements) = &request.elements {
                        apply_elements(&mut resource, elements);
                    }
                    EntryResource::Parsed(resource)
                };
                Ok(SearchEntry {
                    key,
                    resource,
                    mode: if position < page_keys.len() {
                        EntryMode::Match
                    } else {
                        EntryMode::Include
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let path = result_path(request);
        Ok(SearchResult {
            total: match request.total {
                TotalMode::None => None,
                _ => Some(total),
            },
            entries,
            next_cursor,
            previous_cursor,
            ignored: request.ignored.clone(),
            canonical_query: request.canonical_query.clone(),
            path,
        })
    }

    /// The keys (`Type/id`) of every match, in key order, without reading resources.
    pub fn matching_keys(&self, request: &SearchRequest) -> Result<Vec<String>> {
        let searcher = self.current_searcher()?;
        let query = self.request_query(&searcher, request)?;
        let docs = self.index().matching(&searcher, query.as_ref())?;
        let mut keys = Vec::with_capacity(docs.len());
        for doc in docs {
            keys.push(self.index().key(&searcher, doc)?);
        }
        keys.sort();
        Ok(keys)
    }

    /// One page of matches in result order, after `anchor`, with the total.
    fn page(
        &self,
        searcher: &tantivy::Searcher,
        request: &SearchRequest,
        anchor: Option<&Anchor>,
        count: usize,
    ) -> Result<Paged> {
        let query = self.request_query(searcher, request)?;
        let docs = self.index().matching(searcher, query.as_ref())?;
        if request.sort.is_empty() {
            return page_by_key(self.index(), searcher, &docs, anchor, count);
        }
        if let [key] = request.sort.as_slice() {
            // `_id` has no sort column values: its order is the key order when every match
            // has the same type; across types it takes the general path below.
            if key.code != ID_PARAM || request.resource_types.len() == 1 {
                return page_by_sort_key(self.index(), searcher, &docs, key, anchor, count);
            }
        }
        let ranked = self.rank(searcher, &docs, request)?;
        let (start, end) = match anchor {
            Some(anchor) => {
                let position = |r: &Ranked| compare_ranked(r, &anchor.entry, &request.sort);
                if anchor.backward {
                    let end = ranked.partition_point(|r| position(r) == Ordering::Less);
                    (end.saturating_sub(count), end)
                } else {
                    let start = ranked.partition_point(|r| position(r) != Ordering::Greater);
                    (start, (start + count).min(ranked.len()))
                }
            }
            None => (0, count.min(ranked.len())),
        };
        Ok(Paged {
            total: ranked.len(),
            has_next: end < ranked.len(),
            has_previous: start > 0,
            page: ranked[start..end].to_vec(),
        })
    }

    /// Every match with its sort values, in result order (reads each match's key and sort
    /// columns).
    fn rank(
        &self,
        searcher: &tantivy::Searcher,
        docs: &[DocAddress],
        request: &SearchRequest,
    ) -> Result<Vec<Ranked>> {
        let mut ranked = Vec::with_capacity(docs.len());
        for &doc in docs {
            let stored = self.index().doc(searcher, doc)?;
            let sort_values = request
                .sort
                .iter()
                .map(|key| sort_value(&stored.key, &stored.sort, key))
                .collect();
            ranked.push(Ranked {
                sort_values,
                key: stored.key,
            });
        }
        ranked.sort_by(|a, b| compare_ranked(a, b, &request.sort));
        Ok(ranked)
    }

    /// The whole query of a request: types, compartment, every criterion.
    fn request_query(
        &self,
        searcher: &tantivy::Searcher,
        request: &SearchRequest,
    ) -> Result<Box<dyn Query>> {
        let index = self.index();
        let fields = index.fields();
        let registry = self.registry()?;
        let mut must: Vec<Box<dyn Query>> = Vec::new();
        if !request.resource_types.is_empty() {
            must.push(any_of(
                request
                    .resource_types
                    .iter()
                    .map(|t| index.field_term(fields.resource_type, t))
                    .collect(),
            ));
        }
        if let Some((compartment_type, id)) = &request.compartment {
            must.push(compartment_query(
                index,
                &request.resource_types,
                compartment_type,
                id,
            )?);
        }
        for criterion in &request.criteria {
            must.push(self.criterion_query(
                searcher,
                &registry,
                &request.resource_types,
                criterion,
            )?);
        }
        Ok(all_of(must))
    }

    fn criterion_query(
        &self,
        searcher: &tantivy::Searcher,
        registry: &Registry,
        types: &[String],
        criterion: &Criterion,
    ) -> Result<Box<dyn Query>> {
        let index = self.index();
        match criterion {
            Criterion::Param {
                code,
                kind,
                modifier: modifier @ (Modifier::In | Modifier::NotIn),
                values,
            } => {
                let ctx = AccessContext::local("fhirkeep-search");
                let mut codes = Vec::new();
                for url in values {
                    codes.extend(self.value_set_codes(&ctx, url)?);
                }
                let namespace = format!("{code}{SEP}");
                let query = if codes.is_empty() {
                    Box::new(tantivy::query::EmptyQuery) as Box<dyn Query>
                } else {
                    param_query(
                        index,
                        registry,
                        types,
                        code,
                        *kind,
                        &Modifier::None,
                        &codes,
                        &namespace,
                    )?
                };
                Ok(if *modifier == Modifier::NotIn {
                    none_of(query)
                } else {
                    query
                })
            }
            Criterion::Param {
                code,
                kind,
                modifier,
                values,
            } => {
                let namespace = format!("{code}{SEP}");
                param_query(
                    index, registry, types, code, *kind, modifier, values, &namespace,
                )
            }
            Criterion::Chain {
                code,
                target_types,
                inner,
            } => {
                let inner_query = all_of(vec![
                    any_of(
                        target_types
                            .iter()
                            .map(|t| index.field_term(index.fields().resource_type, t))
                            .collect(),
                    ),
                    self.criterion_query(searcher, registry, target_types, inner)?,
                ]);
                let keys = self.inner_keys(searcher, inner_query.as_ref())?;
                Ok(any_of(
                    keys.iter()
                        .map(|key| index.term(&format!("{code}{SEP}r{SEP}{key}")))
                        .collect(),
                ))
            }
            Criterion::Has {
                source_type,
                reference,
                inner,
            } => {
                let inner_query = all_of(vec![
                    index.field_term(index.fields().resource_type, source_type),
                    self.criterion_query(
                        searcher,
                        registry,
                        std::slice::from_ref(source_type),
                        inner,
                    )?,
                ]);
                let docs = index.matching(searcher, inner_query.as_ref())?;
                if docs.len() > self.limits().max_inner_matches {
                    return Err(Error::InvalidSearch(format!(
                        "_has:{source_type}:{reference} matches more than {} resources; narrow it",
                        self.limits().max_inner_matches
                    )));
                }
                let prefix = format!("{reference}{SEP}");
                let mut targets = HashSet::new();
                for doc in docs {
                    for entry in index.refs(searcher, doc)? {
                        if let Some(target) = entry.strip_prefix(&prefix) {
                            let target_type = target.split('/').next().unwrap_or("");
                            if types.is_empty() || types.iter().any(|t| t == target_type) {
                                targets.insert(target.to_string());
                            }
                        }
                    }
                }
                Ok(any_of(
                    targets
                        .iter()
                        .map(|key| index.field_term(index.fields().key, key))
                        .collect(),
                ))
            }
            Criterion::Text(values) => full_text(index, index.fields().narrative, values),
            Criterion::Content(values) => full_text(index, index.fields().content, values),
            Criterion::List(values) => {
                let mut members = Vec::new();
                for list_id in values {
                    let ctx = AccessContext::local("fhirkeep-search");
                    // The List is read like any resource: the read is audited.
                    match self.store().read(&ctx, "List", list_id) {
                        Ok(list) => {
                            let json = list.to_json()?;
                            for entry in json
                                .get("entry")
                                .and_then(Value::as_array)
                                .into_iter()
                                .flatten()
                            {
                                if let Some(reference) = entry
                                    .get("item")
                                    .and_then(|i| i.get("reference"))
                                    .and_then(Value::as_str)
                                {
                                    members.push(index.field_term(index.fields().key, reference));
                                }
                            }
                        }
                        Err(
                            fhirkeep_engine::Error::NotFound | fhirkeep_engine::Error::Gone { .. },
                        ) => {}
                        Err(fhirkeep_engine::Error::InvalidId) => {
                            return Err(Error::InvalidSearch("_list needs List ids".into()));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(any_of(members))
            }
        }
    }

    fn inner_keys(&self, searcher: &tantivy::Searcher, query: &dyn Query) -> Result<Vec<String>> {
        let index = self.index();
        let docs = index.matching(searcher, query)?;
        if docs.len() > self.limits().max_inner_matches {
            return Err(Error::InvalidSearch(format!(
                "a chained parameter matches more than {} resources; narrow it",
                self.limits().max_inner_matches
            )));
        }
        docs.into_iter()
            .map(|doc| index.key(searcher, doc))
            .collect()
    }

    /// Keys to add for `_include` and `_revinclude`, not repeating the page's own.
    fn include_keys(
        &self,
        searcher: &tantivy::Searcher,
        request: &SearchRequest,
        page_keys: &[String],
    ) -> Result<Vec<String>> {
        if request.includes.is_empty() && request.revincludes.is_empty() {
            return Ok(Vec::new());
        }
        let index = self.index();
        let max = self.limits().max_includes;
        let mut seen: HashSet<String> = page_keys.iter().cloned().collect();
        let mut added: Vec<String> = Vec::new();
        let mut frontier: Vec<String> = page_keys.to_vec();
        // Non-iterating includes apply to the matches; iterating ones repeat on what they add.
        let mut first_round = true;
        while !frontier.is_empty() && added.len() < max {
            let mut next = Vec::new();
            for include in request.includes.iter().filter(|i| first_round || i.iterate) {
                for key in &frontier {
                    if !key.starts_with(&format!("{}/", include.source_type)) {
                        continue;
                    }
                    let docs = index
                        .matching(searcher, index.field_term(index.fields().key, key).as_ref())?;
                    for doc in docs {
                        for entry in index.refs(searcher, doc)? {
                            let Some((code, target)) = entry.split_once(SEP) else {
                                continue;
                            };
                            if include.param.as_deref().is_some_and(|p| p != code) {
                                continue;
                            }
                            if include
                                .target_type
                                .as_deref()
                                .is_some_and(|t| !target.starts_with(&format!("{t}/")))
                            {
                                continue;
                            }
                            if seen.insert(target.to_string()) {
                                next.push(target.to_string());
                            }
                        }
                    }
                }
            }
            for include in request
                .revincludes
                .iter()
                .filter(|i| first_round || i.iterate)
            {
                let mut refs: Vec<Box<dyn Query>> = Vec::new();
                for key in &frontier {
                    match &include.param {
                        Some(param) => refs.push(index.term(&format!("{param}{SEP}r{SEP}{key}"))),
                        None => {
                            let registry = self.registry()?;
                            for param in registry.for_type(&include.source_type) {
                                if param.kind == ParamType::Reference {
                                    refs.push(
                                        index.term(&format!("{}{SEP}r{SEP}{key}", param.code)),
                                    );
                                }
                            }
                        }
                    }
                }
                if refs.is_empty() {
                    continue;
                }
                let query = all_of(vec![
                    index.field_term(index.fields().resource_type, &include.source_type),
                    any_of(refs),
                ]);
                for doc in index.matching(searcher, query.as_ref())? {
                    let key = index.key(searcher, doc)?;
                    if seen.insert(key.clone()) {
                        next.push(key);
                    }
                }
            }
            next.sort();
            added.extend(next.iter().cloned());
            frontier = next;
            first_round = false;
        }
        added.truncate(max);
        Ok(added)
    }
}

/// The resources in `compartment_type/id` among `types`, per the Patient
/// CompartmentDefinition.
fn compartment_query(
    index: &SearchIndex,
    types: &[String],
    compartment_type: &str,
    id: &str,
) -> Result<Box<dyn Query>> {
    let definition = crate::compartment::patient_compartment();
    let target = format!("{compartment_type}/{id}");
    let mut alternatives: Vec<Box<dyn Query>> = Vec::new();
    let all_types: Vec<String>;
    let types = if types.is_empty() {
        all_types = definition.keys().cloned().collect();
        &all_types
    } else {
        types
    };
    for resource_type in types {
        if resource_type == compartment_type {
            alternatives.push(index.field_term(index.fields().key, &target));
        }
        let Some(params) = definition.get(resource_type) else {
            continue;
        };
        let refs: Vec<Box<dyn Query>> = params
            .iter()
            .map(|code| index.term(&format!("{code}{SEP}r{SEP}{target}")))
            .collect();
        alternatives.push(all_of(vec![
            index.field_term(index.fields().resource_type, resource_type),
            any_of(refs),
        ]));
    }
    Ok(any_of(alternatives))
}

fn full_text(
    index: &SearchIndex,
    field: tantivy::schema::Field,
    values: &[String],
) -> Result<Box<dyn Query>> {
    let mut parser = QueryParser::for_index(index.tantivy(), vec![field]);
    parser.set_conjunction_by_default();
    let mut alternatives = Vec::new();
    for value in values {
        let (query, errors) = parser.parse_query_lenient(value);
        if !errors.is_empty() {
            // The message would quote the text, which may be PHI.
            return Err(Error::InvalidSearch(
                "_text/_content: the search text has a syntax error".into(),
            ));
        }
        alternatives.push(query);
    }
    Ok(any_of(alternatives))
}

#[allow(clippy::too_many_arguments)]
fn param_query(
    index: &SearchIndex,
    registry: &Registry,
    types: &[String],
    code: &str,
    kind: ParamType,
    modifier: &Modifier,
    values: &[String],
    namespace: &str,
) -> Result<Box<dyn Query>> {
    if *modifier == Modifier::Missing {
        let present = index.term(&format!("{code}{SEP}p{SEP}"));
        // Parsing checked that every value is true or false; mixed values mean "either".
        let wants_missing = values.iter().any(|v| v == "true");
        let wants_present = values.iter().any(|v| v == "false");
        return Ok(match (wants_missing, wants_present) {
            (true, true) => Box::new(tantivy::query::AllQuery),
            (true, false) => none_of(present),
            _ => present,
        });
    }
    if let Some(query) = derived_param_query(index, registry, types, code, kind, modifier, values)?
    {
        return Ok(query);
    }
    let negate = *modifier == Modifier::Not;
    let query = values_query(
        index, registry, types, code, kind, modifier, values, namespace,
    )?;
    Ok(if negate { none_of(query) } else { query })
}

/// Any of `values` (comma is OR) among `code`'s own terms in `namespace`.
#[allow(clippy::too_many_arguments)]
fn values_query(
    index: &SearchIndex,
    registry: &Registry,
    types: &[String],
    code: &str,
    kind: ParamType,
    modifier: &Modifier,
    values: &[String],
    namespace: &str,
) -> Result<Box<dyn Query>> {
    let mut alternatives = Vec::with_capacity(values.len());
    for value in values {
        alternatives.push(value_query(
            index, registry, types, code, kind, modifier, value, namespace,
        )?);
    }
    Ok(any_of(alternatives))
}

/// The query for a parameter that is derived (see `SearchParam::derived_from`) on some of
/// `types`: any of its members' queries there, and its own terms on the other types;
/// `None` when it is derived on none of them.
fn derived_param_query(
    index: &SearchIndex,
    registry: &Registry,
    types: &[String],
    code: &str,
    kind: ParamType,
    modifier: &Modifier,
    values: &[String],
) -> Result<Option<Box<dyn Query>>> {
    let mut groups: Vec<(&[String], Vec<String>)> = Vec::new();
    let mut plain_types = Vec::new();
    for resource_type in types {
        match registry.get(resource_type, code) {
            Some(param) if !param.derived_from.is_empty() => {
                let members = param.derived_from.as_slice();
                match groups.iter_mut().find(|(m, _)| *m == members) {
                    Some((_, group)) => group.push(resource_type.clone()),
                    None => groups.push((members, vec![resource_type.clone()])),
                }
            }
            _ => plain_types.push(resource_type.clone()),
        }
    }
    if groups.is_empty() {
        return Ok(None);
    }
    // `:not` negates the union, not each member.
    let negate = *modifier == Modifier::Not;
    let positive = if negate { &Modifier::None } else { modifier };
    let restrict = groups.len() > 1 || !plain_types.is_empty();
    let of_types = |types: &[String]| {
        any_of(
            types
                .iter()
                .map(|t| index.field_term(index.fields().resource_type, t))
                .collect(),
        )
    };
    let mut alternatives = Vec::new();
    for (members, group_types) in &groups {
        let mut member_queries = Vec::with_capacity(members.len());
        for member in *members {
            member_queries.push(param_query(
                index,
                registry,
                group_types,
                member,
                kind,
                positive,
                values,
                &format!("{member}{SEP}"),
            )?);
        }
        let query = any_of(member_queries);
        alternatives.push(if restrict {
            all_of(vec![of_types(group_types), query])
        } else {
            query
        });
    }
    if !plain_types.is_empty() {
        let own = values_query(
            index,
            registry,
            &plain_types,
            code,
            kind,
            positive,
            values,
            &format!("{code}{SEP}"),
        )?;
        alternatives.push(all_of(vec![of_types(&plain_types), own]));
    }
    let query = any_of(alternatives);
    Ok(Some(if negate { none_of(query) } else { query }))
}

#[allow(clippy::too_many_arguments)]
fn value_query(
    index: &SearchIndex,
    registry: &Registry,
    types: &[String],
    code: &str,
    kind: ParamType,
    modifier: &Modifier,
    value: &str,
    ns: &str,
) -> Result<Box<dyn Query>> {
    let t = |kind: &str, v: &str| format!("{ns}{kind}{SEP}{v}");
    Ok(match kind {
        ParamType::String => match modifier {
            Modifier::Exact => index.term(&t("e", value)),
            Modifier::Contains => index.regex(&format!(
                "{}.*{}.*",
                regex_escape(&t("s", "")),
                regex_escape(&normalize_string(value))
            ))?,
            _ => index.prefix(&t("s", &normalize_string(value))),
        },
        ParamType::Token => match modifier {
            Modifier::Text => index.prefix(&t("x", &normalize_string(value))),
            Modifier::OfType => {
                let parts = split_escaped(value, '|');
                if parts.len() != 3 {
                    return Err(Error::InvalidSearch(format!(
                        "parameter {code:?}: :of-type takes system|code|value"
                    )));
                }
                index.term(&t("o", &format!("{}|{}|{}", parts[0], parts[1], parts[2])))
            }
            Modifier::In | Modifier::NotIn => {
                return Err(Error::Internal("`:in` reached the term builder".into()));
            }
            _ if code == ID_PARAM => id_query(index, types, &token_form(value)),
            _ => {
                let form = token_form(value);
                match form.strip_suffix('|') {
                    // `system|`, any code of the system: the `system|code` terms with that
                    // prefix (the index has no term of its own for it, see `extract::emit`).
                    Some(system) if !system.is_empty() && !system.contains('|') => {
                        index.prefix(&t("t", &form))
                    }
                    _ => index.term(&t("t", &form)),
                }
            }
        },
        ParamType::Reference => {
            if *modifier == Modifier::Identifier {
                index.term(&t("i", &token_form(value)))
            } else {
                let target = match modifier {
                    Modifier::Type(target_type) if !value.contains('/') => {
                        format!("{target_type}/{value}")
                    }
                    _ => value.to_string(),
                };
                let mut forms = vec![index.term(&t("r", &target))];
                if let Some(local) = crate::extract::reference_forms(&target).get(1)
                    && local.contains('/')
                {
                    forms.push(index.term(&t("r", local)));
                }
                if fhirkeep_engine::resource::is_valid_id(&target) {
                    // An id alone: `Type/id` for every type the parameter may point to (the
                    // index has no bare-id terms; see `extract::reference_forms`).
                    for target_type in reference_targets(registry, types, code) {
                        forms.push(index.term(&t("r", &format!("{target_type}/{target}"))));
                    }
                }
                any_of(forms)
            }
        }
        ParamType::Uri => match modifier {
            Modifier::Below => index.prefix(&t("u", value)),
            Modifier::Above => {
                let mut prefixes = Vec::new();
                let mut current = value;
                loop {
                    prefixes.push(index.term(&t("u", current)));
                    match current.rfind('/') {
                        Some(pos) if pos > 0 && !current[..pos].ends_with('/') => {
                            current = &current[..pos]
                        }
                        _ => break,
                    }
                }
                any_of(prefixes)
            }
            _ => index.term(&t("u", value)),
        },
        ParamType::Date => date_query(index, code, value, ns)?,
        ParamType::Number => {
            let (prefix, number) = split_prefix(value);
            let x: f64 = number
                .parse()
                .map_err(|_| Error::InvalidSearch(format!("parameter {code:?}: not a number")))?;
            number_query(
                index,
                &format!("{ns}n{SEP}"),
                prefix,
                x,
                implied_half_width(number),
            )
        }
        ParamType::Quantity => {
            let (prefix, rest) = split_prefix(value);
            let parts = split_escaped(rest, '|');
            let x: f64 = parts[0]
                .parse()
                .map_err(|_| Error::InvalidSearch(format!("parameter {code:?}: not a number")))?;
            let unit_key = match (
                parts.get(1).map(String::as_str),
                parts.get(2).map(String::as_str),
            ) {
                (None, _) | (Some(""), None) | (Some(""), Some("")) => String::new(),
                (Some(""), Some(code)) => format!("|{code}"),
                (Some(system), Some(code)) => format!("{system}|{code}"),
                (Some(_), None) => {
                    return Err(Error::InvalidSearch(format!(
                        "parameter {code:?}: a quantity is number|system|code"
                    )));
                }
            };
            number_query(
                index,
                &format!("{ns}q{SEP}{unit_key}{SEP}"),
                prefix,
                x,
                implied_half_width(&parts[0]),
            )
        }
        ParamType::Composite => composite_query(index, registry, types, code, value)?,
        ParamType::Special => {
            return Err(Error::InvalidSearch(format!(
                "parameter {code:?} is not supported"
            )));
        }
    })
}

/// `_id=value` as lookups of the document key `Type/id` for each of `types` (every R4 type
/// when none is given): ids are not indexed as terms of their own. An id has no system, so
/// `|id` is `id` and `system|id` matches nothing.
/// The types a reference parameter may point to on any of `types`: its targets, or every
/// resource type for a parameter that names none.
fn reference_targets<'r>(registry: &'r Registry, types: &[String], code: &str) -> Vec<&'r str> {
    let mut targets: Vec<&str> = Vec::new();
    let on_all_types = [String::from("Patient")];
    let types = if types.is_empty() {
        &on_all_types[..]
    } else {
        types
    };
    for resource_type in types {
        let Some(param) = registry.get(resource_type, code) else {
            continue;
        };
        if param.targets.is_empty() {
            return fhirkeep_engine::resource::resource_types().to_vec();
        }
        targets.extend(param.targets.iter().map(String::as_str));
    }
    targets.sort_unstable();
    targets.dedup();
    targets
}

fn id_query(index: &SearchIndex, types: &[String], form: &str) -> Box<dyn Query> {
    let id = form.strip_prefix('|').unwrap_or(form);
    if id.contains('|') {
        return Box::new(tantivy::query::EmptyQuery);
    }
    let key = |t: &str| index.field_term(index.fields().key, &format!("{t}/{id}"));
    if types.is_empty() {
        any_of(
            fhirkeep_engine::resource::resource_types()
                .iter()
                .map(|t| key(t))
                .collect(),
        )
    } else {
        any_of(types.iter().map(|t| key(t)).collect())
    }
}

/// A token search value in the form it is indexed under.
fn token_form(value: &str) -> String {
    let parts = split_escaped(value, '|');
    match parts.as_slice() {
        [code] => code.clone(),
        [system, code] => format!("{system}|{code}"),
        _ => value.to_string(),
    }
}

fn composite_query(
    index: &SearchIndex,
    registry: &Registry,
    types: &[String],
    code: &str,
    value: &str,
) -> Result<Box<dyn Query>> {
    let param = crate::params::param_on_types(registry, types, code)
        .ok_or_else(|| Error::InvalidSearch(format!("unknown parameter {code:?}")))?;
    let parts = split_escaped(value, '$');
    let Some((last_part, leading_parts)) = parts.split_last() else {
        return Err(Error::InvalidSearch(format!(
            "parameter {code:?}: empty composite value"
        )));
    };
    // How each searched type indexes the parameter: by its components (one focus, see
    // `extract::single_focus`) or by their combinations; a search over types of both kinds
    // asks both ways.
    let by_type: Vec<(&std::sync::Arc<crate::registry::SearchParam>, bool)> = types
        .iter()
        .filter_map(|t| {
            registry
                .get(t, code)
                .map(|p| (p, crate::extract::single_focus(p, t)))
        })
        .collect();
    let single = by_type.iter().find(|(_, single)| *single).map(|(p, _)| *p);
    let combined = if by_type.is_empty() {
        Some(param)
    } else {
        by_type.iter().find(|(_, single)| !*single).map(|(p, _)| *p)
    };
    let mut shapes = Vec::new();
    for (param, single) in [(combined, false), (single, true)] {
        let Some(param) = param else { continue };
        let Some((last, leading)) = param.components.split_last() else {
            return Err(Error::InvalidSearch(format!(
                "parameter {code:?} has no components"
            )));
        };
        if leading.len() != leading_parts.len() {
            return Err(Error::InvalidSearch(format!(
                "parameter {code:?}: a composite value needs one $-separated part per component"
            )));
        }
        let forms =
            leading
                .iter()
                .zip(leading_parts)
                .map(|(component, part)| match component.kind {
                    ParamType::Token => token_form(part),
                    ParamType::String => normalize_string(part),
                    _ => part.to_string(),
                });
        let last_query = |ns: &str| {
            value_query(
                index,
                registry,
                types,
                code,
                last.kind,
                &Modifier::None,
                last_part,
                ns,
            )
        };
        shapes.push(if single {
            let mut all: Vec<Box<dyn Query>> = forms
                .enumerate()
                .map(|(position, form)| index.term(&format!("{code}{SEP}c{position}{SEP}{form}")))
                .collect();
            all.push(last_query(&format!("{code}{SEP}c{}{SEP}", leading.len()))?);
            all_of(all)
        } else {
            let prefix = forms.collect::<Vec<_>>().join("$");
            last_query(&format!("{code}{SEP}c{SEP}{prefix}{SEP}"))?
        });
    }
    Ok(if shapes.len() == 1 {
        shapes.remove(0)
    } else {
        any_of(shapes)
    })
}

fn date_query(index: &SearchIndex, code: &str, value: &str, ns: &str) -> Result<Box<dyn Query>> {
    let (prefix, text) = split_prefix(value);
    let date = parse_fhir_date(text)
        .ok_or_else(|| Error::InvalidSearch(format!("parameter {code:?}: not a FHIR date")))?;
    let (x_low, x_high) = (date.range.low, date.range.high);
    let at_least = |bound: char, t: i64| date_bound(index, ns, bound, Side::AtLeast, t);
    let at_most = |bound: char, t: i64| date_bound(index, ns, bound, Side::AtMost, t);
    let eq = || -> Box<dyn Query> {
        let bucket = search_bucket(&date).map(|b| index.term(&format!("{ns}db{SEP}{b}")));
        match (date.precision, bucket) {
            (DatePrecision::Year | DatePrecision::Month | DatePrecision::Day, Some(bucket)) => {
                bucket
            }
            (DatePrecision::Minute | DatePrecision::Second, Some(bucket)) => {
                // Values alone on their day: both bounds within the asked minute or second;
                // values on a crowded day: the bucket (see `extract::emit`).
                let day = date_buckets(date.range).pop().unwrap_or_default();
                any_of(vec![
                    all_of(vec![
                        day_bounds_between(index, ns, 'l', x_low, x_high),
                        day_bounds_between(index, ns, 'h', x_low, x_high),
                        none_of(index.term(&format!("{ns}dm{SEP}{day}"))),
                    ]),
                    // A point's or a second's one term holds both bounds: exact on any day.
                    day_points_between(index, ns, x_low, x_high),
                    day_seconds_between(index, ns, x_low, x_high - SECOND_SPAN),
                    bucket,
                ])
            }
            _ => all_of(vec![at_least('l', x_low), at_most('h', x_high)]),
        }
    };
    Ok(match prefix {
        Prefix::Eq => eq(),
        Prefix::Ne => none_of(eq()),
        Prefix::Gt => at_least('h', x_high.saturating_add(1)),
        Prefix::Ge => at_least('h', x_low),
        Prefix::Lt => at_most('l', x_low.saturating_sub(1)),
        Prefix::Le => at_most('l', x_high),
        Prefix::Sa => at_least('l', x_high.saturating_add(1)),
        Prefix::Eb => at_most('h', x_low.saturating_sub(1)),
        Prefix::Ap => {
            // Within 10 % of the distance from now, as the spec suggests, at least a day.
            let now = chrono::Utc::now().timestamp_micros();
            let gap = (now.saturating_sub(x_low)).unsigned_abs() / 10;
            let slack = i64::try_from(gap).unwrap_or(i64::MAX).max(86_400_000_000);
            all_of(vec![
                at_most('l', x_high.saturating_add(slack)),
                at_least('h', x_low.saturating_sub(slack)),
            ])
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    AtLeast,
    AtMost,
}

/// Date values whose low (`bound` = 'l') or high ('h') instant is at least / at most `t`.
///
/// Values are filed by the finest calendar unit that holds them (see
/// [`crate::extract::date_class`]). Whole units after (or before) the one containing `t` are
/// taken as bucket terms — a handful of terms, however many values they hold — and only the
/// bound terms inside `t`'s own day, month and year (per class) and of year-spanning values
/// are scanned as ranges.
/// Documents with a `bound` (`l` or `h`) of a day-long-or-shorter value within `[low, high]`.
fn day_bounds_between(
    index: &SearchIndex,
    ns: &str,
    bound: char,
    low: i64,
    high: i64,
) -> Box<dyn Query> {
    let term_of = |v: i64| format!("{ns}d{bound}D{SEP}{}", ordered_i64(v));
    index.range(
        Bound::Included(term_of(low)),
        Bound::Included(term_of(high)),
    )
}

/// Documents with a point value (`dpD`, both bounds in one term) within `[low, high]`.
fn day_points_between(index: &SearchIndex, ns: &str, low: i64, high: i64) -> Box<dyn Query> {
    day_bounds_between(index, ns, 'p', low, high)
}

/// Documents with a value to the second (`dsD`: one term, the low bound) whose low bound is
/// within `[low, high]`.
fn day_seconds_between(index: &SearchIndex, ns: &str, low: i64, high: i64) -> Box<dyn Query> {
    day_bounds_between(index, ns, 's', low, high)
}

/// The offset from a `dsD` term's instant (the low bound) to the `bound` asked for.
fn second_offset(bound: char) -> i64 {
    if bound == 'h' { SECOND_SPAN } else { 0 }
}

/// Documents with a `bound` (`l` or `h`) on `side` of `t`, over every calendar class.
///
/// Point values (`dpD`, see `extract`) stand for both bounds, so every side also looks at them;
/// they are day-class values, found beyond `t`'s day through the day buckets like the others.
fn date_bound(index: &SearchIndex, ns: &str, bound: char, side: Side, t: i64) -> Box<dyn Query> {
    let term_of = |class: char, v: i64| format!("{ns}d{bound}{class}{SEP}{}", ordered_i64(v));
    let class_start = |class: char| format!("{ns}d{bound}{class}{SEP}");
    let class_end = |class: char| format!("{ns}d{bound}{class}{SEP}g");
    let bucket = |b: String| format!("{ns}db{SEP}{b}");
    let point_of = |v: i64| format!("{ns}dpD{SEP}{}", ordered_i64(v));
    let Some(at) = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(t) else {
        // Beyond the calendar: scan every class (rare; only for extreme `ap` slack).
        let mut parts: Vec<Box<dyn Query>> = ['D', 'M', 'Y', 'S']
            .into_iter()
            .map(|class| match side {
                Side::AtLeast => index.range(
                    Bound::Included(term_of(class, t)),
                    Bound::Excluded(class_end(class)),
                ),
                Side::AtMost => index.range(
                    Bound::Included(class_start(class)),
                    Bound::Included(term_of(class, t)),
                ),
            })
            .collect();
        parts.push(match side {
            Side::AtLeast => index.range(
                Bound::Included(point_of(t)),
                Bound::Excluded(format!("{ns}dpD{SEP}g")),
            ),
            Side::AtMost => index.range(
                Bound::Included(format!("{ns}dpD{SEP}")),
                Bound::Included(point_of(t)),
            ),
        });
        let second_of = |v: i64| format!("{ns}dsD{SEP}{}", ordered_i64(v));
        let second_t = t.saturating_sub(second_offset(bound));
        parts.push(match side {
            Side::AtLeast => index.range(
                Bound::Included(second_of(second_t)),
                Bound::Excluded(format!("{ns}dsD{SEP}g")),
            ),
            Side::AtMost => index.range(
                Bound::Included(format!("{ns}dsD{SEP}")),
                Bound::Included(second_of(second_t)),
            ),
        });
        return any_of(parts);
    };
    use chrono::Datelike as _;
    let (year, month, day) = (at.year(), at.month(), at.day());
    // Start and end (inclusive) of the day, month and year holding `t`, in µs.
    let day_start = t - t.rem_euclid(86_400_000_000);
    let day_end = day_start + 86_400_000_000 - 1;
    let micros = |y: i32, m: u32| -> Option<i64> {
        chrono::NaiveDate::from_ymd_opt(y, m, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc().timestamp_micros())
    };
    let month_start = micros(year, month).unwrap_or(day_start);
    let month_end = if month == 12 {
        micros(year + 1, 1)
    } else {
        micros(year, month + 1)
    }
    .map_or(day_end, |next| next - 1);
    let year_start = micros(year, 1).unwrap_or(month_start);
    let year_end = micros(year + 1, 1).map_or(month_end, |next| next - 1);
    let mut parts: Vec<Box<dyn Query>> = Vec::with_capacity(8);
    match side {
        Side::AtLeast => {
            parts.push(index.range(
                Bound::Excluded(bucket(format!("Y{year:04}"))),
                Bound::Included(bucket("Y9999".into())),
            ));
            parts.push(index.range(
                Bound::Excluded(bucket(format!("M{year:04}-{month:02}"))),
                Bound::Included(bucket(format!("M{year:04}-12"))),
            ));
            parts.push(index.range(
                Bound::Excluded(bucket(format!("D{year:04}-{month:02}-{day:02}"))),
                Bound::Included(bucket(format!("D{year:04}-{month:02}-31"))),
            ));
            for (class, end) in [('D', day_end), ('M', month_end), ('Y', year_end)] {
                parts.push(index.range(
                    Bound::Included(term_of(class, t)),
                    Bound::Included(term_of(class, end)),
                ));
            }
            parts.push(index.range(
                Bound::Included(term_of('S', t)),
                Bound::Excluded(class_end('S')),
            ));
            parts.push(index.range(
                Bound::Included(point_of(t)),
                Bound::Included(point_of(day_end)),
            ));
            // A value to the second lies within one day (days are whole seconds), so the
            // ones of other days are the day buckets' already.
            parts.push(day_seconds_between(
                index,
                ns,
                (t - second_offset(bound)).max(day_start),
                day_end,
            ));
        }
        Side::AtMost => {
            parts.push(index.range(
                Bound::Included(bucket("Y".into())),
                Bound::Excluded(bucket(format!("Y{year:04}"))),
            ));
            parts.push(index.range(
                Bound::Included(bucket(format!("M{year:04}-01"))),
                Bound::Excluded(bucket(format!("M{year:04}-{month:02}"))),
            ));
            parts.push(index.range(
                Bound::Included(bucket(format!("D{year:04}-{month:02}-01"))),
                Bound::Excluded(bucket(format!("D{year:04}-{month:02}-{day:02}"))),
            ));
            for (class, start) in [('D', day_start), ('M', month_start), ('Y', year_start)] {
                parts.push(index.range(
                    Bound::Included(term_of(class, start)),
                    Bound::Included(term_of(class, t)),
                ));
            }
            parts.push(index.range(
                Bound::Included(class_start('S')),
                Bound::Included(term_of('S', t)),
            ));
            parts.push(index.range(
                Bound::Included(point_of(day_start)),
                Bound::Included(point_of(t)),
            ));
            parts.push(day_seconds_between(
                index,
                ns,
                day_start,
                t - second_offset(bound),
            ));
        }
    }
    any_of(parts)
}

fn number_query(
    index: &SearchIndex,
    ns: &str,
    prefix: Prefix,
    x: f64,
    half: f64,
) -> Box<dyn Query> {
    let at = |v: f64| format!("{ns}{}", ordered_f64(v));
    let (start, end) = (ns.to_string(), format!("{ns}g"));
    let eq = || index.range(Bound::Included(at(x - half)), Bound::Excluded(at(x + half)));
    match prefix {
        Prefix::Eq => eq(),
        Prefix::Ne => none_of(eq()),
        Prefix::Gt | Prefix::Sa => index.range(Bound::Excluded(at(x)), Bound::Excluded(end)),
        Prefix::Ge => index.range(Bound::Included(at(x)), Bound::Excluded(end)),
        Prefix::Lt | Prefix::Eb => index.range(Bound::Included(start), Bound::Excluded(at(x))),
        Prefix::Le => index.range(Bound::Included(start), Bound::Included(at(x))),
        Prefix::Ap => {
            let slack = (x.abs() * 0.1).max(half);
            index.range(
                Bound::Included(at(x - slack)),
                Bound::Included(at(x + slack)),
            )
        }
    }
}

/// The sort value of `key` for one document: the smallest (ascending) or largest
/// (descending) of its values.
fn sort_value(doc_key: &str, sort: &[String], key: &SortKey) -> Option<String> {
    if key.code == "_id" {
        return doc_key.split_once('/').map(|(_, id)| id.to_string());
    }
    let prefix = format!("{}{SEP}", key.code);
    let values = sort.iter().filter_map(|s| s.strip_prefix(&prefix));
    if key.descending {
        values.max().map(String::from)
    } else {
        values.min().map(String::from)
    }
}

fn compare_ranked(a: &Ranked, b: &Ranked, keys: &[SortKey]) -> Ordering {
    for (i, key) in keys.iter().enumerate() {
        let ordering = match (&a.sort_values[i], &b.sort_values[i]) {
            (Some(x), Some(y)) => {
                if key.descending {
                    y.cmp(x)
                } else {
                    x.cmp(y)
                }
            }
            // Resources without a value come last either way.
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    a.key.cmp(&b.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_puts_missing_values_last_and_breaks_ties_by_key() {
        let keys = [SortKey {
            code: "birthdate".into(),
            descending: true,
        }];
        let r = |v: Option<&str>, k: &str| Ranked {
            sort_values: vec![v.map(String::from)],
            key: k.into(),
        };
        let mut items = [
            r(None, "Patient/a"),
            r(Some("1"), "Patient/b"),
            r(Some("2"), "Patient/c"),
            r(Some("2"), "Patient/a"),
        ];
        items.sort_by(|a, b| compare_ranked(a, b, &keys));
        let order: Vec<&str> = items.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(order, ["Patient/a", "Patient/c", "Patient/b", "Patient/a"]);
        assert_eq!(items[0].sort_values[0].as_deref(), Some("2"));
        assert_eq!(items[3].sort_values[0], None);
    }

    #[test]
    fn cursors_are_bound_to_their_search() {
        let mut table = Cursors::default();
        let last = Anchor {
            entry: Ranked {
                sort_values: vec![],
                key: "Patient/1".into(),
            },
            backward: false,
        };
        let token = table.put([1; 32], last.clone());
        assert_eq!(table.get(&token, [1; 32]).unwrap(), last);
        assert!(table.get(&token, [2; 32]).is_err());
        assert!(table.get("nope", [1; 32]).is_err());
    }
}
