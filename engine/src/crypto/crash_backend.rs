//! A simulated disk for crash tests: writes land in a volatile image, `sync_data` makes them
//! durable, and a crash image keeps the durable state plus any chosen part of the unsynced
//! writes (including torn ones). Test-only; reused by the store's crash tests.

#![allow(dead_code)] // Parts are used only by the store's crash tests.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use redb::StorageBackend;

/// What happens to writes that were not yet synced when the crash hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TornMode {
    /// All unsynced operations are lost.
    LoseUnsynced,
    /// All unsynced operations reached the disk.
    KeepAll,
    /// All unsynced operations but the last write reached the disk; of the last write only
    /// the first `keep` bytes did.
    TearLast {
        /// Bytes of the last write that persisted.
        keep: usize,
    },
    /// A random subset of the unsynced operations reached the disk (in order), and one of
    /// them only as a random prefix.
    Random {
        /// PRNG seed.
        seed: u64,
    },
}

#[derive(Clone, Debug)]
pub(crate) enum PendingOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    live: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<PendingOp>,
    /// Operations (write/set_len/sync) still allowed before the crash; `None` = never crash.
    countdown: Option<u64>,
    crashed: bool,
    ops: u64,
    syncs: u64,
}

/// A [`StorageBackend`] over an in-memory image that can simulate a crash. Clones share the
/// same image.
#[derive(Clone, Debug, Default)]
pub(crate) struct CrashBackend {
    state: Arc<Mutex<State>>,
}

/// Small deterministic PRNG (splitmix64) for tests.
#[derive(Clone, Debug)]
pub(crate) struct TestRng(pub(crate) u64);

impl TestRng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn apply(image: &mut Vec<u8>, op: &PendingOp, limit: Option<usize>) {
    match op {
        PendingOp::SetLen(len) => image.resize(*len as usize, 0),
        PendingOp::Write { offset, data } => {
            let n = limit.unwrap_or(data.len()).min(data.len());
            let start = *offset as usize;
            let end = start + n;
            if image.len() < end {
                image.resize(end, 0);
            }
            image[start..end].copy_from_slice(&data[..n]);
        }
    }
}

impl CrashBackend {
    /// An empty disk.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A disk holding `image`, all of it durable.
    pub(crate) fn from_image(image: Vec<u8>) -> Self {
        let st = State {
            live: image.clone(),
            durable: image,
            ..State::default()
        };
        CrashBackend {
            state: Arc::new(Mutex::new(st)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After `n` more write/set_len/sync operations, every operation fails (`None`: never).
    pub(crate) fn set_countdown(&self, n: Option<u64>) {
        self.lock().countdown = n;
    }

    /// Number of write/set_len/sync operations performed so far.
    pub(crate) fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Number of syncs performed so far.
    pub(crate) fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Whether the simulated crash has happened.
    pub(crate) fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// The unsynced operations, oldest first.
    pub(crate) fn unsynced(&self) -> Vec<PendingOp> {
        self.lock().unsynced.clone()
    }

    /// The disk contents a reboot after a crash now would find.
    pub(crate) fn crash_image(&self, mode: TornMode) -> Vec<u8> {
        let st = self.lock();
        let mut image = st.durable.clone();
        match mode {
            TornMode::LoseUnsynced => {}
            TornMode::KeepAll => {
                for op in &st.unsynced {
                    apply(&mut image, op, None);
                }
            }
            TornMode::TearLast { keep } => {
                let last_write = st
                    .unsynced
                    .iter()
                    .rposition(|op| matches!(op, PendingOp::Write { .. }));
                for (i, op) in st.unsynced.iter().enumerate() {
                    let limit = (Some(i) == last_write).then_some(keep);
                    apply(&mut image, op, limit);
                }
            }
            TornMode::Random { seed } => {
                let mut rng = TestRng(seed);
                let torn =
                    (!st.unsynced.is_empty()).then(|| rng.below(st.unsynced.len() as u64) as usize);
                for (i, op) in st.unsynced.iter().enumerate() {
                    if Some(i) == torn {
                        let len = match op {
                            PendingOp::Write { data, .. } => data.len() as u64,
                            PendingOp::SetLen(_) => 0,
                        };
                        apply(&mut image, op, Some(rng.below(len + 1) as usize));
                    } else if rng.below(2) == 0 {
                        apply(&mut image, op, None);
                    }
                }
            }
        }
        image
    }

    /// The current (volatile) contents.
    pub(crate) fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// Counts one mutating operation; fails if the crash point has been reached.
    fn tick(st: &mut State) -> io::Result<()> {
        if st.crashed {
            return Err(io::Error::other("simulated crash"));
        }
        if let Some(n) = st.countdown {
            if n == 0 {
                st.crashed = true;
                return Err(io::Error::other("simulated crash"));
            }
            st.countdown = Some(n - 1);
        }
        st.ops += 1;
        Ok(())
    }
}

impl StorageBackend for CrashBackend {
    fn len(&self) -> io::Result<u64> {
        let st = self.lock();
        if st.crashed {
            return Err(io::Error::other("simulated crash"));
        }
        Ok(st.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let st = self.lock();
        if st.crashed {
            return Err(io::Error::other("simulated crash"));
        }
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start
            .checked_add(out.len())
            .filter(|&e| e <= st.live.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        out.copy_from_slice(&st.live[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        Self::tick(&mut st)?;
        st.live.resize(len as usize, 0);
        st.unsynced.push(PendingOp::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.lock();
        Self::tick(&mut st)?;
        st.syncs += 1;
        st.durable = st.live.clone();
        st.unsynced.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        Self::tick(&mut st)?;
        let op = PendingOp::Write {
            offset,
            data: data.to_vec(),
        };
        apply(&mut st.live, &op, None);
        st.unsynced.push(op);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::backend::set_new_file_format_for_tests;
    use crate::crypto::page::{HEADER_BLOCK_SIZE, PageFormat};
    use crate::crypto::{EncryptedBackend, KdfParams, KeySource, Keyring};
    use redb::{Database, Durability, ReadableDatabase, TableDefinition};
    use std::collections::BTreeMap;
    use zeroize::Zeroizing;

    const TABLE: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("crash");

    type Model = BTreeMap<u64, Vec<u8>>;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, Vec<u8>),
        Remove(u64),
    }

    fn workload(seed: u64, txns: usize) -> Vec<Vec<Op>> {
        let mut rng = TestRng(seed);
        (0..txns)
            .map(|t| {
                let n = 3 + rng.below(10) as usize;
                (0..n)
                    .map(|_| {
                        let key = rng.below(48);
                        if rng.below(5) == 0 {
                            Op::Remove(key)
                        } else {
                            // Mostly small values, sometimes multi-page ones.
                            let len = if rng.below(4) == 0 {
                                4096 + rng.below(14_000) as usize
                            } else {
                                1 + rng.below(600) as usize
                            };
                            let mut v = format!("t{t}k{key}:").into_bytes();
                            v.resize(len, (rng.next_u64() & 0xff) as u8);
                            Op::Insert(key, v)
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// `models[i]` = contents after the first `i` transactions.
    fn models(wl: &[Vec<Op>]) -> Vec<Model> {
        let mut m = Model::new();
        let mut out = vec![m.clone()];
        for txn in wl {
            for op in txn {
                match op {
                    Op::Insert(k, v) => {
                        m.insert(*k, v.clone());
                    }
                    Op::Remove(k) => {
                        m.remove(k);
                    }
                }
            }
            out.push(m.clone());
        }
        out
    }

    fn open(disk: &CrashBackend, k: &Arc<Keyring>) -> Result<Database, redb::Error> {
        let b = EncryptedBackend::new(disk.clone(), k.clone())
            .map_err(|e| redb::Error::Io(crate::crypto::to_io(e)))?;
        Ok(redb::Builder::new().create_with_backend(b)?)
    }

    fn commit_txn(db: &Database, ops: &[Op]) -> Result<(), redb::Error> {
        let mut w = db.begin_write()?;
        w.set_two_phase_commit(true);
        w.set_durability(Durability::Immediate)?;
        {
            let mut t = w.open_table(TABLE)?;
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        t.insert(*k, v.as_slice())?;
                    }
                    Op::Remove(k) => {
                        t.remove(*k)?;
                    }
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    /// Runs the workload; returns how many commits were acknowledged.
    fn run(db: &Database, wl: &[Vec<Op>]) -> usize {
        let mut acked = 0;
        for txn in wl {
            if commit_txn(db, txn).is_err() {
                break;
            }
            acked += 1;
        }
        acked
    }

    fn read_state(db: &Database) -> Result<Model, redb::Error> {
        let r = db.begin_read()?;
        let t = r.open_table(TABLE)?;
        let mut m = Model::new();
        for item in t.range::<u64>(..)? {
            let (k, v) = item?;
            m.insert(k.value(), v.value().to_vec());
        }
        Ok(m)
    }

    fn keyring() -> (tempfile::TempDir, Arc<Keyring>) {
        let dir = tempfile::tempdir().unwrap();
        let src = KeySource::Passphrase(Zeroizing::new("crash".to_string()));
        let k = Keyring::create(dir.path(), &src, KdfParams::fast_insecure()).unwrap();
        (dir, k)
    }

    /// A clean database image holding an empty table.
    fn base_image(k: &Arc<Keyring>) -> Vec<u8> {
        let disk = CrashBackend::new();
        let db = open(&disk, k).unwrap();
        commit_txn(&db, &[]).unwrap();
        drop(db);
        disk.crash_image(TornMode::KeepAll)
    }

    /// A write of a header copy, in either format (no page write has a header block's
    /// length).
    fn is_header_write(op: &PendingOp) -> bool {
        let headers = [PageFormat::V1, PageFormat::V2]
            .map(|f| [f.header_offset(false), f.header_offset(true)]);
        matches!(op, PendingOp::Write { offset, data }
            if headers.as_flattened().contains(offset) && data.len() == HEADER_BLOCK_SIZE)
    }

    #[test]
    fn crash_at_every_operation_keeps_acknowledged_commits() {
        for format in [PageFormat::V1, PageFormat::V2] {
            set_new_file_format_for_tests(format);
            let outcome = std::panic::catch_unwind(|| crash_at_every_operation(format));
            set_new_file_format_for_tests(PageFormat::NEWEST);
            if let Err(panic) = outcome {
                eprintln!("in format {format:?}:");
                std::panic::resume_unwind(panic);
            }
        }
    }

    fn crash_at_every_operation(format: PageFormat) {
        let (_dir, k) = keyring();
        let base = base_image(&k);
        assert_eq!(crate::crypto::page::image::format(&base), format);
        let wl = workload(0x5eed, 7);
        let models = models(&wl);

        // Dry run: how many mutating operations does the workload take?
        let disk = CrashBackend::from_image(base.clone());
        let db = open(&disk, &k).unwrap();
        assert_eq!(run(&db, &wl), wl.len());
        assert_eq!(read_state(&db).unwrap(), models[wl.len()]);
        drop(db);
        let total_ops = disk.ops();
        assert!(total_ops > 20, "workload too small: {total_ops} ops");

        let mut torn_header_cases = 0;
        let mut checked = 0;
        for countdown in 0..total_ops {
            let disk = CrashBackend::from_image(base.clone());
            disk.set_countdown(Some(countdown));
            let acked = match open(&disk, &k) {
                Ok(db) => run(&db, &wl),
                Err(_) => 0,
            };
            assert!(disk.crashed(), "countdown {countdown}: no crash happened");
            let unsynced = disk.unsynced();
            let last_write = unsynced
                .iter()
                .rev()
                .find(|op| matches!(op, PendingOp::Write { .. }));
            let mut modes = vec![
                TornMode::LoseUnsynced,
                TornMode::KeepAll,
                TornMode::Random {
                    seed: countdown * 7 + 1,
                },
                TornMode::Random {
                    seed: countdown * 7 + 2,
                },
            ];
            if let Some(PendingOp::Write { data, .. }) = last_write {
                modes.push(TornMode::TearLast {
                    keep: data.len() / 2,
                });
                if is_header_write(last_write.unwrap_or(&PendingOp::SetLen(0))) {
                    torn_header_cases += 1;
                }
            }
            for mode in modes {
                let image = disk.crash_image(mode);
                let disk2 = CrashBackend::from_image(image);
                let db = open(&disk2, &k).unwrap_or_else(|e| {
                    panic!("countdown {countdown} {mode:?}: reopen failed: {e}")
                });
                let state = read_state(&db)
                    .unwrap_or_else(|e| panic!("countdown {countdown} {mode:?}: read failed: {e}"));
                let ok =
                    state == models[acked] || models.get(acked + 1).is_some_and(|m| *m == state);
                assert!(
                    ok,
                    "countdown {countdown} {mode:?}: state is not the result of {acked} or {} commits",
                    acked + 1
                );
                // The recovered database accepts new commits.
                commit_txn(&db, &[Op::Insert(1000, b"after".to_vec())]).unwrap_or_else(|e| {
                    panic!("countdown {countdown} {mode:?}: commit after recovery failed: {e}")
                });
                checked += 1;
            }
        }
        eprintln!(
            "crash test, format {format:?}: {total_ops} operations, {checked} crash images \
             checked, {torn_header_cases} with a torn unsynced header write"
        );
        assert!(checked > 100);
        assert!(
            torn_header_cases > 0,
            "no crash point had an unsynced header write to tear"
        );
    }

    #[test]
    fn torn_header_write_falls_back_to_durable_copy() {
        let (_dir, k) = keyring();
        let disk = CrashBackend::new();
        let b = EncryptedBackend::new(disk.clone(), k.clone()).unwrap();
        b.set_len(4 * 4096).unwrap();
        b.write(0, b"durable header").unwrap();
        b.sync_data().unwrap();
        b.write(0, b"newer   header").unwrap();
        b.write(0, b"newest  header").unwrap();
        let last = disk.unsynced();
        assert!(last.last().is_some_and(is_header_write));
        let read_page0 = |image: Vec<u8>| {
            let b = EncryptedBackend::new(CrashBackend::from_image(image), k.clone()).unwrap();
            let mut out = [0u8; 14];
            b.read(0, &mut out).unwrap();
            out
        };
        // Torn inside the nonce, tag or ciphertext: the copy fails authentication and the
        // durable copy is used.
        for keep in [5, 32, HEADER_BLOCK_SIZE / 2, HEADER_BLOCK_SIZE - 1] {
            let image = disk.crash_image(TornMode::TearLast { keep });
            assert_eq!(&read_page0(image), b"durable header", "keep {keep}");
        }
        // Torn within the key id (identical in both writes): the earlier unsynced write of the
        // same copy is intact and newer than the durable one.
        let image = disk.crash_image(TornMode::TearLast { keep: 1 });
        assert_eq!(&read_page0(image), b"newer   header");
        assert_eq!(
            &read_page0(disk.crash_image(TornMode::LoseUnsynced)),
            b"durable header"
        );
        assert_eq!(
            &read_page0(disk.crash_image(TornMode::KeepAll)),
            b"newest  header"
        );
        // After a sync the newest header is durable; the next write goes to the other copy.
        b.sync_data().unwrap();
        b.write(0, b"after sync    ").unwrap();
        let image = disk.crash_image(TornMode::TearLast {
            keep: HEADER_BLOCK_SIZE / 2,
        });
        assert_eq!(&read_page0(image), b"newest  header");
    }

    #[test]
    fn crash_backend_semantics() {
        let d = CrashBackend::new();
        d.write(0, b"hello").unwrap();
        d.sync_data().unwrap();
        d.write(0, b"HE").unwrap();
        d.set_len(3).unwrap();
        assert_eq!(d.crash_image(TornMode::LoseUnsynced), b"hello");
        assert_eq!(d.crash_image(TornMode::KeepAll), b"HEl");
        assert_eq!(d.crash_image(TornMode::TearLast { keep: 1 }), b"Hel");
        assert_eq!(d.live_image(), b"HEl");
        d.set_countdown(Some(1));
        d.write(0, b"x").unwrap();
        assert!(d.write(0, b"y").is_err());
        assert!(d.crashed());
        assert!(d.read(0, &mut [0u8; 1]).is_err());
        assert_eq!(d.crash_image(TornMode::KeepAll), b"xEl");
    }
}
