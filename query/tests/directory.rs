//! `RedbDirectory` at its boundary: a real tantivy index in a real encrypted store in a temp
//! dir, reopened, "crashed", deleted under readers, and scanned for plaintext.
// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::Store;
use fhirkeep_query::directory::RedbDirectory;
use tantivy::collector::{Count, TopDocs};
use tantivy::directory::error::{DeleteError, LockError, OpenReadError, OpenWriteError};
use tantivy::directory::{Directory, Lock, TerminatingWrite};
use tantivy::query::{QueryParser, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, STORED, STRING, Schema, TEXT, Value};
use tantivy::{
    HasLen, Index, IndexReader, IndexSettings, IndexWriter, ReloadPolicy, TantivyDocument, Term,
    doc,
};
use tempfile::TempDir;

struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = TempDir::new().unwrap();
        create_key_file(&dir.path().join("key")).unwrap();
        Store::builder(dir.path().join("db"))
            .key(KeySource::KeyFile(dir.path().join("key")))
            .create()
            .unwrap();
        Fixture { dir }
    }

    fn db_dir(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    fn store_at(&self, db_dir: &Path) -> Store {
        Store::builder(db_dir)
            .key(KeySource::KeyFile(self.dir.path().join("key")))
            .cache_size(4 << 20)
            .open()
            .unwrap()
    }

    fn store(&self) -> Store {
        self.store_at(&self.db_dir())
    }
}

fn directory(store: &Store) -> RedbDirectory {
    RedbDirectory::new(store.open_aux_database("index").unwrap()).unwrap()
}

struct Fields {
    body: Field,
    code: Field,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let body = builder.add_text_field("body", TEXT | STORED);
    let code = builder.add_text_field("code", STRING | STORED);
    (builder.build(), Fields { body, code })
}

fn writer(index: &Index) -> IndexWriter {
    index.writer_with_num_threads(1, 15_000_000).unwrap()
}

fn reader(index: &Index) -> IndexReader {
    index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()
        .unwrap()
}

fn count_text(index: &Index, fields: &Fields, query: &str) -> usize {
    let searcher = reader(index).searcher();
    let query = QueryParser::for_index(index, vec![fields.body])
        .parse_query(query)
        .unwrap();
    searcher.search(&query, &Count).unwrap()
}

fn codes_matching(index: &Index, fields: &Fields, code: &str) -> Vec<String> {
    let searcher = reader(index).searcher();
    let query = TermQuery::new(
        Term::from_field_text(fields.code, code),
        IndexRecordOption::Basic,
    );
    let hits = searcher
        .search(&query, &TopDocs::with_limit(100).order_by_score())
        .unwrap();
    hits.into_iter()
        .map(|(_, address)| {
            let doc: TantivyDocument = searcher.doc(address).unwrap();
            doc.get_first(fields.body)
                .and_then(|v| v.as_str())
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn add_docs(writer: &mut IndexWriter, fields: &Fields, range: std::ops::Range<usize>, word: &str) {
    for i in range {
        writer
            .add_document(doc!(
                fields.body => format!("document {i} about the quick {word} number{i}"),
                fields.code => format!("code-{}", i % 7),
            ))
            .unwrap();
    }
}

#[test]
fn index_round_trips_through_reopen() {
    let fx = Fixture::new();
    let (schema, fields) = schema();
    {
        let store = fx.store();
        let index =
            Index::create(directory(&store), schema.clone(), IndexSettings::default()).unwrap();
        let mut w = writer(&index);
        add_docs(&mut w, &fields, 0..500, "fox");
        w.commit().unwrap();
        assert_eq!(count_text(&index, &fields, "fox"), 500);
        assert_eq!(count_text(&index, &fields, "number42"), 1);
        assert_eq!(codes_matching(&index, &fields, "code-3").len(), 71);
        // Merge threads hold the directory (and the index file) until they finish.
        w.wait_merging_threads().unwrap();
    }
    // Everything dropped (index, directory, aux database, store): reopen from the files.
    let store = fx.store();
    let dir = RedbDirectory::with_cache_size(store.open_aux_database("index").unwrap(), 128 << 10)
        .unwrap();
    let index = Index::open(dir).unwrap();
    assert_eq!(index.schema(), schema);
    assert_eq!(count_text(&index, &fields, "fox"), 500);
    assert_eq!(count_text(&index, &fields, "number499"), 1);
    let bodies = codes_matching(&index, &fields, "code-3");
    assert_eq!(bodies.len(), 71);
    assert!(bodies.iter().all(|b| b.contains("quick fox")));
    // Writing on after the reopen, with deletes and a merge into one segment.
    let mut w = writer(&index);
    add_docs(&mut w, &fields, 500..800, "hound");
    w.delete_term(Term::from_field_text(fields.code, "code-0"));
    w.commit().unwrap();
    let ids = index.searchable_segment_ids().unwrap();
    if ids.len() > 1 {
        w.merge(&ids).wait().unwrap();
    }
    w.wait_merging_threads().unwrap();
    drop(index);
    drop(store);
    let store = fx.store();
    let index = Index::open(directory(&store)).unwrap();
    assert_eq!(index.searchable_segment_ids().unwrap().len(), 1);
    assert_eq!(count_text(&index, &fields, "hound"), 300 - 300 / 7 - 1);
    assert!(codes_matching(&index, &fields, "code-0").is_empty());
    assert_eq!(
        count_text(&index, &fields, "quick"),
        800 - 800usize.div_ceil(7)
    );
}

/// A crash after tantivy wrote a segment's files but before it committed `meta.json`: the
/// files are not durable, and the index opens at its last commit.
#[test]
fn files_without_a_meta_commit_are_not_a_segment_after_a_crash() {
    let fx = Fixture::new();
    let (schema, fields) = schema();
    let image = TempDir::new().unwrap();
    let (committed_files, uncommitted_files) = {
        let store = fx.store();
        let index = Index::create(directory(&store), schema, IndexSettings::default()).unwrap();
        let mut w = writer(&index);
        add_docs(&mut w, &fields, 0..100, "fox");
        w.commit().unwrap();
        let committed = index.directory().list_managed_files();
        add_docs(&mut w, &fields, 100..300, "hound");
        let prepared = w.prepare_commit().unwrap();
        let now = index.directory().list_managed_files();
        let uncommitted: Vec<PathBuf> = now.difference(&committed).cloned().collect();
        assert!(
            uncommitted
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".idx")),
            "the segment's files were written: {uncommitted:?}"
        );
        // The crash: the disk as it is now, unsynced writes included.
        copy_dir(&fx.db_dir(), image.path());
        prepared.abort().unwrap();
        (committed, uncommitted)
    };
    let store = fx.store_at(image.path());
    let dir = directory(&store);
    for path in &uncommitted_files {
        assert!(
            !dir.exists(path).unwrap(),
            "{} survived the crash",
            path.display()
        );
    }
    let index = Index::open(dir.clone()).unwrap();
    assert_eq!(count_text(&index, &fields, "fox"), 100);
    assert_eq!(count_text(&index, &fields, "hound"), 0);
    for path in committed_files.iter().filter(|p| !p.starts_with(".")) {
        assert!(dir.exists(path).unwrap(), "{} is lost", path.display());
    }
    // The index keeps working from there.
    let mut w = writer(&index);
    add_docs(&mut w, &fields, 100..150, "hound");
    w.commit().unwrap();
    assert_eq!(count_text(&index, &fields, "hound"), 50);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 131 + seed as u64) as u8 ^ (i >> 16) as u8)
        .collect()
}

fn write_file(dir: &RedbDirectory, path: &Path, data: &[u8]) {
    let mut w = dir.open_write(path).unwrap();
    // Odd-sized pieces, so chunk boundaries fall inside writes.
    for piece in data.chunks(10_007) {
        w.write_all(piece).unwrap();
    }
    w.terminate().unwrap();
}

#[test]
fn a_deleted_file_stays_readable_through_an_open_handle() {
    let fx = Fixture::new();
    let store = fx.store();
    let dir =
        RedbDirectory::with_cache_size(store.open_aux_database("index").unwrap(), 100_000).unwrap();
    let path = Path::new("a.bin");
    // Larger than the writer's spill threshold, not a multiple of the chunk size.
    let old = pattern(1, (5 << 20) + 12_345);
    write_file(&dir, path, &old);
    assert!(matches!(
        dir.open_write(path),
        Err(OpenWriteError::FileAlreadyExists(_))
    ));
    let handle = dir.open_read(path).unwrap();
    assert_eq!(handle.len(), old.len());
    dir.delete(path).unwrap();
    assert!(!dir.exists(path).unwrap());
    assert!(matches!(
        dir.open_read(path),
        Err(OpenReadError::FileDoesNotExist(_))
    ));
    assert!(matches!(
        dir.delete(path),
        Err(DeleteError::FileDoesNotExist(_))
    ));
    // A new file under the same name does not disturb the old handle.
    let new = pattern(2, 70_000);
    write_file(&dir, path, &new);
    for (start, end) in [
        (0, 10),
        (65_530, 65_545),
        (0, old.len()),
        (old.len() - 3, old.len()),
        (1 << 20, (1 << 20) + 300_000),
        (77, 77),
    ] {
        let got = handle.read_bytes_slice(start..end).unwrap();
        assert_eq!(got.as_slice(), &old[start..end], "{start}..{end}");
    }
    let fresh = dir.open_read(path).unwrap();
    let raw = dir.get_file_handle(path).unwrap();
    assert!(
        raw.read_bytes(0..new.len() + 1).is_err(),
        "reads past the end are errors"
    );
    assert_eq!(fresh.read_bytes().unwrap().as_slice(), &new[..]);
    drop(handle);

    // An empty file, and a writer dropped without `terminate` (after spilling chunks):
    // the latter never appears, and its name can be written again.
    write_file(&dir, Path::new("empty"), b"");
    assert_eq!(dir.open_read(Path::new("empty")).unwrap().len(), 0);
    {
        let mut w = dir.open_write(Path::new("abandoned")).unwrap();
        w.write_all(&pattern(3, 5 << 20)).unwrap();
        w.flush().unwrap();
        assert!(dir.exists(Path::new("abandoned")).unwrap());
    }
    assert!(!dir.exists(Path::new("abandoned")).unwrap());
    write_file(&dir, Path::new("abandoned"), b"second try");
    assert_eq!(
        dir.atomic_read(Path::new("abandoned")).unwrap(),
        b"second try"
    );

    // atomic_write replaces; atomic_read sees the latest.
    dir.atomic_write(Path::new("meta.json"), b"{\"v\":1}")
        .unwrap();
    dir.atomic_write(Path::new("meta.json"), b"{\"v\":2}")
        .unwrap();
    assert_eq!(
        dir.atomic_read(Path::new("meta.json")).unwrap(),
        b"{\"v\":2}"
    );
    assert!(matches!(
        dir.atomic_read(Path::new("missing.json")),
        Err(OpenReadError::FileDoesNotExist(_))
    ));
    // Open handles keep the database open: everything goes before it is reopened.
    drop((fresh, raw, dir, store));
    let store = fx.store();
    let dir = directory(&store);
    assert_eq!(
        dir.atomic_read(Path::new("meta.json")).unwrap(),
        b"{\"v\":2}"
    );
    assert_eq!(
        dir.open_read(path)
            .unwrap()
            .read_bytes()
            .unwrap()
            .as_slice(),
        &new[..]
    );
    assert!(!dir.exists(Path::new("abandoned-never")).unwrap());
}

#[test]
fn locks_are_exclusive_until_dropped() {
    let fx = Fixture::new();
    let store = fx.store();
    let dir = directory(&store);
    let request = |blocking| Lock {
        filepath: PathBuf::from(".tantivy-writer.lock"),
        is_blocking: blocking,
    };
    let held = dir.acquire_lock(&request(false)).unwrap();
    assert!(matches!(
        dir.clone().acquire_lock(&request(false)),
        Err(LockError::LockBusy)
    ));
    let other = dir.clone();
    let waiter = std::thread::spawn(move || other.acquire_lock(&request(true)).is_ok());
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(held);
    assert!(
        waiter.join().unwrap(),
        "a blocking request gets the lock once it is free"
    );
    // A second index writer on the same directory is refused while the first lives.
    let (schema, _) = schema();
    let index = Index::create(dir, schema, IndexSettings::default()).unwrap();
    let first = writer(&index);
    assert!(
        index
            .writer_with_num_threads::<TantivyDocument>(1, 15_000_000)
            .is_err()
    );
    drop(first);
    writer(&index);
}

/// The canary as UTF-8, UTF-16 (both byte orders) and base64 at each of the 3 alignments.
fn canary_forms(canary: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let mut forms = vec![canary.as_bytes().to_vec()];
    forms.push(canary.encode_utf16().flat_map(u16::to_le_bytes).collect());
    forms.push(canary.encode_utf16().flat_map(u16::to_be_bytes).collect());
    for shift in 0..3 {
        let padded = format!("{}{canary}", "x".repeat(shift));
        let encoded = base64::engine::general_purpose::STANDARD.encode(padded);
        // Skip the characters that depend on the padding; keep a long stable middle.
        let start = (shift * 4).div_ceil(3) + 1;
        forms.push(encoded.as_bytes()[start..encoded.len() - 4].to_vec());
    }
    forms
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn canary_scan_finds_no_index_content_in_any_file() {
    let fx = Fixture::new();
    let canary = "Canary-Zebra-7c41-Quokka";
    let lower = "zebra";
    let (schema, fields) = schema();
    {
        let store = fx.store();
        let index = Index::create(directory(&store), schema, IndexSettings::default()).unwrap();
        let mut w = writer(&index);
        for i in 0..300 {
            w.add_document(doc!(
                fields.body => format!("patient {canary} visit {i} {canary}"),
                fields.code => format!("{canary}-{i}"),
            ))
            .unwrap();
        }
        w.commit().unwrap();
        assert_eq!(count_text(&index, &fields, lower), 300);
        assert_eq!(
            codes_matching(&index, &fields, &format!("{canary}-7")).len(),
            1
        );
        // The control: decrypted, the index files do hold the canary the scan looks for
        // (the string field's terms and stored values).
        let mut plain = Vec::new();
        let managed = index.directory().list_managed_files();
        for path in managed
            .iter()
            .filter(|p| p.extension().is_none_or(|e| e != "json"))
        {
            let file = index.directory().open_read(path).unwrap();
            plain.extend_from_slice(file.read_bytes().unwrap().as_slice());
        }
        let needle = canary.as_bytes();
        assert!(plain.windows(needle.len()).any(|w| w == needle));
    }
    let mut needles = canary_forms(canary);
    // The text field's terms are the lowercased words (too short for base64 forms, which
    // would match ciphertext by chance).
    for word in ["quokka", "zebra"] {
        needles.push(word.as_bytes().to_vec());
        needles.push(word.encode_utf16().flat_map(u16::to_le_bytes).collect());
    }
    let mut scanned = 0;
    for file in walk(fx.dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        scanned += bytes.len();
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{} holds index content in plaintext",
                file.display()
            );
        }
    }
    assert!(scanned > 100_000, "scanned only {scanned} bytes");
}
