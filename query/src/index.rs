//! The tantivy index: its schema, how resources' [`IndexEntries`] become documents, how the
//! store sequence the index has caught up to is recorded, and the primitive queries that FHIR
//! search semantics are built from.
//!
//! One document per current (not deleted) resource. Fields:
//! - `key` (`Type/id`, raw, fast): identity, deletes, paging order;
//! - `type` (raw);
//! - `terms` (one value per document, split at [`TERM_BREAK`] into its terms): every
//!   parameter's terms, see [`crate::extract`];
//! - `narrative`, `content` (tokenized, lower-cased, accent-folded): `_text`, `_content`;
//! - `refs`, `sort` (fast only): reference targets and sort keys per parameter.
//!
//! Nothing is stored in tantivy's document store: what a search reads of a document comes
//! from the fast-field columns (see [`SearchIndex::doc`]).
//!
//! The commit payload holds the last store change sequence the index contains, so that
//! reopening after a crash catches up from there (the store is the source of truth).

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::Mutex;

use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::StrColumn;
use tantivy::directory::Directory;
use tantivy::query::{AllQuery, BooleanQuery, Occur, Query, RangeQuery, RegexQuery, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions};
use tantivy::tokenizer::{
    AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer, Token,
    TokenStream, Tokenizer,
};
use tantivy::{DocAddress, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::extract::IndexEntries;
use crate::priority;
use crate::{Error, Result};

/// The schema version, stored in the commit payload; a different one means "rebuild" (11:
/// a document's terms in one value of the `terms` field; 10:
/// tantivy's sorted-table term dictionary instead of its FST, see ARCHITECTURE.md; 9: no
/// `system|` token terms; 8: composites of one focus indexed by component, values to the
/// second as one term; 7: no
/// terms of derived parameters, no bare-id reference terms, minute and second buckets only on
/// crowded days; 6: `_content` holds `string` and `markdown` values only).
const SCHEMA_VERSION: u32 = 11;

/// The tokenizer of the `terms` field (see [`TermListTokenizer`]).
const TERMS_TOKENIZER: &str = "fhir_terms";

/// What separates a document's terms in its one `terms` value (U+001E, record separator).
/// FHIR strings may not hold it; a term that does anyway has it replaced (see
/// `indexable_term`), so that no value can add a term of another parameter.
pub const TERM_BREAK: char = '\u{1e}';

// The tokenizer searches for the break as one byte.
const _: () = assert!(TERM_BREAK.is_ascii());

/// `term` as the `terms` field holds it: [`TERM_BREAK`] replaced by U+FFFD. Applied to the
/// terms of documents and of queries alike.
fn indexable_term(term: &str) -> std::borrow::Cow<'_, str> {
    // `memchr`: `str::contains` with a `char` cost ~90 instructions per short term.
    if memchr::memchr(TERM_BREAK as u8, term.as_bytes()).is_some() {
        std::borrow::Cow::Owned(term.replace(TERM_BREAK, "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(term)
    }
}

/// Splits a document's one `terms` value at [`TERM_BREAK`], each piece a term as written.
///
/// Why one value rather than one per term: tantivy's per-value work (a value written into the
/// document, a token stream made and run for it) cost about as much as indexing the term
/// itself, for the ~40 terms of a typical resource.
#[derive(Debug, Clone, Default)]
struct TermListTokenizer {
    token: Token,
}

/// The terms of one `terms` value, as tokens.
struct TermListStream<'a> {
    text: &'a str,
    offset: usize,
    token: &'a mut Token,
}

impl Tokenizer for TermListTokenizer {
    type TokenStream<'a> = TermListStream<'a>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> TermListStream<'a> {
        self.token.reset();
        TermListStream {
            text,
            offset: 0,
            token: &mut self.token,
        }
    }
}

impl TokenStream for TermListStream<'_> {
    fn advance(&mut self) -> bool {
        // `memchr` rather than `str::split`: the split's searcher cost more per term than the
        // rest of its tokenizing.
        const BREAK: u8 = TERM_BREAK as u8;
        while self.offset < self.text.len() {
            let start = self.offset;
            let rest = &self.text.as_bytes()[start..];
            let length = memchr::memchr(BREAK, rest).unwrap_or(rest.len());
            self.offset = start + length + 1;
            // The break is ASCII, so both ends of the piece are character boundaries.
            let Some(piece) = self.text.get(start..start + length) else {
                return false;
            };
            if piece.is_empty() {
                continue;
            }
            self.token.text.clear();
            self.token.text.push_str(piece);
            self.token.offset_from = start;
            self.token.offset_to = start + length;
            self.token.position = self.token.position.wrapping_add(1);
            return true;
        }
        false
    }

    fn token(&self) -> &Token {
        self.token
    }

    fn token_mut(&mut self) -> &mut Token {
        self.token
    }
}

const TEXT_TOKENIZER: &str = "fhir_text";

/// Memory the index writer may use before it flushes a segment.
const WRITER_MEMORY: usize = 64 * 1024 * 1024;

/// The fields of the schema.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    /// `Type/id`.
    pub key: Field,
    /// The resource type.
    pub resource_type: Field,
    /// Search terms.
    pub terms: Field,
    /// Narrative text.
    pub narrative: Field,
    /// All strings of the resource.
    pub content: Field,
    /// `code ␟ Type/id` references.
    pub refs: Field,
    /// `code ␟ key` sort keys.
    pub sort: Field,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    // No field has field norms: nothing is scored (matches are collected or counted, never
    // ranked by relevance), so they would be a byte per document and field for nothing.
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(TEXT_TOKENIZER)
            .set_fieldnorms(false)
            // Positions stay: `_text`/`_content` values with several words, or one word the
            // tokenizer splits (`mrn-p3`), become phrase queries, which need them.
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let raw = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("raw")
            .set_fieldnorms(false)
            .set_index_option(IndexRecordOption::Basic),
    );
    // Nothing is stored: what a search reads of a document (its key, references and sort keys)
    // comes from fast-field columns, whose dictionaries hold each distinct value once per
    // segment (a Patient's key is shared by all the references to it), where the document
    // store kept a compressed copy per document.
    let column = TextOptions::default().set_fast("raw");
    let fields = Fields {
        // Indexed for deletes and key lookups, a column for paging order and reading keys.
        key: builder.add_text_field("key", raw.clone().set_fast("raw")),
        resource_type: builder.add_text_field("type", raw.clone()),
        terms: builder.add_text_field(
            "terms",
            raw.clone().set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer(TERMS_TOKENIZER)
                    .set_fieldnorms(false)
                    .set_index_option(IndexRecordOption::Basic),
            ),
        ),
        narrative: builder.add_text_field("narrative", text.clone()),
        content: builder.add_text_field("content", text),
        refs: builder.add_text_field("refs", column.clone()),
        sort: builder.add_text_field("sort", column),
    };
    (builder.build(), fields)
}

/// Opened string columns by (segment, field name).
type ColumnCache = HashMap<(tantivy::index::SegmentId, &'static str), Option<StrColumn>>;

/// The index and its single writer.
pub struct SearchIndex {
    index: Index,
    /// `None` only while the index is dropped (see the `Drop` impl).
    writer: Mutex<Option<IndexWriter>>,
    reader: IndexReader,
    fields: Fields,
    /// Opened string columns by segment. Opening a column reads all of it through the
    /// encrypted directory (tantivy expects a memory map), so each is opened once per segment
    /// rather than once per search; segments are immutable, and entries of merged-away
    /// segments are dropped at the next commit.
    columns: Mutex<ColumnCache>,
}

impl std::fmt::Debug for SearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchIndex").finish_non_exhaustive()
    }
}

impl Drop for SearchIndex {
    fn drop(&mut self) {
        // tantivy's merge threads keep the directory, and so the index file, open after the
        // writer is dropped; waiting for them closes the file with the database, so that the
        // database can be opened again at once (a redb file opens once at a time).
        let writer = self.writer.get_mut().ok().and_then(Option::take);
        if let Some(writer) = writer
            && let Err(error) = writer.wait_merging_threads()
        {
            tracing::warn!(error = %error, "an index merge did not finish on close");
        }
    }
}

/// What a document of the index says about one resource.
#[derive(Debug, Clone)]
pub struct IndexedDoc {
    /// `Type/id`.
    pub key: String,
    /// `code ␟ target` references.
    pub refs: Vec<String>,
    /// `code ␟ key` sort keys.
    pub sort: Vec<String>,
}

/// Collects the matching documents in address order. Segments are visited in order and each
/// one yields its documents in id order, so this is `DocSetCollector` without the hash set
/// and the sort (a large share of a search with many matches).
struct SortedDocs;

impl Collector for SortedDocs {
    type Fruit = Vec<DocAddress>;
    type Child = SortedSegmentDocs;

    fn for_segment(
        &self,
        segment: tantivy::SegmentOrdinal,
        _reader: &tantivy::SegmentReader,
    ) -> tantivy::Result<SortedSegmentDocs> {
        Ok(SortedSegmentDocs {
            segment,
            docs: Vec::new(),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<Vec<DocAddress>>) -> tantivy::Result<Vec<DocAddress>> {
        let mut docs: Vec<DocAddress> = fruits.into_iter().flatten().collect();
        // Already sorted when tantivy merges in segment order; cheap to make sure.
        if !docs.is_sorted() {
            docs.sort_unstable();
        }
        Ok(docs)
    }
}

struct SortedSegmentDocs {
    segment: tantivy::SegmentOrdinal,
    docs: Vec<DocAddress>,
}

impl SegmentCollector for SortedSegmentDocs {
    type Fruit = Vec<DocAddress>;

    fn collect(&mut self, doc: tantivy::DocId, _score: tantivy::Score) {
        self.docs.push(DocAddress::new(self.segment, doc));
    }

    fn harvest(self) -> Vec<DocAddress> {
        self.docs
    }
}

/// One change of the index: the new document of `key`, if any, and whether an earlier one
/// may exist and must go.
#[derive(Debug)]
pub struct DocumentChange {
    /// `Type/id`.
    pub key: String,
    /// Whether the index may hold a document of `key` already (false only for a resource's
    /// first version, which saves tantivy a delete term per created resource).
    pub replaces: bool,
    /// The resource's new document; `None` for a deletion.
    pub document: Option<TantivyDocument>,
}

/// The commit payload: schema version and the store sequence the index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexState {
    /// The schema the index was built with.
    pub schema_version: u32,
    /// The last store change sequence applied, `None` if none yet.
    pub store_seq: Option<u64>,
}

impl SearchIndex {
    /// Opens the index in `directory`, creating it if empty. `None` when the directory
    /// holds an index with another schema (written by another version): the caller deletes
    /// and rebuilds it.
    pub fn open(directory: Box<dyn Directory>) -> Result<Option<SearchIndex>> {
        let (schema, fields) = schema();
        let index = match Index::open_or_create(directory, schema.clone()) {
            Ok(index) if index.schema() == schema => index,
            Ok(_) | Err(tantivy::TantivyError::SchemaError(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // An index of another version can hold segments this build cannot read (version 10
        // changed the term dictionary's format), so it is refused before a segment is opened.
        if let Some(payload) = index.load_metas()?.payload
            && parse_payload(&payload).is_none_or(|state| !Self::is_current_schema(&state))
        {
            return Ok(None);
        }
        index.tokenizers().register(
            TEXT_TOKENIZER,
            TextAnalyzer::builder(SimpleTokenizer::default())
                .filter(RemoveLongFilter::limit(64))
                .filter(LowerCaser)
                .filter(AsciiFoldingFilter)
                .build(),
        );
        index
            .tokenizers()
            .register(TERMS_TOKENIZER, TermListTokenizer::default());
        // One indexing thread: the machine has few cores and the store needs them too. It (and
        // tantivy's merge threads) start here and inherit the index priority.
        let writer = priority::on_index_thread(|| index.writer_with_num_threads(1, WRITER_MEMORY))?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Some(SearchIndex {
            index,
            writer: Mutex::new(Some(writer)),
            reader,
            fields,
            columns: Mutex::new(HashMap::new()),
        }))
    }

    /// The fields.
    pub fn fields(&self) -> Fields {
        self.fields
    }

    /// The tantivy index (for query parsing).
    pub fn tantivy(&self) -> &Index {
        &self.index
    }

    /// The committed state (schema version, store sequence).
    pub fn state(&self) -> Result<IndexState> {
        let metas = self.index.load_metas()?;
        let Some(payload) = metas.payload else {
            return Ok(IndexState {
                schema_version: SCHEMA_VERSION,
                store_seq: None,
            });
        };
        parse_payload(&payload)
            .ok_or_else(|| Error::Index("unreadable index commit payload".into()))
    }

    /// Whether the index was built with this build's schema.
    pub fn is_current_schema(state: &IndexState) -> bool {
        state.schema_version == SCHEMA_VERSION
    }

    /// The document of one resource. Pure, so that documents of a batch can be built on
    /// every core before [`SearchIndex::apply`] hands them to the single writer.
    pub fn document(
        &self,
        key: &str,
        resource_type: &str,
        entries: &IndexEntries,
    ) -> TantivyDocument {
        let f = self.fields;
        let mut doc = TantivyDocument::new();
        doc.add_text(f.key, key);
        doc.add_text(f.resource_type, resource_type);
        if !entries.terms.is_empty() {
            let length = entries.terms.iter().map(|term| term.len() + 1).sum();
            let mut terms = String::with_capacity(length);
            for term in &entries.terms {
                if !terms.is_empty() {
                    terms.push(TERM_BREAK);
                }
                terms.push_str(&indexable_term(term));
            }
            doc.add_text(f.terms, &terms);
        }
        if !entries.narrative.is_empty() {
            doc.add_text(f.narrative, &entries.narrative);
        }
        if !entries.content.is_empty() {
            doc.add_text(f.content, &entries.content);
        }
        for reference in &entries.references {
            doc.add_text(f.refs, reference);
        }
        for sort in &entries.sort_keys {
            doc.add_text(f.sort, sort);
        }
        doc
    }

    /// Applies changes in order, under one hold of the writer.
    pub fn apply(&self, changes: impl IntoIterator<Item = DocumentChange>) -> Result<()> {
        self.with_writer(|writer| {
            for change in changes {
                if change.replaces {
                    writer.delete_term(Term::from_field_text(self.fields.key, &change.key));
                }
                if let Some(doc) = change.document {
                    writer.add_document(doc)?;
                }
            }
            Ok(())
        })
    }

    /// Removes every document (for a rebuild); takes effect at the next commit.
    pub fn clear(&self) -> Result<()> {
        self.with_writer(|writer| {
            writer.delete_all_documents()?;
            Ok(())
        })
    }

    /// Commits everything put so far, recording `store_seq` as caught up, and makes it
    /// visible to searches.
    pub fn commit(&self, store_seq: Option<u64>) -> Result<()> {
        self.with_writer(|writer| {
            // The indexing workers tantivy starts anew here inherit this thread's priority.
            priority::on_index_thread(|| {
                let mut prepared = writer.prepare_commit()?;
                prepared.set_payload(&encode_payload(&IndexState {
                    schema_version: SCHEMA_VERSION,
                    store_seq,
                }));
                prepared.commit()?;
                Ok(())
            })
        })?;
        self.reader.reload()?;
        let live: HashSet<tantivy::index::SegmentId> = self
            .reader
            .searcher()
            .segment_readers()
            .iter()
            .map(tantivy::SegmentReader::segment_id)
            .collect();
        self.lock_columns()?
            .retain(|(segment, _), _| live.contains(segment));
        Ok(())
    }

    /// The string fast-field column `field` of a segment (`None` if the segment has no
    /// value in it), opened once and shared.
    pub fn str_column(
        &self,
        reader: &tantivy::SegmentReader,
        field: &'static str,
    ) -> Result<Option<StrColumn>> {
        let key = (reader.segment_id(), field);
        if let Some(column) = self.lock_columns()?.get(&key) {
            return Ok(column.clone());
        }
        // Opened without the lock held: two searches may both open it; one copy is kept.
        let column = reader.fast_fields().str(field)?;
        self.lock_columns()?.insert(key, column.clone());
        Ok(column)
    }

    fn lock_columns(&self) -> Result<std::sync::MutexGuard<'_, ColumnCache>> {
        self.columns
            .lock()
            .map_err(|_| Error::Internal("column cache lock poisoned".into()))
    }

    /// Drops uncommitted changes (after a failed batch).
    pub fn rollback(&self) -> Result<()> {
        self.with_writer(|writer| {
            priority::on_index_thread(|| {
                writer.rollback()?;
                Ok(())
            })
        })
    }

    /// Runs `body` with the writer, under its lock.
    fn with_writer<T>(&self, body: impl FnOnce(&mut IndexWriter) -> Result<T>) -> Result<T> {
        let mut slot = self
            .writer
            .lock()
            .map_err(|_| Error::Internal("index writer lock poisoned".into()))?;
        let writer = slot
            .as_mut()
            .ok_or_else(|| Error::Internal("the index writer is closed".into()))?;
        body(writer)
    }

    /// A searcher over the last commit.
    pub fn searcher(&self) -> tantivy::Searcher {
        self.reader.searcher()
    }

    /// Every document matching `query`.
    pub fn matching(
        &self,
        searcher: &tantivy::Searcher,
        query: &dyn Query,
    ) -> Result<Vec<DocAddress>> {
        Ok(searcher.search(query, &SortedDocs)?)
    }

    /// How many documents match `query` (nothing collected, nothing read).
    pub fn count(&self, searcher: &tantivy::Searcher, query: &dyn Query) -> Result<usize> {
        Ok(searcher.search(query, &tantivy::collector::Count)?)
    }

    /// What the index says about a document: its key, references and sort keys, read from
    /// the segment's fast-field columns.
    pub fn doc(&self, searcher: &tantivy::Searcher, address: DocAddress) -> Result<IndexedDoc> {
        Ok(IndexedDoc {
            key: self.key(searcher, address)?,
            refs: self.column_values(searcher, address, "refs")?,
            sort: self.column_values(searcher, address, "sort")?,
        })
    }

    /// The key (`Type/id`) of a document.
    pub fn key(&self, searcher: &tantivy::Searcher, address: DocAddress) -> Result<String> {
        self.column_values(searcher, address, "key")?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Index("an index document has no key".into()))
    }

    /// The `code ␟ Type/id` references of a document.
    pub fn refs(&self, searcher: &tantivy::Searcher, address: DocAddress) -> Result<Vec<String>> {
        self.column_values(searcher, address, "refs")
    }

    /// A document's values in the string column `field`, in the order they were added (as
    /// the document store kept them).
    fn column_values(
        &self,
        searcher: &tantivy::Searcher,
        address: DocAddress,
        field: &'static str,
    ) -> Result<Vec<String>> {
        let reader = searcher.segment_reader(address.segment_ord);
        let Some(column) = self.str_column(reader, field)? else {
            return Ok(Vec::new());
        };
        let mut values = Vec::new();
        for ord in column.term_ords(address.doc_id) {
            let mut text = String::new();
            column
                .ord_to_str(ord, &mut text)
                .map_err(|e| Error::Index(format!("reading the {field} column: {e}")))?;
            values.push(text);
        }
        Ok(values)
    }

    /// Bytes of the committed index by part (`termdict`, `postings`, `positions`, `fast`,
    /// `fieldnorms`) and field, plus the document store (`store`, no field) and deletes, summed
    /// over segments, largest first; what the size of `index.redb` is made of (without redb's
    /// own overhead and free pages).
    pub fn space_usage(&self) -> Result<Vec<(String, String, u64)>> {
        let usage = self
            .searcher()
            .space_usage()
            .map_err(|e| Error::Index(format!("index space usage: {e}")))?;
        let mut totals: HashMap<(String, String), u64> = HashMap::new();
        for segment in usage.segments() {
            for (part, per_field) in [
                ("termdict", segment.termdict()),
                ("postings", segment.postings()),
                ("positions", segment.positions()),
                ("fast", segment.fast_fields()),
                ("fieldnorms", segment.fieldnorms()),
            ] {
                for field in per_field.fields() {
                    *totals
                        .entry((part.to_string(), field.field_name().to_string()))
                        .or_default() += field.total().get_bytes();
                }
            }
            *totals.entry(("store".into(), String::new())).or_default() +=
                segment.store().total().get_bytes();
            *totals.entry(("deletes".into(), String::new())).or_default() +=
                segment.deletes().get_bytes();
        }
        let mut rows: Vec<(String, String, u64)> = totals
            .into_iter()
            .map(|((part, field), bytes)| (part, field, bytes))
            .collect();
        rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
        Ok(rows)
    }

    /// A query for one exact term of the `terms` field.
    pub fn term(&self, text: &str) -> Box<dyn Query> {
        Box::new(TermQuery::new(
            Term::from_field_text(self.fields.terms, &indexable_term(text)),
            IndexRecordOption::Basic,
        ))
    }

    /// A query for one exact term of any raw field.
    pub fn field_term(&self, field: Field, text: &str) -> Box<dyn Query> {
        Box::new(TermQuery::new(
            Term::from_field_text(field, text),
            IndexRecordOption::Basic,
        ))
    }

    /// Terms of the `terms` field in a range.
    pub fn range(&self, lower: Bound<String>, upper: Bound<String>) -> Box<dyn Query> {
        let to_term = |b: Bound<String>| match b {
            Bound::Included(t) => Bound::Included(Term::from_field_text(
                self.fields.terms,
                &indexable_term(&t),
            )),
            Bound::Excluded(t) => Bound::Excluded(Term::from_field_text(
                self.fields.terms,
                &indexable_term(&t),
            )),
            Bound::Unbounded => Bound::Unbounded,
        };
        Box::new(RangeQuery::new(to_term(lower), to_term(upper)))
    }

    /// Terms of the `terms` field that start with `prefix`.
    pub fn prefix(&self, prefix: &str) -> Box<dyn Query> {
        self.range(
            Bound::Included(prefix.to_string()),
            Bound::Excluded(format!("{prefix}{}", char::MAX)),
        )
    }

    /// Terms of the `terms` field matching a regular expression (whole term).
    pub fn regex(&self, pattern: &str) -> Result<Box<dyn Query>> {
        Ok(Box::new(RegexQuery::from_pattern(
            pattern,
            self.fields.terms,
        )?))
    }
}

/// Any of `queries` (an empty list matches nothing).
pub fn any_of(queries: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    if queries.len() == 1 {
        return queries
            .into_iter()
            .next()
            .unwrap_or_else(|| Box::new(AllQuery));
    }
    Box::new(BooleanQuery::new(
        queries.into_iter().map(|q| (Occur::Should, q)).collect(),
    ))
}

/// All of `queries` (an empty list matches everything).
pub fn all_of(queries: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    if queries.is_empty() {
        return Box::new(AllQuery);
    }
    if queries.len() == 1 {
        return queries
            .into_iter()
            .next()
            .unwrap_or_else(|| Box::new(AllQuery));
    }
    Box::new(BooleanQuery::new(
        queries.into_iter().map(|q| (Occur::Must, q)).collect(),
    ))
}

/// Everything but `query`.
pub fn none_of(query: Box<dyn Query>) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(vec![
        (Occur::Must, Box::new(AllQuery) as Box<dyn Query>),
        (Occur::MustNot, query),
    ]))
}

fn encode_payload(state: &IndexState) -> String {
    match state.store_seq {
        Some(seq) => format!("fhirkeep-index v{} seq {seq}", state.schema_version),
        None => format!("fhirkeep-index v{} seq none", state.schema_version),
    }
}

fn parse_payload(payload: &str) -> Option<IndexState> {
    let rest = payload.strip_prefix("fhirkeep-index v")?;
    let (version, seq) = rest.split_once(" seq ")?;
    Some(IndexState {
        schema_version: version.parse().ok()?,
        store_seq: if seq == "none" {
            None
        } else {
            Some(seq.parse().ok()?)
        },
    })
}

/// Escapes regular-expression syntax in `text`.
pub fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~\"<>@".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tantivy::directory::RamDirectory;
    use tantivy::query::AllQuery;

    #[test]
    fn documents_read_back_from_the_columns() {
        let index = SearchIndex::open(Box::new(RamDirectory::create()))
            .unwrap()
            .unwrap();
        let entries = |reference: &str, sort: &[&str]| IndexEntries {
            terms: vec!["code\u{1f}t\u{1f}x".into()],
            references: vec![format!("subject\u{1f}{reference}")],
            sort_keys: sort.iter().map(|s| (*s).to_string()).collect(),
            ..IndexEntries::default()
        };
        let changes = [
            (
                "Observation/a",
                entries("Patient/p", &["date\u{1f}2", "_id\u{1f}a"]),
            ),
            ("Observation/b", entries("Patient/q", &["_id\u{1f}b"])),
            ("Patient/p", IndexEntries::default()),
        ]
        .map(|(key, entries)| DocumentChange {
            key: key.into(),
            replaces: false,
            document: Some(index.document(key, key.split('/').next().unwrap(), &entries)),
        });
        index.apply(changes).unwrap();
        index.commit(Some(1)).unwrap();
        let searcher = index.searcher();
        let mut docs: Vec<IndexedDoc> = index
            .matching(&searcher, &AllQuery)
            .unwrap()
            .into_iter()
            .map(|address| index.doc(&searcher, address).unwrap())
            .collect();
        docs.sort_by(|a, b| a.key.cmp(&b.key));
        let seen: Vec<(&str, Vec<&str>, Vec<&str>)> = docs
            .iter()
            .map(|d| {
                (
                    d.key.as_str(),
                    d.refs.iter().map(String::as_str).collect(),
                    d.sort.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (
                    "Observation/a",
                    vec!["subject\u{1f}Patient/p"],
                    vec!["date\u{1f}2", "_id\u{1f}a"]
                ),
                (
                    "Observation/b",
                    vec!["subject\u{1f}Patient/q"],
                    vec!["_id\u{1f}b"]
                ),
                ("Patient/p", vec![], vec![]),
            ]
        );
        // Nothing goes to the document store (its bytes per document were the point).
        let schema = index.tantivy().schema();
        assert!(schema.fields().all(|(_, entry)| !entry.is_stored()));
    }

    #[test]
    fn an_index_of_the_previous_schema_is_refused_for_a_rebuild() {
        // Schema version 4: key, refs and sort stored, field norms on.
        let directory = RamDirectory::create();
        let mut builder = Schema::builder();
        builder.add_text_field("key", tantivy::schema::STRING | tantivy::schema::STORED);
        builder.add_text_field("refs", tantivy::schema::STORED);
        Index::create(
            directory.clone(),
            builder.build(),
            tantivy::IndexSettings::default(),
        )
        .unwrap();
        assert!(SearchIndex::open(Box::new(directory)).unwrap().is_none());
    }

    #[test]
    fn an_index_of_another_version_with_the_same_fields_is_refused_before_its_segments_open() {
        let directory = RamDirectory::create();
        {
            let index = SearchIndex::open(Box::new(directory.clone()))
                .unwrap()
                .unwrap();
            let entries = IndexEntries {
                terms: vec!["gender\u{1f}t\u{1f}female".into()],
                ..IndexEntries::default()
            };
            index
                .apply([DocumentChange {
                    key: "Patient/p".into(),
                    replaces: false,
                    document: Some(index.document("Patient/p", "Patient", &entries)),
                }])
                .unwrap();
            index.commit(Some(1)).unwrap();
        }
        let reopened = SearchIndex::open(Box::new(directory.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(reopened.state().unwrap().store_seq, Some(1));
        let searcher = reopened.searcher();
        let query = reopened.term("gender\u{1f}t\u{1f}female");
        assert_eq!(reopened.count(&searcher, query.as_ref()).unwrap(), 1);
        drop(reopened);
        // The same fields, committed by the previous version (an FST term dictionary).
        let index = Index::open(directory.clone()).unwrap();
        let mut writer: IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
        let mut prepared = writer.prepare_commit().unwrap();
        prepared.set_payload("fhirkeep-index v9 seq 1");
        prepared.commit().unwrap();
        drop(writer);
        assert!(SearchIndex::open(Box::new(directory)).unwrap().is_none());
    }

    #[test]
    fn each_term_of_the_one_value_is_found_and_a_term_break_in_a_value_adds_no_term() {
        let index = SearchIndex::open(Box::new(RamDirectory::create()))
            .unwrap()
            .unwrap();
        let planted = "name\u{1f}s\u{1f}x\u{1e}gender\u{1f}t\u{1f}male";
        let entries = IndexEntries {
            terms: vec![
                "gender\u{1f}t\u{1f}female".into(),
                planted.into(),
                "name\u{1f}p\u{1f}".into(),
                "gender\u{1f}t\u{1f}female".into(),
            ],
            ..IndexEntries::default()
        };
        let other = IndexEntries {
            terms: vec!["gender\u{1f}t\u{1f}other".into()],
            ..IndexEntries::default()
        };
        let changes =
            [("Patient/a", entries), ("Patient/b", other)].map(|(key, entries)| DocumentChange {
                key: key.into(),
                replaces: false,
                document: Some(index.document(key, "Patient", &entries)),
            });
        index.apply(changes).unwrap();
        index.commit(Some(1)).unwrap();
        let searcher = index.searcher();
        let count = |query: Box<dyn Query>| index.count(&searcher, query.as_ref()).unwrap();
        assert_eq!(count(index.term("gender\u{1f}t\u{1f}female")), 1);
        assert_eq!(count(index.term("gender\u{1f}t\u{1f}other")), 1);
        assert_eq!(count(index.term("name\u{1f}p\u{1f}")), 1);
        // The value with a term break is found as written, and plants nothing.
        assert_eq!(count(index.term(planted)), 1);
        assert_eq!(count(index.term("gender\u{1f}t\u{1f}male")), 0);
        assert_eq!(count(index.prefix("gender\u{1f}t\u{1f}")), 2);
        assert_eq!(count(index.prefix("name\u{1f}s\u{1f}x")), 1);
        assert_eq!(count(index.term("name\u{1f}s\u{1f}x")), 0);
    }

    #[test]
    fn the_term_list_tokenizer_yields_every_nonempty_piece_with_its_offsets() {
        let mut tokenizer = TermListTokenizer::default();
        for (text, expected) in [
            ("", vec![]),
            ("\u{1e}\u{1e}", vec![]),
            ("a", vec![("a", 0, 1)]),
            (
                "\u{1e}ä\u{1f}t\u{1f}x\u{1e}\u{1e}b€\u{1e}",
                vec![("ä\u{1f}t\u{1f}x", 1, 7), ("b€", 9, 13)],
            ),
        ] {
            let mut stream = tokenizer.token_stream(text);
            let mut seen = Vec::new();
            while stream.advance() {
                let token = stream.token();
                assert_eq!(&text[token.offset_from..token.offset_to], token.text);
                seen.push((token.text.clone(), token.offset_from, token.offset_to));
            }
            let expected: Vec<(String, usize, usize)> = expected
                .into_iter()
                .map(|(t, from, to)| (t.to_string(), from, to))
                .collect();
            assert_eq!(seen, expected, "{text:?}");
        }
    }

    #[test]
    fn payload_round_trips() {
        for state in [
            IndexState {
                schema_version: 1,
                store_seq: None,
            },
            IndexState {
                schema_version: 7,
                store_seq: Some(123),
            },
        ] {
            assert_eq!(parse_payload(&encode_payload(&state)), Some(state));
        }
        assert_eq!(parse_payload("garbage"), None);
    }
}
