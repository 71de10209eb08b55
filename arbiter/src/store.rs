//! Durable arbiter state: an in-memory map of VM entries, rebuilt at start from an
//! append-only log of checksummed records. Every decision is written to the log and
//! fsync'd before it is answered (group commit: concurrent decisions share one fsync).
//!
//! # On-disk format
//!
//! `<data-dir>/arbiter.log` starts with the 8-byte magic [`LOG_MAGIC`], then records:
//! `[len: u32 LE][crc32(payload): u32 LE][payload: len bytes of JSON]`. A payload is
//! either `{"op":"put","entry":{..}}` (the new state of one VM) or
//! `{"op":"clear","vm":..,"retired_generation":..}`.
//!
//! At start the log is replayed. Records are acknowledged only after their fsync and
//! fsyncs are sequential, so after a crash only an unacknowledged suffix can be damaged:
//! a torn last record (short, or failing its checksum) is dropped (its bytes are kept in
//! `arbiter.log.torn-*` for inspection). Damage followed by a valid record is not a torn
//! write, and the store refuses to open rather than forget acknowledged decisions.
//! The log is then compacted: the state is written to `arbiter.log.tmp`, fsync'd, renamed
//! over `arbiter.log` and the directory fsync'd. `arbiter.lock` (flock) keeps a second
//! arbiter off the same directory.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::protocol::{ClaimResponse, Entry, ListResponse, RePairResponse, Tombstone};
use crate::rules::{self, Slot};

/// Name of the log file inside the data directory.
pub const LOG_FILE: &str = "arbiter.log";
/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "arbiter.lock";
/// First bytes of every log file.
pub const LOG_MAGIC: &[u8; 8] = b"TWINARB1";
/// Largest record payload accepted when replaying the log.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Size of a record's header (length and checksum).
pub const RECORD_HEADER_BYTES: usize = 8;

/// Errors of the store: I/O and log problems, and decisions the store refuses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the data directory's lock.
    #[error("data directory {0} is in use by another arbiter (lock held on {LOCK_FILE})")]
    Locked(PathBuf),
    /// The log is damaged in a way a crash cannot explain; the store will not guess.
    #[error("log {path} is damaged: {reason}")]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An earlier write or fsync failed; the store refuses every request until restarted.
    #[error(
        "the store could not make a decision durable and stopped deciding; restart the arbiter"
    )]
    Poisoned,
    /// The VM id is not known.
    #[error("unknown VM {0:?}")]
    UnknownVm(String),
    /// The generation asked for is newer than the VM's current one.
    #[error("generation {asked} of VM {vm:?} is not open (current generation is {current})")]
    FutureGeneration {
        /// VM id.
        vm: String,
        /// Generation asked for.
        asked: u64,
        /// The VM's current generation.
        current: u64,
    },
    /// `re-pair` by a claimant that does not hold the current generation.
    #[error(
        "{claimant:?} does not hold generation {generation} of VM {vm:?} (holder: {holder:?})"
    )]
    NotHolder {
        /// VM id.
        vm: String,
        /// Who asked.
        claimant: String,
        /// The current generation.
        generation: u64,
        /// Its holder, if any.
        holder: Option<String>,
    },
    /// `re-pair` from a generation that is no longer current (and not a retry).
    #[error("generation {asked} of VM {vm:?} is stale (current generation is {current})")]
    StaleGeneration {
        /// VM id.
        vm: String,
        /// Generation asked for.
        asked: u64,
        /// The VM's current generation.
        current: u64,
    },
    /// The generation counter would overflow.
    #[error("generation {0} is the last one; it cannot be re-paired")]
    GenerationExhausted(u64),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// One log record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    /// The new state of a VM.
    Put { entry: Entry },
    /// A VM removed by an operator; its generations up to `retired_generation` are retired.
    Clear { vm: String, retired_generation: u64 },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    vms: BTreeMap<String, Entry>,
    cleared: BTreeMap<String, u64>,
}

impl State {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Put { entry } => {
                self.cleared.remove(&entry.vm);
                self.vms.insert(entry.vm.clone(), entry);
            }
            Record::Clear {
                vm,
                retired_generation,
            } => {
                self.vms.remove(&vm);
                let retired = self.cleared.entry(vm).or_insert(0);
                *retired = (*retired).max(retired_generation);
            }
        }
    }

    fn slot(&self, vm: &str) -> Slot<'_> {
        match (self.vms.get(vm), self.cleared.get(vm)) {
            (Some(e), _) => Slot::Live(e),
            (None, Some(&retired)) => Slot::Cleared(retired),
            (None, None) => Slot::Unknown,
        }
    }

    fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let clears = self.cleared.iter().map(|(vm, g)| Record::Clear {
            vm: vm.clone(),
            retired_generation: *g,
        });
        let puts = self.vms.values().map(|e| Record::Put { entry: e.clone() });
        clears.chain(puts)
    }
}

fn encode(record: &Record, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(record).expect("records always serialize");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// A record frame that parsed and passed its checksum, or why not.
enum Frame<'a> {
    Valid { payload: &'a [u8], next: usize },
    Invalid { next: Option<usize> },
}

fn frame_at(bytes: &[u8], pos: usize) -> Frame<'_> {
    let rest = &bytes[pos..];
    if rest.len() < RECORD_HEADER_BYTES {
        return Frame::Invalid { next: None };
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
    if len > MAX_RECORD_BYTES || rest.len() < RECORD_HEADER_BYTES + len {
        return Frame::Invalid { next: None };
    }
    let payload = &rest[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len];
    let next = pos + RECORD_HEADER_BYTES + len;
    if crc32fast::hash(payload) != crc {
        return Frame::Invalid { next: Some(next) };
    }
    Frame::Valid { payload, next }
}

/// What replaying the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Valid records replayed.
    pub records: u64,
    /// Bytes of a torn tail that were dropped (never acknowledged).
    pub torn_bytes: u64,
    /// Where the dropped bytes were saved, if any.
    pub torn_saved_to: Option<PathBuf>,
}

struct Replay {
    state: State,
    records: u64,
    valid_len: usize,
}

fn replay(path: &Path, bytes: &[u8]) -> Result<Replay, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < LOG_MAGIC.len() || &bytes[..LOG_MAGIC.len()] != LOG_MAGIC {
        return Err(corrupt(
            "it does not start with the arbiter log magic".into(),
        ));
    }
    let mut state = State::default();
    let mut records = 0;
    let mut pos = LOG_MAGIC.len();
    while pos < bytes.len() {
        match frame_at(bytes, pos) {
            Frame::Valid { payload, next } => {
                let record: Record = serde_json::from_slice(payload).map_err(|e| {
                    corrupt(format!(
                        "record at byte {pos} has a valid checksum but: {e}"
                    ))
                })?;
                state.apply(record);
                records += 1;
                pos = next;
            }
            Frame::Invalid { next } => {
                if let Some(next) = next {
                    if next < bytes.len() && matches!(frame_at(bytes, next), Frame::Valid { .. }) {
                        return Err(corrupt(format!(
                            "record at byte {pos} fails its checksum but is followed by a \
                             valid record; this is not a torn write, refusing to drop \
                             acknowledged decisions"
                        )));
                    }
                }
                break;
            }
        }
    }
    Ok(Replay {
        state,
        records,
        valid_len: pos,
    })
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync of directory {}", dir.display())))
}

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    let path = dir.join(name);
    let mut f = File::create(&path).map_err(io_err(format!("create {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(format!("write {}", path.display())))?;
    Ok(path)
}

#[allow(unsafe_code)] // one flock(2) call, see SAFETY below
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("open {}", path.display())))?;
    // SAFETY: flock takes a file descriptor and flags and touches no memory of ours;
    // `file` keeps the descriptor open for the whole call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        return Err(io_err(format!("flock {}", path.display()))(e));
    }
    Ok(file)
}

struct Inner {
    state: State,
    /// Encoded records decided but not yet written.
    pending: Vec<u8>,
    /// Number of records decided so far (in this process).
    appended: u64,
    poisoned: bool,
}

struct Syncer {
    file: File,
    /// Number of records written and fsync'd so far (in this process).
    durable: u64,
}

/// The durable store. All methods block (file I/O, fsync); call them from a blocking
/// context. Decisions are serialized by a mutex, so two claims can never both win.
pub struct Store {
    dir: PathBuf,
    inner: Mutex<Inner>,
    syncer: Mutex<Syncer>,
    recovery: Recovery,
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: locks it, replays and compacts the log.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        let lock = lock_dir(dir)?;
        let path = dir.join(LOG_FILE);
        let mut recovery = Recovery::default();
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let r = replay(&path, &bytes)?;
                recovery.records = r.records;
                if r.valid_len < bytes.len() {
                    let torn = &bytes[r.valid_len..];
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    let saved = write_durably(dir, &format!("{LOG_FILE}.torn-{nanos}"), torn)?;
                    warn!(
                        bytes = torn.len(),
                        offset = r.valid_len,
                        saved = %saved.display(),
                        "dropped a torn, never acknowledged record at the end of the log"
                    );
                    recovery.torn_bytes = torn.len() as u64;
                    recovery.torn_saved_to = Some(saved);
                }
                r.state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
        };
        // Compact: the state alone, atomically replacing the log.
        let mut snapshot = LOG_MAGIC.to_vec();
        for record in state.records() {
            encode(&record, &mut snapshot);
        }
        let tmp = write_durably(dir, &format!("{LOG_FILE}.tmp"), &snapshot)?;
        fs::rename(&tmp, &path).map_err(io_err(format!("rename {}", tmp.display())))?;
        sync_dir(dir)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(format!("open {}", path.display())))?;
        info!(
            dir = %dir.display(),
            vms = state.vms.len(),
            cleared = state.cleared.len(),
            records = recovery.records,
            "store opened"
        );
        Ok(Store {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner {
                state,
                pending: Vec::new(),
                appended: 0,
                poisoned: false,
            }),
            syncer: Mutex::new(Syncer { file, durable: 0 }),
            recovery,
            _lock: lock,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What was found when the log was replayed.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    fn lock_inner(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        let inner = self.inner.lock().map_err(|_| StoreError::Poisoned)?;
        if inner.poisoned {
            return Err(StoreError::Poisoned);
        }
        Ok(inner)
    }

    /// Runs `decide` on the state under the decision lock; applies and logs the record it
    /// returns; then waits until everything decided so far (which the answer may reveal)
    /// is durable.
    fn decide<T>(
        &self,
        decide: impl FnOnce(&State) -> Result<(T, Option<Record>), StoreError>,
    ) -> Result<T, StoreError> {
        let (answer, seq) = {
            let mut inner = self.lock_inner()?;
            let (answer, record) = decide(&inner.state)?;
            if let Some(record) = record {
                encode(&record, &mut inner.pending);
                inner.state.apply(record);
                inner.appended += 1;
            }
            (answer, inner.appended)
        };
        self.sync_to(seq)?;
        Ok(answer)
    }

    /// Makes the first `seq` records durable. Whoever holds the sync lock writes every
    /// pending record in one go, so waiters queued behind it usually find their work done.
    fn sync_to(&self, seq: u64) -> Result<(), StoreError> {
        let mut syncer = self.syncer.lock().map_err(|_| StoreError::Poisoned)?;
        if syncer.durable >= seq {
            return Ok(());
        }
        let (buf, upto) = {
            let mut inner = self.lock_inner()?;
            (std::mem::take(&mut inner.pending), inner.appended)
        };
        let result = syncer
            .file
            .write_all(&buf)
            .and_then(|_| syncer.file.sync_data());
        match result {
            Ok(()) => {
                syncer.durable = upto;
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "log write failed; the store stops deciding");
                if let Ok(mut inner) = self.inner.lock() {
                    inner.poisoned = true;
                }
                Err(io_err(format!(
                    "append to {}",
                    self.dir.join(LOG_FILE).display()
                ))(e))
            }
        }
    }

    /// Test-and-set: `claimant` asks to hold `generation` of `vm`; see [`rules::claim`].
    pub fn test_and_set(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<ClaimResponse, StoreError> {
        self.decide(|state| {
            let (answer, put) = rules::claim(state.slot(vm), vm, claimant, generation)?;
            Ok((answer, put.map(|entry| Record::Put { entry })))
        })
    }

    /// Re-pair: the holder of the current generation `generation` of `vm` opens
    /// `generation + 1`; see [`rules::re_pair`].
    pub fn re_pair(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<RePairResponse, StoreError> {
        self.decide(|state| {
            let (answer, put) = rules::re_pair(state.slot(vm), vm, claimant, generation)?;
            Ok((answer, put.map(|entry| Record::Put { entry })))
        })
    }

    /// The entry of `vm`, if known.
    pub fn get(&self, vm: &str) -> Result<Option<Entry>, StoreError> {
        self.decide(|state| Ok((state.vms.get(vm).cloned(), None)))
    }

    /// Every entry and every tombstone, sorted by VM id.
    pub fn list(&self) -> Result<ListResponse, StoreError> {
        self.decide(|state| {
            let vms = state.vms.values().cloned().collect();
            let cleared = state
                .cleared
                .iter()
                .map(|(vm, g)| Tombstone {
                    vm: vm.clone(),
                    retired_generation: *g,
                })
                .collect();
            Ok((ListResponse { vms, cleared }, None))
        })
    }

    /// Operator clear: removes `vm`, retiring its generations (see [`Tombstone`]).
    /// Returns the removed entry, or `None` if the VM was not known.
    pub fn clear(&self, vm: &str) -> Result<Option<Entry>, StoreError> {
        self.decide(|state| match rules::clear(state.slot(vm)) {
            None => Ok((None, None)),
            Some(retired_generation) => Ok((
                state.vms.get(vm).cloned(),
                Some(Record::Clear {
                    vm: vm.to_owned(),
                    retired_generation,
                }),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Outcome;

    fn outcome(store: &Store, vm: &str, claimant: &str, generation: u64) -> Outcome {
        store
            .test_and_set(vm, claimant, generation)
            .unwrap()
            .outcome
    }

    #[test]
    fn claim_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(outcome(&store, "vm", "a", 5), Outcome::Won);
        assert_eq!(outcome(&store, "vm", "a", 5), Outcome::Won, "idempotent");
        let lost = store.test_and_set("vm", "b", 5).unwrap();
        assert_eq!(
            (lost.outcome, lost.holder.as_deref()),
            (Outcome::Lost, Some("a"))
        );
        assert_eq!(outcome(&store, "vm", "b", 4), Outcome::Stale);
        assert!(matches!(
            store.test_and_set("vm", "b", 6),
            Err(StoreError::FutureGeneration { current: 5, .. })
        ));
        assert!(matches!(
            store.re_pair("vm", "b", 5),
            Err(StoreError::NotHolder { .. })
        ));
        assert_eq!(store.re_pair("vm", "a", 5).unwrap().generation, 6);
        assert_eq!(
            store.re_pair("vm", "a", 5).unwrap().generation,
            6,
            "idempotent"
        );
        assert!(matches!(
            store.re_pair("vm", "a", 6),
            Err(StoreError::NotHolder { .. })
        ));
        assert!(matches!(
            store.re_pair("vm", "b", 5),
            Err(StoreError::StaleGeneration { .. })
        ));
        assert_eq!(outcome(&store, "vm", "a", 5), Outcome::Stale);
        assert_eq!(outcome(&store, "vm", "c", 6), Outcome::Won);
        assert!(matches!(
            store.re_pair("nope", "a", 1),
            Err(StoreError::UnknownVm(_))
        ));

        // Clear retires the generations used so far.
        let cleared = store.clear("vm").unwrap().unwrap();
        assert_eq!(cleared.generation, 6);
        assert_eq!(store.get("vm").unwrap(), None);
        assert_eq!(store.clear("vm").unwrap(), None);
        assert_eq!(outcome(&store, "vm", "a", 6), Outcome::Stale);
        assert_eq!(outcome(&store, "vm", "a", 1), Outcome::Stale);
        assert_eq!(store.list().unwrap().cleared[0].retired_generation, 6);
        assert_eq!(outcome(&store, "vm", "d", 7), Outcome::Won);
        assert!(store.list().unwrap().cleared.is_empty());

        // Overflow is refused, not wrapped.
        assert_eq!(outcome(&store, "max", "a", u64::MAX), Outcome::Won);
        assert!(matches!(
            store.re_pair("max", "a", u64::MAX),
            Err(StoreError::GenerationExhausted(_))
        ));
    }

    #[test]
    fn state_survives_reopen_and_the_dir_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert!(matches!(
            Store::open(tmp.path()),
            Err(StoreError::Locked(_))
        ));
        store.test_and_set("a", "x", 1).unwrap();
        store.re_pair("a", "x", 1).unwrap();
        store.test_and_set("b", "y", 3).unwrap();
        store.test_and_set("c", "z", 1).unwrap();
        store.clear("c").unwrap();
        let before = store.list().unwrap();
        drop(store);
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.list().unwrap(), before);
        assert_eq!(store.recovery().torn_bytes, 0);
        assert_eq!(store.recovery().records, 5);
        drop(store);
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.list().unwrap(), before);
        assert_eq!(
            store.recovery().records,
            3,
            "compacted to one record per VM"
        );
    }

    /// Cuts the log at every byte offset: the store always opens with exactly the records
    /// that are complete, and keeps working.
    #[test]
    fn every_truncation_recovers_the_complete_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let origin = tmp.path().join("origin");
        let store = Store::open(&origin).unwrap();
        // Each of these appends exactly one record; remember the state after each.
        let mut states = vec![store.list().unwrap()];
        store.test_and_set("a", "x", 1).unwrap();
        states.push(store.list().unwrap());
        store.re_pair("a", "x", 1).unwrap();
        states.push(store.list().unwrap());
        store.test_and_set("a", "y", 2).unwrap();
        states.push(store.list().unwrap());
        store.clear("a").unwrap();
        states.push(store.list().unwrap());
        store.test_and_set("b", "x", 9).unwrap();
        states.push(store.list().unwrap());
        drop(store);
        let log = fs::read(origin.join(LOG_FILE)).unwrap();
        // Record boundaries, from the framing.
        let mut ends = vec![LOG_MAGIC.len()];
        while *ends.last().unwrap() < log.len() {
            let at = *ends.last().unwrap();
            let len = u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
            ends.push(at + RECORD_HEADER_BYTES + len);
        }
        assert_eq!(ends.len(), states.len());
        // Every offset through the first two records (each position in a header and a
        // payload), then around every later record boundary: the framing is the same for
        // every record, and each cut costs a few fsyncs.
        let cuts = (LOG_MAGIC.len()..=ends[2]).chain(ends[2..].iter().flat_map(|&end| {
            [
                end.saturating_sub(5),
                end - 1,
                end,
                end + 1,
                end + 4,
                end + 9,
            ]
            .into_iter()
            .filter(|&c| c > ends[2] && c <= log.len())
        }));
        let mut checked = 0;
        for cut in cuts {
            checked += 1;
            let dir = tmp.path().join(format!("cut-{cut}"));
            if dir.exists() {
                continue;
            }
            fs::create_dir(&dir).unwrap();
            fs::write(dir.join(LOG_FILE), &log[..cut]).unwrap();
            let store = Store::open(&dir).unwrap();
            let complete = ends.iter().filter(|&&end| end <= cut).count() - 1;
            assert_eq!(store.list().unwrap(), states[complete], "cut at {cut}");
            let torn = (cut - ends[complete]) as u64;
            assert_eq!(store.recovery().torn_bytes, torn, "cut at {cut}");
            assert_eq!(store.recovery().torn_saved_to.is_some(), torn > 0);
            // Still decides, and the decision survives a reopen (checked around each
            // record boundary only, to keep the test quick: it costs several fsyncs).
            if !ends.iter().any(|&end| cut == end || cut == end + 1) {
                continue;
            }
            store.test_and_set("after", "z", 1).unwrap();
            drop(store);
            let store = Store::open(&dir).unwrap();
            assert_eq!(store.recovery().torn_bytes, 0);
            assert_eq!(
                store.get("after").unwrap().unwrap().holder.as_deref(),
                Some("z")
            );
        }
        assert!(checked > ends[2], "{checked} cuts checked");
        eprintln!("{checked} cuts of a {}-byte log checked", log.len());
    }

    #[test]
    fn foreign_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(LOG_FILE), b"not an arbiter log").unwrap();
        assert!(matches!(
            Store::open(tmp.path()),
            Err(StoreError::Corrupt { .. })
        ));
        // A valid checksum around a payload that is not a record is not a torn write either.
        let mut log = LOG_MAGIC.to_vec();
        let payload = b"{\"op\":\"steal\"}";
        log.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        log.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        log.extend_from_slice(payload);
        fs::write(tmp.path().join(LOG_FILE), &log).unwrap();
        assert!(matches!(
            Store::open(tmp.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn concurrent_claims_have_one_winner() {
        let tmp = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(tmp.path()).unwrap());
        for round in 0..20 {
            let vm = format!("vm-{round}");
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let (store, vm) = (store.clone(), vm.clone());
                    std::thread::spawn(move || {
                        store.test_and_set(&vm, &format!("c{t}"), 1).unwrap()
                    })
                })
                .collect();
            let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners = answers.iter().filter(|a| a.outcome == Outcome::Won).count();
            assert_eq!(winners, 1);
            let holder = &answers[0].holder;
            assert!(answers.iter().all(|a| &a.holder == holder));
        }
    }
}
