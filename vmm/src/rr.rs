//! Record and replay: where the machine's non-deterministic inputs come from and go.
//!
//! A live run takes time from the host clock and input from the terminal. A recording does
//! the same and also writes every such input to the log, at the position where the guest
//! saw it; a replay takes the inputs from the log instead and never consults the clock or
//! the terminal. The three differ only in the hooks below, which the vCPU loop calls at the
//! same points in all modes:
//!
//! | hook | when | record writes | replay |
//! |---|---|---|---|
//! | [`Mode::time_read`] | a guest read of a time-dependent port (PIT, port 0x61, RTC, the twinvm clock) | `PioIn` | returns the logged value |
//! | digest | at every position that is a multiple of the interval, and at the end | `Digest` | compares, stops on the first mismatch |
//! | asynchronous inputs | at a delivery point | `IrqLine`, `ConsoleIn` | applies the logged ones at this position |
//! | injection | at a delivery point, when the guest can take the PIC's vector | `Inject` | checks the logged vector |
//! | end | power-off, reset, stop | `End` | checks the reason |
//!
//! Any mismatch between the log and what the replaying guest does is a divergence, reported
//! with the position, the log entry and what differed; never tolerated.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logchannel::entry::{Digest, EndReason, Entry, LogHeader, Position};
use logchannel::error::LogError;
use logchannel::file::{LogReader, LogWriter};
use logchannel::transport::{LogReceiver, LogSender, TransportError};

/// Errors of recording or replaying.
#[derive(Debug, thiserror::Error)]
pub enum RrError {
    /// Reading or writing the log failed (the error names the byte offset and entry).
    #[error(transparent)]
    Log(#[from] LogError),
    /// The replaying guest did something other than the recorded one.
    #[error("replay diverged at position {pos}, log entry {entry}: {what}")]
    Divergence {
        /// The replay's position.
        pos: u64,
        /// Index of the log entry concerned (0 is the first entry after the header).
        entry: u64,
        /// What differed.
        what: String,
    },
    /// The log ended cleanly but without an `End` entry.
    #[error("the log ends after {entries} entries (replay at position {pos}) without an End entry: it was cut short (its recorder died, or the file was truncated at an entry boundary)")]
    NoEnd {
        /// Entries read.
        entries: u64,
        /// The replay's position.
        pos: u64,
    },
    /// The log channel to the backup or from the primary failed.
    #[error("log channel: {0}")]
    Channel(#[from] TransportError),
    /// The live peer is gone: the primary's stream ended before the replay's need (seen by
    /// the backup), or the backup stopped acknowledging (seen by the primary).
    #[error("the peer is lost at position {pos}: {reason}")]
    PeerLost {
        /// Where the loss was noticed.
        pos: u64,
        /// What the channel said.
        reason: String,
    },
    /// The replay was asked to stop while it waited for the primary's next entry.
    #[error("stopped while waiting for the log")]
    Interrupted,
    /// Reading the vCPU or memory for a digest failed.
    #[error("taking a state digest: {0}")]
    Kvm(String),
    /// The image to replay is not the one recorded.
    #[error("{0}")]
    ImageMismatch(String),
}

/// Where a recording goes.
#[derive(Debug)]
enum Sink {
    /// A log file.
    File(LogWriter),
    /// The live backup.
    Net(Arc<LogSender>),
}

/// How far a live backup may fall behind before the primary's guest is slowed down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagLimit {
    /// Entries sent but not acknowledged.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Positions the backup's replay may trail the primary by (the backlog a takeover must
    /// replay first).
    pub replay_positions: u64,
    /// The same bound in time: the positions the primary runs in this long (measured over
    /// the last second of its own progress), when that is fewer than `replay_positions`.
    pub replay_time: Duration,
    /// The time bound never goes below this many positions: each hold costs a round trip
    /// and a wake-up of both sides, and a primary allowed only a few hundred positions
    /// between holds (100 ms on a slow host) spends much of its time held (measured: held
    /// about 45% of the time at a floor of 1,000).
    pub replay_min_positions: u64,
}

/// The primary's recent rate of progress, in positions per second.
#[derive(Debug)]
struct Rate {
    since: Instant,
    at: Position,
    per_sec: f64,
}

impl Rate {
    fn new() -> Self {
        Rate {
            since: Instant::now(),
            at: Position::ZERO,
            per_sec: 0.0,
        }
    }

    /// Folds in that the primary is at `pos` now; excludes time it was held back.
    fn update(&mut self, pos: Position) {
        let dt = self.since.elapsed();
        if dt >= Duration::from_secs(1) {
            let now = pos.since(self.at) as f64 / dt.as_secs_f64();
            self.per_sec = if self.per_sec == 0.0 {
                now
            } else {
                0.5 * self.per_sec + 0.5 * now
            };
            self.since = Instant::now();
            self.at = pos;
        }
    }

    /// Restarts the measurement at `pos` (after the primary was held back).
    fn restart(&mut self, pos: Position) {
        self.since = Instant::now();
        self.at = pos;
    }
}

/// Writes a recording: to a file, or to the live backup.
#[derive(Debug)]
pub struct Recorder {
    sink: Sink,
    /// SHA-256 of the log's header (a snapshot taken while recording names it).
    header_sha256: [u8; 32],
    lag: Option<LagLimit>,
    /// Time the guest was held back by the lag limit.
    pub throttled: Duration,
    /// Time of that held back because the backup's replay lagged.
    pub replay_throttled: Duration,
    /// Times the guest was held back for the backup's replay.
    pub replay_holds: u64,
    rate: Rate,
    /// A stream that starts at a state transfer: the backup is where the transfer put it
    /// (this position) before it reports its replay.
    replay_floor: Position,
}

/// Where a replay's entries come from.
#[derive(Debug)]
enum Source {
    /// A log file.
    File(LogReader),
    /// The live primary.
    Net(LogReceiver),
}

/// Feeds a replay from a log file or from the live primary.
#[derive(Debug)]
pub struct Replayer {
    source: Source,
    stop: Option<Arc<AtomicBool>>,
    /// Position of the last entry received.
    pub last_received_pos: Position,
    /// The next entry, read ahead.
    next: Option<Entry>,
    /// Index of `next` in the log.
    index: u64,
    eof: bool,
    /// Digests compared so far (all matched, or the replay would have stopped).
    pub digests_matched: u64,
    /// The position of the last snapshot entry taken.
    snapshot_seen: Option<Position>,
}

/// Where the machine's non-deterministic inputs come from.
// One per machine, never moved in a hot path: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Mode {
    /// Host clock and terminal, nothing logged.
    Live,
    /// Host clock and terminal, everything logged.
    Record(Box<Recorder>),
    /// Everything from the log.
    Replay(Box<Replayer>),
}

impl Recorder {
    /// Creates the log file at `path` with `header`.
    pub fn create(path: &Path, header: &LogHeader) -> Result<Self, RrError> {
        Ok(Recorder {
            sink: Sink::File(LogWriter::create(path, header)?),
            header_sha256: header.sha256(),
            lag: None,
            throttled: Duration::ZERO,
            replay_throttled: Duration::ZERO,
            replay_holds: 0,
            rate: Rate::new(),
            replay_floor: Position::ZERO,
        })
    }

    /// Streams the recording to a live backup over `sender`, slowing the guest down when
    /// the backup lags beyond `lag`.
    pub fn live(sender: Arc<LogSender>, lag: LagLimit) -> Self {
        Recorder {
            header_sha256: [0; 32],
            sink: Sink::Net(sender),
            lag: Some(lag),
            throttled: Duration::ZERO,
            replay_throttled: Duration::ZERO,
            replay_holds: 0,
            rate: Rate::new(),
            replay_floor: Position::ZERO,
        }
    }

    /// [`Recorder::live`] for a stream that starts at a state transfer taken at `pos`: the
    /// new backup starts there, so its replay lag counts from there.
    pub fn live_from(sender: Arc<LogSender>, lag: LagLimit, pos: Position) -> Self {
        let mut r = Self::live(sender, lag);
        r.replay_floor = pos;
        r
    }

    /// Appends one entry.
    pub fn append(&mut self, e: &Entry) -> Result<(), RrError> {
        match &mut self.sink {
            Sink::File(w) => w.append(e).map_err(RrError::from),
            Sink::Net(s) => s.send(e).map(|_| ()).map_err(RrError::from),
        }
    }

    /// Flow control at position `pos`: while the backup has more unacknowledged entries or
    /// bytes than the lag limit allows, or its replay trails `pos` by more than the replay
    /// bound, holds the guest back (returns early if `stop` is raised). Before waiting for
    /// the replay it logs a `Heartbeat` at `pos`, so that the backup can replay right up to
    /// here (a replay waits at the last entry it has for the next one).
    pub fn throttle(&mut self, pos: Position, stop: &AtomicBool) -> Result<(), RrError> {
        let (Sink::Net(s), Some(lag)) = (&self.sink, self.lag) else {
            return Ok(());
        };
        let s = s.clone();
        let f = s.in_flight();
        if f.entries > lag.entries || f.bytes > lag.bytes {
            let t0 = Instant::now();
            while !stop.load(Ordering::Acquire)
                && !s.wait_in_flight_at_most(lag.entries, lag.bytes, Duration::from_millis(50))?
            {
            }
            self.throttled += t0.elapsed();
            self.rate.restart(pos);
        }
        self.rate.update(pos);
        let by_time = (self.rate.per_sec * lag.replay_time.as_secs_f64()) as u64;
        // Until the rate is known, and never below the floor.
        let bound = if by_time == 0 {
            lag.replay_positions
        } else {
            by_time.clamp(
                lag.replay_min_positions.min(lag.replay_positions),
                lag.replay_positions,
            )
        };
        let replayed = s.acked().replayed.max(self.replay_floor);
        if pos.since(replayed) <= bound {
            return Ok(());
        }
        let t0 = Instant::now();
        self.append(&Entry::Heartbeat { pos })?;
        let target = pos.back(bound / 2);
        while !stop.load(Ordering::Acquire)
            && !s.wait_replayed(target, Duration::from_millis(50))?
        {}
        self.throttled += t0.elapsed();
        self.replay_throttled += t0.elapsed();
        self.replay_holds += 1;
        self.rate.restart(pos);
        Ok(())
    }

    /// Ends the recording: a file is flushed and synced; a live stream waits until the backup
    /// has acknowledged everything (bounded by the channel's failure detection). Returns the
    /// bytes of log written.
    pub fn finish(self) -> Result<u64, RrError> {
        match self.sink {
            Sink::File(w) => {
                let bytes = w.bytes_written();
                w.finish()?;
                Ok(bytes)
            }
            Sink::Net(s) => {
                let last = s.sent_seq();
                while !s.wait_acked_seq(last, Duration::from_secs(1))? {}
                Ok(s.acked().bytes)
            }
        }
    }

    /// Bytes of log written (a file) or acknowledged (a live backup) so far.
    pub fn bytes(&self) -> u64 {
        match &self.sink {
            Sink::File(w) => w.bytes_written(),
            Sink::Net(s) => s.acked().bytes,
        }
    }
}

impl Replayer {
    /// Opens a log for replay.
    pub fn open(path: &Path) -> Result<Self, RrError> {
        Ok(Self::new(Source::File(LogReader::open(path)?)))
    }

    /// Replays the live primary's stream.
    pub fn live(receiver: LogReceiver) -> Self {
        Self::new(Source::Net(receiver))
    }

    fn new(source: Source) -> Self {
        Replayer {
            source,
            stop: None,
            last_received_pos: Position::ZERO,
            next: None,
            index: 0,
            eof: false,
            digests_matched: 0,
            snapshot_seen: None,
        }
    }

    /// A flag that, once raised, makes a replay waiting for the primary's next entry stop.
    pub fn set_stop_flag(&mut self, stop: Arc<AtomicBool>) {
        self.stop = Some(stop);
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        match &self.source {
            Source::File(r) => r.header(),
            Source::Net(r) => r.header(),
        }
    }

    /// Whether entries come from a live primary.
    pub fn is_live(&self) -> bool {
        matches!(self.source, Source::Net(_))
    }

    /// Entries consumed so far.
    pub fn consumed(&self) -> u64 {
        self.index
    }

    /// Starts the replay after the first `entries` entries of the log, the point where the
    /// snapshot it resumes from was taken (at position `pos`): they are read and checked
    /// to lie at or before `pos`, and the entry after them must not.
    pub fn skip_to(&mut self, entries: u64, pos: Position) -> Result<(), RrError> {
        while self.index < entries {
            self.fill(pos)?;
            let e = self.take();
            if e.pos() > pos {
                return Err(RrError::Divergence {
                    pos: pos.get(),
                    entry: self.index - 1,
                    what: format!(
                        "the snapshot was taken at position {pos} after {entries} log entries, but entry {} is at position {}: it was not taken in this recording",
                        self.index - 1,
                        e.pos().get()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads ahead the next entry (blocking on a live stream).
    pub fn fill(&mut self, pos: Position) -> Result<(), RrError> {
        let mut waited = false;
        if self.next.is_none() && !self.eof {
            match &mut self.source {
                Source::File(reader) => match reader.next() {
                    Some(Ok(e)) => self.next = Some(e),
                    Some(Err(e)) => return Err(e.into()),
                    None => self.eof = true,
                },
                Source::Net(rx) => loop {
                    if self
                        .stop
                        .as_ref()
                        .is_some_and(|s| s.load(Ordering::Acquire))
                    {
                        return Err(RrError::Interrupted);
                    }
                    // First only what has arrived already; before waiting for more, the
                    // replay tells the primary how far it is (below), so a primary held
                    // back for this replay goes on at once rather than after the wait.
                    let wait = if waited {
                        Duration::from_millis(100)
                    } else {
                        Duration::ZERO
                    };
                    match rx.recv_timeout(wait) {
                        // The primary's VMM failed (a host-side error, not the guest's
                        // doing): for this backup that is the loss of its primary, settled
                        // through the arbiter, never a divergence.
                        Ok(Some(Entry::End {
                            reason: EndReason::Error(msg),
                            pos: at,
                        })) => {
                            self.last_received_pos = at;
                            self.index += 1;
                            return Err(RrError::PeerLost {
                                pos: pos.get(),
                                reason: format!(
                                    "the primary's VMM failed at position {}: {msg}",
                                    at.get()
                                ),
                            });
                        }
                        Ok(Some(e)) => {
                            self.last_received_pos = e.pos();
                            self.next = Some(e);
                            break;
                        }
                        Ok(None) => {
                            // Waiting for the primary: tell it how far the replay is.
                            rx.flush_progress();
                            waited = true;
                            continue;
                        }
                        // The replay needs more, and the primary's stream has ended: closed
                        // without an End (it died), gone silent, or damaged.
                        Err(e) => {
                            return Err(RrError::PeerLost {
                                pos: pos.get(),
                                reason: e.to_string(),
                            })
                        }
                    }
                },
            }
        }
        if self.next.is_none() {
            return Err(RrError::NoEnd {
                entries: self.index,
                pos: pos.get(),
            });
        }
        Ok(())
    }

    /// The next entry if it is at `pos`. An entry at an earlier position was skipped over:
    /// that is a divergence.
    pub fn peek_at(&mut self, pos: Position) -> Result<Option<&Entry>, RrError> {
        self.fill(pos)?;
        // A primary's mark of progress (see `Recorder::throttle`) lets the replay run up to
        // its position without waiting for the next real entry; there it is passed over.
        while let Some(Entry::Heartbeat { pos: at }) = self.next {
            if at > pos {
                return Ok(None);
            }
            self.take();
            self.fill(pos)?;
        }
        let e = self.next.as_ref().expect("filled");
        let at = e.pos().get();
        if at < pos.get() {
            return Err(RrError::Divergence {
                pos: pos.get(),
                entry: self.index,
                what: format!(
                    "the log has {} at position {at}, which the replay passed without it",
                    describe(e)
                ),
            });
        }
        Ok((at == pos.get()).then_some(e))
    }

    /// Takes the entry `peek_at` returned.
    pub fn take(&mut self) -> Entry {
        self.index += 1;
        self.next.take().expect("take after a successful peek")
    }

    fn diverged(&self, pos: Position, what: String) -> RrError {
        RrError::Divergence {
            pos: pos.get(),
            entry: self.index,
            what,
        }
    }

    /// The next entry, which must be at `pos`: `what` says what the replay expected.
    fn expect_at(&mut self, pos: Position, what: &str) -> Result<Entry, RrError> {
        match self.peek_at(pos)? {
            Some(_) => Ok(self.take()),
            None => {
                let e = self.next.as_ref().expect("filled");
                Err(self.diverged(
                    pos,
                    format!(
                        "the replay needs {what} here, but the next log entry is {} at position {}",
                        describe(e),
                        e.pos().get()
                    ),
                ))
            }
        }
    }
}

/// A short description of an entry for error messages.
pub fn describe(e: &Entry) -> String {
    match e {
        Entry::IrqLine { line, .. } => format!("IRQ {line} raised"),
        Entry::Inject { vector, .. } => format!("injection of vector {vector:#x}"),
        Entry::PioIn { port, data, .. } => format!("read of port {port:#x} = {data:02x?}"),
        Entry::MmioRead { addr, .. } => format!("MMIO read of {addr:#x}"),
        Entry::ConsoleIn { bytes, .. } => format!("{} bytes of console input", bytes.len()),
        Entry::NetRx { frame, .. } => format!("a received frame of {} bytes", frame.len()),
        Entry::Digest(_) => "a state digest".to_string(),
        Entry::Landmark { .. } => "a landmark".to_string(),
        Entry::Preempt { pages, .. } => {
            format!("a preemption point ({} pages)", pages.len())
        }
        Entry::PreemptPages { pages, .. } => {
            format!("{} pages of a preemption point", pages.len())
        }
        Entry::Heartbeat { .. } => "a heartbeat".to_string(),
        Entry::End { reason, .. } => format!("the end ({reason:?})"),
        Entry::Snapshot { sha256, .. } => {
            format!("a snapshot ({})", crate::snapshot::hex(sha256))
        }
        Entry::TransferPages { round, pages, .. } => {
            format!("{} pages of a state transfer (round {round})", pages.len())
        }
        Entry::TransferState { offset, total, .. } => {
            format!("a piece of a state transfer's state (at {offset} of {total} bytes)")
        }
    }
}

impl Mode {
    /// Where in its log the machine is, for a snapshot: a recording to a file or a replay
    /// of one (a live pair's stream is not a file a replay could start from).
    pub fn log_point(&self) -> Option<crate::snapshot::LogPoint> {
        match self {
            Mode::Record(r) => match &r.sink {
                Sink::File(w) => Some(crate::snapshot::LogPoint {
                    header_sha256: r.header_sha256,
                    entries: w.entries(),
                }),
                Sink::Net(_) => None,
            },
            Mode::Replay(r) if !r.is_live() => Some(crate::snapshot::LogPoint {
                header_sha256: r.header().sha256(),
                entries: r.consumed(),
            }),
            _ => None,
        }
    }

    /// A snapshot with this SHA-256 was taken at the delivery point `pos`: recorded.
    pub fn snapshot_taken(&mut self, pos: Position, sha256: [u8; 32]) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => r.append(&Entry::Snapshot { pos, sha256 }),
            _ => Ok(()),
        }
    }

    /// Whether the replayed log recorded a snapshot at `pos` (its entry already taken).
    pub fn snapshot_logged_at(&self, pos: Position) -> bool {
        matches!(self, Mode::Replay(r) if r.snapshot_seen == Some(pos))
    }

    /// In a replay, whether the recording took a snapshot at the delivery point `pos` (the
    /// entry is taken): the replay resets its memory mappings there as the recording did.
    pub fn snapshot_here(&mut self, pos: Position) -> Result<Option<[u8; 32]>, RrError> {
        let Mode::Replay(r) = self else {
            return Ok(None);
        };
        if let Some(Entry::Snapshot { .. }) = r.peek_at(pos)? {
            if let Entry::Snapshot { sha256, .. } = r.take() {
                r.snapshot_seen = Some(pos);
                return Ok(Some(sha256));
            }
        }
        Ok(None)
    }

    /// Whether inputs come from the log.
    pub fn is_replay(&self) -> bool {
        matches!(self, Mode::Replay(_))
    }

    /// Whether `e` means the live peer is gone (and failover should decide what happens).
    pub fn is_peer_loss(&self, e: &RrError) -> bool {
        match (self, e) {
            (Mode::Replay(r), RrError::PeerLost { .. }) => r.is_live(),
            (Mode::Record(r), RrError::Channel(_)) => matches!(r.sink, Sink::Net(_)),
            _ => false,
        }
    }

    /// Whether inputs are written to a log (a file or a live backup).
    pub fn is_recording(&self) -> bool {
        matches!(self, Mode::Record(_))
    }

    /// Logs a preemption point (an [`Entry::Preempt`]; record only).
    pub fn preempt(&mut self, entry: &Entry) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => r.append(entry),
            _ => Ok(()),
        }
    }

    /// In replay, the preemption point (or a part of its pages) logged at `pos` next, if any.
    pub fn next_preempt(&mut self, pos: Position) -> Result<Option<Entry>, RrError> {
        let Mode::Replay(r) = self else {
            return Ok(None);
        };
        match r.peek_at(pos)? {
            Some(Entry::Preempt { .. } | Entry::PreemptPages { .. }) => Ok(Some(r.take())),
            _ => Ok(None),
        }
    }

    /// Whether this is one side of a live pair.
    pub fn is_paired(&self) -> bool {
        match self {
            Mode::Replay(r) => r.is_live(),
            Mode::Record(r) => matches!(r.sink, Sink::Net(_)),
            Mode::Live => false,
        }
    }

    /// In a live replay, waits until the entry needed at `pos` is there (or the stream has
    /// ended), so that a loss of the primary is noticed before the machine acts.
    pub fn prefetch(&mut self, pos: Position) -> Result<(), RrError> {
        match self {
            Mode::Replay(r) if r.is_live() => r.fill(pos),
            _ => Ok(()),
        }
    }

    /// Lets a replay waiting on a live primary notice a stop request.
    pub fn attach_stop_flag(&mut self, stop: Arc<AtomicBool>) {
        if let Mode::Replay(r) = self {
            r.set_stop_flag(stop);
        }
    }

    /// Mode-specific fields of the status report.
    pub fn status_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let v = match self {
            Mode::Live => json!({}),
            Mode::Record(r) => match &r.sink {
                Sink::File(w) => json!({
                    "log_entries": w.entries(),
                    "log_bytes": w.bytes_written(),
                }),
                Sink::Net(s) => {
                    let a = s.acked();
                    let f = s.in_flight();
                    json!({
                        "sent_seq": s.sent_seq(),
                        "acked_seq": a.seq,
                        "acked_pos": a.pos.get(),
                        "acked_bytes": a.bytes,
                        "backup_replayed_pos": a.replayed.get(),
                        "replay_lag_positions": s.queued_pos().get().saturating_sub(a.replayed.get()),
                        "in_flight_entries": f.entries,
                        "in_flight_bytes": f.bytes,
                        "throttled_s": r.throttled.as_secs_f64(),
                        "replay_throttled_s": r.replay_throttled.as_secs_f64(),
                        "replay_holds": r.replay_holds,
                    })
                }
            },
            Mode::Replay(r) => json!({
                "entries_replayed": r.index,
                "digests_matched": r.digests_matched,
                "last_received_pos": r.last_received_pos.get(),
            }),
        };
        match v {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        }
    }

    /// Whether a live pair's channel has failed (the primary's side; the backup learns it
    /// when it needs the next entry). An `Err` is a peer loss for [`Mode::is_peer_loss`].
    pub fn check_peer(&self) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => match &r.sink {
                Sink::Net(s) => match s.failure() {
                    Some(f) => Err(f.into()),
                    None => Ok(()),
                },
                Sink::File(_) => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// A live primary whose guest has ended: waits until the backup has acknowledged every
    /// entry (an `Err` if the channel fails first: a peer loss).
    pub fn drain(&mut self) -> Result<(), RrError> {
        if let Mode::Record(r) = self {
            if let Sink::Net(s) = &r.sink {
                let last = s.sent_seq();
                while !s.wait_acked_seq(last, Duration::from_secs(1))? {}
            }
        }
        Ok(())
    }

    /// In a live backup, how much output its primary has released: (console bytes, frames).
    pub fn primary_released(&self) -> Option<(u64, u64)> {
        match self {
            Mode::Replay(r) => match &r.source {
                Source::Net(rx) => Some(rx.released()),
                Source::File(_) => None,
            },
            _ => None,
        }
    }

    /// The machine has reached `pos`: a live backup tells its primary in the next ack.
    pub fn progress(&self, pos: Position) {
        if let Mode::Replay(r) = self {
            if let Source::Net(rx) = &r.source {
                rx.set_replayed(pos);
            }
        }
    }

    /// A live backup whose replay diverged tells its primary (waiting at most a second for
    /// the message to be written); `false` if it is not a live backup or could not tell.
    pub fn report_divergence(&self, pos: Position, what: &str) -> bool {
        match self {
            Mode::Replay(r) => match &r.source {
                Source::Net(rx) => rx.report_divergence(pos, what, Duration::from_secs(1)),
                Source::File(_) => false,
            },
            _ => false,
        }
    }

    /// Flow control of a live primary at `pos` (see [`Recorder::throttle`]).
    pub fn throttle(&mut self, pos: Position, stop: &AtomicBool) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => r.throttle(pos, stop),
            _ => Ok(()),
        }
    }

    /// Whether anything needs digests (and so KVM's dirty log).
    pub fn wants_digests(&self) -> bool {
        !matches!(self, Mode::Live)
    }

    /// A guest read of a time-dependent port at `pos`: `data` holds the device model's live
    /// answer; recorded, or replaced by the recorded one.
    pub fn time_read(&mut self, pos: Position, port: u16, data: &mut [u8]) -> Result<(), RrError> {
        match self {
            Mode::Live => Ok(()),
            Mode::Record(r) => r.append(&Entry::PioIn {
                pos,
                port,
                data: data.to_vec(),
            }),
            Mode::Replay(r) => {
                let e = r.expect_at(pos, &format!("the value of a read of port {port:#x}"))?;
                match e {
                    Entry::PioIn {
                        port: p, data: d, ..
                    } if p == port && d.len() == data.len() => {
                        data.copy_from_slice(&d);
                        Ok(())
                    }
                    other => Err(RrError::Divergence {
                        pos: pos.get(),
                        entry: r.index - 1,
                        what: format!(
                            "the guest read port {port:#x} ({} bytes) where the log has {}",
                            data.len(),
                            describe(&other)
                        ),
                    }),
                }
            }
        }
    }

    /// A digest taken at `pos`: recorded, or compared with the recorded one. Replay takes one
    /// only where the log has one, so `take` is called lazily.
    pub fn digest(
        &mut self,
        pos: Position,
        take: impl FnOnce(Option<&[u64]>) -> Result<Digest, RrError>,
    ) -> Result<(), RrError> {
        match self {
            Mode::Live => Ok(()),
            Mode::Record(r) => {
                let d = take(None)?;
                r.append(&Entry::Digest(d))
            }
            Mode::Replay(r) => {
                let recorded = match r.expect_at(pos, "a state digest")? {
                    Entry::Digest(d) => d,
                    other => {
                        return Err(RrError::Divergence {
                            pos: pos.get(),
                            entry: r.index - 1,
                            what: format!(
                                "the replay takes a state digest here, where the log has {}",
                                describe(&other)
                            ),
                        })
                    }
                };
                let gfns: Vec<u64> = recorded.pages.iter().map(|p| p.0).collect();
                let mine = take(Some(&gfns))?;
                let diff = recorded.diff(&mine);
                if diff.is_empty() {
                    r.digests_matched += 1;
                    Ok(())
                } else {
                    Err(RrError::Divergence {
                        pos: pos.get(),
                        entry: r.index - 1,
                        what: diff.to_string(),
                    })
                }
            }
        }
    }

    /// Records that asynchronous source `line` was raised at `pos` (record only).
    pub fn irq_line(&mut self, pos: Position, line: u8) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => r.append(&Entry::IrqLine { pos, line }),
            _ => Ok(()),
        }
    }

    /// Records console input put into the UART at `pos` (record only).
    pub fn console_in(&mut self, pos: Position, bytes: &[u8]) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => r.append(&Entry::ConsoleIn {
                pos,
                bytes: bytes.to_vec(),
            }),
            _ => Ok(()),
        }
    }

    /// Records a frame delivered to the guest's card at `pos` (record only).
    pub fn net_rx(&mut self, pos: Position, frame: &[u8]) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => r.append(&Entry::NetRx {
                pos,
                frame: frame.to_vec(),
            }),
            _ => Ok(()),
        }
    }

    /// In replay, the next asynchronous input logged at `pos`, if any (`IrqLine`,
    /// `ConsoleIn` or `NetRx`).
    pub fn next_async(&mut self, pos: Position) -> Result<Option<Entry>, RrError> {
        let Mode::Replay(r) = self else {
            return Ok(None);
        };
        match r.peek_at(pos)? {
            Some(Entry::IrqLine { .. } | Entry::ConsoleIn { .. } | Entry::NetRx { .. }) => {
                Ok(Some(r.take()))
            }
            _ => Ok(None),
        }
    }

    /// The PIC's vector that the loop is about to inject at `pos` (or `None` if it injects
    /// nothing): recorded, or checked against the log.
    pub fn inject(&mut self, pos: Position, vector: Option<u8>) -> Result<(), RrError> {
        match self {
            Mode::Live => Ok(()),
            Mode::Record(r) => match vector {
                Some(v) => r.append(&Entry::Inject { pos, vector: v }),
                None => Ok(()),
            },
            Mode::Replay(r) => {
                let logged = match r.peek_at(pos)? {
                    Some(Entry::Inject { vector, .. }) => Some(*vector),
                    _ => None,
                };
                if logged != vector {
                    let show = |v: Option<u8>| match v {
                        Some(v) => format!("vector {v:#x}"),
                        None => "nothing".to_string(),
                    };
                    return Err(r.diverged(
                        pos,
                        format!(
                            "the replay injects {} where the recording injected {}",
                            show(vector),
                            show(logged)
                        ),
                    ));
                }
                if logged.is_some() {
                    r.take();
                }
                Ok(())
            }
        }
    }

    /// In replay, whether the log ends here with the operator's stop.
    pub fn stopped_here(&mut self, pos: Position) -> Result<bool, RrError> {
        let Mode::Replay(r) = self else {
            return Ok(false);
        };
        match r.peek_at(pos)? {
            Some(Entry::End {
                reason: EndReason::Stopped,
                ..
            }) => {
                r.take();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The run ended at `pos` for `reason`: recorded, or checked against the log.
    pub fn end(&mut self, pos: Position, reason: EndReason) -> Result<(), RrError> {
        match self {
            Mode::Live => Ok(()),
            Mode::Record(r) => r.append(&Entry::End { pos, reason }),
            Mode::Replay(r) => {
                let e = r.expect_at(pos, &format!("the end of the run ({reason:?})"))?;
                match e {
                    Entry::End { reason: logged, .. } if logged == reason => Ok(()),
                    other => Err(RrError::Divergence {
                        pos: pos.get(),
                        entry: r.index - 1,
                        what: format!(
                            "the replayed guest ended ({reason:?}) where the log has {}",
                            describe(&other)
                        ),
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(entries: &[Entry]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("twinvm-rr-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("log-{}", entries.len()));
        let header = LogHeader::new([1; 32], [2; 32], "console=ttyS0", 64, 0, "vm");
        let mut r = Recorder::create(&path, &header).unwrap();
        for e in entries {
            r.append(e).unwrap();
        }
        r.finish().unwrap();
        path
    }

    fn irq(pos: u64) -> Entry {
        Entry::IrqLine {
            pos: Position(pos),
            line: 0,
        }
    }

    #[test]
    fn a_replay_skips_to_a_snapshots_entry_and_refuses_a_point_not_in_its_log() {
        let snap = Entry::Snapshot {
            pos: Position(20),
            sha256: [3; 32],
        };
        let log = log_with(&[irq(5), irq(20), snap, irq(20), irq(30)]);
        let mut mode = Mode::Replay(Box::new(Replayer::open(&log).unwrap()));
        if let Mode::Replay(r) = &mut mode {
            r.skip_to(2, Position(20)).unwrap();
            assert_eq!(r.consumed(), 2);
        }
        // The snapshot entry comes first at its delivery point, then the rest there.
        assert_eq!(mode.snapshot_here(Position(20)).unwrap(), Some([3; 32]));
        assert!(mode.snapshot_logged_at(Position(20)));
        assert_eq!(mode.snapshot_here(Position(20)).unwrap(), None);

        // A point that claims fewer positions than its entries have is not of this log.
        let mut r = Replayer::open(&log).unwrap();
        match r.skip_to(2, Position(10)) {
            Err(RrError::Divergence { what, .. }) => {
                assert!(what.contains("not taken in this recording"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }
}
