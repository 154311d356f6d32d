//! Fuzz target: a damaged or tampered encrypted data file never makes the engine panic or
//! return wrong data. One database is built per process; each input edits a copy of its
//! physical file (bit flips, overwrites, zeroed blocks, blocks moved, blocks or header copies
//! replayed from an older image of the same database, truncation), which is then checked with
//! `verify_file`, opened through `EncryptedBackend` + redb (every table read, by iteration and
//! by point lookups) and, if that opens, through `Store` (every resource read). Every read that
//! succeeds must return exactly what the original database holds.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use fhirkeep_engine::Error;
use fhirkeep_engine::crypto::page;
use fhirkeep_engine::crypto::{EncryptedBackend, KEY_HEADER_FILE, KeySource, Keyring, verify_file};
use fhirkeep_engine::store::{AccessContext, DATABASE_FILE, ReadAudit, Store};
use libfuzzer_sys::fuzz_target;
use redb::{ReadableDatabase, ReadableTable, StorageBackend, TableDefinition, TableHandle};
use serde_json::json;

// The engine's tables (engine/src/store/record.rs, engine/src/audit/log.rs).
const VERSIONS: TableDefinition<'_, (&str, &str, u64), &[u8]> = TableDefinition::new("versions");
const CHANGES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("changes");
const TYPE_CHANGES: TableDefinition<'_, (&str, u64), ()> = TableDefinition::new("type_changes");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const LEAVES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("audit_leaf_chunks");
const NODES: TableDefinition<'_, (u8, u64), [u8; 32]> = TableDefinition::new("audit_nodes");
const HEADS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("audit_heads");
const AUDIT_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("audit_meta");

// Physical layout: format 2, which new files get (engine/src/crypto/page.rs).
const HEADER_BLOCK: usize = page::HEADER_BLOCK_SIZE;
const ENTRY: usize = page::ENTRY_SIZE;
const PAGE: usize = page::PAGE_SIZE;

/// (table, key as text) → value bytes.
type Dump = BTreeMap<(String, String), Vec<u8>>;

struct Fixture {
    _dir: tempfile::TempDir,
    key_file: PathBuf,
    keyring: Arc<Keyring>,
    /// The physical file of the finished database.
    original: Vec<u8>,
    /// The physical file after the first half of the writes (source of replayed blocks).
    older: Vec<u8>,
    header_bytes: Vec<u8>,
    tables: Vec<String>,
    truth: Dump,
    /// (type, id) → current JSON bytes, or None if deleted.
    resources: BTreeMap<(String, String), Option<Vec<u8>>>,
    scratch: tempfile::TempDir,
}

fn ctx() -> AccessContext {
    AccessContext::new("fuzz", "encrypted_pages", "local", "r")
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("key");
        fhirkeep_engine::crypto::create_key_file(&key_file).expect("key file");
        let db = dir.path().join("db");
        let mut resources = BTreeMap::new();
        let older;
        {
            let store = Store::builder(&db)
                .key(KeySource::KeyFile(key_file.clone()))
                .read_audit(ReadAudit::Durable)
                .open_or_create()
                .expect("create store");
            let mut put = |t: &str, id: &str, body: serde_json::Value| {
                let out = store.update(&ctx(), t, id, body, None).expect("update");
                resources.insert(
                    (t.to_owned(), id.to_owned()),
                    Some(out.resource.json_bytes().to_vec()),
                );
            };
            for i in 0..12 {
                put(
                    "Patient",
                    &format!("p{i}"),
                    json!({"resourceType": "Patient", "name": [{"family": format!("F{i}")}]}),
                );
            }
            older = std::fs::read(db.join(DATABASE_FILE)).expect("read older image");
            // A large resource spanning several pages, updates, a deletion.
            let big: Vec<String> = (0..600).map(|i| format!("line {i} of a long note")).collect();
            put(
                "Observation",
                "big",
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                       "note": big.iter().map(|t| json!({"text": t})).collect::<Vec<_>>()}),
            );
            for i in 0..6 {
                put(
                    "Patient",
                    &format!("p{i}"),
                    json!({"resourceType": "Patient", "active": true, "name": [{"family": format!("G{i}")}]}),
                );
            }
            store.delete(&ctx(), "Patient", "p7", None).expect("delete");
            resources.insert(("Patient".into(), "p7".into()), None);
        }
        let original = std::fs::read(db.join(DATABASE_FILE)).expect("read image");
        let header_bytes = std::fs::read(db.join(KEY_HEADER_FILE)).expect("read header");
        let keyring =
            Keyring::open(&db, &KeySource::KeyFile(key_file.clone())).expect("open keyring");
        let (tables, truth) = match read_all(&original, &keyring, None) {
            Outcome::Complete { tables, dump } => (tables, dump),
            other => panic!("the pristine image does not read back: {other:?}"),
        };
        assert!(truth.keys().any(|(t, _)| t == "versions"));
        Fixture {
            _dir: dir,
            key_file,
            keyring,
            original,
            older,
            header_bytes,
            tables,
            truth,
            resources,
            scratch: tempfile::tempdir().expect("scratch"),
        }
    })
}

#[derive(Debug)]
enum Outcome {
    /// The database did not open (typed error).
    Refused,
    /// It opened; every table read fully.
    Complete { tables: Vec<String>, dump: Dump },
    /// It opened; some reads failed (typed errors), all successful reads were checked.
    Partial,
}

/// Collects every entry of one table, checking each against `truth` as it goes.
fn scan<K, V>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<'_, K, V>,
    truth: Option<&Dump>,
    dump: &mut Dump,
    key_text: impl Fn(&K::SelfType<'_>) -> String,
    value_bytes: impl Fn(&V::SelfType<'_>) -> Vec<u8>,
) -> bool
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let name = def.name().to_owned();
    let Ok(table) = txn.open_table(def) else {
        return false;
    };
    let Ok(iter) = table.iter() else {
        return false;
    };
    let mut complete = true;
    for entry in iter {
        let Ok((k, v)) = entry else {
            complete = false;
            break;
        };
        let key = (name.clone(), key_text(&k.value()));
        let value = value_bytes(&v.value());
        if let Some(truth) = truth {
            match truth.get(&key) {
                Some(expected) => assert_eq!(
                    expected, &value,
                    "table {name} key {} returned a value the database never held",
                    key.1
                ),
                None => panic!(
                    "table {name} returned key {} that the database never held",
                    key.1
                ),
            }
        }
        dump.insert(key, value);
    }
    complete
}

/// Opens `image` through `EncryptedBackend` + redb and reads every table.
fn read_all(image: &[u8], keyring: &Arc<Keyring>, truth: Option<&Dump>) -> Outcome {
    let mem = redb::backends::InMemoryBackend::new();
    mem.set_len(image.len() as u64).expect("in-memory set_len");
    mem.write(0, image).expect("in-memory write");
    let Ok(backend) = EncryptedBackend::new(mem, Arc::clone(keyring)) else {
        return Outcome::Refused;
    };
    let Ok(db) = redb::Builder::new().create_with_backend(backend) else {
        return Outcome::Refused;
    };
    let Ok(txn) = db.begin_read() else {
        return Outcome::Partial;
    };
    let tables = txn
        .list_tables()
        .map(|it| it.map(|h| h.name().to_owned()).collect::<Vec<_>>());
    let mut dump = Dump::new();
    let s = |x: &&str| (*x).to_owned();
    let b = |x: &&[u8]| x.to_vec();
    let mut ok = true;
    ok &= scan(&txn, VERSIONS, truth, &mut dump, |k| format!("{k:?}"), b);
    ok &= scan(&txn, CHANGES, truth, &mut dump, u64::to_string, b);
    ok &= scan(
        &txn,
        TYPE_CHANGES,
        truth,
        &mut dump,
        |k| format!("{k:?}"),
        |()| Vec::new(),
    );
    ok &= scan(&txn, META, truth, &mut dump, s, b);
    ok &= scan(&txn, LEAVES, truth, &mut dump, u64::to_string, b);
    ok &= scan(
        &txn,
        NODES,
        truth,
        &mut dump,
        |k| format!("{k:?}"),
        |v| v.to_vec(),
    );
    ok &= scan(&txn, HEADS, truth, &mut dump, u64::to_string, b);
    ok &= scan(&txn, AUDIT_META, truth, &mut dump, s, b);

    // Point lookups of every known version record: an answer must be the right one.
    if let (Some(truth), Ok(versions)) = (truth, txn.open_table(VERSIONS)) {
        for ((table, key), expected) in truth.iter().filter(|((t, _), _)| t == "versions") {
            let _ = table;
            // key is Debug of ("Type", "id", v): re-parse cheaply via the fixture's resources.
            let Some((t, id, v)) = parse_version_key(key) else {
                continue;
            };
            match versions.get((t.as_str(), id.as_str(), v)) {
                Ok(Some(guard)) => assert_eq!(guard.value(), expected.as_slice(), "get {key}"),
                Ok(None) => panic!("get {key}: a stored version read as absent"),
                Err(_) => ok = false,
            }
        }
    }
    match tables {
        Ok(tables) if ok => {
            if let Some(truth) = truth {
                assert_eq!(&dump, truth, "a complete scan differs from the database");
            }
            Outcome::Complete { tables, dump }
        }
        _ => Outcome::Partial,
    }
}

fn parse_version_key(key: &str) -> Option<(String, String, u64)> {
    // Format: ("Type", "id", 3)
    let inner = key.strip_prefix('(')?.strip_suffix(')')?;
    let mut parts = inner.splitn(3, ", ");
    let t = parts.next()?.trim_matches('"').to_owned();
    let id = parts.next()?.trim_matches('"').to_owned();
    let v = parts.next()?.parse().ok()?;
    Some((t, id, v))
}

/// Physical byte ranges of block `b`: 0 = header copy A, 1 = header copy B, 2.. = pages 1..
/// (a page's entry, then its ciphertext).
fn block_parts(b: usize, len: usize) -> Option<Vec<std::ops::Range<usize>>> {
    let parts = match b {
        0 | 1 => {
            let start = page::PageFormat::V2.header_offset(b == 1) as usize;
            vec![start..start + HEADER_BLOCK]
        }
        _ => {
            let pg = (b - 1) as u64;
            let entry = page::v2_entry_offset(pg) as usize;
            let data = page::v2_data_offset(pg) as usize;
            vec![entry..entry + ENTRY, data..data + PAGE]
        }
    };
    parts.iter().all(|r| r.end <= len).then_some(parts)
}

fn block_count(len: usize) -> usize {
    (0..)
        .map(|b| b + 2)
        .find(|&b| block_parts(b, len).is_none())
        .unwrap_or(2)
}

fn copy_block(
    image: &mut [u8],
    to: &[std::ops::Range<usize>],
    source: &[u8],
    from: &[std::ops::Range<usize>],
) {
    if to.len() == from.len() && to.iter().zip(from).all(|(t, f)| t.len() == f.len()) {
        for (t, f) in to.iter().zip(from) {
            image[t.clone()].copy_from_slice(&source[f.clone()]);
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Edit {
    Flip { at: u32, bit: u8 },
    Overwrite { at: u32, bytes: Vec<u8> },
    ZeroBlock { block: u16 },
    MoveBlock { from: u16, to: u16 },
    ReplayBlock { block: u16 },
    SwapHeaderCopies,
    Truncate { len: u32 },
    Extend { n: u16, byte: u8 },
}

fn apply(image: &mut Vec<u8>, older: &[u8], edit: &Edit) {
    let len = image.len();
    if len == 0 {
        return;
    }
    let nblocks = block_count(len);
    match edit {
        Edit::Flip { at, bit } => image[*at as usize % len] ^= 1 << (bit % 8),
        Edit::Overwrite { at, bytes } => {
            let at = *at as usize % len;
            let n = bytes.len().min(len - at);
            image[at..at + n].copy_from_slice(&bytes[..n]);
        }
        Edit::ZeroBlock { block } => {
            for r in block_parts(usize::from(*block) % nblocks, len).unwrap_or_default() {
                image[r].fill(0);
            }
        }
        Edit::MoveBlock { from, to } => {
            let (f, t) = (usize::from(*from) % nblocks, usize::from(*to) % nblocks);
            if let (Some(rf), Some(rt)) = (block_parts(f, len), block_parts(t, len)) {
                let source = image.clone();
                copy_block(image, &rt, &source, &rf);
            }
        }
        Edit::ReplayBlock { block } => {
            let b = usize::from(*block) % nblocks;
            if let (Some(r), Some(ro)) = (block_parts(b, len), block_parts(b, older.len())) {
                copy_block(image, &r, older, &ro);
            }
        }
        Edit::SwapHeaderCopies => {
            if let (Some(a), Some(b)) = (block_parts(0, len), block_parts(1, len)) {
                let source = image.clone();
                copy_block(image, &a, &source, &b);
                copy_block(image, &b, &source, &a);
            }
        }
        Edit::Truncate { len: to } => image.truncate(*to as usize % (len + 1)),
        Edit::Extend { n, byte } => image.extend(std::iter::repeat_n(*byte, usize::from(*n))),
    }
}

fn store_level(fx: &Fixture, image: &[u8]) {
    let dir = fx.scratch.path().join("db");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    std::fs::write(dir.join(KEY_HEADER_FILE), &fx.header_bytes).expect("scratch header");
    std::fs::write(dir.join(DATABASE_FILE), image).expect("scratch image");
    let store = match Store::builder(&dir)
        .key(KeySource::KeyFile(fx.key_file.clone()))
        .read_audit(ReadAudit::GroupCommit {
            max_delay: std::time::Duration::from_secs(3600),
        })
        .open()
    {
        Ok(s) => s,
        Err(e) => {
            assert!(!matches!(e, Error::WrongKey | Error::KeyHeader(_)), "{e:?}");
            return;
        }
    };
    for ((t, id), expected) in &fx.resources {
        match (store.read(&ctx(), t, id), expected) {
            (Ok(found), Some(body)) => {
                assert_eq!(
                    found.json_bytes(),
                    body.as_slice(),
                    "{t}/{id} read wrong data"
                )
            }
            (Ok(_), None) => panic!("{t}/{id} was deleted but reads as present"),
            (Err(Error::Gone { .. }), None) => {}
            (Err(Error::Gone { .. } | Error::NotFound), Some(_)) => {
                panic!("{t}/{id} exists but reads as deleted or absent")
            }
            (Err(Error::NotFound), None) => panic!("{t}/{id} tombstone reads as never existed"),
            (Err(_), _) => {}
        }
    }
    let _ = store.verify_audit();
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let Ok(edits) = Vec::<Edit>::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    if std::env::var_os("FHIRKEEP_FUZZ_DEBUG").is_some() {
        eprintln!("edits: {edits:?}");
    }
    // A zeroed page block was a finding (fixed by the high-water mark); the variable still
    // lets a run spend its time elsewhere.
    let skip_zero = std::env::var_os("FHIRKEEP_FUZZ_SKIP_ZERO_BLOCK").is_some();
    // Open finding: a block replayed from an older image authenticates, and ordinary reads
    // trust it (see fuzz/README.md). Set this to fuzz the other edits.
    let skip_replay = std::env::var_os("FHIRKEEP_FUZZ_SKIP_REPLAY").is_some();
    let mut image = fx.original.clone();
    for edit in edits.iter().take(16) {
        if (skip_zero && matches!(edit, Edit::ZeroBlock { .. }))
            || (skip_replay && matches!(edit, Edit::ReplayBlock { .. }))
        {
            continue;
        }
        apply(&mut image, &fx.older, edit);
    }

    let path = fx.scratch.path().join("verify.redb");
    std::fs::write(&path, &image).expect("write scratch image");
    let report = verify_file(&path, &fx.keyring).expect("verify_file failed on a readable file");
    if image == fx.original {
        assert!(
            report.is_ok(),
            "pristine image reported damaged: {report:?}"
        );
    }

    match read_all(&image, &fx.keyring, Some(&fx.truth)) {
        Outcome::Refused => {}
        Outcome::Complete { tables, .. } => {
            assert_eq!(tables, fx.tables, "table list differs");
            store_level(fx, &image);
        }
        Outcome::Partial => store_level(fx, &image),
    }
});
