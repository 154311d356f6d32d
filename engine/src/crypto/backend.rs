//! [`EncryptedBackend`]: a redb [`StorageBackend`] that stores every logical page as an
//! AES-256-GCM block (format in [`super::page`]), plus [`verify_file`] for offline checks.
//!
//! # Formats
//!
//! New files are written in format 2: each page's ciphertext is one aligned 4096-byte span and
//! its entry (key id, nonce, tag) is in the entry page of its group of 128. Entry pages are
//! kept in memory and the changed ones are written before every header write, every sync
//! and at close: the same points at which format 1 would already have written its blocks, so
//! the crash reasoning below holds for both. Whole-page writes of format 2 wait in a queue
//! (see `QueuedPages`) and are sealed together at those same points. Files of format 1 are
//! read and written in format 1.
//!
//! # Page 0 (redb's header) and crash safety
//!
//! redb keeps two commit slots inside the 320-byte header at offset 0 and relies on
//! single-byte writes being atomic there. One AEAD block would turn a torn header write into
//! the loss of both slots, so logical page 0 is stored twice (copies A and B), each with a
//! sequence number in its plaintext:
//!
//! * the plaintext of page 0 is kept in memory; reads of page 0 never touch the disk;
//! * after each `sync_data`, the copy written last is durable. Every header write until the
//!   next `sync_data` goes to the *other* copy, with sequence number + 1. A torn write can
//!   therefore only damage a copy that holds no durable state;
//! * on open the file is synced once (so what is read is durable), both copies are
//!   authenticated and the one with the higher sequence number wins. If neither
//!   authenticates the open fails with [`Error::Corrupted`] (unless a copy is all zeros,
//!   i.e. the database was never initialized).
//!
//! # Zero blocks and the high-water mark
//!
//! redb needs space added by `set_len` to read as zeros, so an all-zero page block reads as a
//! zero page, but only at a page index ≥ `high_water`: one past the highest page (≥ 1) ever
//! written, lowered by `set_len` to the new page count. Each header copy carries the value
//! current when it was written. `write` raises it before the page blocks are written, and
//! redb's two-phase commit syncs the data pages before it writes the header, so a durable
//! header's `high_water` covers every page of the durable commit: those blocks were synced and
//! are never all zero. An all-zero block below `high_water` is therefore damage or tampering
//! and fails authentication like any other block (redb does not check page checksums on
//! ordinary reads and panics on a zero page it trusts). After a crash, pages written above
//! the durable `high_water` may be lost (read as zeros); no durable commit refers to them.
//!
//! # Errors
//!
//! Failures are returned as `io::Error`s wrapping [`crate::Error`] (see
//! [`super::error_from_io`]): "page N failed authentication" for a block that does not
//! authenticate, [`Error::NonceBudgetExhausted`] when the active key is used up. Messages
//! never contain page contents.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::{BackendError, StorageBackend};
use zeroize::{Zeroize, Zeroizing};

use super::keys::Keyring;
use super::page::{
    self, ENTRY_SIZE, HEADER_A_INDEX, HEADER_B_INDEX, HEADER_BLOCK_SIZE, HEADER_PLAIN_SIZE,
    PAGE_BLOCK_SIZE, PAGE_SIZE, PAGES_OFFSET, PAGES_PER_GROUP, PREAMBLE_SIZE, PageFormat,
    SealError,
};
use super::to_io;
use crate::{Error, Result};

const PAGE: u64 = PAGE_SIZE as u64;
/// Largest logical length accepted (4 PiB), far below where physical offsets could overflow.
const MAX_LOGICAL_LEN: u64 = 1 << 52;
/// Format 2: clean entry pages kept in memory before they are dropped (16 MiB: the entries
/// of 2 GiB of pages). Dirty ones are kept until written.
const MAX_CLEAN_ENTRY_PAGES: usize = 4096;
/// Format 2: plaintext of whole-page writes held for sealing together, at most (16 MiB).
const MAX_QUEUED_BYTES: usize = 16 << 20;
/// Format 2: queued pages sealed on one thread; more are shared with a second one.
const PAGES_PER_SEALING_THREAD: usize = 64;

thread_local! {
    /// Tests only: the format new files get on this thread (to test reading format 1).
    static NEW_FILE_FORMAT: Cell<PageFormat> = const { Cell::new(PageFormat::NEWEST) };
}

/// Tests only: new files created on this thread get `format` until this is called again.
#[cfg(test)]
pub(crate) fn set_new_file_format_for_tests(format: PageFormat) {
    NEW_FILE_FORMAT.with(|f| f.set(format));
}

/// One of the two physical copies of logical page 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderSlot {
    /// Copy A, at physical offset 4096 (format 1: 64).
    A,
    /// Copy B, at physical offset 12288 (format 1: 4208).
    B,
}

impl HeaderSlot {
    fn other(self) -> HeaderSlot {
        match self {
            HeaderSlot::A => HeaderSlot::B,
            HeaderSlot::B => HeaderSlot::A,
        }
    }
    fn offset(self, format: PageFormat) -> u64 {
        format.header_offset(self == HeaderSlot::B)
    }
    fn index(self) -> u64 {
        match self {
            HeaderSlot::A => HEADER_A_INDEX,
            HeaderSlot::B => HEADER_B_INDEX,
        }
    }
}

/// State of one header copy as found on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderCopyStatus {
    /// It authenticates and carries this sequence number.
    Valid {
        /// Sequence number (higher = newer).
        sequence: u64,
    },
    /// All zeros: never written.
    Zero,
    /// It does not authenticate (torn write, damage or tampering).
    Failed,
    /// The file is too short to hold it.
    Missing,
}

struct HeaderState {
    page0: Zeroizing<Vec<u8>>,
    /// Highest sequence number read or written.
    seq: u64,
    /// Copy holding the newest durable header.
    durable: HeaderSlot,
    /// Copy written since the last `sync_data`, if any.
    pending: Option<HeaderSlot>,
    /// One past the highest logical page (≥ 1) written, at most the current page count;
    /// persisted in every header copy written.
    high_water: u64,
}

impl HeaderState {
    fn empty() -> Self {
        HeaderState {
            page0: Zeroizing::new(vec![0u8; PAGE_SIZE]),
            seq: 0,
            durable: HeaderSlot::A,
            pending: None,
            high_water: 0,
        }
    }
}

/// Format 2: one entry page (the 32-byte entries of a group of 128 pages) in memory.
struct EntryPage {
    bytes: Box<[u8; PAGE_SIZE]>,
    /// Changed since it was last written.
    dirty: bool,
}

/// Format 2: the entry pages in memory, by group. Changed entries reach the file before the
/// next header write or sync ([`EncryptedBackend::write_entry_pages`]), which is where
/// format 1 would have written them too: before anything that could make them needed.
struct EntryPages {
    by_group: BTreeMap<u64, EntryPage>,
    /// Pages kept in memory before the clean ones are dropped: [`MAX_CLEAN_ENTRY_PAGES`]
    /// (tests lower it).
    cap: usize,
    /// When the next drop happens: at least `cap`, and twice what a drop had to keep
    /// (changed pages), so that many changed pages do not make every load scan them.
    drop_at: usize,
}

impl Default for EntryPages {
    fn default() -> Self {
        EntryPages {
            by_group: BTreeMap::new(),
            cap: MAX_CLEAN_ENTRY_PAGES,
            drop_at: MAX_CLEAN_ENTRY_PAGES,
        }
    }
}

/// A redb storage backend that encrypts and authenticates every page it stores in `inner`.
pub struct EncryptedBackend<B> {
    inner: B,
    keyring: Arc<Keyring>,
    /// Bound into the preamble and every block's AAD: the `db_id` for the main data file, an
    /// id derived from it for an auxiliary file (see [`page::aux_file_id`]).
    file_id: [u8; 16],
    /// The file's format (from its preamble; new files get [`PageFormat::NEWEST`]).
    format: PageFormat,
    header: Mutex<HeaderState>,
    /// Format 2 only. Lock order: `header`, then `queued`, then `entries`.
    entries: RwLock<EntryPages>,
    /// Format 2 only: whole pages written but not yet sealed (see [`QueuedPages`]).
    queued: Mutex<QueuedPages>,
    /// Number of pages in `queued`, so that reads skip its lock when it is empty.
    queued_pages: AtomicUsize,
}

/// Format 2: the plaintext of whole pages written since the last seal, by page. They are
/// sealed and written together, on as many threads as pay off, at the points where entry
/// pages are written (before every header write, every sync, and at close), when partial
/// writes or `set_len` need the file current, and when they reach [`MAX_QUEUED_BYTES`].
/// Why: redb hands over a commit's dirty pages one by one and syncs right after; sealing
/// them there, one at a time, kept a core idle for a tenth of every commit. Reads of a queued
/// page are served from here, so nothing can see the file behind the writes. The buffers are
/// wiped when dropped (after sealing they hold ciphertext anyway).
#[derive(Default)]
struct QueuedPages {
    pages: BTreeMap<u64, Zeroizing<Vec<u8>>>,
    /// Page buffers of sealed pages, reused: allocating them afresh for every commit had the
    /// allocator fault memory in again each time.
    spare: Vec<Zeroizing<Vec<u8>>>,
    /// Ciphertext of a run of pages, for one write.
    run: Vec<u8>,
}

/// Page buffers kept for reuse (4 MiB).
const MAX_SPARE_PAGE_BUFFERS: usize = 1024;

impl<B: fmt::Debug> fmt::Debug for EncryptedBackend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedBackend")
            .field("inner", &self.inner)
            .field("db_id", &hex::encode(self.keyring.db_id()))
            .field("file_id", &hex::encode(self.file_id))
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn corrupted(msg: impl Into<String>) -> io::Error {
    to_io(Error::Corrupted(msg.into()))
}

fn auth_failed(page: u64) -> io::Error {
    corrupted(format!("page {page} failed authentication"))
}

/// The rule for an all-zero block (format 2: an all-zero entry) at page `pg`: a page never
/// written reads as zeros, which it can only be at or above the high-water mark. Below it the
/// page was written once and must hold a real block: the zeros are damage or tampering.
fn zero_page_allowed(pg: u64, high_water: u64) -> io::Result<()> {
    if pg < high_water {
        Err(auth_failed(pg))
    } else {
        Ok(())
    }
}

fn seal_err(e: SealError) -> io::Error {
    match e {
        SealError::Random => io::Error::other("random number generator failed"),
        SealError::Internal => io::Error::other("internal error while encrypting a page"),
    }
}

/// The high-water mark in an authenticated header copy's plaintext.
fn header_high_water(plain: &[u8]) -> u64 {
    let mut h = [0u8; 8];
    h.copy_from_slice(&plain[8..16]);
    u64::from_le_bytes(h)
}

/// Authenticates a header copy; on success `plain` holds `sequence ‖ high_water ‖ page 0`.
fn decode_header_copy(
    format: PageFormat,
    keyring: &Keyring,
    file_id: &[u8; 16],
    slot: HeaderSlot,
    block: &[u8],
    plain: &mut [u8],
) -> HeaderCopyStatus {
    if block.len() != HEADER_BLOCK_SIZE {
        return HeaderCopyStatus::Missing;
    }
    if page::is_zero_block(block) {
        return HeaderCopyStatus::Zero;
    }
    if page::open_into(format, keyring, file_id, slot.index(), block, plain) {
        let mut s = [0u8; 8];
        s.copy_from_slice(&plain[..8]);
        HeaderCopyStatus::Valid {
            sequence: u64::from_le_bytes(s),
        }
    } else {
        HeaderCopyStatus::Failed
    }
}

fn newest(a: HeaderCopyStatus, b: HeaderCopyStatus) -> Option<(HeaderSlot, u64)> {
    match (a, b) {
        (HeaderCopyStatus::Valid { sequence: sa }, HeaderCopyStatus::Valid { sequence: sb }) => {
            if sb > sa {
                Some((HeaderSlot::B, sb))
            } else {
                Some((HeaderSlot::A, sa))
            }
        }
        (HeaderCopyStatus::Valid { sequence }, _) => Some((HeaderSlot::A, sequence)),
        (_, HeaderCopyStatus::Valid { sequence }) => Some((HeaderSlot::B, sequence)),
        _ => None,
    }
}

impl<B: StorageBackend> EncryptedBackend<B> {
    /// Wraps `inner` as the database's main data file (`file_id` = `db_id`). An empty
    /// `inner` gets a preamble for `keyring`'s database; otherwise the preamble, the file
    /// length and the header copies are checked.
    ///
    /// Errors: [`Error::Corrupted`] for a file of another database (or another file of this
    /// one), a truncated file, or when neither header copy authenticates; [`Error::Io`] for
    /// I/O failures.
    pub fn new(inner: B, keyring: Arc<Keyring>) -> Result<Self> {
        let file_id = keyring.db_id();
        Self::with_file_id(inner, keyring, file_id)
    }

    /// Wraps `inner` as the auxiliary file `name` of `keyring`'s database (derived data
    /// such as the search index): the same keys, nonce budget, header copies and checks as
    /// [`EncryptedBackend::new`], but bound to its own file id ([`page::aux_file_id`]), so
    /// no block can be moved between this file and any other file of the database.
    pub fn new_aux(inner: B, keyring: Arc<Keyring>, name: &str) -> Result<Self> {
        let file_id = page::aux_file_id(&keyring.db_id(), name);
        Self::with_file_id(inner, keyring, file_id)
    }

    fn with_file_id(inner: B, keyring: Arc<Keyring>, file_id: [u8; 16]) -> Result<Self> {
        let (format, state) = Self::load_state(&inner, &keyring, &file_id)?;
        Ok(EncryptedBackend {
            inner,
            keyring,
            file_id,
            format,
            header: Mutex::new(state),
            entries: RwLock::new(EntryPages::default()),
            queued: Mutex::new(QueuedPages::default()),
            queued_pages: AtomicUsize::new(0),
        })
    }

    fn load_state(
        inner: &B,
        keyring: &Keyring,
        file_id: &[u8; 16],
    ) -> Result<(PageFormat, HeaderState)> {
        let plen = inner.len()?;
        if plen == 0 {
            let format = NEW_FILE_FORMAT.with(Cell::get);
            // Backends may refuse writes past their length (redb's in-memory one does).
            inner.set_len(format.empty_len())?;
            inner.write(0, &page::encode_preamble(format, file_id))?;
            return Ok((format, HeaderState::empty()));
        }
        if plen < PREAMBLE_SIZE as u64 {
            return Err(Error::Corrupted(
                "the data file is truncated (shorter than its preamble)".into(),
            ));
        }
        let mut pre = [0u8; PREAMBLE_SIZE];
        inner.read(0, &mut pre)?;
        let format = page::check_preamble(&pre, file_id).map_err(Error::Corrupted)?;
        let Some(logical) = format.logical_len(plen) else {
            return Err(Error::Corrupted(format!(
                "the data file length {plen} is not a whole number of blocks: it was truncated or extended"
            )));
        };
        if logical == 0 {
            return Ok((format, HeaderState::empty()));
        }
        // Make what we are about to read durable, so that choosing a header copy and writing
        // to the other one can never lose the last durable header.
        inner.sync_data()?;
        let mut block_a = vec![0u8; HEADER_BLOCK_SIZE];
        let mut block_b = vec![0u8; HEADER_BLOCK_SIZE];
        inner.read(HeaderSlot::A.offset(format), &mut block_a)?;
        inner.read(HeaderSlot::B.offset(format), &mut block_b)?;
        let mut plain_a = Zeroizing::new(vec![0u8; HEADER_PLAIN_SIZE]);
        let mut plain_b = Zeroizing::new(vec![0u8; HEADER_PLAIN_SIZE]);
        let a = decode_header_copy(
            format,
            keyring,
            file_id,
            HeaderSlot::A,
            &block_a,
            &mut plain_a,
        );
        let b = decode_header_copy(
            format,
            keyring,
            file_id,
            HeaderSlot::B,
            &block_b,
            &mut plain_b,
        );
        let state = match newest(a, b) {
            Some((slot, seq)) => {
                let plain = if slot == HeaderSlot::A {
                    &plain_a
                } else {
                    &plain_b
                };
                HeaderState {
                    page0: Zeroizing::new(plain[page::HEADER_PAGE0_OFFSET..].to_vec()),
                    seq,
                    durable: slot,
                    pending: None,
                    // Never above the page count: space added by a later `set_len` must read
                    // as zeros.
                    high_water: header_high_water(plain).min(logical / PAGE),
                }
            }
            None if a == HeaderCopyStatus::Zero => HeaderState::empty(),
            None if b == HeaderCopyStatus::Zero => HeaderState {
                durable: HeaderSlot::B,
                ..HeaderState::empty()
            },
            None => {
                return Err(Error::Corrupted(
                    "both copies of the database header (page 0) failed authentication".into(),
                ));
            }
        };
        Ok((format, state))
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The keyring pages are encrypted with.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// The id this file is bound to (the `db_id` for the main data file).
    pub fn file_id(&self) -> [u8; 16] {
        self.file_id
    }

    /// The file's physical format.
    pub fn format(&self) -> PageFormat {
        self.format
    }

    /// Tests only: keep at most `cap` entry pages in memory before dropping the clean ones.
    #[cfg(test)]
    fn set_entry_page_cap_for_tests(&self, cap: usize) {
        let mut entries = write_lock(&self.entries);
        entries.cap = cap;
        entries.drop_at = cap;
    }

    /// The header copy holding the newest durable header, and the newest sequence number.
    pub fn header_position(&self) -> (HeaderSlot, u64) {
        let st = lock(&self.header);
        (st.durable, st.seq)
    }

    fn write_page0(&self, st: &mut HeaderState, new_page0: &[u8]) -> io::Result<()> {
        // Every page written so far, and its entry, reaches the file before any header copy
        // that could refer to the page (format 1 wrote them with the pages).
        self.seal_queued()?;
        self.write_entry_pages()?;
        let target = st.durable.other();
        let seq = st
            .seq
            .checked_add(1)
            .ok_or_else(|| corrupted("header sequence overflow"))?;
        let key_id = self.keyring.consume_nonces(1).map_err(to_io)?;
        let mut plain = Zeroizing::new([0u8; HEADER_PLAIN_SIZE]);
        plain[..8].copy_from_slice(&seq.to_le_bytes());
        plain[8..16].copy_from_slice(&st.high_water.to_le_bytes());
        plain[page::HEADER_PAGE0_OFFSET..].copy_from_slice(new_page0);
        let mut block = [0u8; HEADER_BLOCK_SIZE];
        page::seal_into(
            self.format,
            &self.keyring,
            &self.file_id,
            key_id,
            target.index(),
            &plain[..],
            &mut block,
        )
        .map_err(seal_err)?;
        self.inner.write(target.offset(self.format), &block)?;
        st.seq = seq;
        st.pending = Some(target);
        st.page0.copy_from_slice(new_page0);
        Ok(())
    }

    /// Raises the high-water mark to cover pages `[first, end)` (`first ≥ 1`) that are about
    /// to be written, and returns its previous value. Never-written pages between the old
    /// mark and `first` (redb leaves such gaps between regions) are first filled with
    /// empty-page markers (authenticated, not encrypted), so that every page below the mark
    /// holds a real block. This runs
    /// under the header lock, so a concurrent write into the gap cannot be overwritten.
    fn raise_high_water(&self, first: u64, end: u64) -> io::Result<u64> {
        const FILL_CHUNK: u64 = 64;
        let mut st = lock(&self.header);
        let old = st.high_water;
        let mut next = old.max(1);
        if self.format == PageFormat::V2 {
            // A marker is an entry only: the gap's ciphertext area is neither written nor read.
            if next < first {
                let key = page::empty_marker_key(&self.keyring);
                let mut entries = write_lock(&self.entries);
                for pg in next..first {
                    let marker = page::empty_entry(&key, &self.file_id, pg);
                    self.set_entry(&mut entries, pg, &marker)?;
                }
            }
            st.high_water = st.high_water.max(first).max(end);
            return Ok(old);
        }
        while next < first {
            let count = FILL_CHUNK.min(first - next);
            let mut buf = vec![0u8; count as usize * PAGE_BLOCK_SIZE];
            page::seal_empty_pages(&self.keyring, &self.file_id, next, &mut buf);
            self.inner.write(page::page_block_offset(next), &buf)?;
            next += count;
            st.high_water = st.high_water.max(next);
        }
        st.high_water = st.high_water.max(end);
        Ok(old)
    }

    /// Format 2: the entry page of `group`, read from the file on first use (all zeros if the
    /// file does not reach it).
    fn entry_page<'a>(
        &self,
        entries: &'a mut EntryPages,
        group: u64,
    ) -> io::Result<&'a mut EntryPage> {
        if !entries.by_group.contains_key(&group) {
            if entries.by_group.len() >= entries.drop_at {
                entries.by_group.retain(|_, p| p.dirty);
                entries.drop_at = entries.cap.max(2 * entries.by_group.len());
            }
            let mut bytes = Box::new([0u8; PAGE_SIZE]);
            let offset = page::v2_entry_page_offset(group);
            if offset + PAGE <= self.inner.len()? {
                self.inner.read(offset, &mut bytes[..])?;
            }
            entries.by_group.insert(
                group,
                EntryPage {
                    bytes,
                    dirty: false,
                },
            );
        }
        Ok(entries
            .by_group
            .get_mut(&group)
            .expect("the entry page was just inserted"))
    }

    fn set_entry(
        &self,
        entries: &mut EntryPages,
        pg: u64,
        entry: &[u8; ENTRY_SIZE],
    ) -> io::Result<()> {
        let (group, slot) = page::v2_group_of(pg);
        let page = self.entry_page(entries, group)?;
        page.bytes[slot * ENTRY_SIZE..(slot + 1) * ENTRY_SIZE].copy_from_slice(entry);
        page.dirty = true;
        Ok(())
    }

    /// Format 2: writes every changed entry page (in file order). A page whose write fails
    /// stays changed and is written again next time.
    fn write_entry_pages(&self) -> io::Result<()> {
        if self.format != PageFormat::V2 {
            return Ok(());
        }
        let mut entries = write_lock(&self.entries);
        for (&group, page) in entries.by_group.iter_mut().filter(|(_, p)| p.dirty) {
            self.inner
                .write(page::v2_entry_page_offset(group), &page.bytes[..])?;
            page.dirty = false;
        }
        Ok(())
    }

    /// Format 2: the entries of pages `first .. first + n`. Readers share the entry pages;
    /// only a group not in memory yet takes them exclusively, to load it.
    fn entries_of(&self, first: u64, n: usize) -> io::Result<Vec<[u8; ENTRY_SIZE]>> {
        let pages = first..first + n as u64;
        let entry = |page: &EntryPage, slot: usize| {
            let mut head = [0u8; ENTRY_SIZE];
            head.copy_from_slice(&page.bytes[slot * ENTRY_SIZE..(slot + 1) * ENTRY_SIZE]);
            head
        };
        {
            let entries = read_lock(&self.entries);
            let shared: Option<Vec<_>> = pages
                .clone()
                .map(|pg| {
                    let (group, slot) = page::v2_group_of(pg);
                    entries.by_group.get(&group).map(|page| entry(page, slot))
                })
                .collect();
            if let Some(heads) = shared {
                return Ok(heads);
            }
        }
        let mut entries = write_lock(&self.entries);
        pages
            .map(|pg| {
                let (group, slot) = page::v2_group_of(pg);
                Ok(entry(self.entry_page(&mut entries, group)?, slot))
            })
            .collect()
    }

    /// Format 2: decrypts the whole pages `first, first + 1, ...` into `out` (a multiple of
    /// 4096 bytes). A page with an all-zero entry reads as zeros at or above `high_water` and
    /// fails below it, like any page that does not authenticate. On failure `out` is zeroed.
    fn read_whole_pages_v2(&self, first: u64, out: &mut [u8], high_water: u64) -> io::Result<()> {
        let n = out.len() / PAGE_SIZE;
        let heads = self.entries_of(first, n)?;
        // One read per run of pages within a group (entry pages sit between groups), unless
        // no page of the run has ciphertext (never written, or an empty-page marker).
        let has_ciphertext = |head: &[u8; ENTRY_SIZE]| head[..4] != [0u8; 4];
        let mut done = 0usize;
        while done < n {
            let pg = first + done as u64;
            let (_, slot) = page::v2_group_of(pg);
            let run = (n - done).min(PAGES_PER_GROUP as usize - slot);
            if heads[done..done + run].iter().any(has_ciphertext)
                && let Err(e) = self.inner.read(
                    page::v2_data_offset(pg),
                    &mut out[done * PAGE_SIZE..(done + run) * PAGE_SIZE],
                )
            {
                out.fill(0);
                return Err(e);
            }
            done += run;
        }
        for (k, (head, body)) in heads
            .iter()
            .zip(out.chunks_exact_mut(PAGE_SIZE))
            .enumerate()
        {
            let pg = first + k as u64;
            if page::is_zero_block(head) {
                if let Err(e) = zero_page_allowed(pg, high_water) {
                    out.fill(0);
                    return Err(e);
                }
                body.fill(0);
                continue;
            }
            let ok = page::open_page(&self.keyring, &self.file_id, pg, head, body);
            if !ok {
                out.fill(0);
                return Err(auth_failed(pg));
            }
        }
        Ok(())
    }

    /// Format 2: reads logical bytes `[off, off + out.len())`, all in pages ≥ 1.
    fn read_pages_v2(&self, off: u64, out: &mut [u8]) -> io::Result<()> {
        let high_water = lock(&self.header).high_water;
        let first = off / PAGE;
        if self.queued_pages.load(Ordering::Acquire) > 0 {
            let queued = lock(&self.queued);
            let last = (off + out.len() as u64 - 1) / PAGE;
            if queued.pages.range(first..=last).next().is_some() {
                // Page by page, each from the queue or the file; the lock keeps the queue
                // from being sealed (and a page from being in neither place) meanwhile.
                let mut page = Zeroizing::new(vec![0u8; PAGE_SIZE]);
                let mut at = 0usize;
                for pg in first..=last {
                    match queued.pages.get(&pg) {
                        Some(plain) => page.copy_from_slice(plain),
                        None => {
                            if let Err(e) = self.read_whole_pages_v2(pg, &mut page, high_water) {
                                out.fill(0);
                                return Err(e);
                            }
                        }
                    }
                    let page_start = pg * PAGE;
                    let lo = off.max(page_start);
                    let hi = (off + out.len() as u64).min(page_start + PAGE);
                    let n = (hi - lo) as usize;
                    let from = (lo - page_start) as usize;
                    out[at..at + n].copy_from_slice(&page[from..from + n]);
                    at += n;
                }
                return Ok(());
            }
        }
        if off.is_multiple_of(PAGE) && out.len().is_multiple_of(PAGE_SIZE) {
            // What redb does: whole pages, decrypted in place in the caller's buffer.
            return self.read_whole_pages_v2(first, out, high_water);
        }
        let end = off + out.len() as u64;
        let n = usize::try_from(end.div_ceil(PAGE) - first).map_err(io::Error::other)?;
        let mut pages = Zeroizing::new(vec![0u8; n * PAGE_SIZE]);
        if let Err(e) = self.read_whole_pages_v2(first, &mut pages, high_water) {
            out.fill(0);
            return Err(e);
        }
        let from = (off - first * PAGE) as usize;
        out.copy_from_slice(&pages[from..from + out.len()]);
        Ok(())
    }

    /// Format 2: queues the whole pages `first, first + 1, ...` of `data` for sealing (see
    /// [`QueuedPages`]); the caller has already raised the high-water mark over them.
    fn queue_pages(&self, first: u64, data: &[u8]) -> io::Result<()> {
        let mut queued = lock(&self.queued);
        for (k, plain) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let pg = first + k as u64;
            match queued.pages.get_mut(&pg) {
                Some(buffer) => buffer.copy_from_slice(plain),
                None => {
                    let buffer = match queued.spare.pop() {
                        Some(mut buffer) => {
                            buffer.copy_from_slice(plain);
                            buffer
                        }
                        None => Zeroizing::new(plain.to_vec()),
                    };
                    queued.pages.insert(pg, buffer);
                }
            }
        }
        self.queued_pages
            .store(queued.pages.len(), Ordering::Release);
        if queued.pages.len() * PAGE_SIZE >= MAX_QUEUED_BYTES {
            self.seal_queued_locked(&mut queued)?;
        }
        Ok(())
    }

    /// Format 2: seals and writes every queued page, and sets their entries.
    fn seal_queued(&self) -> io::Result<()> {
        if self.queued_pages.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let mut queued = lock(&self.queued);
        self.seal_queued_locked(&mut queued)
    }

    fn seal_queued_locked(&self, queued: &mut QueuedPages) -> io::Result<()> {
        if queued.pages.is_empty() {
            return Ok(());
        }
        // Taken out now: whatever happens below, none of them is read from the queue again.
        // After an error redb trusts nothing more of this handle (it reports `PreviousIo`).
        let mut pages: Vec<(u64, Zeroizing<Vec<u8>>)> =
            std::mem::take(&mut queued.pages).into_iter().collect();
        self.queued_pages.store(0, Ordering::Release);
        let key_id = self
            .keyring
            .consume_nonces(pages.len() as u64)
            .map_err(to_io)?;
        let mut heads = vec![[0u8; ENTRY_SIZE]; pages.len()];
        let seal = |pages: &mut [(u64, Zeroizing<Vec<u8>>)], heads: &mut [[u8; ENTRY_SIZE]]| {
            for ((pg, body), head) in pages.iter_mut().zip(heads.iter_mut()) {
                page::seal_page(&self.keyring, &self.file_id, key_id, *pg, body, head)?;
            }
            Ok::<(), SealError>(())
        };
        let threads = crate::process::available_cores().min(2);
        let sealed = if threads > 1 && pages.len() >= 2 * PAGES_PER_SEALING_THREAD {
            let half = pages.len() / 2;
            let (pages_a, pages_b) = pages.split_at_mut(half);
            let (heads_a, heads_b) = heads.split_at_mut(half);
            std::thread::scope(|scope| {
                let other = scope.spawn(|| seal(pages_b, heads_b));
                let here = seal(pages_a, heads_a);
                // Sealing never panics; if the thread did, its pages count as not sealed.
                let there = other.join().unwrap_or(Err(SealError::Internal));
                here.and(there)
            })
        } else {
            seal(&mut pages, &mut heads)
        };
        sealed.map_err(seal_err)?;
        // One write per run of consecutive pages within a group (entry pages sit between).
        let mut run = std::mem::take(&mut queued.run);
        let mut k = 0usize;
        while k < pages.len() {
            let first = pages[k].0;
            let (_, slot) = page::v2_group_of(first);
            let room = PAGES_PER_GROUP as usize - slot;
            let mut n = 1usize;
            while n < room && k + n < pages.len() && pages[k + n].0 == first + n as u64 {
                n += 1;
            }
            if n == 1 {
                self.inner.write(page::v2_data_offset(first), &pages[k].1)?;
            } else {
                run.clear();
                for (_, body) in &pages[k..k + n] {
                    run.extend_from_slice(body);
                }
                self.inner.write(page::v2_data_offset(first), &run)?;
            }
            k += n;
        }
        queued.run = run;
        let mut entries = write_lock(&self.entries);
        for ((pg, _), head) in pages.iter().zip(&heads) {
            self.set_entry(&mut entries, *pg, head)?;
        }
        let room = MAX_SPARE_PAGE_BUFFERS.saturating_sub(queued.spare.len());
        queued
            .spare
            .extend(pages.into_iter().take(room).map(|(_, buffer)| buffer));
        Ok(())
    }

    /// Format 2: writes logical bytes `[off, off + data.len())`, all in pages ≥ 1. The
    /// caller has already raised the high-water mark over them; `old_high_water` is its value
    /// before. The ciphertext is written now; the entries when the next header copy or sync
    /// needs them.
    fn write_pages_v2(&self, off: u64, data: &[u8], old_high_water: u64) -> io::Result<()> {
        let end = off + data.len() as u64;
        let first = off / PAGE;
        let n = end.div_ceil(PAGE) - first;
        let key_id = self.keyring.consume_nonces(n).map_err(to_io)?;
        let n = usize::try_from(n).map_err(io::Error::other)?;
        // What redb writes: whole pages, taken as they are (no zero-filled buffer first).
        let whole_pages = off.is_multiple_of(PAGE) && data.len().is_multiple_of(PAGE_SIZE);
        let mut buf = if whole_pages {
            data.to_vec()
        } else {
            vec![0u8; n * PAGE_SIZE]
        };
        let mut heads = vec![[0u8; ENTRY_SIZE]; n];
        for (k, (body, head)) in buf.chunks_exact_mut(PAGE_SIZE).zip(&mut heads).enumerate() {
            let pg = first + k as u64;
            let page_start = pg * PAGE;
            let lo = off.max(page_start);
            let hi = end.min(page_start + PAGE);
            let src = &data[(lo - off) as usize..(hi - off) as usize];
            if hi - lo == PAGE {
                if !whole_pages {
                    body.copy_from_slice(src);
                }
            } else {
                // Partial page (redb never does this for pages >= 1): read, modify, re-encrypt.
                // A zero entry at or above the old mark is a page never written: zeros.
                self.read_whole_pages_v2(pg, body, old_high_water)?;
                let a = (lo - page_start) as usize;
                body[a..a + src.len()].copy_from_slice(src);
            }
            if let Err(e) = page::seal_page(&self.keyring, &self.file_id, key_id, pg, body, head) {
                buf.zeroize();
                return Err(seal_err(e));
            }
        }
        let mut done = 0usize;
        while done < n {
            let pg = first + done as u64;
            let (_, slot) = page::v2_group_of(pg);
            let run = (n - done).min(PAGES_PER_GROUP as usize - slot);
            self.inner.write(
                page::v2_data_offset(pg),
                &buf[done * PAGE_SIZE..(done + run) * PAGE_SIZE],
            )?;
            done += run;
        }
        let mut entries = write_lock(&self.entries);
        for (k, head) in heads.iter().enumerate() {
            self.set_entry(&mut entries, first + k as u64, head)?;
        }
        Ok(())
    }

    /// Format 1: reads logical bytes `[off, off + out.len())`, all in pages ≥ 1.
    fn read_pages(&self, off: u64, out: &mut [u8]) -> io::Result<()> {
        let end = off + out.len() as u64;
        let first = off / PAGE;
        let last = (end - 1) / PAGE;
        let n = usize::try_from(last - first + 1).map_err(io::Error::other)?;
        // Ciphertext only: whole pages decrypt straight into `out`, and a partial page's
        // plaintext is wiped right after its bytes are copied out. (Wiping the whole buffer
        // with volatile byte writes cost about as much as the decryption.)
        let mut buf = vec![0u8; n * PAGE_BLOCK_SIZE];
        self.inner.read(page::page_block_offset(first), &mut buf)?;
        let high_water = lock(&self.header).high_water;
        for (k, blk) in buf.chunks_exact_mut(PAGE_BLOCK_SIZE).enumerate() {
            let pg = first + k as u64;
            let page_start = pg * PAGE;
            let lo = off.max(page_start);
            let hi = end.min(page_start + PAGE);
            let dst = &mut out[(lo - off) as usize..(hi - off) as usize];
            if page::is_zero_block(blk) {
                if let Err(e) = zero_page_allowed(pg, high_water) {
                    out.fill(0);
                    return Err(e);
                }
                dst.fill(0);
                continue;
            }
            let ok = if hi - lo == PAGE {
                page::open_into(PageFormat::V1, &self.keyring, &self.file_id, pg, blk, dst)
            } else if page::open_in_place(&self.keyring, &self.file_id, pg, blk) {
                let a = page::BLOCK_OVERHEAD + (lo - page_start) as usize;
                let b = page::BLOCK_OVERHEAD + (hi - page_start) as usize;
                dst.copy_from_slice(&blk[a..b]);
                blk.zeroize();
                true
            } else {
                false
            };
            if !ok {
                out.fill(0);
                return Err(auth_failed(pg));
            }
        }
        Ok(())
    }

    /// Format 1: writes logical bytes `[off, off + data.len())`, all in pages ≥ 1. The caller
    /// has already raised the high-water mark over them; `old_high_water` is its value before.
    fn write_pages(&self, off: u64, data: &[u8], old_high_water: u64) -> io::Result<()> {
        let end = off + data.len() as u64;
        let first = off / PAGE;
        let last = (end - 1) / PAGE;
        let n = last - first + 1;
        let key_id = self.keyring.consume_nonces(n).map_err(to_io)?;
        let n = usize::try_from(n).map_err(io::Error::other)?;
        // Holds ciphertext once each block is sealed; the one place plaintext passes through
        // it (a partial page, below) wipes the block if sealing fails.
        let mut buf = vec![0u8; n * PAGE_BLOCK_SIZE];
        let mut physical_len = None;
        for (k, blk) in buf.chunks_exact_mut(PAGE_BLOCK_SIZE).enumerate() {
            let pg = first + k as u64;
            let page_start = pg * PAGE;
            let lo = off.max(page_start);
            let hi = end.min(page_start + PAGE);
            let src = &data[(lo - off) as usize..(hi - off) as usize];
            if hi - lo == PAGE {
                page::seal_into(
                    PageFormat::V1,
                    &self.keyring,
                    &self.file_id,
                    key_id,
                    pg,
                    src,
                    blk,
                )
                .map_err(seal_err)?;
                continue;
            }
            // Partial page (redb never does this for pages >= 1): read, modify, re-encrypt.
            let block_off = page::page_block_offset(pg);
            let plen = match physical_len {
                Some(l) => l,
                None => {
                    let l = self.inner.len()?;
                    physical_len = Some(l);
                    l
                }
            };
            if block_off + PAGE_BLOCK_SIZE as u64 <= plen {
                self.inner.read(block_off, blk)?;
                if page::is_zero_block(blk) {
                    zero_page_allowed(pg, old_high_water)?;
                } else if !page::open_in_place(&self.keyring, &self.file_id, pg, blk) {
                    return Err(auth_failed(pg));
                }
            }
            let a = page::BLOCK_OVERHEAD + (lo - page_start) as usize;
            let b = page::BLOCK_OVERHEAD + (hi - page_start) as usize;
            blk[a..b].copy_from_slice(src);
            if let Err(e) = page::seal_in_place(
                PageFormat::V1,
                &self.keyring,
                &self.file_id,
                key_id,
                pg,
                blk,
            ) {
                blk.zeroize();
                return Err(seal_err(e));
            }
        }
        self.inner.write(page::page_block_offset(first), &buf)
    }
}

impl<B: StorageBackend> StorageBackend for EncryptedBackend<B> {
    fn len(&self) -> io::Result<u64> {
        let plen = self.inner.len()?;
        if plen == 0 {
            return Ok(0);
        }
        self.format.logical_len(plen).ok_or_else(|| {
            corrupted(format!(
                "the data file length {plen} is not a whole number of blocks"
            ))
        })
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(out.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read range overflows"))?;
        // Pages >= 1: reading past the end fails in `inner` (blocks map monotonically).
        // Page 0 lives in memory, so check the length for it explicitly.
        if end > MAX_LOGICAL_LEN || (offset < PAGE && self.len()? < end.min(PAGE)) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the database",
            ));
        }
        let mut pos = 0usize;
        let mut off = offset;
        if off < PAGE {
            let n = (end.min(PAGE) - off) as usize;
            let st = lock(&self.header);
            out[..n].copy_from_slice(&st.page0[off as usize..off as usize + n]);
            pos = n;
            off += n as u64;
        }
        if off < end {
            match self.format {
                PageFormat::V1 => self.read_pages(off, &mut out[pos..])?,
                PageFormat::V2 => self.read_pages_v2(off, &mut out[pos..])?,
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !len.is_multiple_of(PAGE) || len > MAX_LOGICAL_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "length must be a multiple of the 4096-byte page size and at most 2^52 bytes",
            ));
        }
        let mut st = lock(&self.header);
        // Queued pages reach the file first: the cut then applies to them like to any other.
        self.seal_queued()?;
        let physical = self.format.physical_len(len);
        self.inner.set_len(physical)?;
        if self.format == PageFormat::V2 {
            // Entry pages cut off are gone with their pages. In a group that keeps some pages,
            // the entries of the cut ones are cleared: space added later must read as zeros.
            let mut entries = write_lock(&self.entries);
            entries
                .by_group
                .retain(|&group, _| page::v2_entry_page_offset(group) < physical);
            let first_cut = len / PAGE;
            let (group, slot) = page::v2_group_of(first_cut.max(1));
            if first_cut >= 1 && slot > 0 {
                let page = self.entry_page(&mut entries, group)?;
                if !page::is_zero_block(&page.bytes[slot * ENTRY_SIZE..]) {
                    page.bytes[slot * ENTRY_SIZE..].fill(0);
                    page.dirty = true;
                }
            }
        }
        // Pages at or past the new end are gone; space added later must read as zeros.
        st.high_water = st.high_water.min(len / PAGE);
        if len == 0 {
            st.page0.fill(0);
            st.durable = HeaderSlot::A;
            st.pending = None;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = lock(&self.header);
        self.seal_queued()?;
        self.write_entry_pages()?;
        self.inner.sync_data()?;
        if let Some(slot) = st.pending.take() {
            st.durable = slot;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_LOGICAL_LEN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write range too large"))?;
        // Raise the high-water mark before any block (or header copy) is written, so that
        // every header copy written from now on covers these pages.
        let old_high_water = if end > PAGE {
            self.raise_high_water((offset / PAGE).max(1), end.div_ceil(PAGE))?
        } else {
            lock(&self.header).high_water
        };
        let mut pos = 0usize;
        let mut off = offset;
        if off < PAGE {
            let n = (end.min(PAGE) - off) as usize;
            let mut st = lock(&self.header);
            let mut new_page0 = Zeroizing::new([0u8; PAGE_SIZE]);
            new_page0.copy_from_slice(&st.page0);
            new_page0[off as usize..off as usize + n].copy_from_slice(&data[..n]);
            self.write_page0(&mut st, &new_page0[..])?;
            pos = n;
            off += n as u64;
        }
        if off < end {
            let rest = &data[pos..];
            match self.format {
                PageFormat::V1 => self.write_pages(off, rest, old_high_water)?,
                PageFormat::V2
                    if off.is_multiple_of(PAGE) && rest.len().is_multiple_of(PAGE_SIZE) =>
                {
                    self.queue_pages(off / PAGE, rest)?;
                }
                PageFormat::V2 => {
                    // A partial page is read, changed and sealed now, from a current file.
                    self.seal_queued()?;
                    self.write_pages_v2(off, rest, old_high_water)?;
                }
            }
        }
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        {
            let _st = lock(&self.header);
            self.seal_queued()?;
            self.write_entry_pages()?;
        }
        self.inner.close()
    }

    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// Result of [`verify_file`]: what authenticated and what did not.
#[derive(Clone, Debug, Default)]
pub struct FileReport {
    /// Physical file length in bytes.
    pub physical_len: u64,
    /// Page format version from the preamble (1 or 2; 0 if there is no usable preamble).
    pub format_version: u16,
    /// Logical (redb) length in bytes implied by the whole blocks present.
    pub logical_len: u64,
    /// Page blocks examined (logical pages ≥ 1; header copies not included).
    pub page_blocks: u64,
    /// Page blocks that are all zeros at or above `high_water` (never written; read as zero
    /// pages).
    pub zero_blocks: u64,
    /// Logical page numbers whose blocks failed authentication, including all-zero blocks
    /// below `high_water`.
    pub failed_pages: Vec<u64>,
    /// The high-water mark of the current header copy (one past the highest page written),
    /// 0 if no header copy authenticates.
    pub high_water: u64,
    /// Authenticated page blocks per data key id (header copies included).
    pub blocks_by_key: BTreeMap<u32, u64>,
    /// Authenticated empty-page markers (pages below the high-water mark redb never wrote).
    pub empty_markers: u64,
    /// Status of header copies A and B.
    pub header_copies: [Option<HeaderCopyStatus>; 2],
    /// The copy a reader would use (the newest that authenticates).
    pub current_header: Option<HeaderSlot>,
    /// Structural problems (bad preamble, length not a whole number of blocks, no usable
    /// header). Empty for a healthy file.
    pub problems: Vec<String>,
    /// Conditions that are expected after a crash (e.g. one torn header copy) and harmless.
    pub warnings: Vec<String>,
}

impl FileReport {
    /// True when nothing failed authentication and the structure is sound.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.failed_pages.is_empty()
    }

    /// Counts page `pg` as a read would see it: all zeros (`zero`: never written at or above
    /// the high-water mark, damaged or tampered below it), or a block whose 32-byte `prefix`
    /// names its key and which `authenticates`.
    fn record_page(
        &mut self,
        pg: u64,
        zero: bool,
        prefix: &[u8],
        authenticates: impl FnOnce() -> bool,
    ) {
        self.page_blocks += 1;
        if zero {
            match zero_page_allowed(pg, self.high_water) {
                Ok(()) => self.zero_blocks += 1,
                Err(_) => self.failed_pages.push(pg),
            }
        } else if authenticates() {
            match page::block_key_id(prefix) {
                Some(page::EMPTY_KEY_ID) => self.empty_markers += 1,
                Some(id) => *self.blocks_by_key.entry(id).or_default() += 1,
                None => {}
            }
        } else {
            self.failed_pages.push(pg);
        }
    }
}

/// Opens the main data file at `path` read-only and authenticates every block with `keyring`.
///
/// Returns `Err` only for I/O failures opening or reading the file; everything found wrong
/// with the contents is listed in the [`FileReport`].
pub fn verify_file(path: &Path, keyring: &Keyring) -> Result<FileReport> {
    verify_file_as(path, keyring, &keyring.db_id())
}

/// Like [`verify_file`], for the auxiliary file `name` of `keyring`'s database (the file
/// written through [`EncryptedBackend::new_aux`] with the same name).
pub fn verify_aux_file(path: &Path, keyring: &Keyring, name: &str) -> Result<FileReport> {
    verify_file_as(path, keyring, &page::aux_file_id(&keyring.db_id(), name))
}

fn verify_file_as(path: &Path, keyring: &Keyring, file_id: &[u8; 16]) -> Result<FileReport> {
    let file = File::open(path)?;
    let plen = file.metadata()?.len();
    let mut report = FileReport {
        physical_len: plen,
        ..FileReport::default()
    };
    if plen == 0 {
        return Ok(report);
    }
    if plen < PREAMBLE_SIZE as u64 {
        report
            .problems
            .push("the file is truncated (shorter than its preamble)".into());
        return Ok(report);
    }
    let mut pre = [0u8; PREAMBLE_SIZE];
    file.read_exact_at(&mut pre, 0)?;
    let format = match page::check_preamble(&pre, file_id) {
        Ok(format) => {
            report.format_version = format.version();
            format
        }
        Err(problem) => {
            let foreign = pre[..8] != page::MAGIC[..];
            report.problems.push(problem);
            if foreign {
                return Ok(report);
            }
            // Damaged: go on with the format the preamble names, if any, to report the rest.
            match u16::from_le_bytes([pre[8], pre[9]]) {
                1 => PageFormat::V1,
                _ => PageFormat::V2,
            }
        }
    };
    if format.logical_len(plen).is_none() {
        report.problems.push(format!(
            "the file length {plen} is not a whole number of blocks: it was truncated or extended"
        ));
    }
    if plen < format.pages_offset() {
        if plen > format.empty_len() {
            report.header_copies = [Some(HeaderCopyStatus::Missing); 2];
        }
        return Ok(report);
    }
    let mut block = vec![0u8; HEADER_BLOCK_SIZE];
    let mut plain = Zeroizing::new(vec![0u8; HEADER_PLAIN_SIZE]);
    let mut statuses = [HeaderCopyStatus::Missing; 2];
    let mut high_waters = [0u64; 2];
    for (i, slot) in [HeaderSlot::A, HeaderSlot::B].into_iter().enumerate() {
        file.read_exact_at(&mut block, slot.offset(format))?;
        statuses[i] = decode_header_copy(format, keyring, file_id, slot, &block, &mut plain);
        if let HeaderCopyStatus::Valid { .. } = statuses[i] {
            high_waters[i] = header_high_water(&plain);
            if let Some(id) = page::block_key_id(&block) {
                *report.blocks_by_key.entry(id).or_default() += 1;
            }
        }
    }
    report.header_copies = [Some(statuses[0]), Some(statuses[1])];
    report.current_header = newest(statuses[0], statuses[1]).map(|(slot, _)| slot);
    report.high_water = match report.current_header {
        Some(HeaderSlot::A) => high_waters[0],
        Some(HeaderSlot::B) => high_waters[1],
        None => 0,
    };
    match (report.current_header, statuses) {
        (None, [HeaderCopyStatus::Zero, HeaderCopyStatus::Zero]) => {}
        (None, _) => report
            .problems
            .push("both copies of the database header (page 0) failed authentication".into()),
        (Some(_), [HeaderCopyStatus::Failed, _] | [_, HeaderCopyStatus::Failed]) => report
            .warnings
            .push("one header copy does not authenticate (expected after a crash during a header write)".into()),
        _ => {}
    }
    let pages = match format {
        PageFormat::V1 => verify_pages_v1(&file, plen, keyring, file_id, &mut report)?,
        PageFormat::V2 => verify_pages_v2(&file, plen, keyring, file_id, &mut report)?,
    };
    report.logical_len = (pages + 1) * PAGE;
    Ok(report)
}

/// Authenticates every whole page block of a format-1 file; returns how many there are.
fn verify_pages_v1(
    file: &File,
    plen: u64,
    keyring: &Keyring,
    file_id: &[u8; 16],
    report: &mut FileReport,
) -> Result<u64> {
    let whole_blocks = (plen - PAGES_OFFSET) / PAGE_BLOCK_SIZE as u64;
    const CHUNK: u64 = 256;
    let mut buf = vec![0u8; CHUNK as usize * PAGE_BLOCK_SIZE];
    let mut out = Zeroizing::new(vec![0u8; PAGE_SIZE]);
    let mut next = 0u64;
    while next < whole_blocks {
        let count = CHUNK.min(whole_blocks - next);
        let bytes = &mut buf[..count as usize * PAGE_BLOCK_SIZE];
        file.read_exact_at(bytes, PAGES_OFFSET + next * PAGE_BLOCK_SIZE as u64)?;
        for (k, blk) in bytes.chunks_exact(PAGE_BLOCK_SIZE).enumerate() {
            let pg = next + k as u64 + 1;
            report.record_page(pg, page::is_zero_block(blk), blk, || {
                page::open_into(PageFormat::V1, keyring, file_id, pg, blk, &mut out)
            });
        }
        next += count;
    }
    Ok(whole_blocks)
}

/// Authenticates every whole page of a format-2 file, group by group, as a read would; returns
/// how many pages the file holds. The ciphertext area of an empty-page marker is not looked
/// at: the page reads as zeros whatever it holds.
fn verify_pages_v2(
    file: &File,
    plen: u64,
    keyring: &Keyring,
    file_id: &[u8; 16],
    report: &mut FileReport,
) -> Result<u64> {
    let mut entries = [0u8; PAGE_SIZE];
    let mut data = Zeroizing::new(vec![0u8; PAGES_PER_GROUP as usize * PAGE_SIZE]);
    let mut pages = 0u64;
    for group in 0.. {
        let at = page::v2_entry_page_offset(group);
        let Some(room) = plen.checked_sub(at + PAGE) else {
            break;
        };
        let count = (room / PAGE).min(PAGES_PER_GROUP);
        if count == 0 {
            break;
        }
        file.read_exact_at(&mut entries, at)?;
        let bytes = &mut data[..count as usize * PAGE_SIZE];
        file.read_exact_at(bytes, at + PAGE)?;
        for (k, body) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let pg = group * PAGES_PER_GROUP + k as u64 + 1;
            let mut head = [0u8; ENTRY_SIZE];
            head.copy_from_slice(&entries[k * ENTRY_SIZE..(k + 1) * ENTRY_SIZE]);
            report.record_page(pg, page::is_zero_block(&head), &head, || {
                page::open_page(keyring, file_id, pg, &head, body)
            });
        }
        pages += count;
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KdfParams;
    use crate::crypto::keys::KeySource;
    use crate::crypto::page::image;
    use crate::crypto::{create_key_file, error_from_io};
    use redb::backends::FileBackend;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};
    use std::fs::OpenOptions;
    use std::path::PathBuf;

    const TABLE: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("t");

    fn pass(s: &str) -> KeySource {
        KeySource::Passphrase(Zeroizing::new(s.to_string()))
    }

    fn keyring(dir: &Path) -> Arc<Keyring> {
        Keyring::create(dir, &pass("pw"), KdfParams::fast_insecure()).unwrap()
    }

    fn backend(path: &Path, k: &Arc<Keyring>) -> Result<EncryptedBackend<FileBackend>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let fb = FileBackend::new(file).map_err(|e| Error::Storage(e.to_string()))?;
        EncryptedBackend::new(fb, k.clone())
    }

    fn open_db(path: &Path, k: &Arc<Keyring>) -> std::result::Result<Database, redb::Error> {
        let b = backend(path, k).map_err(|e| redb::Error::Io(to_io(e)))?;
        Ok(redb::Builder::new().create_with_backend(b)?)
    }

    /// The engine error inside a redb error, if any.
    fn engine_err(e: impl Into<redb::Error>) -> Option<Error> {
        match e.into() {
            redb::Error::Io(io) => match error_from_io(io) {
                Error::Io(_) => None,
                other => Some(other),
            },
            _ => None,
        }
    }

    fn value(i: u64) -> Vec<u8> {
        let len = if i.is_multiple_of(50) {
            20_000 + (i as usize * 37) % 60_000
        } else {
            (i as usize * 13) % 300
        };
        let mut v = format!("value-{i}-").into_bytes();
        v.resize(len.max(v.len()), (i % 251) as u8);
        v
    }

    fn fill(db: &Database, range: std::ops::Range<u64>) {
        let mut txn = db.begin_write().unwrap();
        txn.set_two_phase_commit(true);
        {
            let mut t = txn.open_table(TABLE).unwrap();
            for i in range {
                t.insert(i, value(i).as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// Reads every entry; Ok only if everything read back equals `value(i)` for `expected`.
    fn read_all(db: &Database) -> std::result::Result<Vec<(u64, Vec<u8>)>, redb::Error> {
        let txn = db.begin_read()?;
        let t = txn.open_table(TABLE)?;
        let mut out = Vec::new();
        for item in t.range::<u64>(..)? {
            let (k, v) = item?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn expected(range: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, value(i))).collect()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        k: Arc<Keyring>,
    }

    fn fixture(n: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        let path = dir.path().join("data.fhk");
        let db = open_db(&path, &k).unwrap();
        fill(&db, 0..n);
        drop(db);
        Fixture { _dir: dir, path, k }
    }

    /// Runs `test` with new files created in `format`.
    fn in_format(format: PageFormat, test: impl FnOnce()) {
        set_new_file_format_for_tests(format);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(test));
        set_new_file_format_for_tests(PageFormat::NEWEST);
        if let Err(panic) = outcome {
            eprintln!("in format {format:?}:");
            std::panic::resume_unwind(panic);
        }
    }

    /// Pages that were ever written.
    fn nonzero_pages(path: &Path) -> Vec<u64> {
        image::written_pages(&std::fs::read(path).unwrap())
    }

    /// Opening and reading either fails or returns exactly the expected data; returns
    /// whether it failed.
    fn open_and_read_fails(path: &Path, k: &Arc<Keyring>, n: u64) -> bool {
        let db = match open_db(path, k) {
            Ok(db) => db,
            Err(_) => return true,
        };
        match read_all(&db) {
            Ok(data) => {
                assert_eq!(
                    data,
                    expected(0..n),
                    "wrong data returned instead of an error"
                );
                false
            }
            Err(_) => true,
        }
    }

    #[test]
    fn redb_roundtrip_many_entries_and_big_values() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || {
                redb_roundtrip_many_entries_and_big_values_in(format)
            });
        }
    }

    fn redb_roundtrip_many_entries_and_big_values_in(format: PageFormat) {
        let f = fixture(1500);
        let db = open_db(&f.path, &f.k).unwrap();
        fill(&db, 1500..2000);
        {
            let mut txn = db.begin_write().unwrap();
            txn.set_two_phase_commit(true);
            {
                let mut t = txn.open_table(TABLE).unwrap();
                for i in 0..100 {
                    t.remove(i * 20).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        drop(db);
        let k2 = Keyring::open(f.path.parent().unwrap(), &pass("pw")).unwrap();
        let db = open_db(&f.path, &k2).unwrap();
        let got = read_all(&db).unwrap();
        let want: Vec<_> = expected(0..2000)
            .into_iter()
            .filter(|(i, _)| !(i % 20 == 0 && *i < 2000))
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want);
        {
            let txn = db.begin_read().unwrap();
            assert_eq!(txn.open_table(TABLE).unwrap().len().unwrap(), 1900);
        }
        drop(db);
        let report = verify_file(&f.path, &f.k).unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert!(report.page_blocks > 50);
        assert!(report.current_header.is_some());
        assert!(report.failed_pages.is_empty());
        assert_eq!(
            report.logical_len,
            format.logical_len(report.physical_len).unwrap()
        );
    }

    #[test]
    fn file_of_another_database_is_rejected() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || file_of_another_database_is_rejected_in(format));
        }
    }

    fn file_of_another_database_is_rejected_in(format: PageFormat) {
        let f = fixture(10);
        let other_dir = tempfile::tempdir().unwrap();
        let other = keyring(other_dir.path());
        let err = backend(&f.path, &other).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupted(m) if m.contains("another database")),
            "{err:?}"
        );
        let report = verify_file(&f.path, &other).unwrap();
        assert!(!report.is_ok());
        assert!(report.current_header.is_none());
        assert_eq!(
            report.failed_pages.len() as u64,
            report.page_blocks - report.zero_blocks
        );

        // Even with the preamble's db_id rewritten, the blocks do not authenticate.
        let mut bytes = std::fs::read(&f.path).unwrap();
        bytes[..PREAMBLE_SIZE].copy_from_slice(&page::encode_preamble(format, &other.db_id()));
        std::fs::write(&f.path, &bytes).unwrap();
        let err = backend(&f.path, &other).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupted(m) if m.contains("header")),
            "{err:?}"
        );
    }

    #[test]
    fn flipped_byte_in_page_block_is_detected() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || flipped_byte_in_page_block_is_detected_in(format));
        }
    }

    fn flipped_byte_in_page_block_is_detected_in(_format: PageFormat) {
        let f = fixture(600);
        let good = std::fs::read(&f.path).unwrap();
        let pages = nonzero_pages(&f.path);
        assert!(pages.len() > 10);
        let mut failures = 0;
        let step = (pages.len() / 12).max(1);
        for (n, &pg) in pages.iter().step_by(step).enumerate() {
            let mut bad = good.clone();
            // Alternate between key id, nonce, tag and ciphertext bytes (a format-2 marker
            // has no ciphertext: its page reads as zeros whatever the area holds).
            let within = [0usize, 7, 20, 40, 2000, PAGE_BLOCK_SIZE - 1][n % 6];
            let within = if image::is_marker(&good, pg) {
                within % 32
            } else {
                within
            };
            bad[image::block_byte(&good, pg, within)] ^= 0x10;
            std::fs::write(&f.path, &bad).unwrap();
            let report = verify_file(&f.path, &f.k).unwrap();
            assert_eq!(report.failed_pages, vec![pg]);
            assert!(!report.is_ok());
            // Direct read of that page fails with the authentication error, not data.
            let b = backend(&f.path, &f.k).unwrap();
            let mut out = vec![0u8; PAGE_SIZE];
            let e = b.read(pg * PAGE, &mut out).unwrap_err();
            assert!(
                matches!(error_from_io(e), Error::Corrupted(m) if m == format!("page {pg} failed authentication"))
            );
            assert!(out.iter().all(|&x| x == 0));
            drop(b);
            if open_and_read_fails(&f.path, &f.k, 600) {
                failures += 1;
            }
        }
        assert!(failures > 0, "no corrupted page was ever read by redb");
        std::fs::write(&f.path, &good).unwrap();
        assert!(!open_and_read_fails(&f.path, &f.k, 600));
    }

    #[test]
    fn zeroed_page_block_is_an_error_never_a_panic_or_wrong_data() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || {
                zeroed_page_block_is_an_error_never_a_panic_or_wrong_data_in(format)
            });
        }
    }

    fn zeroed_page_block_is_an_error_never_a_panic_or_wrong_data_in(_format: PageFormat) {
        let f = fixture(60);
        let good = std::fs::read(&f.path).unwrap();
        let clean = verify_file(&f.path, &f.k).unwrap();
        assert!(clean.is_ok(), "{clean:?}");
        let pages = nonzero_pages(&f.path);
        assert!(pages.len() > 3, "{pages:?}");
        assert!(clean.high_water > *pages.last().unwrap(), "{clean:?}");
        let mut failures = 0;
        for &pg in &pages {
            let mut bad = good.clone();
            image::put_block(&mut bad, pg, &[0u8; PAGE_BLOCK_SIZE]);
            std::fs::write(&f.path, &bad).unwrap();
            let report = verify_file(&f.path, &f.k).unwrap();
            assert_eq!(report.failed_pages, vec![pg], "{report:?}");
            assert!(!report.is_ok());
            // The backend refuses the page instead of handing redb a zero page.
            let b = backend(&f.path, &f.k).unwrap();
            let mut out = vec![1u8; PAGE_SIZE];
            let e = b.read(pg * PAGE, &mut out).unwrap_err();
            assert!(
                matches!(error_from_io(e), Error::Corrupted(m) if m == format!("page {pg} failed authentication"))
            );
            assert!(out.iter().all(|&x| x == 0));
            drop(b);
            // Through redb: an error or exactly the right data (for a free page), no panic.
            let (path, k) = (&f.path, &f.k);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                open_and_read_fails(path, k, 60)
            }));
            match outcome {
                Ok(true) => failures += 1,
                Ok(false) => {}
                Err(_) => panic!("redb panicked on zeroed page {pg}"),
            }
        }
        assert!(failures > 0, "no zeroed page was ever read by redb");
        std::fs::write(&f.path, &good).unwrap();
        assert!(!open_and_read_fails(&f.path, &f.k, 60));
    }

    #[test]
    fn zeroed_page_block_of_a_store_is_an_error_not_a_panic() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || {
                zeroed_page_block_of_a_store_is_an_error_not_a_panic_in(format)
            });
        }
    }

    fn zeroed_page_block_of_a_store_is_an_error_not_a_panic_in(_format: PageFormat) {
        use crate::store::tests::{key_for, open_store};
        use crate::store::{AccessContext, DATABASE_FILE, ReadAudit, Store};
        let dir = tempfile::tempdir().unwrap();
        let ctx = AccessContext::new("tester", "unit-test", "local", "req-1");
        let mut want = Vec::new();
        {
            let store = open_store(dir.path(), ReadAudit::Durable);
            for i in 0..12 {
                let body = serde_json::json!({"resourceType": "Patient", "name": [{"family": format!("F{i}")}]});
                let out = store
                    .update(&ctx, "Patient", &format!("p{i}"), body, None)
                    .unwrap();
                want.push(out.resource.json_bytes().to_vec());
            }
        }
        let path = dir.path().join("db").join(DATABASE_FILE);
        let good = std::fs::read(&path).unwrap();
        let pages = nonzero_pages(&path);
        let mut failures = 0;
        for &pg in &pages {
            let mut bad = good.clone();
            image::put_block(&mut bad, pg, &[0u8; PAGE_BLOCK_SIZE]);
            std::fs::write(&path, &bad).unwrap();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let store = Store::builder(dir.path().join("db"))
                    .key(key_for(dir.path()))
                    .read_audit(ReadAudit::Durable)
                    .open()?;
                for (i, bytes) in want.iter().enumerate() {
                    let got = store.read(&ctx, "Patient", &format!("p{i}"))?;
                    assert_eq!(got.json_bytes(), &bytes[..], "wrong data, page {pg}");
                }
                Ok::<(), Error>(())
            }));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(_)) => failures += 1,
                Err(_) => panic!("panic with page {pg} zeroed"),
            }
        }
        assert!(failures > 0);
    }

    #[test]
    fn high_water_mark_decides_how_zero_blocks_read() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || {
                high_water_mark_decides_how_zero_blocks_read_in(format)
            });
        }
    }

    fn high_water_mark_decides_how_zero_blocks_read_in(_format: PageFormat) {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        let path = dir.path().join("d");
        let b = backend(&path, &k).unwrap();
        b.set_len(6 * PAGE).unwrap();
        b.write(PAGE, &vec![7u8; 2 * PAGE_SIZE]).unwrap(); // pages 1 and 2
        b.sync_data().unwrap();
        b.write(0, b"head").unwrap(); // header copy with high_water 3
        b.sync_data().unwrap();
        drop(b);
        let r = verify_file(&path, &k).unwrap();
        assert_eq!(r.high_water, 3);
        assert_eq!(r.zero_blocks, 3); // pages 3, 4, 5
        assert!(r.is_ok());
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        image::put_block(&mut bad, 2, &[0u8; PAGE_BLOCK_SIZE]);
        std::fs::write(&path, &bad).unwrap();
        let r = verify_file(&path, &k).unwrap();
        assert_eq!(r.failed_pages, vec![2]);
        assert_eq!(r.zero_blocks, 3);
        let b = backend(&path, &k).unwrap();
        let mut out = vec![0u8; PAGE_SIZE];
        assert!(b.read(2 * PAGE, &mut out).is_err());
        b.read(4 * PAGE, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0));
        // Partial writes into a zeroed written page fail too.
        assert!(b.write(2 * PAGE + 10, b"x").is_err());
        // Shrinking lowers the mark: space added again reads as zeros.
        b.set_len(2 * PAGE).unwrap();
        b.set_len(6 * PAGE).unwrap();
        b.read(2 * PAGE, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0));
        b.read(PAGE, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 7));
        b.write(0, b"next").unwrap();
        b.sync_data().unwrap();
        drop(b);
        assert_eq!(verify_file(&path, &k).unwrap().high_water, 2);
        // A header whose mark exceeds the file (shrunk after it was written) is clamped.
        std::fs::write(&path, &good).unwrap();
        let b = backend(&path, &k).unwrap();
        b.set_len(PAGE).unwrap();
        b.set_len(6 * PAGE).unwrap();
        b.read(2 * PAGE, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0));
        b.set_len(0).unwrap();
        b.set_len(3 * PAGE).unwrap();
        b.read(PAGE, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0));
    }

    #[test]
    fn swapped_page_blocks_are_detected() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || swapped_page_blocks_are_detected_in(format));
        }
    }

    fn swapped_page_blocks_are_detected_in(_format: PageFormat) {
        let f = fixture(600);
        let good = std::fs::read(&f.path).unwrap();
        let pages = nonzero_pages(&f.path);
        let mut failures = 0;
        for w in pages.windows(2).step_by((pages.len() / 8).max(1)) {
            let (p, q) = (w[0], w[1]);
            let mut bad = good.clone();
            image::put_block(&mut bad, p, &image::block(&good, q));
            image::put_block(&mut bad, q, &image::block(&good, p));
            std::fs::write(&f.path, &bad).unwrap();
            let report = verify_file(&f.path, &f.k).unwrap();
            assert_eq!(report.failed_pages, vec![p, q]);
            if open_and_read_fails(&f.path, &f.k, 600) {
                failures += 1;
            }
        }
        assert!(failures > 0);
        // Swapping the two header copies is detected too.
        let mut bad = good.clone();
        let (a, b) = (image::header(&good, false), image::header(&good, true));
        bad[a.clone()].copy_from_slice(&good[b.clone()]);
        bad[b].copy_from_slice(&good[a]);
        std::fs::write(&f.path, &bad).unwrap();
        let err = backend(&f.path, &f.k).unwrap_err();
        assert!(matches!(err, Error::Corrupted(_)));
        let report = verify_file(&f.path, &f.k).unwrap();
        assert_eq!(
            report.header_copies,
            [
                Some(HeaderCopyStatus::Failed),
                Some(HeaderCopyStatus::Failed)
            ]
        );
        assert!(!report.is_ok());
    }

    #[test]
    fn truncated_file_is_detected() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || truncated_file_is_detected_in(format));
        }
    }

    fn truncated_file_is_detected_in(format: PageFormat) {
        let f = fixture(600);
        let good = std::fs::read(&f.path).unwrap();
        // Not a whole number of blocks.
        for cut in [1usize, 100, PAGE_BLOCK_SIZE - 1] {
            std::fs::write(&f.path, &good[..good.len() - cut]).unwrap();
            assert!(matches!(backend(&f.path, &f.k), Err(Error::Corrupted(_))));
            let report = verify_file(&f.path, &f.k).unwrap();
            assert!(!report.is_ok());
            assert!(report.problems.iter().any(|p| p.contains("whole number")));
        }
        let pages_offset = format.pages_offset() as usize;
        for short in [10usize, 64 + 100, pages_offset - 1] {
            std::fs::write(&f.path, &good[..short]).unwrap();
            assert!(backend(&f.path, &f.k).is_err());
            assert!(!verify_file(&f.path, &f.k).unwrap().is_ok());
        }
        // Whole blocks cut off: the data that lived there can no longer be read.
        let keep = format.physical_len(good.len() as u64 / 2 / 4096 * 4096) as usize;
        let keep = keep.min(good.len());
        std::fs::write(&f.path, &good[..keep]).unwrap();
        assert!(open_and_read_fails(&f.path, &f.k, 600));
    }

    #[test]
    fn no_plaintext_in_file() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || no_plaintext_in_file_in(format));
        }
    }

    fn no_plaintext_in_file_in(_format: PageFormat) {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        let path = dir.path().join("data.fhk");
        let canary = "CANARY-7f3a9c";
        let db = open_db(&path, &k).unwrap();
        let mut txn = db.begin_write().unwrap();
        txn.set_two_phase_commit(true);
        {
            let mut t = txn.open_table(TABLE).unwrap();
            for i in 0..300u64 {
                let v = format!("{{\"resourceType\":\"Patient\",\"name\":\"{canary}-{i}\"}}")
                    .repeat(1 + (i as usize % 40));
                t.insert(i, v.as_bytes()).unwrap();
            }
        }
        txn.commit().unwrap();
        drop(db);
        let bytes = std::fs::read(&path).unwrap();
        let utf16: Vec<u8> = canary
            .encode_utf16()
            .flat_map(|c| c.to_le_bytes())
            .collect();
        use base64::Engine as _;
        let mut needles = vec![canary.as_bytes().to_vec(), utf16, b"resourceType".to_vec()];
        // base64 of the canary at all three alignments.
        for shift in 0..3 {
            let s = format!("{}{canary}", "x".repeat(shift));
            let enc = base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
            let skip = (shift * 4).div_ceil(3) + 1;
            needles.push(enc.as_bytes()[skip..enc.len() - 4].to_vec());
        }
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "plaintext found in file"
            );
        }
        // The table name is not visible either.
        assert!(!bytes.windows(4).any(|w| w == b"redb"));
    }

    #[test]
    fn header_copies_alternate_after_sync() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || header_copies_alternate_after_sync_in(format));
        }
    }

    fn header_copies_alternate_after_sync_in(_format: PageFormat) {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        let path = dir.path().join("d");
        let b = backend(&path, &k).unwrap();
        assert_eq!(b.len().unwrap(), 0);
        b.set_len(8 * 4096).unwrap();
        assert_eq!(b.len().unwrap(), 8 * 4096);
        let mut out = vec![1u8; 8 * 4096];
        b.read(0, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0), "new space reads as zeros");
        assert_eq!(b.header_position(), (HeaderSlot::A, 0));
        b.write(0, b"first").unwrap();
        assert_eq!(b.header_position(), (HeaderSlot::A, 1)); // B pending
        b.write(5, b"-more").unwrap();
        b.sync_data().unwrap();
        assert_eq!(b.header_position(), (HeaderSlot::B, 2));
        b.write(0, b"third").unwrap();
        b.sync_data().unwrap();
        assert_eq!(b.header_position(), (HeaderSlot::A, 3));
        drop(b);
        let b = backend(&path, &k).unwrap();
        assert_eq!(b.header_position(), (HeaderSlot::A, 3));
        let mut head = [0u8; 10];
        b.read(0, &mut head).unwrap();
        assert_eq!(&head, b"third-more");
        let r = verify_file(&path, &k).unwrap();
        assert_eq!(
            r.header_copies,
            [
                Some(HeaderCopyStatus::Valid { sequence: 3 }),
                Some(HeaderCopyStatus::Valid { sequence: 2 })
            ]
        );
        assert_eq!(r.zero_blocks, 7);
        assert!(r.is_ok());
    }

    #[test]
    fn unaligned_reads_and_writes() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || unaligned_reads_and_writes_in(format));
        }
    }

    fn unaligned_reads_and_writes_in(_format: PageFormat) {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        let b = backend(&dir.path().join("d"), &k).unwrap();
        b.set_len(6 * 4096).unwrap();
        let mut model = vec![0u8; 6 * 4096];
        let mut rng = crate::crypto::crash_backend::TestRng(42);
        for _ in 0..200 {
            let off = rng.below(6 * 4096) as usize;
            let len = 1 + rng.below((6 * 4096 - off) as u64) as usize;
            if rng.below(2) == 0 {
                let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                b.write(off as u64, &data).unwrap();
                model[off..off + len].copy_from_slice(&data);
            } else {
                let mut out = vec![0u8; len];
                b.read(off as u64, &mut out).unwrap();
                assert_eq!(out, model[off..off + len]);
            }
        }
        let mut all = vec![0u8; 6 * 4096];
        b.read(0, &mut all).unwrap();
        assert_eq!(all, model);
        let mut over = [0u8; 2];
        assert!(b.read(6 * 4096 - 1, &mut over).is_err());
        assert!(b.set_len(100).is_err());
        b.set_len(2 * 4096).unwrap();
        b.set_len(3 * 4096).unwrap();
        let mut p2 = vec![1u8; 4096];
        b.read(2 * 4096, &mut p2).unwrap();
        assert!(p2.iter().all(|&x| x == 0));
        // Absurd offsets are errors, not panics or overflows.
        assert!(b.write(u64::MAX - 10, b"abc").is_err());
        assert!(b.write(1 << 60, b"abc").is_err());
        assert!(b.read(u64::MAX - 1, &mut [0u8; 4]).is_err());
        assert!(b.read(1 << 60, &mut [0u8; 4]).is_err());
        assert!(b.set_len(!4095).is_err());
        b.set_len(0).unwrap();
        assert!(b.read(0, &mut [0u8; 9]).is_err());
    }

    mod damaged_images {
        use super::*;
        use crate::crypto::crash_backend::CrashBackend;
        use proptest::prelude::*;
        use std::sync::OnceLock;

        const PAGES: u64 = 6;

        /// (key dir, keyring, clean image, logical contents)
        type Clean = (tempfile::TempDir, Arc<Keyring>, Vec<u8>, Vec<u8>);

        fn clean() -> &'static Clean {
            static CLEAN: OnceLock<Clean> = OnceLock::new();
            CLEAN.get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let k = keyring(dir.path());
                let disk = CrashBackend::new();
                let b = EncryptedBackend::new(disk.clone(), k.clone()).unwrap();
                b.set_len(PAGES * PAGE).unwrap();
                let data: Vec<u8> = (0..PAGES * PAGE).map(|i| (i % 253) as u8 + 1).collect();
                b.write(0, &data).unwrap();
                b.sync_data().unwrap();
                // Leave page 5 as a zero block.
                b.set_len(5 * PAGE).unwrap();
                b.set_len(PAGES * PAGE).unwrap();
                b.sync_data().unwrap();
                let mut logical = data;
                logical[5 * PAGE_SIZE..].fill(0);
                drop(b);
                (dir, k, disk.live_image(), logical)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn damaged_file_never_panics_or_returns_wrong_pages(
                flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
                cut in proptest::option::of(any::<prop::sample::Index>()),
            ) {
                let (_dir, k, image, logical) = clean();
                let mut bad = image.clone();
                for (idx, x) in &flips {
                    let i = idx.index(bad.len());
                    bad[i] ^= x;
                }
                if let Some(c) = cut {
                    bad.truncate(c.index(bad.len()));
                }
                let Ok(b) = EncryptedBackend::new(CrashBackend::from_image(bad), k.clone()) else {
                    return Ok(());
                };
                let Ok(len) = b.len() else { return Ok(()) };
                let mut page = vec![0u8; PAGE_SIZE];
                for pg in 1..len / PAGE {
                    if b.read(pg * PAGE, &mut page).is_ok() {
                        let start = pg as usize * PAGE_SIZE;
                        prop_assert_eq!(&page[..], &logical[start..start + PAGE_SIZE]);
                    } else {
                        prop_assert!(page.iter().all(|&x| x == 0));
                    }
                }
                let _ = b.read(0, &mut page);
            }
        }
    }

    /// Records the writes that reach the wrapped backend.
    #[derive(Debug)]
    struct RecordingBackend {
        inner: redb::backends::InMemoryBackend,
        writes: Arc<Mutex<Vec<(u64, usize)>>>,
    }

    impl StorageBackend for RecordingBackend {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            lock(&self.writes).push((offset, data.len()));
            self.inner.write(offset, data)
        }
    }

    /// An encrypted backend over memory, and the `(offset, length)` of every write it makes.
    #[allow(clippy::type_complexity)]
    fn recorded_backend(
        k: &Arc<Keyring>,
    ) -> (
        EncryptedBackend<RecordingBackend>,
        Arc<Mutex<Vec<(u64, usize)>>>,
    ) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let disk = RecordingBackend {
            inner: redb::backends::InMemoryBackend::new(),
            writes: Arc::clone(&writes),
        };
        (EncryptedBackend::new(disk, k.clone()).unwrap(), writes)
    }

    #[test]
    fn format_2_writes_whole_aligned_pages_and_fills_gaps_with_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let (b, writes) = recorded_backend(&keyring(dir.path()));
        assert_eq!(b.format(), PageFormat::V2);
        b.set_len(300 * PAGE).unwrap();
        lock(&writes).clear();
        // Pages 200 and 201, above a gap of pages 1..200 that redb never wrote.
        b.write(200 * PAGE, &vec![9u8; 2 * PAGE_SIZE]).unwrap();
        assert!(lock(&writes).is_empty(), "pages are sealed at the sync");
        b.sync_data().unwrap();
        assert_eq!(
            lock(&writes)[0],
            (page::v2_data_offset(200), 2 * PAGE_SIZE),
            "one aligned write of the two pages' ciphertext; no gap written"
        );
        // The entry pages of groups 0 and 1 (markers for the gap, entries for 200 and 201).
        assert_eq!(
            lock(&writes)[1..],
            [
                (page::v2_entry_page_offset(0), PAGE_SIZE),
                (page::v2_entry_page_offset(1), PAGE_SIZE)
            ]
        );
        for (offset, len) in lock(&writes).iter() {
            assert!(offset.is_multiple_of(PAGE) && len.is_multiple_of(PAGE_SIZE));
        }
        let mut out = vec![1u8; 3 * PAGE_SIZE];
        b.read(199 * PAGE, &mut out).unwrap();
        assert!(
            out[..PAGE_SIZE].iter().all(|&x| x == 0),
            "a gap page is zeros"
        );
        assert!(out[PAGE_SIZE..].iter().all(|&x| x == 9));
        // A read straddling a group boundary (pages 128 and 129) and a partial read.
        b.write(128 * PAGE, &vec![5u8; 2 * PAGE_SIZE]).unwrap();
        let mut two = vec![0u8; 2 * PAGE_SIZE];
        b.read(128 * PAGE, &mut two).unwrap();
        assert!(two.iter().all(|&x| x == 5));
        let mut part = [0u8; 10];
        b.read(129 * PAGE + 4086, &mut part).unwrap();
        assert_eq!(part, [5u8; 10]);
        // Shrinking clears the cut pages' entries: regrown space reads as zeros.
        b.set_len(201 * PAGE).unwrap();
        b.set_len(300 * PAGE).unwrap();
        b.read(200 * PAGE, &mut out[..2 * PAGE_SIZE]).unwrap();
        assert!(out[..PAGE_SIZE].iter().all(|&x| x == 9));
        assert!(out[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&x| x == 0));
    }

    /// Whole pages wait in the queue until a sync, a header write, a partial write, a cut or
    /// the size limit seals them; until then every read sees them, and what reaches the file
    /// is ciphertext in runs that never cross an entry page.
    #[test]
    fn format_2_queued_pages_are_read_back_and_sealed_in_runs_at_the_right_points() {
        let dir = tempfile::tempdir().unwrap();
        let (b, writes) = recorded_backend(&keyring(dir.path()));
        b.set_len(400 * PAGE).unwrap();
        b.sync_data().unwrap();
        lock(&writes).clear();
        let fill = |byte: u8, pages: usize| vec![byte; pages * PAGE_SIZE];
        // Pages 126..130 span groups 0 (pages 1..=128) and 1; page 10 stands alone.
        b.write(126 * PAGE, &fill(3, 4)).unwrap();
        b.write(10 * PAGE, &fill(4, 1)).unwrap();
        // Rewritten while queued: the newest bytes win.
        b.write(127 * PAGE, &fill(6, 1)).unwrap();
        assert!(lock(&writes).is_empty());
        // A read across queued and never-written pages, and a partial read inside one.
        let mut out = fill(1, 6);
        b.read(125 * PAGE, &mut out).unwrap();
        let expected: Vec<u8> =
            [fill(0, 1), fill(3, 1), fill(6, 1), fill(3, 2), fill(0, 1)].concat();
        assert!(out == expected, "queued pages read back");
        let mut part = [0u8; 8];
        b.read(10 * PAGE + 100, &mut part).unwrap();
        assert_eq!(part, [4u8; 8]);
        b.sync_data().unwrap();
        let data_writes: Vec<(u64, usize)> = lock(&writes)
            .iter()
            .copied()
            .filter(|(offset, _)| {
                *offset != page::v2_entry_page_offset(0) && *offset != page::v2_entry_page_offset(1)
            })
            .collect();
        assert_eq!(
            data_writes,
            vec![
                (page::v2_data_offset(10), PAGE_SIZE),
                (page::v2_data_offset(126), 3 * PAGE_SIZE),
                (page::v2_data_offset(129), PAGE_SIZE),
            ],
            "page order, one write per run within a group"
        );
        for (offset, len) in lock(&writes).iter() {
            let mut raw = vec![0u8; *len];
            b.inner().read(*offset, &mut raw).unwrap();
            assert!(
                !raw.chunks_exact(PAGE_SIZE)
                    .any(|c| c.iter().all(|&x| x == 3 || x == 6)),
                "only ciphertext reaches the file"
            );
        }
        b.read(125 * PAGE, &mut out).unwrap();
        assert!(out == expected, "the same bytes after sealing");

        // A partial write into a queued page seals the queue first, then changes the page.
        lock(&writes).clear();
        b.write(300 * PAGE, &fill(7, 1)).unwrap();
        b.write(300 * PAGE + 8, &[8u8; 4]).unwrap();
        assert_eq!(lock(&writes)[0], (page::v2_data_offset(300), PAGE_SIZE));
        let mut page300 = fill(0, 1);
        b.read(300 * PAGE, &mut page300).unwrap();
        assert_eq!(
            &page300[..16],
            &[7, 7, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 7, 7, 7, 7]
        );

        // A header write seals the queue before the header copy.
        lock(&writes).clear();
        b.write(20 * PAGE, &fill(9, 1)).unwrap();
        b.write(0, &[1u8; 64]).unwrap();
        let order = lock(&writes).clone();
        let data_at = order
            .iter()
            .position(|w| *w == (page::v2_data_offset(20), PAGE_SIZE))
            .unwrap();
        let header_at = order
            .iter()
            .position(|(offset, _)| *offset < page::v2_data_offset(1))
            .unwrap();
        assert!(data_at < header_at, "{order:?}");

        // Cutting the file seals the queue, then the cut pages read as zeros when regrown.
        b.write(390 * PAGE, &fill(5, 1)).unwrap();
        b.set_len(390 * PAGE).unwrap();
        b.set_len(400 * PAGE).unwrap();
        let mut cut = fill(1, 1);
        b.read(390 * PAGE, &mut cut).unwrap();
        assert!(cut.iter().all(|&x| x == 0));

        // More than the limit in one go is sealed as it comes, not kept in memory.
        let pages = MAX_QUEUED_BYTES / PAGE_SIZE + 8;
        b.set_len((pages as u64 + 1000) * PAGE).unwrap();
        lock(&writes).clear();
        for pg in 0..pages as u64 {
            b.write((1000 + pg) * PAGE, &fill((pg % 200) as u8 + 1, 1))
                .unwrap();
        }
        assert!(!lock(&writes).is_empty());
        assert!(b.queued_pages.load(Ordering::Acquire) < MAX_QUEUED_BYTES / PAGE_SIZE);
        for pg in [0u64, 1, pages as u64 - 1] {
            let mut one = fill(0, 1);
            b.read((1000 + pg) * PAGE, &mut one).unwrap();
            assert!(one.iter().all(|&x| x == (pg % 200) as u8 + 1), "page {pg}");
        }
    }

    #[test]
    fn format_2_entry_pages_dropped_from_memory_are_read_again_and_changed_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        let path = dir.path().join("d");
        let pages = 20 * PAGES_PER_GROUP; // 20 groups
        let content = |pg: u64, round: u64| vec![(pg * 7 + round) as u8 | 1; PAGE_SIZE];
        let b = backend(&path, &k).unwrap();
        b.set_entry_page_cap_for_tests(3);
        b.set_len(pages * PAGE).unwrap();
        // Every page written, group after group, with no sync in between: more changed
        // entry pages than the cap, all of which must survive until they are written.
        for pg in (1..pages).rev() {
            b.write(pg * PAGE, &content(pg, 0)).unwrap();
        }
        let mut out = vec![0u8; PAGE_SIZE];
        for pg in (1..pages).step_by(37) {
            b.read(pg * PAGE, &mut out).unwrap();
            assert_eq!(out, content(pg, 0), "page {pg} before the sync");
        }
        b.sync_data().unwrap();
        // Clean pages are now dropped and read back from the file as needed, while a second
        // round of writes changes some of them again.
        for pg in (1..pages).step_by(5) {
            b.write(pg * PAGE, &content(pg, 1)).unwrap();
            let other = 1 + (pg * 31) % (pages - 1);
            b.read(other * PAGE, &mut out).unwrap();
            let round = u64::from(other % 5 == 1 && other <= pg);
            assert_eq!(
                out,
                content(other, round),
                "page {other} while writing {pg}"
            );
        }
        b.write(0, b"head").unwrap();
        b.sync_data().unwrap();
        drop(b);
        let r = verify_file(&path, &k).unwrap();
        assert!(r.is_ok(), "{r:?}");
        let (data_pages, header_copies) = (pages - 1, 1);
        assert_eq!(
            r.blocks_by_key.values().sum::<u64>(),
            data_pages + header_copies
        );
        let b = backend(&path, &k).unwrap();
        b.set_entry_page_cap_for_tests(2);
        for pg in 1..pages {
            b.read(pg * PAGE, &mut out).unwrap();
            assert_eq!(
                out,
                content(pg, u64::from(pg % 5 == 1)),
                "page {pg} after reopening"
            );
        }
    }

    #[test]
    fn format_2_marker_and_entry_tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        let path = dir.path().join("d");
        let b = backend(&path, &k).unwrap();
        b.set_len(10 * PAGE).unwrap();
        b.write(5 * PAGE, &vec![3u8; PAGE_SIZE]).unwrap(); // pages 1..5 become markers
        b.sync_data().unwrap();
        b.write(0, b"head").unwrap();
        b.sync_data().unwrap();
        drop(b);
        let good = std::fs::read(&path).unwrap();
        let r = verify_file(&path, &k).unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.empty_markers, r.high_water, r.format_version), (4, 6, 2));
        // A marker moved to another page, a real entry moved onto a marker's page, and a
        // zeroed entry below the mark: each fails at that page.
        let entry = |pg: u64| image::parts(&good, pg)[0].clone();
        let cases: Vec<(Vec<u8>, Vec<u64>)> = vec![
            {
                let mut bad = good.clone();
                bad.copy_within(entry(1), entry(2).start);
                (bad, vec![2])
            },
            {
                let mut bad = good.clone();
                bad.copy_within(entry(5), entry(3).start);
                (bad, vec![3])
            },
            {
                let mut bad = good.clone();
                bad[entry(4)].fill(0);
                (bad, vec![4])
            },
        ];
        for (bad, failed) in cases {
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(verify_file(&path, &k).unwrap().failed_pages, failed);
            let b = backend(&path, &k).unwrap();
            let mut out = vec![1u8; PAGE_SIZE];
            assert!(b.read(failed[0] * PAGE, &mut out).is_err());
            assert!(out.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn nonce_budget_exhaustion_surfaces_through_redb() {
        let f = fixture(10);
        let db = open_db(&f.path, &f.k).unwrap();
        f.k.set_nonce_limit_for_tests(f.k.writes_used() + 5);
        let mut txn = db.begin_write().unwrap();
        txn.set_two_phase_commit(true);
        let res = (|| -> std::result::Result<(), redb::Error> {
            {
                let mut t = txn.open_table(TABLE)?;
                for i in 100..400u64 {
                    t.insert(i, value(i * 50).as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        let err = res.unwrap_err();
        assert!(matches!(
            engine_err(err),
            Some(Error::NonceBudgetExhausted { key_id: 1, .. })
        ),);
    }

    #[test]
    fn rotated_and_rekeyed_database_stays_readable() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || {
                rotated_and_rekeyed_database_stays_readable_in(format)
            });
        }
    }

    fn rotated_and_rekeyed_database_stays_readable_in(_format: PageFormat) {
        let dir = tempfile::tempdir().unwrap();
        let kf = dir.path().join("key");
        create_key_file(&kf).unwrap();
        let src = KeySource::KeyFile(kf);
        let dbdir = dir.path().join("db");
        let path = dbdir.join("data.fhk");
        {
            let k = Keyring::create(&dbdir, &src, KdfParams::fast_insecure()).unwrap();
            let db = open_db(&path, &k).unwrap();
            fill(&db, 0..300);
        }
        assert_eq!(Keyring::rotate_data_key(&dbdir, &src).unwrap(), 2);
        {
            let k = Keyring::open(&dbdir, &src).unwrap();
            assert_eq!(k.active_key_id(), 2);
            let db = open_db(&path, &k).unwrap();
            fill(&db, 300..400);
            assert_eq!(read_all(&db).unwrap(), expected(0..400));
            drop(db);
            let r = verify_file(&path, &k).unwrap();
            assert!(r.is_ok());
            assert!(r.blocks_by_key.get(&1).is_some_and(|&n| n > 0), "{r:?}");
            assert!(r.blocks_by_key.get(&2).is_some_and(|&n| n > 0), "{r:?}");
        }
        Keyring::change_key(&dbdir, &src, &pass("new pass"), KdfParams::fast_insecure()).unwrap();
        assert!(matches!(Keyring::open(&dbdir, &src), Err(Error::WrongKey)));
        let k = Keyring::open(&dbdir, &pass("new pass")).unwrap();
        let db = open_db(&path, &k).unwrap();
        assert_eq!(read_all(&db).unwrap(), expected(0..400));
    }

    #[test]
    fn empty_page_markers_are_bound_to_page_and_database() {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(&dir.path().join("a"));
        let other = keyring(&dir.path().join("b"));
        let (id, other_id) = (k.db_id(), other.db_id());
        let aux_id = page::aux_file_id(&id, "index");
        let mut blocks = vec![0u8; 3 * PAGE_BLOCK_SIZE];
        page::seal_empty_pages(&k, &id, 10, &mut blocks);
        let mut out = vec![1u8; PAGE_SIZE];
        let marker = |i: usize| &blocks[i * PAGE_BLOCK_SIZE..(i + 1) * PAGE_BLOCK_SIZE];
        assert!(page::open_into(
            PageFormat::V1,
            &k,
            &id,
            11,
            marker(1),
            &mut out
        ));
        assert!(out.iter().all(|&b| b == 0));
        // Moved to another page, another file of the database, or read by another
        // database: not authentic.
        assert!(!page::open_into(
            PageFormat::V1,
            &k,
            &id,
            12,
            marker(1),
            &mut out
        ));
        assert!(!page::open_into(
            PageFormat::V1,
            &k,
            &aux_id,
            11,
            marker(1),
            &mut out
        ));
        assert!(!page::open_into(
            PageFormat::V1,
            &other,
            &other_id,
            11,
            marker(1),
            &mut out
        ));
        // Any changed byte, in the tag or in the (zero) body, breaks it.
        for at in [0, 5, 16, 31, 32, 4000] {
            let mut changed = marker(1).to_vec();
            changed[at] ^= 1;
            assert!(
                !page::open_into(PageFormat::V1, &k, &id, 11, &changed, &mut out),
                "byte {at}"
            );
            let mut in_place = changed.clone();
            assert!(
                !page::open_in_place(&k, &id, 11, &mut in_place),
                "byte {at}"
            );
        }
    }

    /// Found by the `key_header` fuzz target: a fresh backend that refuses writes past its end
    /// (redb's `InMemoryBackend`) must still take the preamble and pages.
    #[test]
    fn works_over_a_backend_that_refuses_writes_past_its_end() {
        for format in [PageFormat::V1, PageFormat::V2] {
            in_format(format, || {
                works_over_a_backend_that_refuses_writes_past_its_end_in(format)
            });
        }
    }

    fn works_over_a_backend_that_refuses_writes_past_its_end_in(_format: PageFormat) {
        let dir = tempfile::tempdir().unwrap();
        let k = keyring(dir.path());
        let backend = EncryptedBackend::new(redb::backends::InMemoryBackend::new(), k).unwrap();
        backend.set_len(2 * 4096).unwrap();
        let page = [0xA5u8; 4096];
        backend.write(4096, &page).unwrap();
        let mut back = [0u8; 4096];
        backend.read(4096, &mut back).unwrap();
        assert_eq!(back, page);
    }
}
