//! A query-layer `Database` in a temporary directory for the fuzz targets that need one: on
//! tmpfs when there is one (fsync is then nearly free), fast key derivation, and read leaves
//! flushed rarely, so that the fuzzer spends its time in the code under test.

use fhirkeep_engine::crypto::{KdfParams, KeySource};
use fhirkeep_engine::store::ReadAudit;
use fhirkeep_query::Database;

/// The database and the directory that holds it (deleted when dropped).
pub struct FuzzDatabase {
    pub db: Database,
    _dir: tempfile::TempDir,
}

/// A new, empty database.
pub fn new_database() -> FuzzDatabase {
    let dir = tempfile::Builder::new()
        .prefix("fhirkeep-fuzz-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    let key = dir.path().join("key");
    fhirkeep_engine::crypto::create_key_file(&key).expect("key file");
    let db = Database::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(key))
        .kdf(KdfParams::fast_insecure())
        .read_audit(ReadAudit::GroupCommit {
            max_delay: std::time::Duration::from_secs(3600),
        })
        .create()
        .expect("database");
    FuzzDatabase { db, _dir: dir }
}
