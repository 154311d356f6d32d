//! The physical format of an encrypted database file: preamble, the two copies of redb's
//! header page, and one AES-256-GCM block per 4 KiB logical page.
//!
//! # Layout (format version 1, all integers little-endian)
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
use aes_gcm::aead::inout::InOutBuf;

use super::keys::Keyring;

/// Logical page size (redb's page size).
pub const PAGE_SIZE: usize = 4096;
/// Bytes in front of each ciphertext: key id, nonce, tag.
pub const BLOCK_OVERHEAD: usize = 32;
/// Physical size of a page block.
pub const PAGE_BLOCK_SIZE: usize = PAGE_SIZE + BLOCK_OVERHEAD;
/// Offset of page 0 in a header copy's plaintext (after sequence and high-water mark).
pub const HEADER_PAGE0_OFFSET: usize = 16;
/// Plaintext size of a header copy: sequence number + high-water mark + page 0.
pub const HEADER_PLAIN_SIZE: usize = HEADER_PAGE0_OFFSET + PAGE_SIZE;
/// Physical size of a header copy block.
pub const HEADER_BLOCK_SIZE: usize = HEADER_PLAIN_SIZE + BLOCK_OVERHEAD;
/// Size of the plaintext preamble.
pub const PREAMBLE_SIZE: usize = 64;
/// Physical offset of header copy A.
pub const HEADER_A_OFFSET: u64 = PREAMBLE_SIZE as u64;
/// Physical offset of header copy B.
pub const HEADER_B_OFFSET: u64 = HEADER_A_OFFSET + HEADER_BLOCK_SIZE as u64;
/// Physical offset of the block of logical page 1.
pub const PAGES_OFFSET: u64 = HEADER_B_OFFSET + HEADER_BLOCK_SIZE as u64;
/// Physical format version.
pub const FORMAT_VERSION: u16 = 1;
/// Magic bytes at offset 0.
pub const MAGIC: &[u8; 8] = b"FHKPAGE\0";
/// Pseudo block index of header copy A in the AAD.
pub const HEADER_A_INDEX: u64 = u64::MAX - 1;
/// Pseudo block index of header copy B in the AAD.
pub const HEADER_B_INDEX: u64 = u64::MAX;

/// Physical offset of the block holding logical page `page` (≥ 1).
pub fn page_block_offset(page: u64) -> u64 {
    PAGES_OFFSET + (page - 1) * PAGE_BLOCK_SIZE as u64
}

/// Physical length for a logical length (a multiple of 4096).
pub fn physical_len(logical: u64) -> u64 {
    if logical == 0 {
        PREAMBLE_SIZE as u64
    } else {
        page_block_offset(logical / PAGE_SIZE as u64)
    }
}

/// Logical length for a physical length, or `None` if it is not a valid block boundary.
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

/// Builds the preamble of a file with id `file_id` (the `db_id` for the main data file).
pub fn encode_preamble(file_id: &[u8; 16]) -> [u8; PREAMBLE_SIZE] {
    let mut p = [0u8; PREAMBLE_SIZE];
    p[..8].copy_from_slice(MAGIC);
    p[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    p[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    p[16..20].copy_from_slice(&(PAGE_BLOCK_SIZE as u32).to_le_bytes());
    p[20..24].copy_from_slice(&(HEADER_BLOCK_SIZE as u32).to_le_bytes());
    p[24..40].copy_from_slice(file_id);
    let sum = blake3::hash(&p[..48]);
    p[48..64].copy_from_slice(&sum.as_bytes()[..16]);
    p
}

/// Checks a preamble; returns a description of the problem, or `None` if it is valid for
/// `file_id`. Descriptions contain no data.
pub fn check_preamble(p: &[u8], file_id: &[u8; 16]) -> Option<String> {
    if p.len() != PREAMBLE_SIZE || &p[..8] != MAGIC {
        return Some("not an encrypted fhirkeep data file (bad magic)".into());
    }
    let sum = blake3::hash(&p[..48]);
    if sum.as_bytes()[..16] != p[48..64] {
        return Some("the file preamble is damaged".into());
    }
    let version = u16::from_le_bytes([p[8], p[9]]);
    if version != FORMAT_VERSION {
        return Some(format!("unsupported data file format version {version}"));
    }
    let expected = encode_preamble(file_id);
    if p[10..24] != expected[10..24] || p[40..48] != expected[40..48] {
        return Some("the file preamble has unsupported parameters".into());
    }
    if p[24..40] != expected[24..40] {
        return Some(
            "the data file belongs to another database, or is another of its files (file id \
             differs from the one expected from the key header)"
                .into(),
        );
    }
    None
}

fn aad(file_id: &[u8; 16], index: u64, key_id: u32) -> [u8; 30] {
    let mut a = [0u8; 30];
    a[..16].copy_from_slice(file_id);
    a[16..18].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    a[18..26].copy_from_slice(&index.to_le_bytes());
    a[26..30].copy_from_slice(&key_id.to_le_bytes());
    a
}

/// Whether a physical block is all zeros (never written).
pub fn is_zero_block(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Key id of an *empty-page marker*: a page block that stands for a page redb never wrote,
/// below the high-water mark. No data key has id 0.
pub const EMPTY_KEY_ID: u32 = 0;

/// Tag of the empty-page marker of page `index`: BLAKE3 keyed with a subkey of the data key,
/// over the same AAD as a real block with key id 0, truncated to 16 bytes.
fn empty_tag(key: &[u8; 32], file_id: &[u8; 16], index: u64) -> [u8; 16] {
    let hash = blake3::keyed_hash(key, &aad(file_id, index, EMPTY_KEY_ID));
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&hash.as_bytes()[..16]);
    tag
}

fn empty_marker_key(keyring: &Keyring) -> zeroize::Zeroizing<[u8; 32]> {
    keyring.derive_subkey("empty page marker v1")
}

/// Writes empty-page markers for pages `first, first + 1, ...` into `blocks` (a whole number
/// of page blocks). A marker costs a keyed hash, not an encryption, and no nonce: the page
/// content is known (zeros), only its authenticity matters.
pub(crate) fn seal_empty_pages(
    keyring: &Keyring,
    file_id: &[u8; 16],
    first: u64,
    blocks: &mut [u8],
) {
    let key = empty_marker_key(keyring);
    for (k, block) in blocks.chunks_exact_mut(PAGE_BLOCK_SIZE).enumerate() {
        block.fill(0);
        let tag = empty_tag(&key, file_id, first + k as u64);
        block[16..32].copy_from_slice(&tag);
    }
}

/// Whether `block` is the authentic empty-page marker of page `index`.
fn is_empty_marker(keyring: &Keyring, file_id: &[u8; 16], index: u64, block: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    if block.len() != PAGE_BLOCK_SIZE
        || !block[..16].iter().all(|&b| b == 0)
        || !block[BLOCK_OVERHEAD..].iter().all(|&b| b == 0)
    {
        return false;
    }
    let expected = empty_tag(&empty_marker_key(keyring), file_id, index);
    bool::from(expected.ct_eq(&block[16..32]))
}

/// Why a block could not be encrypted.
#[derive(Debug)]
pub(crate) enum SealError {
    /// The random number generator failed.
    Random,
    /// Internal error (unknown key id, AEAD length limits).
    Internal,
}

/// Encrypts `plain` into `block` (`block.len() == plain.len() + 32`) with a fresh random
/// nonce. The caller must already have counted the encryption with
/// [`Keyring::consume_nonces`].
pub(crate) fn seal_into(
    keyring: &Keyring,
    file_id: &[u8; 16],
    key_id: u32,
    index: u64,
    plain: &[u8],
    block: &mut [u8],
) -> Result<(), SealError> {
    let cipher: &Aes256Gcm = keyring.cipher(key_id).ok_or(SealError::Internal)?;
    if block.len() != plain.len() + BLOCK_OVERHEAD {
        return Err(SealError::Internal);
    }
    let (head, body) = block.split_at_mut(BLOCK_OVERHEAD);
    head[..4].copy_from_slice(&key_id.to_le_bytes());
    getrandom::fill(&mut head[4..16]).map_err(|_| SealError::Random)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&head[4..16]);
    let buf = InOutBuf::new(plain, body).map_err(|_| SealError::Internal)?;
    let tag = cipher
        .encrypt_inout_detached(&nonce.into(), &aad(file_id, index, key_id), buf)
        .map_err(|_| SealError::Internal)?;
    head[16..32].copy_from_slice(&tag);
    Ok(())
}

/// Encrypts `block[32..]` in place (the plaintext is already there).
pub(crate) fn seal_in_place(
    keyring: &Keyring,
    file_id: &[u8; 16],
    key_id: u32,
    index: u64,
    block: &mut [u8],
) -> Result<(), SealError> {
    let cipher: &Aes256Gcm = keyring.cipher(key_id).ok_or(SealError::Internal)?;
    if block.len() < BLOCK_OVERHEAD {
        return Err(SealError::Internal);
    }
    let (head, body) = block.split_at_mut(BLOCK_OVERHEAD);
    head[..4].copy_from_slice(&key_id.to_le_bytes());
    getrandom::fill(&mut head[4..16]).map_err(|_| SealError::Random)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&head[4..16]);
    let tag = cipher
        .encrypt_inout_detached(&nonce.into(), &aad(file_id, index, key_id), body.into())
        .map_err(|_| SealError::Internal)?;
    head[16..32].copy_from_slice(&tag);
    Ok(())
}

/// Decrypts `block` into `out` (`out.len() == block.len() - 32`). Returns false (and zeroes
/// `out`) if the block does not authenticate at position `index`.
#[must_use]
pub(crate) fn open_into(
    keyring: &Keyring,
    file_id: &[u8; 16],
    index: u64,
    block: &[u8],
    out: &mut [u8],
) -> bool {
    let ok = open_into_inner(keyring, file_id, index, block, out);
    if !ok {
        out.fill(0);
    }
    ok
}

fn open_into_inner(
    keyring: &Keyring,
    file_id: &[u8; 16],
    index: u64,
    block: &[u8],
    out: &mut [u8],
) -> bool {
    if block.len() != out.len() + BLOCK_OVERHEAD {
        return false;
    }
    let (head, body) = block.split_at(BLOCK_OVERHEAD);
    let key_id = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if key_id == EMPTY_KEY_ID {
        out.fill(0);
        return is_empty_marker(keyring, file_id, index, block);
    }
    let Some(cipher) = keyring.cipher(key_id) else {
        return false;
    };
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&head[4..16]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&head[16..32]);
    let Ok(buf) = InOutBuf::new(body, out) else {
        return false;
    };
    cipher
        .decrypt_inout_detached(
            &nonce.into(),
            &aad(file_id, index, key_id),
            buf,
            &tag.into(),
        )
        .is_ok()
}

/// Decrypts `block[32..]` in place. On failure the plaintext area is zeroed.
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
        let ok = is_empty_marker(keyring, file_id, index, block);
        block[BLOCK_OVERHEAD..].fill(0);
        return ok;
    }
    let (head, body) = block.split_at_mut(BLOCK_OVERHEAD);
    let key_id = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let ok = match keyring.cipher(key_id) {
        Some(cipher) => {
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&head[4..16]);
            let mut tag = [0u8; 16];
            tag.copy_from_slice(&head[16..32]);
            cipher
                .decrypt_inout_detached(
                    &nonce.into(),
                    &aad(file_id, index, key_id),
                    body.into(),
                    &tag.into(),
                )
                .is_ok()
        }
        None => false,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_mapping_roundtrips() {
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
    fn preamble_checks() {
        let id = [7u8; 16];
        let p = encode_preamble(&id);
        assert!(check_preamble(&p, &id).is_none());
        assert!(check_preamble(&p, &[8u8; 16]).is_some());
        for i in 0..PREAMBLE_SIZE {
            let mut bad = p;
            bad[i] ^= 0x40;
            assert!(check_preamble(&bad, &id).is_some(), "byte {i}");
        }
    }
}
