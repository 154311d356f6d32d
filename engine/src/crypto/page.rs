//! The physical format of an encrypted database file: preamble, the two copies of redb's
//! header page, and one AES-256-GCM block per 4 KiB logical page.
//!
//! Two formats exist ([`PageFormat`]); new files are written in format 2, files of format 1
//! are read and written in their own format (`fhirkeep compact` rewrites them as format 2).
//!
//! # Layout (format version 2, all integers little-endian)
//!
//! ```text
//! offset                           size   content
//! 0                                4096   preamble (64 bytes, plaintext) + zeros
//! 4096                             4144   header copy A (in an 8192-byte slot)
//! 12288                            4144   header copy B (in an 8192-byte slot)
//! 20480 + g*129*4096               4096   entry page of group g: 128 entries of 32 bytes
//! 20480 + g*129*4096 + (k+1)*4096  4096   ciphertext of logical page 1 + 128*g + k
//! ```
//!
//! A page's ciphertext is exactly 4096 bytes at a 4096-aligned offset, so writing a page
//! dirties one kernel page, not two; its 32-byte *entry* (key id, nonce, tag: the prefix of a
//! format-1 block) is in the entry page in front of its group of 128. An empty-page marker is
//! an entry only. The backend keeps entry pages in memory and writes the changed ones before
//! every header write and every sync.
//!
//! # Layout (format version 1)
//!
//! ```text
//! offset                        size   content
//! 0                             64     preamble (plaintext, nothing secret)
//! 64                            4144   header copy A  (logical page 0, pseudo-index 2^64-2)
//! 4208                          4144   header copy B  (logical page 0, pseudo-index 2^64-1)
//! 8352 + (i-1)*4128             4128   block of logical page i, for i >= 1
//! ```
//!
//! A file of logical length `L` (a multiple of 4096) is `64` bytes long if `L = 0`, else
//! `8352 + (L/4096 - 1) * 4128` bytes. Any other length is reported as truncated/corrupted.
//!
//! ## Preamble (64 bytes)
//!
//! | offset | len | field |
//! |---|---|---|
//! | 0 | 8 | magic `FHKPAGE\0` |
//! | 8 | 2 | format version, u16 = 1 |
//! | 10 | 2 | reserved, 0 |
//! | 12 | 4 | logical page size, u32 = 4096 |
//! | 16 | 4 | page block size, u32 = 4128 |
//! | 20 | 4 | header block size, u32 = 4144 |
//! | 24 | 16 | `file_id` (see below) |
//! | 40 | 8 | reserved, 0 |
//! | 48 | 16 | first 16 bytes of BLAKE3(bytes 0..48) |
//!
//! ## Block (page block 4128 bytes, header block 4144 bytes)
//!
//! | offset | len | field |
//! |---|---|---|
//! | 0 | 4 | `key_id`, u32 (≥ 1): data key that encrypted the block |
//! | 4 | 12 | random 96-bit nonce, fresh for every write |
//! | 16 | 16 | GCM tag |
//! | 32 | 4096 (page) / 4112 (header) | ciphertext |
//!
//! Header-copy plaintext is `sequence u64 ‖ high_water u64 ‖ logical page 0 (4096 bytes)`,
//! where `high_water` is one past the highest logical page index (≥ 1) ever written when the
//! copy was written (0 if none), lowered when the file shrinks below it.
//!
//! AAD (30 bytes) = `file_id [16] ‖ format version u16 ‖ block index u64 ‖ key_id u32`, where
//! the block index is the logical page number for page blocks and 2^64−2 / 2^64−1 for header
//! copies A / B. A block moved to another position, another file, or relabelled with
//! another key id fails authentication.
//!
//! ## File ids
//!
//! Every encrypted file of a database is bound to a 16-byte `file_id`, in its preamble, in
//! every block's AAD and in every empty-page marker's tag:
//!
//! * the main data file `fhirkeep.redb`: `file_id = db_id` (the key header's), so files
//!   written before auxiliary files existed are unchanged byte for byte;
//! * an auxiliary file (derived data such as the search index, `DIR/<name>.redb`):
//!   `file_id = first 16 bytes of BLAKE3-derive_key("fhirkeep aux file id v1", db_id ‖ name)`
//!   ([`aux_file_id`]). `db_id` has a fixed length, so `db_id ‖ name` is unambiguous.
//!
//! All files of a database share its data keys, so without distinct ids a block of the store
//! could be copied into an auxiliary file at the same index (or back) and authenticate.
//!
//! ## Zero blocks
//!
//! redb requires space added by `set_len` to read as zeros, and growing the file yields
//! all-zero physical blocks. An all-zero block (it can never be a real encrypted block,
//! whose `key_id` is ≥ 1) at a page index ≥ the header's `high_water` (never written)
//! therefore reads as a zero page. An all-zero block *below* `high_water` was written and
//! must hold a real block, so it fails authentication like any other damaged block (redb
//! does not verify page checksums on ordinary reads, so a zero page must never reach it).
//! This reveals which pages at or above `high_water` were never written, and `high_water`
//! itself (the file length already bounds it).

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::AeadInOut;

use super::keys::Keyring;

/// Logical page size (redb's page size).
pub const PAGE_SIZE: usize = 4096;
/// Bytes in front of each ciphertext: key id, nonce, tag.
pub const BLOCK_OVERHEAD: usize = 32;
/// Physical size of a format-1 page block (format 2: its prefix and ciphertext, apart).
pub const PAGE_BLOCK_SIZE: usize = PAGE_SIZE + BLOCK_OVERHEAD;
/// Offset of page 0 in a header copy's plaintext (after sequence and high-water mark).
pub const HEADER_PAGE0_OFFSET: usize = 16;
/// Plaintext size of a header copy: sequence number + high-water mark + page 0.
pub const HEADER_PLAIN_SIZE: usize = HEADER_PAGE0_OFFSET + PAGE_SIZE;
/// Physical size of a header copy block.
pub const HEADER_BLOCK_SIZE: usize = HEADER_PLAIN_SIZE + BLOCK_OVERHEAD;
/// Size of the plaintext preamble.
pub const PREAMBLE_SIZE: usize = 64;
/// Format 1: physical offset of header copy A.
pub const HEADER_A_OFFSET: u64 = PREAMBLE_SIZE as u64;
/// Format 1: physical offset of header copy B.
pub const HEADER_B_OFFSET: u64 = HEADER_A_OFFSET + HEADER_BLOCK_SIZE as u64;
/// Format 1: physical offset of the block of logical page 1.
pub const PAGES_OFFSET: u64 = HEADER_B_OFFSET + HEADER_BLOCK_SIZE as u64;
/// Physical format version of new files ([`PageFormat::NEWEST`]).
pub const FORMAT_VERSION: u16 = 2;
/// Size of one entry (key id, nonce, tag) of a format-2 page.
pub const ENTRY_SIZE: usize = BLOCK_OVERHEAD;
/// Format 2: logical pages per group (one entry page in front of them).
pub const PAGES_PER_GROUP: u64 = (PAGE_SIZE / ENTRY_SIZE) as u64;
/// Format 2: physical offset of header copy A.
pub const V2_HEADER_A_OFFSET: u64 = PAGE_SIZE as u64;
/// Format 2: physical offset of header copy B.
pub const V2_HEADER_B_OFFSET: u64 = 3 * PAGE_SIZE as u64;
/// Format 2: physical offset of the first group (its entry page).
pub const V2_GROUPS_OFFSET: u64 = 5 * PAGE_SIZE as u64;
/// Format 2: physical size of a whole group (entry page + 128 pages).
pub const V2_GROUP_SPAN: u64 = (PAGES_PER_GROUP + 1) * PAGE_SIZE as u64;

/// The physical format of a file, from its preamble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageFormat {
    /// Format 1: each page a contiguous 4128-byte block (prefix ‖ ciphertext).
    V1,
    /// Format 2: 4096-aligned ciphertext; prefixes (entries) in an entry page per group.
    V2,
}

impl PageFormat {
    /// The format of new files.
    pub const NEWEST: PageFormat = PageFormat::V2;

    /// The version number in the preamble and in every AAD.
    pub fn version(self) -> u16 {
        match self {
            PageFormat::V1 => 1,
            PageFormat::V2 => 2,
        }
    }

    fn from_version(version: u16) -> Option<PageFormat> {
        match version {
            1 => Some(PageFormat::V1),
            2 => Some(PageFormat::V2),
            _ => None,
        }
    }

    /// Physical offset of header copy A (`b = false`) or B.
    pub fn header_offset(self, b: bool) -> u64 {
        match (self, b) {
            (PageFormat::V1, false) => HEADER_A_OFFSET,
            (PageFormat::V1, true) => HEADER_B_OFFSET,
            (PageFormat::V2, false) => V2_HEADER_A_OFFSET,
            (PageFormat::V2, true) => V2_HEADER_B_OFFSET,
        }
    }

    /// Physical length of a file with no page: the preamble (format 2 pads it to a page).
    pub fn empty_len(self) -> u64 {
        match self {
            PageFormat::V1 => PREAMBLE_SIZE as u64,
            PageFormat::V2 => PAGE_SIZE as u64,
        }
    }

    /// Physical offset where the pages ≥ 1 begin (after both header copies).
    pub fn pages_offset(self) -> u64 {
        match self {
            PageFormat::V1 => PAGES_OFFSET,
            PageFormat::V2 => V2_GROUPS_OFFSET,
        }
    }

    /// Physical length for a logical length (a multiple of 4096).
    pub fn physical_len(self, logical: u64) -> u64 {
        let pages = logical / PAGE_SIZE as u64;
        match (self, pages) {
            (_, 0) => self.empty_len(),
            (PageFormat::V1, _) => page_block_offset(pages),
            (PageFormat::V2, _) => {
                let data = pages - 1;
                let (groups, rest) = (data / PAGES_PER_GROUP, data % PAGES_PER_GROUP);
                let partial = if rest == 0 {
                    0
                } else {
                    (rest + 1) * PAGE_SIZE as u64
                };
                V2_GROUPS_OFFSET + groups * V2_GROUP_SPAN + partial
            }
        }
    }

    /// Logical length for a physical length, or `None` if it is not a valid boundary.
    pub fn logical_len(self, physical: u64) -> Option<u64> {
        if physical == self.empty_len() {
            return Some(0);
        }
        match self {
            PageFormat::V1 => logical_len(physical),
            PageFormat::V2 => {
                let rest = physical.checked_sub(V2_GROUPS_OFFSET)?;
                let (groups, tail) = (rest / V2_GROUP_SPAN, rest % V2_GROUP_SPAN);
                // A partial group has its entry page and at least one page.
                if !tail.is_multiple_of(PAGE_SIZE as u64) || tail == PAGE_SIZE as u64 {
                    return None;
                }
                let partial = (tail / PAGE_SIZE as u64).saturating_sub(1);
                Some((groups * PAGES_PER_GROUP + partial + 1) * PAGE_SIZE as u64)
            }
        }
    }
}

/// Format 2: the group of logical page `page` (≥ 1) and its slot in the group's entry page.
pub fn v2_group_of(page: u64) -> (u64, usize) {
    let data = page - 1;
    (data / PAGES_PER_GROUP, (data % PAGES_PER_GROUP) as usize)
}

/// Format 2: physical offset of the entry page of group `group`.
pub fn v2_entry_page_offset(group: u64) -> u64 {
    V2_GROUPS_OFFSET + group * V2_GROUP_SPAN
}

/// Format 2: physical offset of the entry of logical page `page` (≥ 1).
pub fn v2_entry_offset(page: u64) -> u64 {
    let (group, slot) = v2_group_of(page);
    v2_entry_page_offset(group) + (slot * ENTRY_SIZE) as u64
}

/// Format 2: physical offset of the ciphertext of logical page `page` (≥ 1).
pub fn v2_data_offset(page: u64) -> u64 {
    let (group, slot) = v2_group_of(page);
    v2_entry_page_offset(group) + (slot as u64 + 1) * PAGE_SIZE as u64
}
/// Magic bytes at offset 0.
pub const MAGIC: &[u8; 8] = b"FHKPAGE\0";
/// Pseudo block index of header copy A in the AAD.
pub const HEADER_A_INDEX: u64 = u64::MAX - 1;
/// Pseudo block index of header copy B in the AAD.
pub const HEADER_B_INDEX: u64 = u64::MAX;

/// Format 1: physical offset of the block holding logical page `page` (≥ 1).
pub fn page_block_offset(page: u64) -> u64 {
    PAGES_OFFSET + (page - 1) * PAGE_BLOCK_SIZE as u64
}

/// Format 1: physical length for a logical length (a multiple of 4096).
pub fn physical_len(logical: u64) -> u64 {
    if logical == 0 {
        PREAMBLE_SIZE as u64
    } else {
        page_block_offset(logical / PAGE_SIZE as u64)
    }
}

/// Format 1: logical length for a physical length, or `None` if it is not a valid block
/// boundary.
pub fn logical_len(physical: u64) -> Option<u64> {
    if physical == PREAMBLE_SIZE as u64 {
        return Some(0);
    }
    let rest = physical.checked_sub(PAGES_OFFSET)?;
    if !rest.is_multiple_of(PAGE_BLOCK_SIZE as u64) {
        return None;
    }
    Some((rest / PAGE_BLOCK_SIZE as u64 + 1) * PAGE_SIZE as u64)
}

/// Derivation context of auxiliary file ids.
const AUX_FILE_ID_CONTEXT: &str = "fhirkeep aux file id v1";

/// The `file_id` of the auxiliary file `name` of database `db_id`: the first 16 bytes of
/// `BLAKE3-derive_key("fhirkeep aux file id v1", db_id ‖ name)`. The main data file's
/// `file_id` is `db_id` itself.
pub fn aux_file_id(db_id: &[u8; 16], name: &str) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new_derive_key(AUX_FILE_ID_CONTEXT);
    hasher.update(db_id);
    hasher.update(name.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    id
}

/// Builds the preamble of a file in `format` with id `file_id` (the `db_id` for the main
/// data file).
pub fn encode_preamble(format: PageFormat, file_id: &[u8; 16]) -> [u8; PREAMBLE_SIZE] {
    let mut p = [0u8; PREAMBLE_SIZE];
    p[..8].copy_from_slice(MAGIC);
    p[8..10].copy_from_slice(&format.version().to_le_bytes());
    p[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    let stride = match format {
        PageFormat::V1 => PAGE_BLOCK_SIZE,
        PageFormat::V2 => PAGE_SIZE,
    };
    p[16..20].copy_from_slice(&(stride as u32).to_le_bytes());
    p[20..24].copy_from_slice(&(HEADER_BLOCK_SIZE as u32).to_le_bytes());
    p[24..40].copy_from_slice(file_id);
    if format == PageFormat::V2 {
        p[40..44].copy_from_slice(&(PAGES_PER_GROUP as u32).to_le_bytes());
    }
    let sum = blake3::hash(&p[..48]);
    p[48..64].copy_from_slice(&sum.as_bytes()[..16]);
    p
}

/// Checks a preamble and returns the file's format, or a description of the problem if it
/// is not a valid preamble for `file_id`. Descriptions contain no data.
pub fn check_preamble(p: &[u8], file_id: &[u8; 16]) -> Result<PageFormat, String> {
    if p.len() != PREAMBLE_SIZE || &p[..8] != MAGIC {
        return Err("not an encrypted fhirkeep data file (bad magic)".into());
    }
    let sum = blake3::hash(&p[..48]);
    if sum.as_bytes()[..16] != p[48..64] {
        return Err("the file preamble is damaged".into());
    }
    let version = u16::from_le_bytes([p[8], p[9]]);
    let Some(format) = PageFormat::from_version(version) else {
        return Err(format!("unsupported data file format version {version}"));
    };
    let expected = encode_preamble(format, file_id);
    if p[10..24] != expected[10..24] || p[40..48] != expected[40..48] {
        return Err("the file preamble has unsupported parameters".into());
    }
    if p[24..40] != expected[24..40] {
        return Err(
            "the data file belongs to another database, or is another of its files (file id \
             differs from the one expected from the key header)"
                .into(),
        );
    }
    Ok(format)
}

fn aad(format: PageFormat, file_id: &[u8; 16], index: u64, key_id: u32) -> [u8; 30] {
    let mut a = [0u8; 30];
    a[..16].copy_from_slice(file_id);
    a[16..18].copy_from_slice(&format.version().to_le_bytes());
    a[18..26].copy_from_slice(&index.to_le_bytes());
    a[26..30].copy_from_slice(&key_id.to_le_bytes());
    a
}

/// Whether a physical block (or a format-2 entry) is all zeros (never written).
pub fn is_zero_block(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Key id of an *empty-page marker*: a page block (format 2: an entry) that stands for a
/// page redb never wrote, below the high-water mark. No data key has id 0.
pub const EMPTY_KEY_ID: u32 = 0;

/// Tag of the empty-page marker of page `index`: BLAKE3 keyed with a subkey of the data key,
/// over the same AAD as a real block with key id 0, truncated to 16 bytes.
fn empty_tag(format: PageFormat, key: &[u8; 32], file_id: &[u8; 16], index: u64) -> [u8; 16] {
    let hash = blake3::keyed_hash(key, &aad(format, file_id, index, EMPTY_KEY_ID));
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&hash.as_bytes()[..16]);
    tag
}

/// The key of empty-page marker tags (a subkey of the keyring's derivation key).
pub(crate) fn empty_marker_key(keyring: &Keyring) -> zeroize::Zeroizing<[u8; 32]> {
    keyring.derive_subkey("empty page marker v1")
}

/// Format 1: writes empty-page markers for pages `first, first + 1, ...` into `blocks` (a
/// whole number of page blocks). A marker costs a keyed hash, not an encryption, and no
/// nonce: the page content is known (zeros), only its authenticity matters.
pub(crate) fn seal_empty_pages(
    keyring: &Keyring,
    file_id: &[u8; 16],
    first: u64,
    blocks: &mut [u8],
) {
    let key = empty_marker_key(keyring);
    for (k, block) in blocks.chunks_exact_mut(PAGE_BLOCK_SIZE).enumerate() {
        block.fill(0);
        let tag = empty_tag(PageFormat::V1, &key, file_id, first + k as u64);
        block[16..32].copy_from_slice(&tag);
    }
}

/// Format 2: the entry of the empty-page marker of page `index`, with `key` from
/// [`empty_marker_key`]. The page's ciphertext area is neither written nor read.
pub(crate) fn empty_entry(key: &[u8; 32], file_id: &[u8; 16], index: u64) -> [u8; ENTRY_SIZE] {
    let mut entry = [0u8; ENTRY_SIZE];
    entry[16..32].copy_from_slice(&empty_tag(PageFormat::V2, key, file_id, index));
    entry
}

/// Whether `prefix` (the first 32 bytes of a block, or an entry) is the authentic empty-page
/// marker of page `index`.
fn is_empty_marker(
    format: PageFormat,
    keyring: &Keyring,
    file_id: &[u8; 16],
    index: u64,
    prefix: &[u8],
) -> bool {
    use subtle::ConstantTimeEq;
    if prefix.len() != BLOCK_OVERHEAD || !prefix[..16].iter().all(|&b| b == 0) {
        return false;
    }
    let expected = empty_tag(format, &empty_marker_key(keyring), file_id, index);
    bool::from(expected.ct_eq(&prefix[16..32]))
}

/// Format 1: whether `block` is the authentic empty-page marker of page `index`.
fn is_empty_marker_block(keyring: &Keyring, file_id: &[u8; 16], index: u64, block: &[u8]) -> bool {
    block.len() == PAGE_BLOCK_SIZE
        && block[BLOCK_OVERHEAD..].iter().all(|&b| b == 0)
        && is_empty_marker(
            PageFormat::V1,
            keyring,
            file_id,
            index,
            &block[..BLOCK_OVERHEAD],
        )
}

/// Why a block could not be encrypted.
#[derive(Debug)]
pub(crate) enum SealError {
    /// The random number generator failed.
    Random,
    /// Internal error (unknown key id, AEAD length limits).
    Internal,
}

/// Encrypts `body` in place with a fresh random nonce and writes key id, nonce and tag into
/// `head` (32 bytes). The caller must already have counted the encryption with
/// [`Keyring::consume_nonces`].
fn seal_detached(
    format: PageFormat,
    keyring: &Keyring,
    file_id: &[u8; 16],
    key_id: u32,
    index: u64,
    head: &mut [u8],
    body: &mut [u8],
) -> Result<(), SealError> {
    let cipher: &Aes256Gcm = keyring.cipher(key_id).ok_or(SealError::Internal)?;
    if head.len() != BLOCK_OVERHEAD {
        return Err(SealError::Internal);
    }
    head[..4].copy_from_slice(&key_id.to_le_bytes());
    getrandom::fill(&mut head[4..16]).map_err(|_| SealError::Random)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&head[4..16]);
    let tag = cipher
        .encrypt_inout_detached(
            &nonce.into(),
            &aad(format, file_id, index, key_id),
            body.into(),
        )
        .map_err(|_| SealError::Internal)?;
    head[16..32].copy_from_slice(&tag);
    Ok(())
}

/// Decrypts `body` in place with the key id, nonce and tag in `head`. False if it does not
/// authenticate (the body is then garbage: the callers zero it).
fn open_detached(
    format: PageFormat,
    keyring: &Keyring,
    file_id: &[u8; 16],
    index: u64,
    head: &[u8],
    body: &mut [u8],
) -> bool {
    if head.len() != BLOCK_OVERHEAD {
        return false;
    }
    let key_id = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let Some(cipher) = keyring.cipher(key_id) else {
        return false;
    };
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&head[4..16]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&head[16..32]);
    cipher
        .decrypt_inout_detached(
            &nonce.into(),
            &aad(format, file_id, index, key_id),
            body.into(),
            &tag.into(),
        )
        .is_ok()
}

/// Encrypts `plain` into `block` (`block.len() == plain.len() + 32`) with a fresh random
/// nonce: a format-1 page block, or a header copy of either format. The caller must already
/// have counted the encryption with [`Keyring::consume_nonces`].
pub(crate) fn seal_into(
    format: PageFormat,
    keyring: &Keyring,
    file_id: &[u8; 16],
    key_id: u32,
    index: u64,
    plain: &[u8],
    block: &mut [u8],
) -> Result<(), SealError> {
    if block.len() != plain.len() + BLOCK_OVERHEAD {
        return Err(SealError::Internal);
    }
    let (head, body) = block.split_at_mut(BLOCK_OVERHEAD);
    body.copy_from_slice(plain);
    seal_detached(format, keyring, file_id, key_id, index, head, body)
}

/// Encrypts `block[32..]` in place (the plaintext is already there).
pub(crate) fn seal_in_place(
    format: PageFormat,
    keyring: &Keyring,
    file_id: &[u8; 16],
    key_id: u32,
    index: u64,
    block: &mut [u8],
) -> Result<(), SealError> {
    if block.len() < BLOCK_OVERHEAD {
        return Err(SealError::Internal);
    }
    let (head, body) = block.split_at_mut(BLOCK_OVERHEAD);
    seal_detached(format, keyring, file_id, key_id, index, head, body)
}

/// Format 2: encrypts the 4096-byte `page` in place and fills its `entry`.
pub(crate) fn seal_page(
    keyring: &Keyring,
    file_id: &[u8; 16],
    key_id: u32,
    index: u64,
    page: &mut [u8],
    entry: &mut [u8; ENTRY_SIZE],
) -> Result<(), SealError> {
    seal_detached(PageFormat::V2, keyring, file_id, key_id, index, entry, page)
}

/// Format 2: decrypts the 4096-byte `page` in place with its `entry` (an empty-page marker's
/// entry gives a zero page). Returns false, and zeroes `page`, if it does not authenticate at
/// position `index`. An all-zero entry is the caller's to interpret (it fails here).
#[must_use]
pub(crate) fn open_page(
    keyring: &Keyring,
    file_id: &[u8; 16],
    index: u64,
    entry: &[u8; ENTRY_SIZE],
    page: &mut [u8],
) -> bool {
    let ok = if entry[..4] == EMPTY_KEY_ID.to_le_bytes() {
        page.fill(0);
        is_empty_marker(PageFormat::V2, keyring, file_id, index, entry)
    } else {
        open_detached(PageFormat::V2, keyring, file_id, index, entry, page)
    };
    if !ok {
        page.fill(0);
    }
    ok
}

/// Decrypts `block` into `out` (`out.len() == block.len() - 32`): a format-1 page block or a
/// header copy. Returns false (and zeroes `out`) if the block does not authenticate at
/// position `index`.
#[must_use]
pub(crate) fn open_into(
    format: PageFormat,
    keyring: &Keyring,
    file_id: &[u8; 16],
    index: u64,
    block: &[u8],
    out: &mut [u8],
) -> bool {
    let ok = block.len() == out.len() + BLOCK_OVERHEAD && {
        let (head, body) = block.split_at(BLOCK_OVERHEAD);
        if head[..4] == EMPTY_KEY_ID.to_le_bytes() {
            out.fill(0);
            format == PageFormat::V1 && is_empty_marker_block(keyring, file_id, index, block)
        } else {
            out.copy_from_slice(body);
            open_detached(format, keyring, file_id, index, head, out)
        }
    };
    if !ok {
        out.fill(0);
    }
    ok
}

/// Decrypts `block[32..]` in place (a format-1 page block). On failure the plaintext area is
/// zeroed.
#[must_use]
pub(crate) fn open_in_place(
    keyring: &Keyring,
    file_id: &[u8; 16],
    index: u64,
    block: &mut [u8],
) -> bool {
    if block.len() < BLOCK_OVERHEAD {
        return false;
    }
    if block.get(..4) == Some(&EMPTY_KEY_ID.to_le_bytes()[..]) {
        let ok = is_empty_marker_block(keyring, file_id, index, block);
        block[BLOCK_OVERHEAD..].fill(0);
        return ok;
    }
    let (head, body) = block.split_at_mut(BLOCK_OVERHEAD);
    let ok = open_detached(PageFormat::V1, keyring, file_id, index, head, body);
    if !ok {
        body.fill(0);
    }
    ok
}

/// The key id a (non-zero) block names.
pub(crate) fn block_key_id(block: &[u8]) -> Option<u32> {
    let b = block.get(..4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Tests only: the blocks of a file image, in either format. A page's *block* is its 32-byte
/// prefix (format 2: its entry) followed by its 4096 bytes of ciphertext, wherever they are.
#[cfg(test)]
pub(crate) mod image {
    use std::ops::Range;

    use super::*;

    /// The format named by an image's preamble.
    pub(crate) fn format(bytes: &[u8]) -> PageFormat {
        match u16::from_le_bytes([bytes[8], bytes[9]]) {
            1 => PageFormat::V1,
            _ => PageFormat::V2,
        }
    }

    /// How many pages (≥ 1) have their whole block in the image.
    pub(crate) fn page_count(bytes: &[u8]) -> u64 {
        let len = bytes.len() as u64;
        match format(bytes) {
            PageFormat::V1 => len.saturating_sub(PAGES_OFFSET) / PAGE_BLOCK_SIZE as u64,
            PageFormat::V2 => {
                let Some(rest) = len.checked_sub(V2_GROUPS_OFFSET) else {
                    return 0;
                };
                let tail = (rest % V2_GROUP_SPAN) / PAGE_SIZE as u64;
                rest / V2_GROUP_SPAN * PAGES_PER_GROUP + tail.saturating_sub(1)
            }
        }
    }

    /// Where page `pg`'s prefix (entry) and ciphertext are.
    pub(crate) fn parts(bytes: &[u8], pg: u64) -> [Range<usize>; 2] {
        match format(bytes) {
            PageFormat::V1 => {
                let at = page_block_offset(pg) as usize;
                [
                    at..at + BLOCK_OVERHEAD,
                    at + BLOCK_OVERHEAD..at + PAGE_BLOCK_SIZE,
                ]
            }
            PageFormat::V2 => {
                let (entry, data) = (v2_entry_offset(pg) as usize, v2_data_offset(pg) as usize);
                [entry..entry + ENTRY_SIZE, data..data + PAGE_SIZE]
            }
        }
    }

    /// The file offset of byte `within` (< 4128) of page `pg`'s block.
    pub(crate) fn block_byte(bytes: &[u8], pg: u64, within: usize) -> usize {
        let [head, body] = parts(bytes, pg);
        if within < BLOCK_OVERHEAD {
            head.start + within
        } else {
            body.start + within - BLOCK_OVERHEAD
        }
    }

    /// A copy of page `pg`'s block (4128 bytes).
    pub(crate) fn block(bytes: &[u8], pg: u64) -> Vec<u8> {
        let [head, body] = parts(bytes, pg);
        [&bytes[head], &bytes[body]].concat()
    }

    /// Replaces page `pg`'s block with `block` (4128 bytes).
    pub(crate) fn put_block(bytes: &mut [u8], pg: u64, block: &[u8]) {
        let [head, body] = parts(bytes, pg);
        bytes[head].copy_from_slice(&block[..BLOCK_OVERHEAD]);
        bytes[body].copy_from_slice(&block[BLOCK_OVERHEAD..]);
    }

    /// Whether page `pg` was ever written (its prefix, or entry, is not all zeros).
    pub(crate) fn is_written(bytes: &[u8], pg: u64) -> bool {
        let [head, _] = parts(bytes, pg);
        !is_zero_block(&bytes[head])
    }

    /// Whether page `pg` holds an empty-page marker (key id 0). In format 2 a marker is an
    /// entry only, and the page's ciphertext area is never read.
    pub(crate) fn is_marker(bytes: &[u8], pg: u64) -> bool {
        let [head, _] = parts(bytes, pg);
        is_written(bytes, pg) && bytes[head][..4] == EMPTY_KEY_ID.to_le_bytes()
    }

    /// The pages (≥ 1) that were ever written.
    pub(crate) fn written_pages(bytes: &[u8]) -> Vec<u64> {
        (1..=page_count(bytes))
            .filter(|&pg| is_written(bytes, pg))
            .collect()
    }

    /// Where header copy A (`b = false`) or B is.
    pub(crate) fn header(bytes: &[u8], b: bool) -> Range<usize> {
        let at = format(bytes).header_offset(b) as usize;
        at..at + HEADER_BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_1_length_mapping_roundtrips() {
        assert_eq!(physical_len(0), 64);
        assert_eq!(logical_len(64), Some(0));
        assert_eq!(physical_len(4096), PAGES_OFFSET);
        assert_eq!(HEADER_BLOCK_SIZE, 4144);
        assert_eq!(HEADER_B_OFFSET, 4208);
        assert_eq!(PAGES_OFFSET, 8352);
        for pages in 1..50u64 {
            let l = pages * 4096;
            assert_eq!(logical_len(physical_len(l)), Some(l));
            assert_eq!(logical_len(physical_len(l) + 1), None);
            assert_eq!(logical_len(physical_len(l) - 1), None);
        }
        assert_eq!(logical_len(0), None);
        assert_eq!(logical_len(100), None);
    }

    #[test]
    fn format_2_length_mapping_roundtrips() {
        let f = PageFormat::V2;
        assert_eq!(f.physical_len(0), 4096);
        assert_eq!(f.logical_len(4096), Some(0));
        assert_eq!(f.physical_len(4096), V2_GROUPS_OFFSET);
        // Page 1 is the first page of group 0, after its entry page.
        assert_eq!(f.physical_len(2 * 4096), V2_GROUPS_OFFSET + 2 * 4096);
        assert_eq!(v2_data_offset(1), V2_GROUPS_OFFSET + 4096);
        assert_eq!(v2_data_offset(128), V2_GROUPS_OFFSET + 128 * 4096);
        assert_eq!(v2_data_offset(129), V2_GROUPS_OFFSET + V2_GROUP_SPAN + 4096);
        assert_eq!(v2_entry_offset(129), V2_GROUPS_OFFSET + V2_GROUP_SPAN);
        assert_eq!(v2_entry_offset(130), V2_GROUPS_OFFSET + V2_GROUP_SPAN + 32);
        for pages in 1..600u64 {
            let l = pages * 4096;
            let p = f.physical_len(l);
            assert_eq!(f.logical_len(p), Some(l), "{pages} pages");
            assert_eq!(f.logical_len(p + 1), None);
            assert_eq!(f.logical_len(p - 1), None);
            if pages > 1 {
                // The last page's ciphertext ends the file, and is 4096-aligned.
                assert_eq!(v2_data_offset(pages - 1) + 4096, p);
                assert!(v2_data_offset(pages - 1).is_multiple_of(4096));
            }
        }
        // An entry page with no page after it is not a valid end.
        assert_eq!(f.logical_len(V2_GROUPS_OFFSET + V2_GROUP_SPAN + 4096), None);
        assert_eq!(f.logical_len(0), None);
        assert_eq!(f.logical_len(8192), None);
    }

    #[test]
    fn preamble_checks() {
        assert_eq!(PageFormat::NEWEST.version(), FORMAT_VERSION);
        let id = [7u8; 16];
        for format in [PageFormat::V1, PageFormat::V2] {
            let p = encode_preamble(format, &id);
            assert_eq!(check_preamble(&p, &id), Ok(format));
            assert!(check_preamble(&p, &[8u8; 16]).is_err());
            for i in 0..PREAMBLE_SIZE {
                let mut bad = p;
                bad[i] ^= 0x40;
                assert!(check_preamble(&bad, &id).is_err(), "byte {i}");
            }
        }
    }

    #[test]
    fn format_2_pages_and_markers_are_bound_to_their_position_and_format() {
        let dir = tempfile::TempDir::new().unwrap();
        let keyring = Keyring::create(
            dir.path(),
            &super::super::keys::KeySource::Passphrase(zeroize::Zeroizing::new("pw".into())),
            super::super::keys::KdfParams::fast_insecure(),
        )
        .unwrap();
        let id = keyring.db_id();
        let key_id = keyring.consume_nonces(2).unwrap();
        let mut page = vec![7u8; PAGE_SIZE];
        let mut entry = [0u8; ENTRY_SIZE];
        seal_page(&keyring, &id, key_id, 5, &mut page, &mut entry).unwrap();
        assert_ne!(page, vec![7u8; PAGE_SIZE]);
        let sealed = page.clone();
        assert!(open_page(&keyring, &id, 5, &entry, &mut page));
        assert_eq!(page, vec![7u8; PAGE_SIZE]);
        let mut moved = sealed.clone();
        assert!(!open_page(&keyring, &id, 6, &entry, &mut moved));
        assert!(moved.iter().all(|&b| b == 0), "a failed page is zeroed");
        // The same bytes as a format-1 block do not authenticate (the AAD names the format).
        let mut block = entry.to_vec();
        block.extend_from_slice(&sealed);
        let mut out = vec![0u8; PAGE_SIZE];
        assert!(!open_into(
            PageFormat::V1,
            &keyring,
            &id,
            5,
            &block,
            &mut out
        ));
        // Markers: bound to the page, and not valid for format 1.
        let key = empty_marker_key(&keyring);
        let marker = empty_entry(&key, &id, 9);
        let mut zero = vec![1u8; PAGE_SIZE];
        assert!(open_page(&keyring, &id, 9, &marker, &mut zero));
        assert!(zero.iter().all(|&b| b == 0));
        assert!(!open_page(&keyring, &id, 10, &marker, &mut zero));
        let mut v1_block = marker.to_vec();
        v1_block.extend_from_slice(&[0u8; PAGE_SIZE]);
        assert!(!open_into(
            PageFormat::V1,
            &keyring,
            &id,
            9,
            &v1_block,
            &mut out
        ));
        // An all-zero entry never authenticates.
        assert!(!open_page(&keyring, &id, 9, &[0u8; ENTRY_SIZE], &mut zero));
    }
}
