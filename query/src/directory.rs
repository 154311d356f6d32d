//! [`RedbDirectory`]: tantivy's [`Directory`] over an encrypted redb database (the store's
//! auxiliary file `index.redb`, see `Store::open_aux_database`), so the search index gets the
//! store's page encryption, keys and crash safety, and no index byte reaches an OS file in
//! plaintext.
//!
//! # Tables (format in docs/design.md, "Search index directory")
//!
//! | table | key | value |
//! |---|---|---|
//! | `tantivy_files` | `&str` file path | `(u64 file number, u64 length)` |
//! | `tantivy_chunks` | `(u64 file number, u64 chunk index)` | `&[u8]`: 65,280 bytes (64 KiB − 256), the last one shorter |
//! | `tantivy_pending` | `u64` file number | `()`: chunks of a file still being written |
//! | `tantivy_meta` | `&str` | `u64`: `"next_file_number"` |
//!
//! A file's content is addressed by a number that is never reused, not by its name, so a name
//! deleted and written again never mixes old and new chunks (in redb or in the chunk cache).
//!
//! # Durability
//!
//! Each file is made visible by one redb write transaction when its writer is terminated,
//! committed with `Durability::None` (no fsync). `meta.json` is written with a durable
//! two-phase commit, which makes every earlier commit durable too. redb recovers after a crash
//! to its last durable commit, i.e. to the directory exactly as it was right after some
//! `meta.json` was written: a tantivy commit is durable exactly when its `meta.json` is, and
//! segment files written after it are simply absent, as after a crash on a file system. So
//! `sync_directory` has nothing to do, and `.managed.json` (rewritten for every new file) needs
//! no fsync of its own.
//!
//! # Reads
//!
//! A [`FileHandle`] reads from the redb read transaction (snapshot) that was current when the
//! file was opened, so a file deleted (or replaced) afterwards stays readable through it, as
//! tantivy requires. Decrypted chunks are shared through a size-bounded LRU cache of
//! [`OwnedBytes`]. Nothing here writes to an OS file except through redb and the encrypting
//! backend.
//!
//! # Locks
//!
//! tantivy's lock files are replaced by in-memory locks: redb locks the database file for as
//! long as it is open, and [`RedbDirectory::new`] takes the database by value, so one
//! directory (with its clones, which share the lock table) is the only user of the index.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::{
    Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tantivy::HasLen;
use tantivy::directory::error::{DeleteError, LockError, OpenReadError, OpenWriteError};
use tantivy::directory::{
    AntiCallToken, Directory, DirectoryLock, FileHandle, Lock, OwnedBytes, TerminatingWrite,
    WatchCallback, WatchHandle, WritePtr,
};

/// `path -> (file number, length)`.
const FILES: TableDefinition<'_, &str, (u64, u64)> = TableDefinition::new("tantivy_files");
/// `(file number, chunk index) -> chunk bytes`.
const CHUNKS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("tantivy_chunks");
/// File numbers whose chunks were written before their file was complete.
const PENDING: TableDefinition<'_, u64, ()> = TableDefinition::new("tantivy_pending");
/// Directory facts: the next file number.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("tantivy_meta");
const NEXT_FILE_NUMBER: &str = "next_file_number";

/// Size of a stored chunk. Large enough that a chunk is one redb value of a few pages,
/// small enough that a random read of a posting list decrypts little it does not need.
/// 256 bytes under 64 KiB because redb gives a value its own leaf and allocates leaves in
/// power-of-two runs of pages: a leaf of a 64 KiB value plus its key and header took 128 KiB,
/// half the file. Chunks of an index written with another size read as corrupted, so this
/// changes only together with the index schema (an index of another schema is deleted after
/// reading `meta.json` alone, which fits one chunk of either size).
const CHUNK_SIZE: usize = (64 << 10) - 256;
/// An open writer stores its full chunks once this much is buffered, so a large segment
/// file never sits whole in memory.
const SPILL_BYTES: usize = 64 * CHUNK_SIZE;
/// Default size of the decrypted-chunk cache.
const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// How long a blocking lock request waits (tantivy's own default: 100 × 100 ms).
const BLOCKING_LOCK_WAIT: Duration = Duration::from_secs(10);
/// The file whose write is a tantivy commit.
const META_FILE: &str = "meta.json";

/// tantivy's [`Directory`] stored in an (encrypted) redb database; see the module docs.
#[derive(Clone)]
pub struct RedbDirectory {
    shared: Arc<Shared>,
}

struct Shared {
    db: redb::Database,
    /// Bumped after every commit; a snapshot of an older generation is not reused.
    generation: AtomicU64,
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    cache: Mutex<ChunkCache>,
    /// Paths with an open writer (they exist, and cannot be opened for writing again).
    writing: Mutex<HashSet<String>>,
    /// File numbers of writers dropped without `terminate`; their chunks are removed by the
    /// next write transaction (never from `Drop`, which must not wait for redb's writer).
    abandoned: Mutex<Vec<u64>>,
    locks: Mutex<HashSet<PathBuf>>,
    lock_released: Condvar,
}

/// The tables of one redb read transaction (they keep the transaction alive).
struct Snapshot {
    generation: u64,
    files: ReadOnlyTable<&'static str, (u64, u64)>,
    chunks: ReadOnlyTable<(u64, u64), &'static [u8]>,
}

impl fmt::Debug for RedbDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbDirectory")
            .field("generation", &self.shared.generation.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A storage failure as an `io::Error` carrying the engine's error (an authentication failure
/// stays `Corrupted`; `fhirkeep_engine::crypto::error_from_io` recovers it). redb's and the
/// engine's messages name pages and tables, never stored bytes.
fn storage(error: impl Into<fhirkeep_engine::Error>) -> io::Error {
    io::Error::other(error.into())
}

fn corrupted(message: &str) -> io::Error {
    io::Error::other(fhirkeep_engine::Error::Corrupted(format!(
        "search index: {message}"
    )))
}

/// tantivy's paths are relative UTF-8 names (`meta.json`, `<uuid>.idx`, ...).
fn path_key(path: &Path) -> io::Result<&str> {
    path.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "index file names must be UTF-8",
        )
    })
}

/// Removes every chunk of file `number`.
fn remove_chunks(txn: &WriteTransaction, number: u64) -> Result<(), redb::Error> {
    let mut chunks = txn.open_table(CHUNKS)?;
    chunks.retain_in((number, 0)..=(number, u64::MAX), |_, _| false)?;
    Ok(())
}

/// Takes the next file number (persisted in the same transaction).
fn allocate_file_number(txn: &WriteTransaction) -> Result<u64, redb::Error> {
    let mut meta = txn.open_table(META)?;
    let next = meta.get(NEXT_FILE_NUMBER)?.map_or(1, |v| v.value());
    let after = next.checked_add(1).ok_or_else(|| {
        redb::Error::from(redb::StorageError::Corrupted(
            "file numbers exhausted".into(),
        ))
    })?;
    meta.insert(NEXT_FILE_NUMBER, after)?;
    Ok(next)
}

/// Stores `data` as the chunks of file `number`, from chunk `first`.
fn put_chunks(
    txn: &WriteTransaction,
    number: u64,
    first: u64,
    data: &[u8],
) -> Result<(), redb::Error> {
    let mut chunks = txn.open_table(CHUNKS)?;
    for (k, chunk) in data.chunks(CHUNK_SIZE).enumerate() {
        chunks.insert((number, first + k as u64), chunk)?;
    }
    Ok(())
}

impl RedbDirectory {
    /// A directory over `db` (typically `Store::open_aux_database("index")`), with a 64 MiB
    /// cache of decrypted chunks. Creates the tables if needed and removes chunks left by
    /// files that were being written when the process stopped.
    pub fn new(db: redb::Database) -> fhirkeep_engine::Result<RedbDirectory> {
        RedbDirectory::with_cache_size(db, DEFAULT_CACHE_BYTES)
    }

    /// Like [`RedbDirectory::new`], with a cache of at most `cache_bytes` of decrypted chunks.
    pub fn with_cache_size(
        db: redb::Database,
        cache_bytes: usize,
    ) -> fhirkeep_engine::Result<RedbDirectory> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.set_two_phase_commit(true);
        {
            txn.open_table(FILES)?;
            txn.open_table(META)?;
            let mut pending = txn.open_table(PENDING)?;
            let mut stale = Vec::new();
            for entry in pending.iter()? {
                stale.push(entry?.0.value());
            }
            for number in stale {
                remove_chunks(&txn, number).map_err(redb_to_engine)?;
                pending.remove(number)?;
            }
            txn.open_table(CHUNKS)?;
        }
        txn.commit()?;
        Ok(RedbDirectory {
            shared: Arc::new(Shared {
                db,
                generation: AtomicU64::new(0),
                snapshot: Mutex::new(None),
                cache: Mutex::new(ChunkCache::new(cache_bytes)),
                writing: Mutex::new(HashSet::new()),
                abandoned: Mutex::new(Vec::new()),
                locks: Mutex::new(HashSet::new()),
                lock_released: Condvar::new(),
            }),
        })
    }
}

fn redb_to_engine(e: redb::Error) -> fhirkeep_engine::Error {
    match e {
        redb::Error::Io(io) => fhirkeep_engine::crypto::error_from_io(io),
        redb::Error::Corrupted(message) => fhirkeep_engine::Error::Corrupted(message),
        other => fhirkeep_engine::Error::Storage(other.to_string()),
    }
}

fn redb_io(e: redb::Error) -> io::Error {
    storage(redb_to_engine(e))
}

impl Shared {
    /// The current snapshot (a fresh read transaction after any commit).
    fn snapshot(&self) -> io::Result<Arc<Snapshot>> {
        let mut slot = lock(&self.snapshot);
        // Read before the transaction begins: a commit racing with us bumps it afterwards,
        // so a snapshot that might miss that commit is never taken for current.
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(snapshot) = slot.as_ref()
            && snapshot.generation == generation
        {
            return Ok(Arc::clone(snapshot));
        }
        let txn = self.db.begin_read().map_err(storage)?;
        let snapshot = Arc::new(Snapshot {
            generation,
            files: txn.open_table(FILES).map_err(storage)?,
            chunks: txn.open_table(CHUNKS).map_err(storage)?,
        });
        *slot = Some(Arc::clone(&snapshot));
        Ok(snapshot)
    }

    /// Runs `body` in one write transaction, durable (fsynced, two-phase) or not, after
    /// removing the chunks of abandoned writers, and commits.
    fn write<T>(
        &self,
        durable: bool,
        body: impl FnOnce(&WriteTransaction) -> Result<T, redb::Error>,
    ) -> io::Result<T> {
        let abandoned = std::mem::take(&mut *lock(&self.abandoned));
        let result = (|| {
            let mut txn = self.db.begin_write()?;
            if durable {
                txn.set_durability(Durability::Immediate)?;
                txn.set_two_phase_commit(true);
            } else {
                txn.set_durability(Durability::None)?;
            }
            for &number in &abandoned {
                remove_chunks(&txn, number)?;
                txn.open_table(PENDING)?.remove(number)?;
            }
            let value = body(&txn)?;
            txn.commit()?;
            Ok(value)
        })();
        self.generation.fetch_add(1, Ordering::SeqCst);
        if result.is_err() && !abandoned.is_empty() {
            lock(&self.abandoned).extend(abandoned);
        }
        result.map_err(redb_io)
    }

    fn chunk(
        &self,
        snapshot: &Snapshot,
        number: u64,
        index: u64,
        len: usize,
    ) -> io::Result<OwnedBytes> {
        if let Some(bytes) = lock(&self.cache).get(number, index) {
            return Ok(bytes);
        }
        let guard = snapshot
            .chunks
            .get((number, index))
            .map_err(storage)?
            .ok_or_else(|| corrupted("a file chunk is missing"))?;
        let bytes = guard.value();
        if bytes.len() != len {
            return Err(corrupted("a file chunk has the wrong length"));
        }
        let owned = OwnedBytes::new(bytes.to_vec());
        lock(&self.cache).insert(number, index, owned.clone());
        Ok(owned)
    }
}

/// An open file: its number and length in one snapshot.
struct RedbFile {
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    number: u64,
    len: u64,
}

impl fmt::Debug for RedbFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbFile")
            .field("number", &self.number)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl RedbFile {
    /// Length of chunk `index` (the last one may be shorter).
    fn chunk_len(&self, index: u64) -> usize {
        let start = index * CHUNK_SIZE as u64;
        // Bounded by CHUNK_SIZE, so it fits a usize.
        (self.len - start).min(CHUNK_SIZE as u64) as usize
    }
}

impl HasLen for RedbFile {
    fn len(&self) -> usize {
        // Files larger than the address space cannot have been written by this process.
        usize::try_from(self.len).unwrap_or(usize::MAX)
    }
}

impl FileHandle for RedbFile {
    fn read_bytes(&self, range: Range<usize>) -> io::Result<OwnedBytes> {
        let (start, end) = (range.start as u64, range.end as u64);
        if start > end || end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read outside of an index file",
            ));
        }
        if start == end {
            return Ok(OwnedBytes::empty());
        }
        let chunk = CHUNK_SIZE as u64;
        let (first, last) = (start / chunk, (end - 1) / chunk);
        let offset = |at: u64, index: u64| (at - index * chunk) as usize;
        if first == last {
            let bytes =
                self.shared
                    .chunk(&self.snapshot, self.number, first, self.chunk_len(first))?;
            return Ok(bytes.slice(offset(start, first)..offset(end, first)));
        }
        let mut out = Vec::with_capacity(range.len());
        for index in first..=last {
            let bytes =
                self.shared
                    .chunk(&self.snapshot, self.number, index, self.chunk_len(index))?;
            let lo = if index == first {
                offset(start, index)
            } else {
                0
            };
            let hi = if index == last {
                offset(end, index)
            } else {
                bytes.len()
            };
            out.extend_from_slice(&bytes.as_slice()[lo..hi]);
        }
        Ok(OwnedBytes::new(out))
    }
}

/// Buffers a file and stores it on `terminate`; see the module docs.
struct RedbWriter {
    shared: Arc<Shared>,
    name: String,
    /// Assigned when the first chunks are stored.
    number: Option<u64>,
    /// Full chunks already stored.
    stored_chunks: u64,
    buffer: Vec<u8>,
    terminated: bool,
    /// A store failed: what is buffered and stored no longer adds up to the file.
    failed: bool,
}

impl RedbWriter {
    /// Runs `store` in a write transaction. On failure the writer refuses further use, and
    /// forgets a file number that was allocated by the failed transaction (it was not
    /// committed, so another file may get it; purging it later would destroy that file).
    fn commit_store(
        &mut self,
        body: impl FnOnce(&mut RedbWriter, &WriteTransaction) -> Result<(), redb::Error>,
    ) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier write of this index file failed",
            ));
        }
        let number_before = self.number;
        let shared = Arc::clone(&self.shared);
        let result = shared.write(false, |txn| body(self, txn));
        if result.is_err() {
            self.failed = true;
            self.number = number_before;
        }
        result
    }

    /// Stores the full chunks of the buffer (all of it when `last`), allocating the file
    /// number (and marking it pending) the first time.
    fn store(&mut self, txn: &WriteTransaction, last: bool) -> Result<(), redb::Error> {
        let keep = if last {
            0
        } else {
            self.buffer.len() % CHUNK_SIZE
        };
        let cut = self.buffer.len() - keep;
        let number = match self.number {
            Some(number) => number,
            None => {
                let number = allocate_file_number(txn)?;
                if !last {
                    txn.open_table(PENDING)?.insert(number, ())?;
                }
                number
            }
        };
        put_chunks(txn, number, self.stored_chunks, &self.buffer[..cut])?;
        self.number = Some(number);
        self.stored_chunks += (cut / CHUNK_SIZE) as u64;
        self.buffer.drain(..cut);
        Ok(())
    }
}

impl Write for RedbWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.terminated {
            return Err(io::Error::other("write to a terminated index file"));
        }
        if self.failed {
            return Err(io::Error::other(
                "an earlier write of this index file failed",
            ));
        }
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= SPILL_BYTES {
            self.commit_store(|writer, txn| writer.store(txn, false))?;
        }
        Ok(data.len())
    }

    /// Nothing becomes visible before `terminate` (tantivy's contract for `open_write`).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TerminatingWrite for RedbWriter {
    fn terminate_ref(&mut self, _: AntiCallToken) -> io::Result<()> {
        if self.terminated {
            return Ok(());
        }
        let name = self.name.clone();
        let len = self.stored_chunks * CHUNK_SIZE as u64 + self.buffer.len() as u64;
        self.commit_store(|writer, txn| {
            let pending = writer.number.is_some();
            writer.store(txn, true)?;
            let number = writer.number.ok_or_else(|| {
                redb::Error::from(redb::StorageError::Corrupted("file number missing".into()))
            })?;
            if pending {
                txn.open_table(PENDING)?.remove(number)?;
            }
            txn.open_table(FILES)?
                .insert(name.as_str(), (number, len))?;
            Ok(())
        })?;
        self.terminated = true;
        lock(&self.shared.writing).remove(&self.name);
        Ok(())
    }
}

impl Drop for RedbWriter {
    fn drop(&mut self) {
        if !self.terminated {
            lock(&self.shared.writing).remove(&self.name);
            if let Some(number) = self.number {
                lock(&self.shared.abandoned).push(number);
            }
        }
    }
}

/// Releases an in-memory lock when tantivy drops it.
struct LockGuard {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        lock(&self.shared.locks).remove(&self.path);
        self.shared.lock_released.notify_all();
    }
}

impl Directory for RedbDirectory {
    fn get_file_handle(&self, path: &Path) -> Result<Arc<dyn FileHandle>, OpenReadError> {
        let io_error = |e: io::Error| OpenReadError::wrap_io_error(e, path.to_path_buf());
        let key = path_key(path).map_err(io_error)?;
        let snapshot = self.shared.snapshot().map_err(io_error)?;
        let (number, len) = snapshot
            .files
            .get(key)
            .map_err(|e| io_error(storage(e)))?
            .map(|v| v.value())
            .ok_or_else(|| OpenReadError::FileDoesNotExist(path.to_path_buf()))?;
        if usize::try_from(len).is_err() {
            return Err(io_error(corrupted("a file is too large")));
        }
        Ok(Arc::new(RedbFile {
            shared: Arc::clone(&self.shared),
            snapshot,
            number,
            len,
        }))
    }

    fn delete(&self, path: &Path) -> Result<(), DeleteError> {
        let io_error = |e: io::Error| DeleteError::IoError {
            io_error: Arc::new(e),
            filepath: path.to_path_buf(),
        };
        let key = path_key(path).map_err(io_error)?;
        let existed = self
            .shared
            .write(false, |txn| {
                let removed = txn.open_table(FILES)?.remove(key)?.map(|v| v.value());
                if let Some((number, _)) = removed {
                    remove_chunks(txn, number)?;
                }
                Ok(removed.is_some())
            })
            .map_err(io_error)?;
        if existed {
            Ok(())
        } else {
            Err(DeleteError::FileDoesNotExist(path.to_path_buf()))
        }
    }

    fn exists(&self, path: &Path) -> Result<bool, OpenReadError> {
        let io_error = |e: io::Error| OpenReadError::wrap_io_error(e, path.to_path_buf());
        let key = path_key(path).map_err(io_error)?;
        if lock(&self.shared.writing).contains(key) {
            return Ok(true);
        }
        let snapshot = self.shared.snapshot().map_err(io_error)?;
        let found = snapshot.files.get(key).map_err(|e| io_error(storage(e)))?;
        Ok(found.is_some())
    }

    fn open_write(&self, path: &Path) -> Result<WritePtr, OpenWriteError> {
        let io_error = |e: io::Error| OpenWriteError::wrap_io_error(e, path.to_path_buf());
        let key = path_key(path).map_err(io_error)?;
        let mut writing = lock(&self.shared.writing);
        let snapshot = self.shared.snapshot().map_err(io_error)?;
        let stored = snapshot
            .files
            .get(key)
            .map_err(|e| io_error(storage(e)))?
            .is_some();
        if stored || !writing.insert(key.to_owned()) {
            return Err(OpenWriteError::FileAlreadyExists(path.to_path_buf()));
        }
        drop(writing);
        let writer = RedbWriter {
            shared: Arc::clone(&self.shared),
            name: key.to_owned(),
            number: None,
            stored_chunks: 0,
            buffer: Vec::new(),
            terminated: false,
            failed: false,
        };
        Ok(io::BufWriter::new(Box::new(writer)))
    }

    fn atomic_read(&self, path: &Path) -> Result<Vec<u8>, OpenReadError> {
        let handle = self.get_file_handle(path)?;
        let io_error = |e: io::Error| OpenReadError::wrap_io_error(e, path.to_path_buf());
        let bytes = handle.read_bytes(0..handle.len()).map_err(io_error)?;
        Ok(bytes.as_slice().to_vec())
    }

    fn atomic_write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let key = path_key(path)?;
        let len = data.len() as u64;
        // The commit of `meta.json` is tantivy's commit: it alone is fsynced, and it makes
        // every earlier write durable with it (see the module docs).
        let durable = key == META_FILE;
        self.shared.write(durable, |txn| {
            let number = allocate_file_number(txn)?;
            put_chunks(txn, number, 0, data)?;
            let previous = txn
                .open_table(FILES)?
                .insert(key, (number, len))?
                .map(|v| v.value());
            if let Some((old, _)) = previous {
                remove_chunks(txn, old)?;
            }
            Ok(())
        })
    }

    /// Nothing to do: files are durable with the next durable commit, which is the
    /// `meta.json` write that follows every `sync_directory` tantivy makes.
    fn sync_directory(&self) -> io::Result<()> {
        Ok(())
    }

    fn acquire_lock(&self, lock_request: &Lock) -> Result<DirectoryLock, LockError> {
        let deadline = Instant::now()
            + if lock_request.is_blocking {
                BLOCKING_LOCK_WAIT
            } else {
                Duration::ZERO
            };
        let mut held = lock(&self.shared.locks);
        while held.contains(&lock_request.filepath) {
            let now = Instant::now();
            if now >= deadline {
                return Err(LockError::LockBusy);
            }
            held = self
                .shared
                .lock_released
                .wait_timeout(held, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        held.insert(lock_request.filepath.clone());
        Ok(DirectoryLock::from(Box::new(LockGuard {
            shared: Arc::clone(&self.shared),
            path: lock_request.filepath.clone(),
        })))
    }

    /// The index is reloaded explicitly (`ReloadPolicy::Manual`): no watching.
    fn watch(&self, _watch_callback: WatchCallback) -> tantivy::Result<WatchHandle> {
        Ok(WatchHandle::empty())
    }
}

/// A least-recently-used cache of decrypted chunks, bounded in bytes.
struct ChunkCache {
    capacity: usize,
    size: usize,
    tick: u64,
    entries: HashMap<(u64, u64), (OwnedBytes, u64)>,
    /// Last use → key, oldest first.
    order: BTreeMap<u64, (u64, u64)>,
}

impl ChunkCache {
    fn new(capacity: usize) -> ChunkCache {
        ChunkCache {
            capacity,
            size: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn get(&mut self, number: u64, index: u64) -> Option<OwnedBytes> {
        self.tick += 1;
        let tick = self.tick;
        let (bytes, used) = self.entries.get_mut(&(number, index))?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, (number, index));
        Some(bytes.clone())
    }

    fn insert(&mut self, number: u64, index: u64, bytes: OwnedBytes) {
        if bytes.len() > self.capacity || self.entries.contains_key(&(number, index)) {
            return;
        }
        while self.size + bytes.len() > self.capacity {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.entries.remove(&key) {
                self.size -= old.len();
            }
        }
        self.tick += 1;
        self.size += bytes.len();
        self.order.insert(self.tick, (number, index));
        self.entries.insert((number, index), (bytes, self.tick));
    }
}
