//! Envelope keys: the key header file `fhirkeep.keys`, key-encryption-key derivation
//! (passphrase or key file), the data keys that encrypt pages, and their nonce budget.
//!
//! # Keys
//!
//! * **KEK** (key-encryption key), 32 bytes, never stored:
//!   * passphrase: `Argon2id(passphrase, salt, m_cost, t_cost, p_cost)` with a 16-byte random salt
//!     and the cost parameters stored in the header (defaults: 64 MiB, t = 3, p = 1);
//!   * key file (32 random bytes, stored as 64 lowercase hex characters plus a newline, or as
//!     exactly 32 raw bytes): `BLAKE3-derive_key("fhirkeep key-file kek v1", file key)`, so the
//!     file's bytes are never used as a key as they are.
//! * **DEKs** (data keys), 32 random bytes each, identified by a `key_id` (u32, first one = 1).
//!   They are stored wrapped: `AES-256-GCM(KEK, random 96-bit nonce, DEK,
//!   AAD = "fhirkeep key wrap v1" ‖ db_id ‖ key_id as u32 LE)`. The active DEK (the highest
//!   non-retired id) encrypts new page writes; every DEK in the header can decrypt.
//! * **Derived subkeys** ([`Keyring::derive_subkey`]) come from DEK 1, which is never removed,
//!   so they stay stable across data-key rotation and passphrase changes.
//!
//! # Key header file `DIR/fhirkeep.keys` (format version 1, all integers little-endian)
//!
//! | offset | len | field |
//! |---|---|---|
//! | 0 | 8 | magic `FHKKEYS\0` |
//! | 8 | 2 | format version, u16 = 1 |
//! | 10 | 16 | `db_id`: random per database; also part of every page block's AAD |
//! | 26 | 1 | KEK kind: 1 = passphrase (Argon2id), 2 = key file |
//! | 27 | 4 | Argon2 `m_cost` in KiB, u32 (0 for a key file) |
//! | 31 | 4 | Argon2 `t_cost`, u32 (0 for a key file) |
//! | 35 | 4 | Argon2 `p_cost`, u32 (0 for a key file) |
//! | 39 | 16 | Argon2 salt (zeros for a key file) |
//! | 55 | 4 | `n`, number of data keys, u32 (1 ..= 65536) |
//! | 59 | 73·n | data-key entries in increasing `key_id` order (below) |
//! | 59+73n | 32 | header MAC: BLAKE3 keyed hash of bytes `[0, 59+73n)`, key = `BLAKE3-derive_key("fhirkeep key header mac v1", DEK 1)` |
//! | 91+73n | 32 | checksum: BLAKE3 hash of bytes `[0, 91+73n)` |
//!
//! Data-key entry (73 bytes): `key_id` u32 (≥ 1, unique) ‖ `writes_reserved` u64 ‖ `retired`
//! u8 (0/1) ‖ wrap nonce (12 bytes) ‖ wrapped DEK (32 bytes) ‖ GCM tag (16 bytes).
//!
//! Opening checks, in order: the checksum (a damaged or truncated file gives
//! [`Error::KeyHeader`]), the structure, the KEK kind, then unwraps DEK 1: if that fails
//! authentication the key is wrong ([`Error::WrongKey`]). Then the remaining DEKs and the MAC
//! (which protects the counters and retired flags against tampering by someone without the
//! key) are checked; failures there are [`Error::KeyHeader`]. No page is read before that.
//!
//! The header is replaced atomically: write `fhirkeep.keys.tmp` (mode 0600), fsync, rename
//! over `fhirkeep.keys`, fsync the directory. Creation links the temporary file instead of
//! renaming, so an existing header is never overwritten by `create`.
//!
//! # Nonce budget
//!
//! Pages use random 96-bit GCM nonces. NIST SP 800-38D §8.3 bounds the number of invocations
//! of one key with random IVs at 2^32 (collision probability ≤ 2^-32); [`NONCE_LIMIT`] stops at
//! 2^32 − 2^24 to keep a safety margin for counts lost in crashes. Every block encryption
//! consumes one unit of the active key's counter. `writes_reserved` in the header is a
//! high-water mark: before the in-memory count passes it, the header is rewritten with
//! `writes_reserved += NONCE_RESERVATION_CHUNK`. On open the count starts at `writes_reserved`
//! (a crash may have used every reserved unit); on clean close
//! ([`Keyring::persist_counters`]) the exact count is written back. The count therefore never
//! goes backwards.
//!
//! Header updates made while a database is open re-read the file and change only the active
//! key's counter, so a concurrent [`Keyring::change_key`] is not undone. A
//! [`Keyring::rotate_data_key`] takes effect the next time the database is opened.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::{Error, Result};

/// Name of the key header file inside a database directory.
pub const KEY_HEADER_FILE: &str = "fhirkeep.keys";
const KEY_HEADER_TMP: &str = "fhirkeep.keys.tmp";

/// Number of nonce units reserved in the key header at a time.
pub const NONCE_RESERVATION_CHUNK: u64 = 65_536;

/// Maximum page encryptions per data key: 2^32 (NIST SP 800-38D bound for random 96-bit IVs)
/// minus a 2^24 safety margin.
pub const NONCE_LIMIT: u64 = (1 << 32) - (1 << 24);

const MAGIC: &[u8; 8] = b"FHKKEYS\0";
const FORMAT_VERSION: u16 = 1;
const KIND_PASSPHRASE: u8 = 1;
const KIND_KEYFILE: u8 = 2;
const FIXED_LEN: usize = 59;
const ENTRY_LEN: usize = 73;
const WRAPPED_LEN: usize = 60;
const TRAILER_LEN: usize = 64;
const MAX_KEYS: usize = 65_536;
/// Largest header we are willing to read (65536 entries fit well below this).
const MAX_HEADER_LEN: u64 = 8 << 20;
/// Caps on Argon2 parameters read from a header, so a tampered header cannot make `open`
/// allocate unbounded memory or spin forever.
const MAX_M_COST_KIB: u32 = 4 << 20;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 64;

const WRAP_AAD_PREFIX: &[u8] = b"fhirkeep key wrap v1";
const KEYFILE_CONTEXT: &str = "fhirkeep key-file kek v1";
const MAC_CONTEXT: &str = "fhirkeep key header mac v1";
const SUBKEY_CONTEXT_PREFIX: &str = "fhirkeep subkey v1 ";

/// Where the key-encryption key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<String>),
    /// A file holding a 32-byte key (64 hex characters, or 32 raw bytes).
    KeyFile(PathBuf),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
            KeySource::KeyFile(p) => f.debug_tuple("KeyFile").field(p).finish(),
        }
    }
}

/// Argon2id cost parameters for passphrase-derived keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub m_cost_kib: u32,
    /// Number of passes.
    pub t_cost: u32,
    /// Degree of parallelism.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane.
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 65_536,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// The cheapest parameters Argon2 accepts (8 KiB, 1 pass, 1 lane).
    ///
    /// **For tests only**: a passphrase protected with these can be brute-forced quickly.
    pub fn fast_insecure() -> Self {
        KdfParams {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

/// Creates a new key file at `path`: 32 random bytes written as 64 lowercase hex characters
/// and a newline, mode 0600. Fails if the file already exists.
pub fn create_key_file(path: &Path) -> Result<()> {
    let mut key = Zeroizing::new([0u8; 32]);
    fill_random(&mut key[..])?;
    let mut text = Zeroizing::new(hex::encode(&key[..]));
    text.push('\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            Error::Io(io::Error::new(
                e.kind(),
                format!("cannot create key file {}: {e}", path.display()),
            ))
        })?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        // Best effort: the key file is already complete and synced.
        let _ = File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Reads a key file: 64 hex characters (surrounding whitespace ignored) or exactly 32 bytes.
fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::KeyFileMissing {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(Error::Io(e)),
    };
    let mut buf = Zeroizing::new(Vec::with_capacity(128));
    f.take(1025).read_to_end(&mut buf)?;
    let invalid = |reason: &str| Error::KeyFileInvalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut key = Zeroizing::new([0u8; 32]);
    if buf.len() > 1024 {
        return Err(invalid("the file is far larger than a 32-byte key"));
    }
    if buf.len() == 32 {
        key.copy_from_slice(&buf);
        return Ok(key);
    }
    let trimmed = buf.trim_ascii();
    if trimmed.len() == 64 && hex::decode_to_slice(trimmed, &mut key[..]).is_ok() {
        return Ok(key);
    }
    Err(invalid(
        "expected 64 hexadecimal characters or exactly 32 raw bytes",
    ))
}

fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::Io(io::Error::other(format!(
            "random number generator failed: {e}"
        )))
    })
}

fn header_err(msg: impl Into<String>) -> Error {
    Error::KeyHeader(msg.into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the KEK is derived, as recorded in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KekSpec {
    Passphrase { params: KdfParams, salt: [u8; 16] },
    KeyFile,
}

#[derive(Clone, Debug)]
struct KeyEntry {
    id: u32,
    writes_reserved: u64,
    retired: bool,
    wrapped: [u8; WRAPPED_LEN],
}

#[derive(Clone, Debug)]
struct HeaderData {
    db_id: [u8; 16],
    kek: KekSpec,
    keys: Vec<KeyEntry>,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let end = self
            .pos
            .checked_add(N)
            .ok_or_else(|| header_err("truncated"))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or_else(|| header_err("key header is truncated"))?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        self.pos = end;
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

impl HeaderData {
    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + ENTRY_LEN * self.keys.len() + TRAILER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.db_id);
        match self.kek {
            KekSpec::Passphrase { params, salt } => {
                out.push(KIND_PASSPHRASE);
                out.extend_from_slice(&params.m_cost_kib.to_le_bytes());
                out.extend_from_slice(&params.t_cost.to_le_bytes());
                out.extend_from_slice(&params.p_cost.to_le_bytes());
                out.extend_from_slice(&salt);
            }
            KekSpec::KeyFile => {
                out.push(KIND_KEYFILE);
                out.extend_from_slice(&[0u8; 28]);
            }
        }
        // Entry count fits: it is capped at MAX_KEYS when adding keys.
        out.extend_from_slice(
            &u32::try_from(self.keys.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for k in &self.keys {
            out.extend_from_slice(&k.id.to_le_bytes());
            out.extend_from_slice(&k.writes_reserved.to_le_bytes());
            out.push(u8::from(k.retired));
            out.extend_from_slice(&k.wrapped);
        }
        out
    }

    /// Serializes with MAC and checksum.
    fn encode(&self, mac_key: &[u8; 32]) -> Vec<u8> {
        let mut out = self.body();
        let mac = blake3::keyed_hash(mac_key, &out);
        out.extend_from_slice(mac.as_bytes());
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses and checks the checksum and structure (not the MAC, which needs DEK 1).
    fn decode(bytes: &[u8]) -> Result<HeaderData> {
        if bytes.len() < FIXED_LEN + ENTRY_LEN + TRAILER_LEN {
            return Err(header_err("key header is truncated"));
        }
        let (content, sum) = bytes.split_at(bytes.len() - 32);
        let expect = blake3::hash(content);
        if !bool::from(expect.as_bytes().ct_eq(sum)) {
            return Err(header_err(
                "key header checksum mismatch: the file is damaged or truncated; restore it from a backup",
            ));
        }
        let mut c = Cursor { bytes, pos: 0 };
        if &c.take::<8>()? != MAGIC {
            return Err(header_err("not a fhirkeep key header (bad magic)"));
        }
        let version = c.u16()?;
        if version != FORMAT_VERSION {
            return Err(header_err(format!(
                "unsupported key header format version {version}"
            )));
        }
        let db_id = c.take::<16>()?;
        let kind = c.take::<1>()?[0];
        let m = c.u32()?;
        let t = c.u32()?;
        let p = c.u32()?;
        let salt = c.take::<16>()?;
        let kek = match kind {
            KIND_PASSPHRASE => {
                if m > MAX_M_COST_KIB || t > MAX_T_COST || p > MAX_P_COST {
                    return Err(header_err("Argon2 parameters out of the accepted range"));
                }
                KekSpec::Passphrase {
                    params: KdfParams {
                        m_cost_kib: m,
                        t_cost: t,
                        p_cost: p,
                    },
                    salt,
                }
            }
            KIND_KEYFILE => KekSpec::KeyFile,
            other => return Err(header_err(format!("unknown key kind {other}"))),
        };
        let n = c.u32()? as usize;
        if n == 0 || n > MAX_KEYS {
            return Err(header_err(format!("invalid number of data keys {n}")));
        }
        if bytes.len() != FIXED_LEN + n * ENTRY_LEN + TRAILER_LEN {
            return Err(header_err("key header length does not match its key count"));
        }
        let mut keys: Vec<KeyEntry> = Vec::with_capacity(n);
        for _ in 0..n {
            let id = c.u32()?;
            let writes_reserved = c.u64()?;
            let retired = match c.take::<1>()?[0] {
                0 => false,
                1 => true,
                _ => return Err(header_err("invalid retired flag")),
            };
            let wrapped = c.take::<WRAPPED_LEN>()?;
            if id == 0 || keys.last().is_some_and(|k| k.id >= id) {
                return Err(header_err("data key ids are not strictly increasing"));
            }
            keys.push(KeyEntry {
                id,
                writes_reserved,
                retired,
                wrapped,
            });
        }
        if keys.first().map(|k| k.id) != Some(1) {
            return Err(header_err("data key 1 is missing"));
        }
        Ok(HeaderData { db_id, kek, keys })
    }
}

fn verify_mac(bytes: &[u8], mac_key: &[u8; 32]) -> Result<()> {
    let ok = bytes.len() >= TRAILER_LEN && {
        let body_end = bytes.len() - TRAILER_LEN;
        let mac = blake3::keyed_hash(mac_key, &bytes[..body_end]);
        bool::from(mac.as_bytes().ct_eq(&bytes[body_end..body_end + 32]))
    };
    if ok {
        Ok(())
    } else {
        Err(header_err(
            "key header failed authentication: it was modified by someone without the key",
        ))
    }
}

fn wrap_aad(db_id: &[u8; 16], key_id: u32) -> [u8; 40] {
    let mut aad = [0u8; 40];
    aad[..20].copy_from_slice(WRAP_AAD_PREFIX);
    aad[20..36].copy_from_slice(db_id);
    aad[36..].copy_from_slice(&key_id.to_le_bytes());
    aad
}

fn kek_cipher(kek: &[u8; 32]) -> Result<Aes256Gcm> {
    Aes256Gcm::new_from_slice(kek).map_err(|_| header_err("internal: bad key length"))
}

fn wrap_dek(
    kek: &[u8; 32],
    db_id: &[u8; 16],
    key_id: u32,
    dek: &[u8; 32],
) -> Result<[u8; WRAPPED_LEN]> {
    let cipher = kek_cipher(kek)?;
    let mut nonce = [0u8; 12];
    fill_random(&mut nonce)?;
    let mut buf = Zeroizing::new(*dek);
    let tag = cipher
        .encrypt_inout_detached(
            &nonce.into(),
            &wrap_aad(db_id, key_id),
            (&mut buf[..]).into(),
        )
        .map_err(|_| header_err("internal: key wrap failed"))?;
    let mut out = [0u8; WRAPPED_LEN];
    out[..12].copy_from_slice(&nonce);
    out[12..44].copy_from_slice(&buf[..]);
    out[44..].copy_from_slice(&tag);
    Ok(out)
}

fn unwrap_dek(
    kek: &[u8; 32],
    db_id: &[u8; 16],
    entry: &KeyEntry,
) -> Result<Option<Zeroizing<[u8; 32]>>> {
    let cipher = kek_cipher(kek)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&entry.wrapped[..12]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&entry.wrapped[44..]);
    let mut buf = Zeroizing::new([0u8; 32]);
    buf.copy_from_slice(&entry.wrapped[12..44]);
    let ok = cipher
        .decrypt_inout_detached(
            &nonce.into(),
            &wrap_aad(db_id, entry.id),
            (&mut buf[..]).into(),
            &tag.into(),
        )
        .is_ok();
    Ok(ok.then_some(buf))
}

fn derive_kek(source: &KeySource, spec: &KekSpec) -> Result<Zeroizing<[u8; 32]>> {
    match source {
        KeySource::Passphrase(p) => {
            if p.is_empty() {
                return Err(Error::NoKeySource);
            }
            let KekSpec::Passphrase { params, salt } = spec else {
                return Err(Error::WrongKey);
            };
            let argon_params =
                argon2::Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(32))
                    .map_err(|e| header_err(format!("invalid Argon2 parameters: {e}")))?;
            let argon = argon2::Argon2::new(
                argon2::Algorithm::Argon2id,
                argon2::Version::V0x13,
                argon_params,
            );
            let mut kek = Zeroizing::new([0u8; 32]);
            argon
                .hash_password_into(p.as_bytes(), salt, &mut kek[..])
                .map_err(|e| header_err(format!("Argon2 failed: {e}")))?;
            Ok(kek)
        }
        KeySource::KeyFile(path) => {
            let raw = read_key_file(path)?;
            if *spec != KekSpec::KeyFile {
                return Err(Error::WrongKey);
            }
            let mut kek = Zeroizing::new([0u8; 32]);
            blake3::Hasher::new_derive_key(KEYFILE_CONTEXT)
                .update(&raw[..])
                .finalize_xof()
                .fill(&mut kek[..]);
            Ok(kek)
        }
    }
}

fn new_kek_spec(source: &KeySource, kdf: KdfParams) -> Result<KekSpec> {
    Ok(match source {
        KeySource::Passphrase(_) => {
            if kdf.m_cost_kib > MAX_M_COST_KIB || kdf.t_cost > MAX_T_COST || kdf.p_cost > MAX_P_COST
            {
                return Err(header_err(
                    "Argon2 parameters out of the accepted range (memory at most 4 GiB, \
                     at most 64 passes and 64 lanes)",
                ));
            }
            let mut salt = [0u8; 16];
            fill_random(&mut salt)?;
            KekSpec::Passphrase { params: kdf, salt }
        }
        KeySource::KeyFile(_) => KekSpec::KeyFile,
    })
}

fn mac_key_from(dek1: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    blake3::Hasher::new_derive_key(MAC_CONTEXT)
        .update(dek1)
        .finalize_xof()
        .fill(&mut k[..]);
    k
}

fn read_header_bytes(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(KEY_HEADER_FILE);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::DatabaseNotFound(dir.to_path_buf()));
        }
        Err(e) => return Err(Error::Io(e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_HEADER_LEN + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_HEADER_LEN {
        return Err(header_err("key header file is too large"));
    }
    Ok(bytes)
}

/// Name of the lock file that serializes every read-modify-write of the key header, across
/// threads and processes (a counter update must never undo a concurrent `change_key`).
const KEY_HEADER_LOCK: &str = "fhirkeep.keys.lock";

/// Takes the exclusive key-header lock; released when the returned file is dropped.
fn lock_header(dir: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(KEY_HEADER_LOCK))?;
    file.lock()?;
    Ok(file)
}

/// Atomically writes the key header (tmp file, fsync, rename or link, fsync dir).
fn write_header_bytes(dir: &Path, bytes: &[u8], no_clobber: bool) -> Result<()> {
    let tmp = dir.join(KEY_HEADER_TMP);
    let dest = dir.join(KEY_HEADER_FILE);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Io(e)),
    }
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    if no_clobber {
        let linked = fs::hard_link(&tmp, &dest);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(dir.to_path_buf()));
            }
            Err(e) => return Err(Error::Io(e)),
        }
    } else {
        fs::rename(&tmp, &dest)?;
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// A header whose keys have been unwrapped.
struct Unlocked {
    header: HeaderData,
    kek: Zeroizing<[u8; 32]>,
    deks: BTreeMap<u32, Zeroizing<[u8; 32]>>,
    mac_key: Zeroizing<[u8; 32]>,
}

fn unlock(dir: &Path, source: &KeySource) -> Result<Unlocked> {
    let bytes = read_header_bytes(dir)?;
    let header = HeaderData::decode(&bytes)?;
    let kek = derive_kek(source, &header.kek)?;
    let mut deks = BTreeMap::new();
    for entry in &header.keys {
        match unwrap_dek(&kek, &header.db_id, entry)? {
            Some(dek) => {
                deks.insert(entry.id, dek);
            }
            None if deks.is_empty() => return Err(Error::WrongKey),
            None => {
                return Err(header_err(format!(
                    "data key {} failed authentication",
                    entry.id
                )));
            }
        }
    }
    let dek1 = deks
        .get(&1)
        .ok_or_else(|| header_err("data key 1 is missing"))?;
    let mac_key = mac_key_from(dek1);
    verify_mac(&bytes, &mac_key)?;
    Ok(Unlocked {
        header,
        kek,
        deks,
        mac_key,
    })
}

#[derive(Debug)]
struct NonceCounter {
    /// Encryptions made with the active key (conservative after a crash).
    used: u64,
    /// High-water mark known to be in the header on disk.
    reserved: u64,
    /// Limit (normally [`NONCE_LIMIT`]).
    limit: u64,
    /// Whether `used` differs from what a clean close should record.
    dirty: bool,
}

/// The unwrapped data keys of one database, shared by its storage backend and indexes.
pub struct Keyring {
    dir: PathBuf,
    db_id: [u8; 16],
    ciphers: BTreeMap<u32, Aes256Gcm>,
    active: u32,
    subkey_root: Zeroizing<[u8; 32]>,
    mac_key: Zeroizing<[u8; 32]>,
    counter: Mutex<NonceCounter>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("dir", &self.dir)
            .field("db_id", &hex::encode(self.db_id))
            .field("active_key_id", &self.active)
            .field("key_ids", &self.key_ids())
            .finish_non_exhaustive()
    }
}

impl Keyring {
    fn from_unlocked(dir: &Path, u: Unlocked) -> Result<Arc<Keyring>> {
        let active_entry = u
            .header
            .keys
            .iter()
            .filter(|k| !k.retired)
            .max_by_key(|k| k.id)
            .ok_or_else(|| header_err("no usable data key: every key is retired"))?;
        let mut ciphers = BTreeMap::new();
        for (id, dek) in &u.deks {
            ciphers.insert(*id, kek_cipher(dek)?);
        }
        let subkey_root = Zeroizing::new(
            **u.deks
                .get(&1)
                .ok_or_else(|| header_err("data key 1 is missing"))?,
        );
        Ok(Arc::new(Keyring {
            dir: dir.to_path_buf(),
            db_id: u.header.db_id,
            ciphers,
            active: active_entry.id,
            subkey_root,
            mac_key: u.mac_key,
            counter: Mutex::new(NonceCounter {
                used: active_entry.writes_reserved,
                reserved: active_entry.writes_reserved,
                limit: NONCE_LIMIT,
                dirty: false,
            }),
        }))
    }

    /// Creates the key header of a new database in `dir` (created if needed): a new random
    /// `db_id` and data key 1, wrapped under the KEK from `source`.
    ///
    /// Fails with [`Error::AlreadyExists`] if `dir` already has a key header. A missing key file
    /// is an error ([`Error::KeyFileMissing`]); create it first with [`create_key_file`].
    pub fn create(dir: &Path, source: &KeySource, kdf: KdfParams) -> Result<Arc<Keyring>> {
        if fs::symlink_metadata(dir.join(KEY_HEADER_FILE)).is_ok() {
            return Err(Error::AlreadyExists(dir.to_path_buf()));
        }
        let spec = new_kek_spec(source, kdf)?;
        let kek = derive_kek(source, &spec)?;
        fs::create_dir_all(dir)?;
        let mut db_id = [0u8; 16];
        fill_random(&mut db_id)?;
        let mut dek = Zeroizing::new([0u8; 32]);
        fill_random(&mut dek[..])?;
        let wrapped = wrap_dek(&kek, &db_id, 1, &dek)?;
        let header = HeaderData {
            db_id,
            kek: spec,
            keys: vec![KeyEntry {
                id: 1,
                writes_reserved: 0,
                retired: false,
                wrapped,
            }],
        };
        let mac_key = mac_key_from(&dek);
        let _lock = lock_header(dir)?;
        write_header_bytes(dir, &header.encode(&mac_key), true)?;
        let mut deks = BTreeMap::new();
        deks.insert(1, dek);
        Keyring::from_unlocked(
            dir,
            Unlocked {
                header,
                kek,
                deks,
                mac_key,
            },
        )
    }

    /// Opens the key header in `dir` and unwraps its data keys.
    ///
    /// [`Error::DatabaseNotFound`] if there is no header, [`Error::WrongKey`] if `source` does
    /// not unwrap the data keys, [`Error::KeyHeader`] if the header is damaged.
    pub fn open(dir: &Path, source: &KeySource) -> Result<Arc<Keyring>> {
        let u = unlock(dir, source)?;
        Keyring::from_unlocked(dir, u)
    }

    /// Re-wraps every data key under a new KEK derived from `new` (new salt for passphrases).
    /// O(1) in the database size: no page is rewritten. `kdf` applies if `new` is a passphrase.
    pub fn change_key(dir: &Path, old: &KeySource, new: &KeySource, kdf: KdfParams) -> Result<()> {
        let _lock = lock_header(dir)?;
        let mut u = unlock(dir, old)?;
        let spec = new_kek_spec(new, kdf)?;
        let new_kek = derive_kek(new, &spec)?;
        let db_id = u.header.db_id;
        for entry in &mut u.header.keys {
            let dek = u
                .deks
                .get(&entry.id)
                .ok_or_else(|| header_err("internal: data key not unwrapped"))?;
            entry.wrapped = wrap_dek(&new_kek, &db_id, entry.id, dek)?;
        }
        u.header.kek = spec;
        write_header_bytes(dir, &u.header.encode(&u.mac_key), false)
    }

    /// Adds a new data key (id = highest id + 1) that becomes the active key the next time the
    /// database is opened. Older keys stay in the header to decrypt pages written with them.
    pub fn rotate_data_key(dir: &Path, source: &KeySource) -> Result<u32> {
        let _lock = lock_header(dir)?;
        let mut u = unlock(dir, source)?;
        if u.header.keys.len() >= MAX_KEYS {
            return Err(header_err("too many data keys"));
        }
        let id = u
            .header
            .keys
            .iter()
            .map(|k| k.id)
            .max()
            .and_then(|m| m.checked_add(1))
            .ok_or_else(|| header_err("data key ids exhausted"))?;
        let mut dek = Zeroizing::new([0u8; 32]);
        fill_random(&mut dek[..])?;
        let wrapped = wrap_dek(&u.kek, &u.header.db_id, id, &dek)?;
        u.header.keys.push(KeyEntry {
            id,
            writes_reserved: 0,
            retired: false,
            wrapped,
        });
        write_header_bytes(dir, &u.header.encode(&u.mac_key), false)?;
        Ok(id)
    }

    /// The database's random 16-byte id.
    pub fn db_id(&self) -> [u8; 16] {
        self.db_id
    }

    /// Id of the data key used for new page writes.
    pub fn active_key_id(&self) -> u32 {
        self.active
    }

    /// Ids of all data keys in the header, ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        self.ciphers.keys().copied().collect()
    }

    /// Directory holding the key header.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Page encryptions counted against the active key so far (conservative after a crash).
    pub fn writes_used(&self) -> u64 {
        lock(&self.counter).used
    }

    /// Derives a 32-byte key for `purpose` (e.g. `"search-index"`):
    /// `BLAKE3-derive_key("fhirkeep subkey v1 " + purpose, DEK 1)`.
    ///
    /// It is derived from data key 1, not the active key, so it stays the same across data-key
    /// rotation and passphrase changes.
    pub fn derive_subkey(&self, purpose: &str) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        blake3::Hasher::new_derive_key(&format!("{SUBKEY_CONTEXT_PREFIX}{purpose}"))
            .update(&self.subkey_root[..])
            .finalize_xof()
            .fill(&mut out[..]);
        out
    }

    /// The cipher for a data key id, if the keyring has it.
    pub(crate) fn cipher(&self, key_id: u32) -> Option<&Aes256Gcm> {
        self.ciphers.get(&key_id)
    }

    /// Accounts for `n` encryptions with the active key, reserving more budget in the header
    /// when needed. Returns the active key id.
    ///
    /// Any number of backends may share one keyring (the store's file and its auxiliary
    /// files do): the count is one counter under one lock. Two *keyrings* of the same
    /// database alive at once (two processes, or an auxiliary database kept open after its
    /// store was closed and reopened) each count from the value they read. So that no unit is
    /// counted by both, a reservation that finds the stored mark above this keyring's own
    /// (another keyring reserved since) continues above that mark: every keyring numbers its
    /// units within its own reserved ranges, which never overlap, and the stored mark stays at
    /// or above the number of encryptions ever made with the key.
    pub(crate) fn consume_nonces(&self, n: u64) -> Result<u32> {
        let mut c = lock(&self.counter);
        let (used, reserved, limit) = (c.used, c.reserved, c.limit);
        let exhausted = |writes: u64| Error::NonceBudgetExhausted {
            key_id: self.active,
            writes,
        };
        let new_used = match used.checked_add(n) {
            Some(v) if v <= limit => v,
            _ => return Err(exhausted(used)),
        };
        if new_used <= reserved {
            c.used = new_used;
            c.dirty = true;
            return Ok(self.active);
        }
        let mut start = used;
        let mut written = 0;
        self.update_counter_on_disk(|on_disk| {
            if on_disk > reserved {
                // Another keyring reserved the units up to `on_disk`.
                start = on_disk;
            }
            let end = start
                .checked_add(n)
                .filter(|&end| end <= limit)
                .ok_or_else(|| exhausted(start))?;
            written = end.saturating_add(NONCE_RESERVATION_CHUNK).max(on_disk);
            Ok(written)
        })?;
        c.reserved = written;
        c.used = start + n;
        c.dirty = true;
        Ok(self.active)
    }

    /// Writes the exact count of encryptions made with the active key into the header
    /// (called on clean close; a no-op if nothing was encrypted since the last call).
    pub fn persist_counters(&self) -> Result<()> {
        let mut c = lock(&self.counter);
        if !c.dirty {
            return Ok(());
        }
        let (used, reserved) = (c.used, c.reserved);
        // If someone else raised the mark, never lower it below theirs.
        self.update_counter_on_disk(|on_disk| {
            Ok(if on_disk == reserved {
                used
            } else {
                on_disk.max(used)
            })
        })?;
        c.reserved = used;
        c.dirty = false;
        Ok(())
    }

    /// Lowers the nonce limit so tests can reach it quickly.
    #[doc(hidden)]
    pub fn set_nonce_limit_for_tests(&self, limit: u64) {
        lock(&self.counter).limit = limit;
    }

    /// Re-reads the header and sets the active key's `writes_reserved` to `f(current)`; an
    /// error from `f` leaves the header unchanged.
    fn update_counter_on_disk(&self, f: impl FnOnce(u64) -> Result<u64>) -> Result<()> {
        let _lock = lock_header(&self.dir)?;
        let bytes = read_header_bytes(&self.dir)?;
        let mut header = HeaderData::decode(&bytes)?;
        if !bool::from(header.db_id.ct_eq(&self.db_id)) {
            return Err(header_err(
                "the key header was replaced by another database's header",
            ));
        }
        verify_mac(&bytes, &self.mac_key)?;
        let entry = header
            .keys
            .iter_mut()
            .find(|k| k.id == self.active)
            .ok_or_else(|| header_err("the active data key vanished from the key header"))?;
        entry.writes_reserved = f(entry.writes_reserved)?;
        write_header_bytes(&self.dir, &header.encode(&self.mac_key), false)
    }
}

impl Drop for Keyring {
    fn drop(&mut self) {
        let _ = self.persist_counters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn pass(s: &str) -> KeySource {
        KeySource::Passphrase(Zeroizing::new(s.to_string()))
    }

    fn fast() -> KdfParams {
        KdfParams::fast_insecure()
    }

    #[test]
    fn create_open_roundtrip_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = Keyring::create(dir.path(), &pass("correct horse"), fast()).unwrap();
        let k2 = Keyring::open(dir.path(), &pass("correct horse")).unwrap();
        assert_eq!(k1.db_id(), k2.db_id());
        assert_eq!(k2.active_key_id(), 1);
        assert_eq!(k2.key_ids(), vec![1]);
        assert_eq!(*k1.derive_subkey("search"), *k2.derive_subkey("search"));
        assert_ne!(*k1.derive_subkey("search"), *k1.derive_subkey("other"));
        let mode = fs::metadata(dir.path().join(KEY_HEADER_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Debug never shows key material.
        let dbg = format!("{k1:?} {:?}", pass("correct horse"));
        assert!(!dbg.contains("correct horse"));
    }

    #[test]
    fn unusable_kdf_params_are_rejected_at_create() {
        let dir = tempfile::tempdir().unwrap();
        for kdf in [
            KdfParams {
                m_cost_kib: MAX_M_COST_KIB + 1,
                t_cost: 1,
                p_cost: 1,
            },
            KdfParams {
                m_cost_kib: 8,
                t_cost: 0,
                p_cost: 1,
            },
            KdfParams {
                m_cost_kib: 8,
                t_cost: 1,
                p_cost: 65,
            },
        ] {
            assert!(matches!(
                Keyring::create(dir.path(), &pass("a"), kdf),
                Err(Error::KeyHeader(_))
            ));
        }
        assert!(!dir.path().join(KEY_HEADER_FILE).exists());
    }

    #[test]
    fn create_twice_is_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        Keyring::create(dir.path(), &pass("a"), fast()).unwrap();
        assert!(matches!(
            Keyring::create(dir.path(), &pass("a"), fast()),
            Err(Error::AlreadyExists(_))
        ));
    }

    #[test]
    fn open_without_header_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Keyring::open(dir.path(), &pass("a")),
            Err(Error::DatabaseNotFound(_))
        ));
    }

    #[test]
    fn wrong_passphrase_is_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        Keyring::create(dir.path(), &pass("right"), fast()).unwrap();
        assert!(matches!(
            Keyring::open(dir.path(), &pass("wrong")),
            Err(Error::WrongKey)
        ));
        assert!(matches!(
            Keyring::open(dir.path(), &pass("")),
            Err(Error::NoKeySource)
        ));
    }

    #[test]
    fn key_file_roundtrip_wrong_missing_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let kf = dir.path().join("key");
        create_key_file(&kf).unwrap();
        let mode = fs::metadata(&kf).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = fs::read_to_string(&kf).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert!(
            text[..64]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // create_key_file never overwrites.
        assert!(create_key_file(&kf).is_err());

        let db = dir.path().join("db");
        let src = KeySource::KeyFile(kf.clone());
        let k1 = Keyring::create(&db, &src, fast()).unwrap();
        let k2 = Keyring::open(&db, &src).unwrap();
        assert_eq!(k1.db_id(), k2.db_id());

        // Same key as 32 raw bytes works too.
        let raw = hex::decode(text.trim()).unwrap();
        let rawf = dir.path().join("raw");
        fs::write(&rawf, &raw).unwrap();
        Keyring::open(&db, &KeySource::KeyFile(rawf)).unwrap();

        // Another key file → WrongKey.
        let other = dir.path().join("other");
        create_key_file(&other).unwrap();
        assert!(matches!(
            Keyring::open(&db, &KeySource::KeyFile(other)),
            Err(Error::WrongKey)
        ));
        // A passphrase on a key-file database → WrongKey.
        assert!(matches!(
            Keyring::open(&db, &pass("x")),
            Err(Error::WrongKey)
        ));
        // Missing key file.
        let missing = dir.path().join("nope");
        assert!(matches!(
            Keyring::open(&db, &KeySource::KeyFile(missing.clone())),
            Err(Error::KeyFileMissing { .. })
        ));
        assert!(matches!(
            Keyring::create(
                &dir.path().join("db2"),
                &KeySource::KeyFile(missing.clone()),
                fast()
            ),
            Err(Error::KeyFileMissing { .. })
        ));
        assert!(!missing.exists());
        // Garbage key files.
        for garbage in [
            &b"hello"[..],
            &[b'z'; 64][..],
            &[0u8; 31][..],
            &[b'a'; 2000][..],
        ] {
            let g = dir.path().join("garbage");
            fs::write(&g, garbage).unwrap();
            assert!(matches!(
                Keyring::open(&db, &KeySource::KeyFile(g)),
                Err(Error::KeyFileInvalid { .. })
            ));
        }
    }

    #[test]
    fn damaged_header_is_key_header_error() {
        let dir = tempfile::tempdir().unwrap();
        Keyring::create(dir.path(), &pass("pw"), fast()).unwrap();
        let path = dir.path().join(KEY_HEADER_FILE);
        let good = fs::read(&path).unwrap();
        // Every truncation.
        for len in 0..good.len() {
            fs::write(&path, &good[..len]).unwrap();
            let r = Keyring::open(dir.path(), &pass("pw"));
            assert!(matches!(r, Err(Error::KeyHeader(_))), "len {len}: {r:?}");
        }
        // Every single-byte flip.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            let r = Keyring::open(dir.path(), &pass("pw"));
            assert!(matches!(r, Err(Error::KeyHeader(_))), "byte {i}: {r:?}");
        }
        // Appended garbage.
        let mut long = good.clone();
        long.extend_from_slice(b"xx");
        fs::write(&path, &long).unwrap();
        assert!(matches!(
            Keyring::open(dir.path(), &pass("pw")),
            Err(Error::KeyHeader(_))
        ));
        fs::write(&path, &good).unwrap();
        Keyring::open(dir.path(), &pass("pw")).unwrap();
    }

    #[test]
    fn tampered_counter_with_fixed_checksum_fails_mac() {
        let dir = tempfile::tempdir().unwrap();
        Keyring::create(dir.path(), &pass("pw"), fast()).unwrap();
        let path = dir.path().join(KEY_HEADER_FILE);
        let mut bytes = fs::read(&path).unwrap();
        // writes_reserved of entry 1 lives at 59 + 4.
        bytes[63] = 7;
        let n = bytes.len();
        let sum = blake3::hash(&bytes[..n - 32]);
        bytes[n - 32..].copy_from_slice(sum.as_bytes());
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Keyring::open(dir.path(), &pass("pw")),
            Err(Error::KeyHeader(_))
        ));
        // A wrong key on the same file is still reported as WrongKey (checked before the MAC).
        assert!(matches!(
            Keyring::open(dir.path(), &pass("nope")),
            Err(Error::WrongKey)
        ));
    }

    #[test]
    fn change_key_rewraps() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::create(dir.path(), &pass("old"), fast()).unwrap();
        let sub = k.derive_subkey("x");
        drop(k);
        let kf = dir.path().join("kf");
        create_key_file(&kf).unwrap();
        let newsrc = KeySource::KeyFile(kf);
        Keyring::change_key(dir.path(), &pass("old"), &newsrc, fast()).unwrap();
        assert!(matches!(
            Keyring::open(dir.path(), &pass("old")),
            Err(Error::WrongKey)
        ));
        let k = Keyring::open(dir.path(), &newsrc).unwrap();
        assert_eq!(*k.derive_subkey("x"), *sub);
        drop(k);
        Keyring::change_key(dir.path(), &newsrc, &pass("new"), fast()).unwrap();
        let k = Keyring::open(dir.path(), &pass("new")).unwrap();
        assert_eq!(*k.derive_subkey("x"), *sub);
        assert!(matches!(
            Keyring::change_key(dir.path(), &pass("bad"), &pass("x"), fast()),
            Err(Error::WrongKey)
        ));
    }

    #[test]
    fn rotate_adds_active_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::create(dir.path(), &pass("pw"), fast()).unwrap();
        let sub = k.derive_subkey("idx");
        drop(k);
        assert_eq!(
            Keyring::rotate_data_key(dir.path(), &pass("pw")).unwrap(),
            2
        );
        assert_eq!(
            Keyring::rotate_data_key(dir.path(), &pass("pw")).unwrap(),
            3
        );
        let k = Keyring::open(dir.path(), &pass("pw")).unwrap();
        assert_eq!(k.active_key_id(), 3);
        assert_eq!(k.key_ids(), vec![1, 2, 3]);
        assert_eq!(*k.derive_subkey("idx"), *sub);
        assert_eq!(k.writes_used(), 0);
    }

    #[test]
    fn nonce_budget_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::create(dir.path(), &pass("pw"), fast()).unwrap();
        k.set_nonce_limit_for_tests(10);
        assert_eq!(k.consume_nonces(4).unwrap(), 1);
        assert_eq!(k.consume_nonces(6).unwrap(), 1);
        match k.consume_nonces(1) {
            Err(Error::NonceBudgetExhausted {
                key_id: 1,
                writes: 10,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(k.consume_nonces(u64::MAX).is_err());
    }

    #[test]
    fn nonce_counter_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::create(dir.path(), &pass("pw"), fast()).unwrap();
        k.consume_nonces(5).unwrap();
        // Simulate a crash: the keyring is leaked without persisting exact counts.
        std::mem::forget(k);
        let k = Keyring::open(dir.path(), &pass("pw")).unwrap();
        assert_eq!(k.writes_used(), 5 + NONCE_RESERVATION_CHUNK);
        k.consume_nonces(NONCE_RESERVATION_CHUNK).unwrap();
        std::mem::forget(k);
        let k = Keyring::open(dir.path(), &pass("pw")).unwrap();
        assert_eq!(k.writes_used(), 5 + 3 * NONCE_RESERVATION_CHUNK);
        k.consume_nonces(3).unwrap();
        k.persist_counters().unwrap();
        drop(k);
        let k = Keyring::open(dir.path(), &pass("pw")).unwrap();
        assert_eq!(k.writes_used(), 5 + 3 * NONCE_RESERVATION_CHUNK + 3);
        k.consume_nonces(1).unwrap();
        drop(k); // Drop persists too.
        let k = Keyring::open(dir.path(), &pass("pw")).unwrap();
        assert_eq!(k.writes_used(), 5 + 3 * NONCE_RESERVATION_CHUNK + 4);
    }

    /// Two keyrings of one database alive at once (e.g. an auxiliary database kept open
    /// after its store was reopened) never number the same units: the stored mark stays at
    /// or above the total number of encryptions made through both.
    #[test]
    fn two_keyrings_of_one_database_never_share_units() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keyring::create(dir.path(), &pass("pw"), fast()).unwrap();
        let b = Keyring::open(dir.path(), &pass("pw")).unwrap();
        let stored = || {
            let bytes = read_header_bytes(dir.path()).unwrap();
            HeaderData::decode(&bytes).unwrap().keys[0].writes_reserved
        };
        let mut total = 0;
        for round in 0..6u64 {
            let n = NONCE_RESERVATION_CHUNK / 2 + round;
            a.consume_nonces(n).unwrap();
            b.consume_nonces(n + 1).unwrap();
            total += 2 * n + 1;
            assert!(stored() >= total, "round {round}");
        }
        // Both close cleanly, in either order: the mark still covers every encryption.
        drop(a);
        assert!(stored() >= total);
        drop(b);
        assert!(stored() >= total);
    }

    #[test]
    fn counter_update_keeps_concurrent_key_change() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::create(dir.path(), &pass("old"), fast()).unwrap();
        Keyring::change_key(dir.path(), &pass("old"), &pass("new"), fast()).unwrap();
        k.consume_nonces(1).unwrap();
        drop(k);
        let k = Keyring::open(dir.path(), &pass("new")).unwrap();
        assert_eq!(k.writes_used(), 1);
        assert!(matches!(
            Keyring::open(dir.path(), &pass("old")),
            Err(Error::WrongKey)
        ));
    }
}
