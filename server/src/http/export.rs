//! Bulk Data `$export` (FHIR Bulk Data Access IG, async pattern): the kick-off of system,
//! Patient and Group exports, status polling, cancellation, file downloads, and the
//! background jobs that write NDJSON into the encrypted auxiliary database `exports`.
//!
//! Files never touch the disk in plaintext: a job writes each type's NDJSON in chunks into
//! a redb table of `Store::open_aux_database("exports")` (encrypted pages, like the search
//! index), keyed by (job id, file name, chunk number). Job records live in the same file, so
//! finished jobs survive a restart until they expire.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{CONTENT_LOCATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use fhirkeep_engine::audit::AuditAction;
use fhirkeep_engine::audit::merkle::leaf_hash;
use fhirkeep_engine::resource::is_resource_type;
use fhirkeep_engine::store::{AccessContext, Store};
use fhirkeep_query::params::{Handling, decode_query, parse_search};
use fhirkeep_query::patient_compartment;
use fhirkeep_query::{Database, Error};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Decision, Grant, authorize};
use super::envelope::RequestInfo;
use super::response::{ApiError, FhirResponse, ResponseBody, outcome};
use super::scopes::Letter;

/// The auxiliary database (`exports.redb`) that holds jobs and files.
pub(crate) const AUX_NAME: &str = "exports";
/// How long jobs and their files are kept by default (`--export-ttl`).
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// The media type of the files.
const NDJSON: &str = "application/fhir+ndjson";
/// File contents in chunks of this size: one redb value per chunk, so a large file never
/// needs one huge value. (Small in tests, so that they cross chunk and file boundaries.)
const CHUNK_BYTES: usize = if cfg!(test) { 1024 } else { 1 << 20 };
/// A type's resources are split into files of about this size: a download is read whole
/// into memory, so this bounds the memory of one download.
const FILE_BYTES: usize = if cfg!(test) { 4096 } else { 32 << 20 };
/// Jobs one client may have running at once (more: 429).
const MAX_RUNNING_PER_CLIENT: usize = 4;
/// Keys read from the store per call (one audit leaf per call).
const READ_BATCH: usize = 500;

/// (job id, file name, chunk number) → NDJSON bytes.
pub(crate) const FILES: TableDefinition<'static, (&str, &str, u64), &[u8]> =
    TableDefinition::new("export_files");
/// job id → the job record as JSON.
const JOBS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("export_jobs");

static X_PROGRESS: HeaderName = HeaderName::from_static("x-progress");

/// What an export covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Scope {
    /// `GET /$export`: every resource of the types.
    System,
    /// `GET /Patient/$export`: the compartments of all patients.
    Patients,
    /// `GET /Group/[id]/$export`: the compartments of the group's patient members.
    Group(Vec<String>),
}

/// One file of a finished export.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Output {
    #[serde(rename = "type")]
    resource_type: String,
    name: String,
    count: u64,
    /// A file of deletions (the manifest's `deleted`: Bundles of DELETE entries).
    #[serde(default)]
    deleted: bool,
}

/// Where a job is.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Progress {
    Running { done: usize, total: usize },
    Done(Vec<Output>),
    Failed,
}

/// A job as stored: who may see it, what it was asked, and where it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    owner_subject: String,
    owner_client: String,
    /// The kick-off URL (for the manifest's `request`).
    request: String,
    transaction_time: String,
    expires_ms: i64,
    progress: Progress,
}

impl Job {
    fn owned_by(&self, grant: &Grant) -> bool {
        self.owner_subject == grant.subject && self.owner_client == grant.client
    }
}

/// The jobs of a server and the encrypted file that holds them.
#[derive(Debug)]
pub(crate) struct Exports {
    jobs: Mutex<HashMap<String, (Job, Arc<AtomicBool>)>>,
    /// Opened on first use (or at startup), then shared by every job.
    db: Mutex<Option<Arc<redb::Database>>>,
    ttl_seconds: std::sync::atomic::AtomicU64,
}

impl Default for Exports {
    fn default() -> Self {
        Exports {
            jobs: Mutex::new(HashMap::new()),
            db: Mutex::new(None),
            ttl_seconds: std::sync::atomic::AtomicU64::new(DEFAULT_TTL.as_secs()),
        }
    }
}

fn storage_error(_error: impl std::fmt::Display) -> ApiError {
    // Not logged with its text: redb's messages may name keys (job and file names).
    tracing::error!("the export store failed");
    ApiError::internal()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; it stays usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Exports {
    /// Sets how long jobs and files are kept (`--export-ttl`).
    pub(crate) fn set_ttl(&self, ttl: Duration) {
        self.ttl_seconds
            .store(ttl.as_secs().max(1), Ordering::Relaxed);
    }

    fn ttl(&self) -> i64 {
        i64::try_from(self.ttl_seconds.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
    }

    /// The aux database, opened on first use; at that moment the jobs of an earlier run are
    /// loaded, and the expired or unfinished ones deleted.
    pub(crate) fn db(&self, store: &Store) -> Result<Arc<redb::Database>, ApiError> {
        let mut slot = lock(&self.db);
        if let Some(db) = slot.as_ref() {
            return Ok(Arc::clone(db));
        }
        let db = Arc::new(
            store
                .open_aux_database(AUX_NAME)
                .map_err(|e| ApiError::query(&Error::Engine(e), false))?,
        );
        let txn = db.begin_write().map_err(storage_error)?;
        txn.open_table(FILES).map_err(storage_error)?;
        let stored: Vec<(String, Vec<u8>)> = {
            let jobs = txn.open_table(JOBS).map_err(storage_error)?;
            let mut stored = Vec::new();
            for row in jobs.iter().map_err(storage_error)? {
                let (id, bytes) = row.map_err(storage_error)?;
                stored.push((id.value().to_owned(), bytes.value().to_vec()));
            }
            stored
        };
        txn.commit().map_err(storage_error)?;
        let now = Utc::now().timestamp_millis();
        let mut jobs = lock(&self.jobs);
        let mut stale = Vec::new();
        for (id, bytes) in stored {
            match serde_json::from_slice::<Job>(&bytes) {
                Ok(job) if matches!(job.progress, Progress::Done(_)) && job.expires_ms > now => {
                    jobs.insert(id, (job, Arc::new(AtomicBool::new(false))));
                }
                // Expired, failed, or cut off by the restart.
                _ => stale.push(id),
            }
        }
        drop(jobs);
        for id in stale {
            delete_job_rows(&db, &id)?;
        }
        *slot = Some(Arc::clone(&db));
        Ok(db)
    }

    /// Deletes the jobs (and files) that expired by `now_ms`; returns how many.
    pub(crate) fn sweep(&self, store: &Store, now_ms: i64) -> Result<usize, ApiError> {
        let db = self.db(store)?;
        let expired: Vec<(String, Arc<AtomicBool>)> = {
            let mut jobs = lock(&self.jobs);
            let ids: Vec<String> = jobs
                .iter()
                .filter(|(_, (job, _))| job.expires_ms <= now_ms)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| jobs.remove(&id).map(|(_, cancel)| (id, cancel)))
                .collect()
        };
        for (id, cancel) in &expired {
            cancel.store(true, Ordering::Relaxed);
            delete_job_rows(&db, id)?;
        }
        Ok(expired.len())
    }

    fn job(&self, id: &str, grant: &Grant) -> Option<Job> {
        let jobs = lock(&self.jobs);
        let (job, _) = jobs.get(id)?;
        // Another client's job answers like a missing one.
        job.owned_by(grant).then(|| job.clone())
    }

    fn update(&self, id: &str, progress: Progress) {
        if let Some((job, _)) = lock(&self.jobs).get_mut(id) {
            job.progress = progress;
        }
    }
}

fn delete_job_rows(db: &redb::Database, id: &str) -> Result<(), ApiError> {
    let txn = db.begin_write().map_err(storage_error)?;
    {
        let mut files = txn.open_table(FILES).map_err(storage_error)?;
        let keys: Vec<(String, u64)> = files
            .range((id, "", 0)..)
            .map_err(storage_error)?
            .map_while(|row| {
                let (key, _) = row.ok()?;
                let (job, name, chunk) = key.value();
                (job == id).then(|| (name.to_owned(), chunk))
            })
            .collect();
        for (name, chunk) in keys {
            files
                .remove((id, name.as_str(), chunk))
                .map_err(storage_error)?;
        }
        txn.open_table(JOBS)
            .map_err(storage_error)?
            .remove(id)
            .map_err(storage_error)?;
    }
    txn.commit().map_err(storage_error)
}

fn persist_job(db: &redb::Database, id: &str, job: &Job) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(job).map_err(storage_error)?;
    let txn = db.begin_write().map_err(storage_error)?;
    txn.open_table(JOBS)
        .map_err(storage_error)?
        .insert(id, bytes.as_slice())
        .map_err(storage_error)?;
    txn.commit().map_err(storage_error)
}

impl AppState {
    pub(crate) fn exports(&self) -> &Exports {
        &self.inner.exports
    }

    /// Sets `--export-ttl`, deletes expired jobs of an earlier run, and starts the periodic
    /// task that deletes expired jobs and files. Must run inside the tokio runtime.
    pub(crate) fn start_exports(&self, ttl: Duration) -> Result<(), ApiError> {
        self.exports().set_ttl(ttl);
        let db = self.db();
        self.exports()
            .sweep(db.store(), Utc::now().timestamp_millis())?;
        let state = self.clone();
        let period = Duration::from_secs((ttl.as_secs() / 4).clamp(1, 60));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            loop {
                interval.tick().await;
                let state = state.clone();
                let swept = tokio::task::spawn_blocking(move || {
                    let db = state.db();
                    state
                        .exports()
                        .sweep(db.store(), Utc::now().timestamp_millis())
                })
                .await;
                if !matches!(swept, Ok(Ok(_))) {
                    tracing::error!("could not delete expired export jobs");
                }
            }
        });
        Ok(())
    }

    /// Opens the export store (loading the jobs of an earlier run) if no request has yet.
    async fn exports_loaded(&self) -> Result<(), ApiError> {
        if lock(&self.exports().db).is_some() {
            return Ok(());
        }
        let state = self.clone();
        tokio::task::spawn_blocking(move || {
            let db = state.db();
            state.exports().db(db.store()).map(drop)
        })
        .await
        .map_err(|_| ApiError::internal())?
    }

    /// Registers `n` running jobs of `grant`'s client that never finish, for tests.
    #[cfg(test)]
    pub(crate) fn fake_running_exports(&self, grant: &Grant, n: usize) {
        let mut jobs = lock(&self.exports().jobs);
        for i in 0..n {
            let job = Job {
                owner_subject: grant.subject.clone(),
                owner_client: grant.client.clone(),
                request: String::new(),
                transaction_time: String::new(),
                expires_ms: i64::MAX,
                progress: Progress::Running { done: 0, total: 1 },
            };
            jobs.insert(format!("fake{i}"), (job, Arc::new(AtomicBool::new(false))));
        }
    }

    /// Deletes expired jobs now (the periodic task's work), for tests.
    #[cfg(test)]
    pub(crate) fn sweep_exports_at(&self, now_ms: i64) -> usize {
        let db = self.db();
        self.exports().sweep(db.store(), now_ms).unwrap_or_default()
    }
}

type Info = Extension<Arc<RequestInfo>>;

/// Whether the `Prefer` header asks for `respond-async`.
fn respond_async(headers: &HeaderMap) -> bool {
    headers
        .get_all(HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .any(|token| token.trim().eq_ignore_ascii_case("respond-async"))
}

/// The kick-off parameters.
#[derive(Debug, Default)]
struct Params {
    types: Option<Vec<String>>,
    since: Option<DateTime<Utc>>,
    /// `_typeFilter`: per type, searches whose matches (any of them) are exported; a type
    /// without filters is exported whole.
    type_filters: BTreeMap<String, Vec<Vec<(String, String)>>>,
    /// `_elements`: root elements to keep (`name` for every type, `Type.name` for one).
    elements: Option<Vec<String>>,
}

/// The types one export search covers, and its parameters (none: every resource).
type TypeSearch<'a> = (Vec<String>, &'a [(String, String)]);

/// Splits a `_typeFilter` value into its `Type?query` searches. Filters are comma-separated;
/// a comma inside a search (an OR of values, `code=a,b`) belongs to the search before it, so a
/// new filter starts only where a resource type and `?` follow the comma.
fn split_type_filters(value: &str) -> Vec<&str> {
    let mut filters: Vec<&str> = Vec::new();
    let mut start = 0;
    for (at, _) in value.match_indices(',') {
        let next = &value[at + 1..];
        let starts_filter = next
            .split_once('?')
            .is_some_and(|(t, _)| is_resource_type(t.trim()));
        if starts_filter {
            filters.push(&value[start..at]);
            start = at + 1;
        }
    }
    filters.push(&value[start..]);
    filters
        .into_iter()
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect()
}

fn parse_params(query: Option<&str>) -> Result<Params, ApiError> {
    let pairs = decode_query(query.unwrap_or("")).map_err(|e| ApiError::query(&e, false))?;
    let mut params = Params::default();
    for (name, value) in pairs {
        match name.as_str() {
            "_type" => {
                let mut types = params.types.take().unwrap_or_default();
                for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if !is_resource_type(t) {
                        return Err(ApiError::bad_request(
                            "_type names a type that is not an R4 resource type",
                        ));
                    }
                    types.push(t.to_owned());
                }
                params.types = Some(types);
            }
            "_since" => {
                // An unencoded `+` of the zone offset arrives as a space.
                let since =
                    DateTime::parse_from_rfc3339(&value.replace(' ', "+")).map_err(|_| {
                        ApiError::bad_request("_since must be a FHIR instant with a time zone")
                    })?;
                params.since = Some(since.with_timezone(&Utc));
            }
            "_outputFormat" => {
                // An unencoded `+` arrives as a space.
                let format = value.replace(' ', "+");
                if !matches!(
                    format.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) {
                    return Err(ApiError::bad_request(
                        "_outputFormat must be application/fhir+ndjson",
                    ));
                }
            }
            "_typeFilter" => {
                for filter in split_type_filters(&value) {
                    let Some((resource_type, query)) = filter.split_once('?') else {
                        return Err(ApiError::bad_request(
                            "_typeFilter must be searches of the form Type?parameters",
                        ));
                    };
                    if !is_resource_type(resource_type) {
                        return Err(ApiError::bad_request(
                            "_typeFilter names a type that is not an R4 resource type",
                        ));
                    }
                    let pairs = decode_query(query).map_err(|e| ApiError::query(&e, false))?;
                    if pairs.is_empty() {
                        return Err(ApiError::bad_request(
                            "a _typeFilter search needs at least one parameter",
                        ));
                    }
                    params
                        .type_filters
                        .entry(resource_type.to_owned())
                        .or_default()
                        .push(pairs);
                }
            }
            "_elements" => {
                let elements = params.elements.get_or_insert_with(Vec::new);
                for element in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    let (resource_type, name) = match element.split_once('.') {
                        Some((t, name)) => (Some(t), name),
                        None => (None, element),
                    };
                    if resource_type.is_some_and(|t| !is_resource_type(t)) {
                        return Err(ApiError::bad_request(
                            "_elements names a type that is not an R4 resource type",
                        ));
                    }
                    let root_name = !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric())
                        && name.starts_with(|c: char| c.is_ascii_lowercase());
                    if !root_name {
                        return Err(ApiError::bad_request(
                            "_elements must list root elements, as name or Type.name",
                        ));
                    }
                    elements.push(element.to_owned());
                }
            }
            "_format" | "_pretty" => {}
            _ => {
                return Err(ApiError::bad_request(
                    "only _type, _since, _typeFilter, _elements and _outputFormat are supported \
                     by $export",
                ));
            }
        }
    }
    if let Some(types) = &params.types
        && params.type_filters.keys().any(|t| !types.contains(t))
    {
        return Err(ApiError::bad_request(
            "_typeFilter names a type that _type leaves out",
        ));
    }
    Ok(params)
}

/// Checks every `_typeFilter` search against the registry (400 naming the problem), so that
/// a job never starts with a search that cannot run.
fn check_type_filters(db: &Database, params: &Params) -> Result<(), ApiError> {
    let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
    for (resource_type, searches) in &params.type_filters {
        for pairs in searches {
            let request = parse_search(
                &registry,
                vec![resource_type.clone()],
                None,
                pairs,
                Handling::Strict,
            )
            .map_err(|e| ApiError::query(&e, false))?;
            // Results come whole: paging, sorting and reshaping have no place in a filter.
            if pairs.iter().any(|(name, _)| {
                matches!(
                    name.as_str(),
                    "_include"
                        | "_revinclude"
                        | "_sort"
                        | "_count"
                        | "_summary"
                        | "_elements"
                        | "_total"
                        | "_cursor"
                ) || name.starts_with("_include:")
                    || name.starts_with("_revinclude:")
            }) || request.criteria.is_empty()
            {
                return Err(ApiError::bad_request(
                    "a _typeFilter search may only hold search criteria",
                ));
            }
        }
    }
    Ok(())
}

/// The types the export may contain: the requested (or every) type the token may read in
/// full. Types it reaches only partly are left out.
fn allowed_types(grant: &Grant, scope: &Scope, requested: Option<&[String]>) -> Vec<String> {
    let in_scope = |t: &str| match scope {
        Scope::System => true,
        Scope::Patients | Scope::Group(_) => {
            t == "Patient" || patient_compartment().contains_key(t)
        }
    };
    let candidates: Vec<String> = match requested {
        Some(types) => types.to_vec(),
        None => fhirkeep_engine::resource::resource_types()
            .iter()
            .map(|t| (*t).to_owned())
            .collect(),
    };
    let mut seen = BTreeSet::new();
    candidates
        .into_iter()
        .filter(|t| in_scope(t) && seen.insert(t.clone()))
        .filter(|t| authorize(grant, Letter::Read, Some(t)) == Decision::All)
        .collect()
}

/// `GET /$export`
pub(crate) async fn export_system(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<FhirResponse, ApiError> {
    kick_off(state, info, Scope::System, "$export", query, &headers).await
}

/// `GET /Patient/$export`
pub(crate) async fn export_patients(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<FhirResponse, ApiError> {
    kick_off(
        state,
        info,
        Scope::Patients,
        "Patient/$export",
        query,
        &headers,
    )
    .await
}

/// `GET /Group/[id]/$export`
pub(crate) async fn export_group(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<FhirResponse, ApiError> {
    precheck(&info, &headers)?;
    parse_params(query.as_deref())?;
    if authorize(&info.grant, Letter::Read, Some("Group")) != Decision::All {
        return Err(ApiError::forbidden(
            "the token may not read every Group, which a group export needs",
        ));
    }
    // The members are read now, so that a missing group is a 404 at kick-off.
    let db = state.db();
    let ctx = info.ctx.clone();
    let path = format!("Group/{id}/$export");
    let group = tokio::task::spawn_blocking(move || db.store().read(&ctx, "Group", &id))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(|e| ApiError::query(&Error::Engine(e), true))?;
    let group = group
        .to_json()
        .map_err(|e| ApiError::query(&Error::Engine(e), true))?;
    let members = group_patients(&group, state.base());
    kick_off(state, info, Scope::Group(members), &path, query, &headers).await
}

/// The ids of a Group's active members that are Patients (`Patient/x`, `Patient/x/_history/n`
/// or the same under this server's base URL); other references are not followed.
fn group_patients(group: &Value, base: &str) -> Vec<String> {
    let mut ids = BTreeSet::new();
    for member in group
        .get("member")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if member.get("inactive").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let Some(reference) = member.pointer("/entity/reference").and_then(Value::as_str) else {
            continue;
        };
        let local = reference
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(reference);
        if let Some(id) = local
            .strip_prefix("Patient/")
            .and_then(|rest| rest.split('/').next())
            .filter(|id| fhirkeep_engine::resource::is_valid_id(id))
        {
            ids.insert(id.to_owned());
        }
    }
    ids.into_iter().collect()
}

/// What every kick-off needs before anything is read: `Prefer: respond-async`, and a token
/// without a patient context (a patient's own export is not supported).
fn precheck(info: &RequestInfo, headers: &HeaderMap) -> Result<(), ApiError> {
    if !respond_async(headers) {
        return Err(ApiError::bad_request(
            "$export needs the header Prefer: respond-async",
        ));
    }
    if info.grant.patient.is_some() {
        return Err(ApiError::forbidden(
            "a token with a patient context may not run a bulk export",
        ));
    }
    Ok(())
}

async fn kick_off(
    state: AppState,
    info: Arc<RequestInfo>,
    scope: Scope,
    path: &str,
    query: Option<String>,
    headers: &HeaderMap,
) -> Result<FhirResponse, ApiError> {
    precheck(&info, headers)?;
    let mut params = parse_params(query.as_deref())?;
    if !params.type_filters.is_empty() {
        let db = state.db();
        let checked =
            tokio::task::spawn_blocking(move || check_type_filters(&db, &params).map(|()| params));
        params = checked.await.map_err(|_| ApiError::internal())??;
    }
    let running = lock(&state.exports().jobs)
        .values()
        .filter(|(job, _)| {
            job.owned_by(&info.grant) && matches!(job.progress, Progress::Running { .. })
        })
        .count();
    if running >= MAX_RUNNING_PER_CLIENT {
        return Err(ApiError::http(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "too many exports of this client are running; wait for one to finish",
        ));
    }
    let types = allowed_types(&info.grant, &scope, params.types.as_deref());
    if types.is_empty() {
        return Err(ApiError::forbidden(
            "the token may not read any of the requested types in full",
        ));
    }
    // 244 random bits: the id is the only thing between a status URL and a guess.
    let id = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let request = match &query {
        Some(q) => format!("{}/{path}?{q}", state.base()),
        None => format!("{}/{path}", state.base()),
    };
    let job = Job {
        owner_subject: info.grant.subject.clone(),
        owner_client: info.grant.client.clone(),
        request,
        transaction_time: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        expires_ms: Utc::now()
            .timestamp_millis()
            .saturating_add(state.exports().ttl().saturating_mul(1000)),
        progress: Progress::Running {
            done: 0,
            total: types.len(),
        },
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let work = ExportWork {
        state: state.clone(),
        id: id.clone(),
        // The job's reads are audited as the requesting subject and client.
        ctx: info.ctx.clone(),
        scope,
        types,
        since: params.since,
        type_filters: params.type_filters,
        elements: params.elements,
        cancel: Arc::clone(&cancel),
    };
    let setup_state = state.clone();
    let setup_id = id.clone();
    tokio::task::spawn_blocking(move || {
        let db = setup_state.db();
        let aux = setup_state.exports().db(db.store())?;
        persist_job(&aux, &setup_id, &job)?;
        lock(&setup_state.exports().jobs).insert(setup_id, (job, cancel));
        Ok::<(), ApiError>(())
    })
    .await
    .map_err(|_| ApiError::internal())??;
    // Detached, on a thread of its own rather than one of the pool that runs requests' database
    // calls (a long job there would take a request thread for its whole run): the client
    // polls for the result.
    let exports = state.clone();
    let failed_id = id.clone();
    if std::thread::Builder::new()
        .name("fhirkeep-export".into())
        .spawn(move || work.run())
        .is_err()
    {
        tracing::error!("could not start a thread for an export job");
        exports.exports().update(&failed_id, Progress::Failed);
    }
    let status_url = format!("{}/$export-status/{id}", state.base());
    Ok(FhirResponse {
        status: StatusCode::ACCEPTED,
        headers: HeaderMap::new(),
        body: Some(ResponseBody::Json(outcome(
            "information",
            "informational",
            "the export has started; poll the Content-Location URL",
        ))),
        audited: false,
    }
    .header(CONTENT_LOCATION, &status_url))
}

/// A job's work, run on a blocking thread.
struct ExportWork {
    state: AppState,
    id: String,
    ctx: AccessContext,
    scope: Scope,
    types: Vec<String>,
    since: Option<DateTime<Utc>>,
    type_filters: BTreeMap<String, Vec<Vec<(String, String)>>>,
    elements: Option<Vec<String>>,
    cancel: Arc<AtomicBool>,
}

impl ExportWork {
    /// The `_elements` that apply to `resource_type` (unqualified names and its own), or
    /// `None` when none do: a type the list does not speak of is exported whole.
    fn elements_for(&self, resource_type: &str) -> Option<Vec<String>> {
        let prefix = format!("{resource_type}.");
        let applying: Vec<String> = self
            .elements
            .as_ref()?
            .iter()
            .filter(|e| !e.contains('.') || e.starts_with(&prefix))
            .cloned()
            .collect();
        (!applying.is_empty()).then_some(applying)
    }

    fn run(self) {
        let exports = self.state.exports();
        let db = self.state.db();
        let Ok(aux) = exports.db(db.store()) else {
            tracing::error!("an export job could not open the export store");
            exports.update(&self.id, Progress::Failed);
            return;
        };
        let progress = match self.export(&db, &aux) {
            Ok(Some(outputs)) => Some(Progress::Done(outputs)),
            Ok(None) => None,
            Err(_) => {
                tracing::error!("an export job failed");
                Some(Progress::Failed)
            }
        };
        let job = lock(&exports.jobs)
            .get(&self.id)
            .map(|(job, _)| job.clone());
        let stored = match (job, progress) {
            // Stored before it is shown: a manifest a client saw survives a restart.
            (Some(mut job), Some(progress)) => {
                job.progress = progress.clone();
                persist_job(&aux, &self.id, &job).map(|()| exports.update(&self.id, progress))
            }
            // Cancelled or expired meanwhile: remove what the job wrote since.
            _ => delete_job_rows(&aux, &self.id),
        };
        // A DELETE between the look-up and the write would leave the row behind.
        let removed = !lock(&exports.jobs).contains_key(&self.id);
        let cleaned = if removed {
            delete_job_rows(&aux, &self.id)
        } else {
            Ok(())
        };
        if stored.is_err() || cleaned.is_err() {
            tracing::error!("could not store the state of an export job");
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The outputs, or `None` if the job was cancelled.
    fn export(&self, db: &Database, aux: &redb::Database) -> Result<Option<Vec<Output>>, ApiError> {
        let patients = match &self.scope {
            Scope::System => None,
            Scope::Patients => Some(
                self.keys(db, vec!["Patient".to_owned()], None)?
                    .into_iter()
                    .filter_map(|k| k.strip_prefix("Patient/").map(str::to_owned))
                    .collect::<Vec<_>>(),
            ),
            Scope::Group(members) => Some(members.clone()),
        };
        // Patient and Group exports: one index search per patient across every exported
        // type of the compartment, its matches sorted by type.
        let mut compartment_keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        if let Some(patients) = &patients {
            let types: Vec<String> = self
                .types
                .iter()
                .filter(|t| t.as_str() != "Patient")
                .cloned()
                .collect();
            for patient in patients {
                if self.cancelled() {
                    return Ok(None);
                }
                if !types.is_empty() {
                    for key in self.keys(db, types.clone(), Some(patient))? {
                        if let Some((resource_type, _)) = key.split_once('/') {
                            compartment_keys
                                .entry(resource_type.to_owned())
                                .or_default()
                                .insert(key);
                        }
                    }
                }
                compartment_keys
                    .entry("Patient".to_owned())
                    .or_default()
                    .insert(format!("Patient/{patient}"));
            }
        }
        let mut outputs = Vec::new();
        for (done, resource_type) in self.types.iter().enumerate() {
            if self.cancelled() {
                return Ok(None);
            }
            let keys: BTreeSet<String> = match &patients {
                None => self
                    .keys(db, vec![resource_type.clone()], None)?
                    .into_iter()
                    .collect(),
                Some(_) => compartment_keys.remove(resource_type).unwrap_or_default(),
            };
            outputs.extend(self.write_files(db, aux, resource_type, &keys)?);
            if self.since.is_some() && !self.type_filters.contains_key(resource_type) {
                outputs.extend(self.write_deletions(db, aux, resource_type)?);
            }
            self.state.exports().update(
                &self.id,
                Progress::Running {
                    done: done + 1,
                    total: self.types.len(),
                },
            );
        }
        Ok((!self.cancelled()).then_some(outputs))
    }

    /// An export with `_since`: the resources of `resource_type` deleted since then and not
    /// written again, as Bundles of one DELETE entry each (`deleted-Type.ndjson`), from the
    /// type's history (audited like any history read). Types with `_typeFilter` get none: a
    /// deleted resource can no longer be matched against the filter. A Patient export lists
    /// deleted patients and the deleted resources whose last content was in some patient's
    /// compartment; a Group export, deleted members and the deleted resources whose last
    /// content was in a member's compartment (the index no longer holds a deleted resource,
    /// so its last content is read and its compartment links taken from it).
    fn write_deletions(
        &self,
        db: &Database,
        aux: &redb::Database,
        resource_type: &str,
    ) -> Result<Vec<Output>, ApiError> {
        let mut query = fhirkeep_engine::store::HistoryQuery {
            since: self.since,
            count: Some(READ_BATCH),
            ..Default::default()
        };
        // History is newest first: the first version met of an id is its latest since then.
        let mut seen = HashSet::new();
        let mut deleted = BTreeSet::new();
        loop {
            if self.cancelled() {
                return Ok(Vec::new());
            }
            let page = db
                .store()
                .history_type(&self.ctx, resource_type, &query)
                .map_err(|e| ApiError::query(&Error::Engine(e), true))?;
            for version in &page.entries {
                if seen.insert(version.id.clone()) && version.is_deleted() {
                    deleted.insert(version.id.clone());
                }
            }
            match page.next {
                Some(cursor) if !page.entries.is_empty() => query.cursor = Some(cursor),
                _ => break,
            }
        }
        if !matches!(self.scope, Scope::System) {
            deleted = self.deleted_in_scope(db, resource_type, deleted)?;
        }
        let mut file = FileWriter::deletions(resource_type);
        for id in deleted {
            let bundle = json!({
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"request": {"method": "DELETE", "url": format!("{resource_type}/{id}")}}],
            });
            file.push(aux, &self.id, &bundle)?;
        }
        file.finish(aux, &self.id)
    }

    /// Of the deleted `ids` of `resource_type`, those a Patient or Group export covers: judged
    /// by the compartment of each one's last version with content.
    fn deleted_in_scope(
        &self,
        db: &Database,
        resource_type: &str,
        ids: BTreeSet<String>,
    ) -> Result<BTreeSet<String>, ApiError> {
        let members: Option<HashSet<&str>> = match &self.scope {
            Scope::System => return Ok(ids),
            Scope::Patients => None,
            Scope::Group(members) => Some(members.iter().map(String::as_str).collect()),
        };
        let covers = |patient: &str| members.as_ref().is_none_or(|m| m.contains(patient));
        let mut kept = BTreeSet::new();
        for id in ids {
            if self.cancelled() {
                break;
            }
            if resource_type == "Patient" && covers(&id) {
                kept.insert(id);
                continue;
            }
            let Some(last) = self.last_content(db, resource_type, &id)? else {
                continue;
            };
            let json = last.to_json().map_err(|_| ApiError::internal())?;
            let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
            let patients = fhirkeep_query::compartment_patients(&registry, resource_type, &json);
            drop(registry);
            if patients.iter().any(|patient| covers(patient)) {
                kept.insert(id);
            }
        }
        Ok(kept)
    }

    /// The newest version of `Type/id` that is not a deletion, if there is one.
    fn last_content(
        &self,
        db: &Database,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<fhirkeep_engine::store::StoredResource>, ApiError> {
        let mut query = fhirkeep_engine::store::HistoryQuery {
            count: Some(8),
            ..Default::default()
        };
        loop {
            let page = db
                .store()
                .history_instance(&self.ctx, resource_type, id, &query)
                .map_err(|e| ApiError::query(&Error::Engine(e), true))?;
            if let Some(found) = page.entries.iter().find(|v| !v.is_deleted()) {
                return Ok(Some(found.clone()));
            }
            match page.next {
                Some(cursor) if !page.entries.is_empty() => query.cursor = Some(cursor),
                _ => return Ok(None),
            }
        }
    }

    /// The keys of every resource of `types` (in `patient`'s compartment).
    fn keys(
        &self,
        db: &Database,
        types: Vec<String>,
        patient: Option<&str>,
    ) -> Result<Vec<String>, ApiError> {
        // Types with `_typeFilter` searches are searched one filter at a time (a match of any
        // is exported); the others in one search.
        let (filtered, whole): (Vec<String>, Vec<String>) = types
            .into_iter()
            .partition(|t| self.type_filters.contains_key(t));
        let compartment = patient.map(|p| ("Patient".to_owned(), p.to_owned()));
        let mut searches: Vec<TypeSearch<'_>> = Vec::new();
        if !whole.is_empty() {
            searches.push((whole, &[]));
        }
        for resource_type in filtered {
            for pairs in self.type_filters.get(&resource_type).into_iter().flatten() {
                searches.push((vec![resource_type.clone()], pairs.as_slice()));
            }
        }
        let mut keys = BTreeSet::new();
        for (types, pairs) in searches {
            let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
            let request = parse_search(
                &registry,
                types,
                compartment.clone(),
                pairs,
                Handling::Strict,
            )
            .map_err(|e| ApiError::query(&e, false))?;
            drop(registry);
            keys.extend(
                db.matching_keys(&request)
                    .map_err(|e| ApiError::query(&e, false))?,
            );
        }
        Ok(keys.into_iter().collect())
    }

    /// Reads `keys` and writes the current versions (changed after `_since`) as NDJSON
    /// files `Type.ndjson`, `Type.2.ndjson`, ... of about [`FILE_BYTES`], in chunks.
    fn write_files(
        &self,
        db: &Database,
        aux: &redb::Database,
        resource_type: &str,
        keys: &BTreeSet<String>,
    ) -> Result<Vec<Output>, ApiError> {
        let keys: Vec<(&str, &str)> = keys.iter().filter_map(|k| k.split_once('/')).collect();
        // One audit leaf per batch, action `export`; the hash names the job, not the data.
        let digest = leaf_hash(format!("$export {} {resource_type}", self.id).as_bytes());
        let mut file = FileWriter::new(resource_type);
        let elements = self.elements_for(resource_type);
        for batch in keys.chunks(READ_BATCH) {
            if self.cancelled() {
                return Ok(Vec::new());
            }
            let found = db
                .store()
                .read_many(&self.ctx, AuditAction::Export, digest, batch)
                .map_err(|e| ApiError::query(&Error::Engine(e), true))?;
            for stored in found.into_iter().flatten() {
                if self.since.is_some_and(|since| stored.last_updated <= since) {
                    continue;
                }
                let mut json = stored
                    .to_json()
                    .map_err(|e| ApiError::query(&Error::Engine(e), true))?;
                if let Some(elements) = &elements {
                    // Kept: the listed elements, the mandatory ones, `id` and `meta` (tagged
                    // SUBSETTED when anything was left out).
                    fhirkeep_query::apply_elements(&mut json, elements);
                }
                file.push(aux, &self.id, &json)?;
            }
        }
        file.finish(aux, &self.id)
    }
}

/// Writes one type's NDJSON into chunks and files.
struct FileWriter {
    resource_type: String,
    /// Writes the deletions of `resource_type` (`deleted-Type.ndjson`).
    deleted: bool,
    outputs: Vec<Output>,
    /// The current file: its number (from 1), chunks written, bytes written, resources.
    part: u64,
    chunk: u64,
    bytes: usize,
    count: u64,
    buffer: Vec<u8>,
}

impl FileWriter {
    fn new(resource_type: &str) -> Self {
        FileWriter {
            resource_type: resource_type.to_owned(),
            deleted: false,
            outputs: Vec::new(),
            part: 1,
            chunk: 0,
            bytes: 0,
            count: 0,
            buffer: Vec::new(),
        }
    }

    /// A writer of the deletions of `resource_type`.
    fn deletions(resource_type: &str) -> Self {
        FileWriter {
            deleted: true,
            ..FileWriter::new(resource_type)
        }
    }

    fn name(&self) -> String {
        let prefix = if self.deleted { "deleted-" } else { "" };
        match self.part {
            1 => format!("{prefix}{}.ndjson", self.resource_type),
            n => format!("{prefix}{}.{n}.ndjson", self.resource_type),
        }
    }

    fn push(&mut self, aux: &redb::Database, id: &str, resource: &Value) -> Result<(), ApiError> {
        serde_json::to_writer(&mut self.buffer, resource).map_err(storage_error)?;
        self.buffer.push(b'\n');
        self.count += 1;
        if self.buffer.len() >= CHUNK_BYTES {
            self.flush(aux, id)?;
        }
        if self.bytes >= FILE_BYTES {
            self.close_file(aux, id)?;
        }
        Ok(())
    }

    fn flush(&mut self, aux: &redb::Database, id: &str) -> Result<(), ApiError> {
        if !self.buffer.is_empty() {
            write_chunk(aux, id, &self.name(), self.chunk, &self.buffer)?;
            self.chunk += 1;
            self.bytes += self.buffer.len();
            self.buffer.clear();
        }
        Ok(())
    }

    fn close_file(&mut self, aux: &redb::Database, id: &str) -> Result<(), ApiError> {
        self.flush(aux, id)?;
        if self.count > 0 {
            self.outputs.push(Output {
                resource_type: self.resource_type.clone(),
                name: self.name(),
                count: self.count,
                deleted: self.deleted,
            });
            self.part += 1;
        }
        self.chunk = 0;
        self.bytes = 0;
        self.count = 0;
        Ok(())
    }

    fn finish(mut self, aux: &redb::Database, id: &str) -> Result<Vec<Output>, ApiError> {
        self.close_file(aux, id)?;
        Ok(self.outputs)
    }
}

fn write_chunk(
    aux: &redb::Database,
    id: &str,
    name: &str,
    chunk: u64,
    bytes: &[u8],
) -> Result<(), ApiError> {
    let txn = aux.begin_write().map_err(storage_error)?;
    txn.open_table(FILES)
        .map_err(storage_error)?
        .insert((id, name, chunk), bytes)
        .map_err(storage_error)?;
    txn.commit().map_err(storage_error)
}

/// A job that does not exist, expired, or belongs to someone else.
fn no_job() -> ApiError {
    ApiError::http(StatusCode::NOT_FOUND, "not-found", "no such export job")
}

/// `GET /$export-status/[id]`
pub(crate) async fn status(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(id): Path<String>,
) -> Result<FhirResponse, ApiError> {
    state.exports_loaded().await?;
    let job = state.exports().job(&id, &info.grant).ok_or_else(no_job)?;
    if job.expires_ms <= Utc::now().timestamp_millis() {
        return Err(no_job());
    }
    match job.progress {
        Progress::Running { done, total } => Ok(FhirResponse {
            status: StatusCode::ACCEPTED,
            headers: HeaderMap::new(),
            body: None,
            audited: false,
        }
        .header(X_PROGRESS.clone(), &format!("{done} of {total} types"))
        .header(RETRY_AFTER, "1")),
        Progress::Failed => Err(ApiError::http(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "the export failed",
        )),
        Progress::Done(outputs) => {
            let file = |o: &Output, file_type: &str| {
                json!({
                    "type": file_type,
                    "url": format!("{}/$export-file/{id}/{}", state.base(), o.name),
                    "count": o.count,
                })
            };
            let output: Vec<Value> = outputs
                .iter()
                .filter(|o| !o.deleted)
                .map(|o| file(o, &o.resource_type))
                .collect();
            let deleted: Vec<Value> = outputs
                .iter()
                .filter(|o| o.deleted)
                .map(|o| file(o, "Bundle"))
                .collect();
            Ok(FhirResponse {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Some(ResponseBody::Json(json!({
                    "transactionTime": job.transaction_time,
                    "request": job.request,
                    "requiresAccessToken": true,
                    "output": output,
                    "deleted": deleted,
                    "error": [],
                }))),
                audited: false,
            }
            .header(
                axum::http::header::EXPIRES,
                &DateTime::from_timestamp_millis(job.expires_ms)
                    .unwrap_or_default()
                    .format("%a, %d %b %Y %H:%M:%S GMT")
                    .to_string(),
            ))
        }
    }
}

/// `DELETE /$export-status/[id]`: cancels the job and deletes its files.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(id): Path<String>,
) -> Result<FhirResponse, ApiError> {
    state.exports_loaded().await?;
    state.exports().job(&id, &info.grant).ok_or_else(no_job)?;
    let removed = lock(&state.exports().jobs).remove(&id);
    if let Some((_, cancel)) = removed {
        cancel.store(true, Ordering::Relaxed);
    }
    tokio::task::spawn_blocking(move || {
        let db = state.db();
        let aux = state.exports().db(db.store())?;
        delete_job_rows(&aux, &id)
    })
    .await
    .map_err(|_| ApiError::internal())??;
    Ok(FhirResponse {
        status: StatusCode::ACCEPTED,
        headers: HeaderMap::new(),
        body: Some(ResponseBody::Json(outcome(
            "information",
            "informational",
            "the export job and its files were deleted",
        ))),
        audited: false,
    })
}

/// `GET /$export-file/[id]/[name]`: one NDJSON file, only to the job's owner.
pub(crate) async fn file(
    State(state): State<AppState>,
    Extension(info): Info,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.exports_loaded().await?;
    let job = state.exports().job(&id, &info.grant).ok_or_else(no_job)?;
    let Progress::Done(outputs) = job.progress else {
        return Err(no_job());
    };
    if job.expires_ms <= Utc::now().timestamp_millis() || !outputs.iter().any(|o| o.name == name) {
        return Err(no_job());
    }
    let bytes = tokio::task::spawn_blocking(move || {
        let db = state.db();
        let aux = state.exports().db(db.store())?;
        let txn = aux.begin_read().map_err(storage_error)?;
        let files = txn.open_table(FILES).map_err(storage_error)?;
        let mut bytes = Vec::new();
        for row in files
            .range((id.as_str(), name.as_str(), 0)..=(id.as_str(), name.as_str(), u64::MAX))
            .map_err(storage_error)?
        {
            let (_, chunk) = row.map_err(storage_error)?;
            bytes.extend_from_slice(chunk.value());
        }
        Ok::<_, ApiError>(bytes)
    })
    .await
    .map_err(|_| ApiError::internal())??;
    let mut response = (StatusCode::OK, Body::from(bytes)).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(response)
}

/// Whether `path` is a file download (answered as NDJSON, not negotiated as JSON).
pub(crate) fn is_file_path(path: &str) -> bool {
    path.contains("/$export-file/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_filters_split_at_commas_that_start_a_search() {
        assert_eq!(
            split_type_filters(
                "Observation?code=a,b&status=final,Patient?gender=male, Encounter?class=x,"
            ),
            [
                "Observation?code=a,b&status=final",
                "Patient?gender=male",
                "Encounter?class=x,"
            ]
        );
        assert_eq!(split_type_filters("Patient?x=1"), ["Patient?x=1"]);
        assert!(split_type_filters("").is_empty());
    }

    #[test]
    fn group_members_are_local_active_patients() {
        let group = json!({"resourceType": "Group", "member": [
            {"entity": {"reference": "Patient/a"}},
            {"entity": {"reference": "Patient/b/_history/2"}},
            {"entity": {"reference": "http://fhir.test/Patient/c"}},
            {"entity": {"reference": "http://elsewhere.test/Patient/d"}},
            {"entity": {"reference": "Practitioner/e"}},
            {"entity": {"reference": "Patient/f"}, "inactive": true},
            {"entity": {"reference": "Patient/bad id"}},
            {"entity": {"display": "no reference"}},
            {"entity": {"reference": "Patient/a"}},
        ]});
        assert_eq!(group_patients(&group, "http://fhir.test"), ["a", "b", "c"]);
    }
}
