//! Fuzz target: `Keyring::open` on a hostile `DIR/fhirkeep.keys` returns `Ok` or a typed error,
//! never panics and never does unbounded work. Inputs are either raw bytes (optionally with a
//! correct trailing checksum, so the structural parser is reached) or a header the harness
//! builds field by field from the input and seals exactly as the engine does (key wraps under
//! the fixed key file's KEK, header MAC, checksum), so that the data-key, MAC, retired-flag and
//! nonce-counter paths after a successful unwrap are explored too. An accepted keyring is then
//! checked against the header it came from and used to encrypt one page.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;
use arbitrary::{Arbitrary, Unstructured};
use fhirkeep_engine::Error;
use fhirkeep_engine::crypto::{EncryptedBackend, KEY_HEADER_FILE, KeySource, Keyring};
use libfuzzer_sys::fuzz_target;
use redb::StorageBackend;

/// The fixed key file every header is opened with: 32 raw bytes.
const KEY: [u8; 32] = *b"fhirkeep-fuzz-fixed-key-32-bytes";
const MAGIC: &[u8; 8] = b"FHKKEYS\0";

struct Fixture {
    _dir: tempfile::TempDir,
    key_file: PathBuf,
    kek: [u8; 32],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("fixed.key");
        std::fs::write(&key_file, KEY).expect("write key file");
        let mut kek = [0u8; 32];
        blake3::Hasher::new_derive_key("fhirkeep key-file kek v1")
            .update(&KEY)
            .finalize_xof()
            .fill(&mut kek);
        Fixture {
            _dir: dir,
            key_file,
            kek,
        }
    })
}

#[derive(Debug, Arbitrary)]
enum Input {
    /// The file as given.
    Raw(Vec<u8>),
    /// The given bytes followed by their correct BLAKE3 checksum.
    RawChecksummed(Vec<u8>),
    /// A header built from fields.
    Built(Built),
}

#[derive(Debug, Arbitrary)]
struct Built {
    version: Option<u16>,
    db_id: [u8; 16],
    kind: Kind,
    keys: Vec<Entry>,
    /// Overrides the entry count field.
    count_override: Option<u32>,
    /// Breaks the MAC (xor into one byte).
    mac_xor: Option<(u8, u8)>,
    /// Breaks the checksum.
    checksum_xor: Option<(u8, u8)>,
    /// Drops bytes from the end / appends bytes before sealing.
    cut: Option<u16>,
    append: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
enum Kind {
    KeyFile { nonzero_params: Option<[u8; 28]> },
    Passphrase { m: u32, t: u32, p: u32, salt: [u8; 16] },
    Other(u8),
}

#[derive(Debug, Arbitrary)]
struct Entry {
    id: u32,
    writes_reserved: u64,
    retired: u8,
    dek: [u8; 32],
    nonce: [u8; 12],
    /// Wrap under the real KEK (otherwise the wrapped bytes are garbage from the input).
    wrap_properly: bool,
    /// Wrap with another key id in the AAD than the one stored.
    aad_id_xor: u32,
    garbage: [u8; 60],
}

fn wrap(kek: &[u8; 32], db_id: &[u8; 16], key_id: u32, dek: &[u8; 32], nonce: &[u8; 12]) -> [u8; 60] {
    let cipher = Aes256Gcm::new_from_slice(kek).expect("key length");
    let mut aad = [0u8; 40];
    aad[..20].copy_from_slice(b"fhirkeep key wrap v1");
    aad[20..36].copy_from_slice(db_id);
    aad[36..].copy_from_slice(&key_id.to_le_bytes());
    let mut buf = *dek;
    let tag = cipher
        .encrypt_inout_detached(&(*nonce).into(), &aad, (&mut buf[..]).into())
        .expect("encrypt");
    let mut out = [0u8; 60];
    out[..12].copy_from_slice(nonce);
    out[12..44].copy_from_slice(&buf);
    out[44..].copy_from_slice(&tag);
    out
}

fn build(b: &Built, kek: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&b.version.unwrap_or(1).to_le_bytes());
    out.extend_from_slice(&b.db_id);
    match &b.kind {
        Kind::KeyFile { nonzero_params } => {
            out.push(2);
            out.extend_from_slice(nonzero_params.as_ref().unwrap_or(&[0u8; 28]));
        }
        Kind::Passphrase { m, t, p, salt } => {
            out.push(1);
            out.extend_from_slice(&m.to_le_bytes());
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(salt);
        }
        Kind::Other(k) => {
            out.push(*k);
            out.extend_from_slice(&[0u8; 28]);
        }
    }
    let keys = &b.keys[..b.keys.len().min(64)];
    let count = b.count_override.unwrap_or(keys.len() as u32);
    out.extend_from_slice(&count.to_le_bytes());
    for e in keys {
        out.extend_from_slice(&e.id.to_le_bytes());
        out.extend_from_slice(&e.writes_reserved.to_le_bytes());
        out.push(e.retired);
        if e.wrap_properly {
            out.extend_from_slice(&wrap(kek, &b.db_id, e.id ^ e.aad_id_xor, &e.dek, &e.nonce));
        } else {
            out.extend_from_slice(&e.garbage);
        }
    }
    if let Some(cut) = b.cut {
        out.truncate(out.len().saturating_sub(usize::from(cut)));
    }
    out.extend_from_slice(&b.append);
    // MAC keyed from the DEK of the first entry that claims id 1 (what a real writer would use).
    let dek1 = keys.iter().find(|e| e.id == 1).map_or([0u8; 32], |e| e.dek);
    let mut mac_key = [0u8; 32];
    blake3::Hasher::new_derive_key("fhirkeep key header mac v1")
        .update(&dek1)
        .finalize_xof()
        .fill(&mut mac_key);
    let mut mac = *blake3::keyed_hash(&mac_key, &out).as_bytes();
    if let Some((i, x)) = b.mac_xor {
        mac[usize::from(i) % 32] ^= x;
    }
    out.extend_from_slice(&mac);
    let mut sum = *blake3::hash(&out).as_bytes();
    if let Some((i, x)) = b.checksum_xor {
        sum[usize::from(i) % 32] ^= x;
    }
    out.extend_from_slice(&sum);
    out
}

fn is_typed_open_error(e: &Error) -> bool {
    matches!(
        e,
        Error::KeyHeader(_) | Error::WrongKey | Error::NoKeySource | Error::Io(_)
    )
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let (bytes, built) = match &input {
        Input::Raw(b) => (b.clone(), None),
        Input::RawChecksummed(b) => {
            let mut v = b.clone();
            v.extend_from_slice(blake3::hash(b).as_bytes());
            (v, None)
        }
        Input::Built(b) => (build(b, &fx.kek), Some(b)),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(KEY_HEADER_FILE), &bytes).expect("write header");

    // A passphrase attempt too, but only where Argon2 stays cheap: the header's own caps
    // (4 GiB, 64 passes, 64 lanes) are far beyond what a fuzz iteration can afford.
    if let Some(Built {
        kind: Kind::Passphrase { m, t, p, .. },
        ..
    }) = built
        && *m <= 256
        && *t <= 2
        && *p <= 2
    {
        let pass = KeySource::Passphrase("fuzz".to_string().into());
        match Keyring::open(dir.path(), &pass) {
            // Nothing was wrapped under a passphrase KEK, so nothing can unwrap.
            Ok(_) => panic!("a passphrase opened a header wrapped under the key-file KEK"),
            Err(e) => assert!(is_typed_open_error(&e), "unexpected error kind: {e:?}"),
        }
    }

    let source = KeySource::KeyFile(fx.key_file.clone());
    let keyring = match Keyring::open(dir.path(), &source) {
        Ok(k) => k,
        Err(e) => {
            assert!(is_typed_open_error(&e), "unexpected error kind: {e:?}");
            return;
        }
    };

    // Accepted: the header must be the well-formed thing the format describes.
    if let Some(b) = built {
        assert!(matches!(b.kind, Kind::KeyFile { .. }), "non-key-file header opened with a key file");
        let ids: Vec<u32> = b.keys.iter().take(64).map(|e| e.id).collect();
        assert_eq!(keyring.key_ids(), ids, "key ids differ from the header");
        assert_eq!(ids.first(), Some(&1));
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let active = b
            .keys
            .iter()
            .take(64)
            .filter(|e| e.retired == 0)
            .max_by_key(|e| e.id)
            .expect("an active key");
        assert!(b.keys.iter().take(64).all(|e| e.retired <= 1));
        assert_eq!(keyring.active_key_id(), active.id);
        assert_eq!(keyring.writes_used(), active.writes_reserved);
        assert_eq!(keyring.db_id(), b.db_id);
    }
    let _ = keyring.derive_subkey("fuzz");

    // Use it: encrypt one page, which charges the nonce budget (possibly rewriting the header
    // or refusing with NonceBudgetExhausted), then read it back.
    let keyring: Arc<Keyring> = keyring;
    match EncryptedBackend::new(redb::backends::InMemoryBackend::new(), Arc::clone(&keyring)) {
        Ok(backend) => {
            let page = [0xA5u8; 4096];
            let grown = backend.set_len(2 * 4096);
            if grown.is_ok() && backend.write(4096, &page).is_ok() {
                let mut back = [0u8; 4096];
                backend.read(4096, &mut back).expect("read back a page just written");
                assert_eq!(back, page);
            }
        }
        Err(e) => panic!("a fresh in-memory backend refused an accepted keyring: {e:?}"),
    }
    let _ = keyring.persist_counters();
});
