//! Durable arbiter state: an in-memory map of VM entries, rebuilt at start from an
//! append-only log of checksummed records. Every decision is written to the log and
//! fsync'd before it is answered (group commit: concurrent decisions share one fsync).
//!
//! # On-disk format
//!
//! `<data-dir>/arbiter.log` starts with the 8-byte magic [`LOG_MAGIC`] (`TWINARB2`, format
//! 2), then records:
//!
//! `[RECORD_MAGIC: 4][len: u32 LE][crc32(magic, len): u32 LE][crc32(len, payload): u32 LE][payload: len bytes of JSON]`.
//!
//! A payload is either `{"op":"put","entry":{..}}` (the new state of one VM) or
//! `{"op":"clear","vm":..,"retired_generation":..}`. The per-record magic makes zero fill
//! invalid and lets replay find records again after damage; the header checksum tells a
//! damaged length from a record cut short. Format 1 (`TWINARB1`, records
//! `[len][crc32(payload)][payload]`) is still read, and rewritten in format 2 at start.
//!
//! # Recovery
//!
//! Records are acknowledged only after their fsync and fsyncs are sequential, so after a
//! crash only an unacknowledged tail can be damaged. Replay reads every valid record; at
//! the first unreadable byte it decides:
//!
//! * if a valid record starts anywhere after it, the damage is in the middle: the store
//!   refuses to open, naming the byte offset (dropping it would forget acknowledged
//!   decisions);
//! * if the rest is a torn tail (zeros; a record cut short, possibly followed by zeros; or
//!   one last full-length record failing its payload checksum), it is dropped and its
//!   bytes are kept in `arbiter.log.torn-*` for inspection;
//! * anything else (garbage, a damaged length with nothing valid after it) also refuses
//!   to open, naming the offset.
//!
//! The log is then compacted: the state is written to `arbiter.log.tmp`, fsync'd, renamed
//! over `arbiter.log` and the directory fsync'd. `arbiter.lock` (flock) keeps a second
//! arbiter off the same directory. Appends go through a [`LogSink`] (the log file; tests
//! substitute one whose fsync they observe or fail).

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
/// First bytes of a log in the current format (2), the only one written.
pub const LOG_MAGIC: &[u8; 8] = b"TWINARB2";
/// First bytes of a log in format 1 (read, then rewritten in format 2 by compaction).
pub const LOG_MAGIC_V1: &[u8; 8] = b"TWINARB1";
/// First bytes of every record of format 2. Never zero (zero fill is never a record) and
/// never inside a JSON payload (0xF5 appears in no UTF-8 text), so records can be found
/// again after damage.
pub const RECORD_MAGIC: [u8; 4] = [0xF5, b'A', b'R', b'c'];
/// Largest record payload accepted when replaying the log.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Size of a record's header in format 2 (magic, length and two checksums).
pub const RECORD_HEADER_BYTES: usize = 16;
/// Size of a record's header in format 1 (length and checksum).
pub const RECORD_HEADER_BYTES_V1: usize = 8;

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

/// Log formats this build reads. It writes only [`Format::V2`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `TWINARB1`: `[len][crc32(payload)][payload]`.
    V1,
    /// `TWINARB2`: `[RECORD_MAGIC][len][crc32(magic, len)][crc32(len, payload)][payload]`.
    V2,
}

impl Format {
    fn of(bytes: &[u8]) -> Option<Format> {
        match bytes.get(..LOG_MAGIC.len()) {
            Some(m) if m == LOG_MAGIC => Some(Format::V2),
            Some(m) if m == LOG_MAGIC_V1 => Some(Format::V1),
            _ => None,
        }
    }

    fn number(self) -> u32 {
        match self {
            Format::V1 => 1,
            Format::V2 => 2,
        }
    }

    fn header_bytes(self) -> usize {
        match self {
            Format::V1 => RECORD_HEADER_BYTES_V1,
            Format::V2 => RECORD_HEADER_BYTES,
        }
    }
}

fn header_crc(magic_and_len: &[u8]) -> u32 {
    crc32fast::hash(magic_and_len)
}

fn payload_crc(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Encodes one record frame of the current format (2) around `payload`:
/// `[RECORD_MAGIC][len u32 LE][crc32 of magic and len][crc32 of len and payload][payload]`.
/// The store writes its records with it; tools and tests can use it to craft logs.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let hcrc = header_crc(&out[start..start + 8]);
    let pcrc = payload_crc(&out[start + 4..start + 8], payload);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&pcrc.to_le_bytes());
    out.extend_from_slice(payload);
}

fn encode(record: &Record, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(record).expect("records always serialize");
    encode_frame(&payload, out);
}

/// What is found at one offset of the log.
#[derive(Debug)]
enum Parsed<'a> {
    /// A complete record that passes every check.
    Record { payload: &'a [u8], next: usize },
    /// The log ends inside this record: a header cut short, or a (checked) header whose
    /// payload goes past the end.
    Short,
    /// A complete record, header checked, whose payload fails its checksum.
    BadPayload { next: usize },
    /// Not the start of a record: why.
    BadHeader(String),
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn parse_at(format: Format, bytes: &[u8], pos: usize) -> Parsed<'_> {
    let rest = &bytes[pos..];
    let header = format.header_bytes();
    match format {
        Format::V1 => {
            if rest.len() < header {
                return Parsed::Short;
            }
            let len = le32(&rest[0..4]) as usize;
            if len == 0 {
                // Never written (every payload is a JSON object): zeros, not a record.
                return Parsed::BadHeader("an empty record (zero length)".into());
            }
            if len > MAX_RECORD_BYTES {
                return Parsed::BadHeader(format!(
                    "a length field of {len} bytes, over the {MAX_RECORD_BYTES}-byte limit"
                ));
            }
            if rest.len() < header + len {
                return Parsed::Short;
            }
            let payload = &rest[header..header + len];
            let next = pos + header + len;
            if crc32fast::hash(payload) != le32(&rest[4..8]) {
                return Parsed::BadPayload { next };
            }
            Parsed::Record { payload, next }
        }
        Format::V2 => {
            let magic = rest.len().min(RECORD_MAGIC.len());
            if rest[..magic] != RECORD_MAGIC[..magic] {
                return Parsed::BadHeader("no record magic".into());
            }
            if rest.len() < 12 {
                return Parsed::Short;
            }
            if header_crc(&rest[0..8]) != le32(&rest[8..12]) {
                return Parsed::BadHeader("a record header failing its checksum".into());
            }
            let len = le32(&rest[4..8]) as usize;
            if len == 0 || len > MAX_RECORD_BYTES {
                return Parsed::BadHeader(format!("a record length of {len} bytes"));
            }
            if rest.len() < header + len {
                return Parsed::Short;
            }
            let payload = &rest[header..header + len];
            let next = pos + header + len;
            if payload_crc(&rest[4..8], payload) != le32(&rest[12..16]) {
                return Parsed::BadPayload { next };
            }
            Parsed::Record { payload, next }
        }
    }
}

/// The first offset after `pos` where a complete, valid record starts, if any. Records of
/// format 2 start with [`RECORD_MAGIC`]; the payloads of format 1 all start with `{"op":"`.
fn readable_record_after(format: Format, bytes: &[u8], pos: usize) -> Option<usize> {
    let (needle, back): (&[u8], usize) = match format {
        Format::V1 => (b"{\"op\":\"", RECORD_HEADER_BYTES_V1),
        Format::V2 => (&RECORD_MAGIC, 0),
    };
    let from = pos + 1 + back;
    if from >= bytes.len() {
        return None;
    }
    bytes[from..]
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| from + i - back)
        .find(|&q| matches!(parse_at(format, bytes, q), Parsed::Record { .. }))
}

/// Whether the unreadable bytes from `pos` to the end can be what a crash leaves of an
/// append that was never acknowledged: zeros (the file grew but its data never reached
/// the disk), a record cut short (possibly followed by zeros), or one last record of full
/// length whose payload fails its checksum. `None` if so, else what is wrong.
fn torn_tail(format: Format, bytes: &[u8], pos: usize, found: &Parsed<'_>) -> Option<String> {
    let nonzero_end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if nonzero_end <= pos {
        return None; // zeros only
    }
    match found {
        Parsed::Short => return None,
        Parsed::BadPayload { next } if *next == bytes.len() => return None,
        _ => {}
    }
    // The same, followed by zeros: a page of the append never reached the disk.
    match parse_at(format, &bytes[..nonzero_end], pos) {
        Parsed::Short => return None,
        Parsed::BadPayload { next } if next == nonzero_end => return None,
        _ => {}
    }
    Some(match found {
        Parsed::BadHeader(why) => why.clone(),
        Parsed::BadPayload { next } => format!(
            "a record failing its checksum, followed by {} more bytes",
            bytes.len() - next
        ),
        Parsed::Short | Parsed::Record { .. } => "a record".into(),
    })
}

/// What replaying the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Format version of the log as found (it is rewritten in the current format).
    pub format: u32,
    /// Valid records replayed.
    pub records: u64,
    /// Bytes of a torn tail that were dropped (never acknowledged).
    pub torn_bytes: u64,
    /// Where the dropped bytes were saved, if any.
    pub torn_saved_to: Option<PathBuf>,
}

struct Replay {
    format: Format,
    state: State,
    records: u64,
    valid_len: usize,
}

fn replay(path: &Path, bytes: &[u8]) -> Result<Replay, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let Some(format) = Format::of(bytes) else {
        return Err(corrupt(
            "it does not start with an arbiter log magic (TWINARB1 or TWINARB2)".into(),
        ));
    };
    let mut state = State::default();
    let mut records = 0;
    let mut pos = LOG_MAGIC.len();
    while pos < bytes.len() {
        let found = parse_at(format, bytes, pos);
        let (payload, next) = match found {
            Parsed::Record { payload, next } => (payload, next),
            _ => {
                // Everything from here on is dropped only if it is a torn tail.
                if let Some(q) = readable_record_after(format, bytes, pos) {
                    let what = match found {
                        Parsed::BadHeader(why) => why,
                        Parsed::BadPayload { .. } => "a record failing its checksum".into(),
                        _ => "a record with a damaged length".into(),
                    };
                    return Err(corrupt(format!(
                        "unreadable bytes at byte {pos} ({what}) are followed by a valid \
                         record at byte {q}: this is not a torn write; refusing to start \
                         rather than drop acknowledged decisions (inspect the log, restore \
                         it from a backup or remove the damaged bytes by hand)"
                    )));
                }
                if let Some(what) = torn_tail(format, bytes, pos, &found) {
                    return Err(corrupt(format!(
                        "unreadable bytes at byte {pos} to the end ({} bytes: {what}) are not \
                         a torn record; refusing to start rather than guess (inspect the log, \
                         restore it from a backup or remove the damaged bytes by hand)",
                        bytes.len() - pos
                    )));
                }
                break;
            }
        };
        let record: Record = serde_json::from_slice(payload).map_err(|e| {
            corrupt(format!(
                "record at byte {pos} has a valid checksum but: {e}"
            ))
        })?;
        state.apply(record);
        records += 1;
        pos = next;
    }
    Ok(Replay {
        format,
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

/// Where the store appends its records: the log file opened for appending, or a wrapper
/// around it that observes or faults writes and fsyncs (tests).
pub trait LogSink: Send {
    /// Appends `bytes` at the end of the log.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable (`fdatasync`). The store answers no
    /// decision before this returned `Ok` for the bytes that record it.
    fn sync(&mut self) -> io::Result<()>;
}

impl LogSink for File {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

struct Syncer {
    file: Box<dyn LogSink>,
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
        Store::open_with_sink(dir, |file| Box::new(file))
    }

    /// [`open`](Store::open), appending through the [`LogSink`] that `sink` makes of the
    /// log file (opened for appending): to observe or fault writes and fsyncs.
    pub fn open_with_sink(
        dir: &Path,
        sink: impl FnOnce(File) -> Box<dyn LogSink>,
    ) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        let lock = lock_dir(dir)?;
        let path = dir.join(LOG_FILE);
        let mut recovery = Recovery::default();
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let r = replay(&path, &bytes)?;
                recovery.records = r.records;
                recovery.format = r.format.number();
                if r.format != Format::V2 {
                    info!(
                        from = r.format.number(),
                        to = 2,
                        "rewriting the log in the current format"
                    );
                }
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
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                recovery.format = Format::V2.number();
                State::default()
            }
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
            syncer: Mutex::new(Syncer {
                file: sink(file),
                durable: 0,
            }),
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
        let result = syncer.file.append(&buf).and_then(|_| syncer.file.sync());
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
            let len = u32::from_le_bytes(log[at + 4..at + 8].try_into().unwrap()) as usize;
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
        for format in [Format::V1, Format::V2] {
            let log = log_of(format, &["{\"op\":\"steal\"}"]).0;
            fs::write(tmp.path().join(LOG_FILE), &log).unwrap();
            assert!(matches!(
                Store::open(tmp.path()),
                Err(StoreError::Corrupt { .. })
            ));
        }
    }

    fn put(vm: &str, generation: u64, holder: &str) -> String {
        format!(
            r#"{{"op":"put","entry":{{"vm":"{vm}","generation":{generation},"holder":"{holder}","opened_by":null}}}}"#
        )
    }

    /// A log of `format` holding `payloads`, and the offset of each record.
    fn log_of(format: Format, payloads: &[&str]) -> (Vec<u8>, Vec<usize>) {
        let mut log = match format {
            Format::V1 => LOG_MAGIC_V1.to_vec(),
            Format::V2 => LOG_MAGIC.to_vec(),
        };
        let mut starts = Vec::new();
        for p in payloads {
            starts.push(log.len());
            match format {
                Format::V1 => {
                    log.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    log.extend_from_slice(&crc32fast::hash(p.as_bytes()).to_le_bytes());
                    log.extend_from_slice(p.as_bytes());
                }
                Format::V2 => encode_frame(p.as_bytes(), &mut log),
            }
        }
        (log, starts)
    }

    /// Four grants: a/1, b/1, c/1, d/1.
    fn four_grants(format: Format) -> (Vec<u8>, Vec<usize>) {
        let records = [
            put("a", 1, "x"),
            put("b", 1, "x"),
            put("c", 1, "x"),
            put("d", 1, "x"),
        ];
        log_of(
            format,
            &records.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        )
    }

    fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<Store, StoreError>) {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(LOG_FILE), bytes).unwrap();
        let store = Store::open(tmp.path());
        (tmp, store)
    }

    fn holders(store: &Store) -> Vec<String> {
        store
            .list()
            .unwrap()
            .vms
            .into_iter()
            .map(|e| e.vm)
            .collect()
    }

    /// The store refuses `bytes`, and says where the damage is.
    fn assert_refused(bytes: &[u8], offset: usize, what: &str) {
        match open_bytes(bytes).1 {
            Err(StoreError::Corrupt { reason, .. }) => assert!(
                reason.contains(&format!("at byte {offset} ")),
                "{what}: the error should name byte {offset}: {reason}"
            ),
            Err(e) => panic!("{what}: wrong error {e}"),
            Ok(store) => panic!(
                "{what}: opened with {:?} ({} torn bytes dropped)",
                holders(&store),
                store.recovery().torn_bytes
            ),
        }
    }

    /// A damaged length field in the middle of the log (in either format) must not make
    /// the valid records after it look like a torn tail.
    #[test]
    fn a_damaged_length_in_the_middle_refuses_to_open() {
        for format in [Format::V1, Format::V2] {
            let (log, starts) = four_grants(format);
            let len_at = starts[1] + if format == Format::V1 { 0 } else { 4 };
            let len = le32(&log[len_at..]);
            for (what, damaged) in [
                ("past the limit", 0x0100_0000 | len),
                ("past the end", len + 4096),
                ("a little longer", len + 3),
                ("a little shorter", len - 5),
                ("zero", 0),
            ] {
                let mut bytes = log.clone();
                bytes[len_at..len_at + 4].copy_from_slice(&damaged.to_le_bytes());
                assert_refused(&bytes, starts[1], &format!("{format:?}, length {what}"));
            }
        }
    }

    /// Other damage in the middle: a flipped payload bit, zeros over a record, a few bytes
    /// of garbage inserted between records.
    #[test]
    fn damage_in_the_middle_refuses_to_open() {
        for format in [Format::V1, Format::V2] {
            let (log, starts) = four_grants(format);
            let mut flipped = log.clone();
            flipped[starts[2] + 20] ^= 0x10;
            assert_refused(&flipped, starts[2], &format!("{format:?}, flipped bit"));
            let mut zeroed = log.clone();
            zeroed[starts[1]..starts[2]].fill(0);
            assert_refused(&zeroed, starts[1], &format!("{format:?}, zeroed record"));
            let mut inserted = log[..starts[3]].to_vec();
            inserted.extend_from_slice(b"garbage!");
            inserted.extend_from_slice(&log[starts[3]..]);
            assert_refused(
                &inserted,
                starts[3],
                &format!("{format:?}, inserted garbage"),
            );
        }
    }

    /// Zeros after the last record (a file extended by a crash whose data never landed)
    /// are a torn tail, never a record; the store opens with every record and keeps
    /// working, and a record cut short and followed by zeros is torn too.
    #[test]
    fn zeros_at_the_tail_are_a_torn_tail() {
        for format in [Format::V1, Format::V2] {
            let (log, starts) = four_grants(format);
            for zeros in [1, 7, 8, 9, 16, 4096] {
                let mut bytes = log.clone();
                bytes.resize(log.len() + zeros, 0);
                let (tmp, store) = open_bytes(&bytes);
                let store = store.unwrap_or_else(|e| panic!("{format:?}, {zeros} zeros: {e}"));
                assert_eq!(holders(&store), ["a", "b", "c", "d"], "{format:?}");
                assert_eq!(store.recovery().torn_bytes, zeros as u64);
                assert_eq!(store.recovery().format, format.number());
                store.test_and_set("e", "y", 1).unwrap();
                drop(store);
                let store = Store::open(tmp.path()).unwrap();
                assert_eq!(holders(&store), ["a", "b", "c", "d", "e"]);
                assert_eq!(store.recovery().format, 2, "rewritten in format 2");
            }
            // The last record cut in its payload, the rest of its page never written.
            let mut bytes = log[..starts[3] + 20].to_vec();
            bytes.resize(starts[3] + 4096, 0);
            let (_tmp, store) = open_bytes(&bytes);
            let store = store.unwrap();
            assert_eq!(holders(&store), ["a", "b", "c"], "{format:?}");
            assert_eq!(store.recovery().torn_bytes, 4096 - 20 + 20);
        }
        // A format-2 header cut after its length, then zeros: its header checksum fails
        // only because its bytes never landed.
        let (log, starts) = four_grants(Format::V2);
        let mut bytes = log[..starts[3] + 6].to_vec();
        bytes.resize(starts[3] + 64, 0);
        assert_eq!(holders(&open_bytes(&bytes).1.unwrap()), ["a", "b", "c"]);
    }

    /// Bytes at the end that no crash of an append can leave are not dropped.
    #[test]
    fn garbage_at_the_tail_refuses_to_open() {
        for format in [Format::V1, Format::V2] {
            let (log, _) = four_grants(format);
            let mut bytes = log.clone();
            bytes.extend_from_slice(b"hello, this is not a record at all");
            assert_refused(&bytes, log.len(), &format!("{format:?}, text"));
            // A damaged length in the last record (its length is checked in format 2;
            // in format 1 a length past the limit cannot have been written).
            let (log, starts) = four_grants(format);
            let mut bytes = log.clone();
            if format == Format::V2 {
                bytes[starts[3] + 4] ^= 0x01;
            } else {
                bytes[starts[3] + 3] = 0x40;
            }
            assert_refused(&bytes, starts[3], &format!("{format:?}, last length"));
            // A record failing its checksum with more (non-zero) bytes after it.
            let mut bytes = log.clone();
            bytes[starts[3] + 20] ^= 0x10;
            bytes.extend_from_slice(b"xyz");
            assert_refused(
                &bytes,
                starts[3],
                &format!("{format:?}, bad record then bytes"),
            );
        }
    }

    /// A log in format 1 is read in full and rewritten in format 2.
    #[test]
    fn a_format_1_log_is_read_and_rewritten() {
        let (log, _) = four_grants(Format::V1);
        let (tmp, store) = open_bytes(&log);
        let store = store.unwrap();
        assert_eq!(holders(&store), ["a", "b", "c", "d"]);
        assert_eq!(store.recovery().format, 1);
        drop(store);
        let bytes = fs::read(tmp.path().join(LOG_FILE)).unwrap();
        assert_eq!(&bytes[..8], LOG_MAGIC);
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(holders(&store), ["a", "b", "c", "d"]);
        assert_eq!(store.recovery().format, 2);
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
