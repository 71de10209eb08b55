//! State transfer to a new backup: re-protect (DESIGN.md, "State transfer: one mechanism,
//! four uses"). A side that runs the VM alone (a backup gone live after a failover, or a
//! primary whose backup was lost) and was given the address where a new backup will listen
//! (`--next-backup`) connects there (the log channel's handshake, the pair secret and the
//! header check are those of a pair starting), opens the next generation at the arbiter
//! (`re-pair`), sends its memory while the guest keeps running (pre-copy rounds driven by
//! the dirty log), stops the guest at one delivery point for the pages dirtied since the
//! last round and the machine's state (a snapshot, `vmm::snapshot`), and from there streams
//! the log as a primary, with the output rule. The new backup restores that state and
//! replays from it, checking every digest.
//!
//! This module holds the pieces that are not the vCPU loop's: the connector thread that
//! waits for a new backup, the output rule a re-protected side starts for itself, the
//! sending of pages and state, and the receiving end of a joining backup. The machine
//! (`Machine::reprotect_step`) drives the rounds at its delivery points.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logchannel::entry::{Entry, LogHeader, Position};
use logchannel::transport::{ChannelConfig, LogReceiver, LogSender, PairSecret, TransportError};
use vm_memory::{Bytes, GuestAddress};

use crate::ft::output::{
    spawn_output_releaser, Decision, HeldOutput, OutputDelays, SharedDecision,
};
use crate::memory::GuestMemory;
use crate::rr::LagLimit;
use crate::snapshot::{ImageId, Snapshot, SnapshotError};

/// Bytes of snapshot in one [`Entry::TransferState`] (a frame's payload is at most 1 MiB).
pub const STATE_CHUNK: usize = 512 << 10;
/// Pages in one [`Entry::TransferPages`].
pub const PAGES_PER_ENTRY: usize = 64;
/// Unacknowledged transfer bytes the sender allows before it waits for the backup.
const IN_FLIGHT_BYTES: u64 = 16 << 20;
/// How often the connector tries to reach the address where a new backup will listen.
pub const CONNECT_RETRY: Duration = Duration::from_millis(500);

/// Errors of a state transfer, on either side.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The log channel failed (the peer vanished, garbage, a timeout).
    #[error("the log channel: {0}")]
    Channel(#[from] TransportError),
    /// The live side sent something a transfer does not have there.
    #[error("state transfer: expected {expected}, got {got}")]
    Unexpected {
        /// What should have come.
        expected: &'static str,
        /// What came.
        got: String,
    },
    /// The pieces of the state do not fit together (a gap, a wrong size, a changed
    /// generation).
    #[error("state transfer: {0}")]
    Inconsistent(String),
    /// The state is not a snapshot of this VM, or is corrupt.
    #[error("state transfer: the received state: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The live side stopped sending before the state was complete.
    #[error("state transfer: nothing from the live side for {0:?} (after {1} of its bytes)")]
    Timeout(Duration, u64),
    /// Asked to stop.
    #[error("stopped while receiving the state transfer")]
    Interrupted,
}

/// What a side that may go on alone needs to re-protect itself: where the new backup will
/// listen and how to talk to it.
pub struct ReprotectConfig {
    /// The new backup's log channel address.
    pub addr: SocketAddr,
    /// The header this side presents (the new backup checks it, as at a pair's start).
    pub header: LogHeader,
    /// The channel's timing.
    pub channel: ChannelConfig,
    /// The pair secret, if the channel is authenticated.
    pub secret: Option<PairSecret>,
    /// Flow control of the stream that follows.
    pub lag: LagLimit,
    /// The guest image, named in the snapshot the transfer sends.
    pub image: ImageId,
    /// Most pre-copy rounds before the guest is stopped for the rest (0: stop-and-copy).
    pub max_rounds: u32,
    /// A round that leaves at most this many dirty pages ends the pre-copy.
    pub stop_pages: usize,
}

impl std::fmt::Debug for ReprotectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReprotectConfig")
            .field("addr", &self.addr)
            .field("max_rounds", &self.max_rounds)
            .field("stop_pages", &self.stop_pages)
            .finish_non_exhaustive()
    }
}

/// A new backup that has accepted this side's handshake (the channel to it).
pub struct Joined(pub Arc<LogSender>);

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Joined({})", self.0.peer())
    }
}

/// Starts the thread that waits for a new backup at `cfg.addr`: it tries every
/// [`CONNECT_RETRY`] until one accepts the handshake, hands it over with `joined`, and
/// ends; it also ends, without connecting, once `cancel` is raised. Strangers and refusals
/// (a wrong secret, a mismatched header) are logged and tried again.
pub fn spawn_connector(
    cfg: Arc<ReprotectConfig>,
    cancel: Arc<AtomicBool>,
    joined: impl Fn(Joined) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("reprotect-connect".into())
        .spawn(move || {
            crate::hostcpu::unpin_current_thread();
            let mut said = None::<String>;
            while !cancel.load(Ordering::Acquire) {
                match LogSender::connect_with_secret(
                    cfg.addr,
                    cfg.header.clone(),
                    cfg.channel,
                    cfg.secret.clone(),
                ) {
                    Ok(s) if !cancel.load(Ordering::Acquire) => {
                        eprintln!(
                            "twinvm: re-protect: a new backup at {} accepted this side",
                            cfg.addr
                        );
                        joined(Joined(Arc::new(s)));
                        return;
                    }
                    Ok(_) => return,
                    Err(e) => {
                        let msg = e.to_string();
                        // Say each kind of failure once, not every half second.
                        let kind = msg.split(':').next().unwrap_or_default().to_string();
                        if said.as_deref() != Some(kind.as_str()) {
                            match &e {
                                TransportError::Connect { .. } => tracing::info!(
                                    "re-protect: no new backup at {} yet: {msg}",
                                    cfg.addr
                                ),
                                _ => eprintln!(
                                    "twinvm: re-protect: the new backup at {} refused or failed: {msg}",
                                    cfg.addr
                                ),
                            }
                            said = Some(kind);
                        }
                        std::thread::sleep(CONNECT_RETRY);
                    }
                }
            }
        })
}

/// The output rule of a side that re-protected itself: what it holds (console and frames)
/// goes out once the new backup has acknowledged the log before it; a watch thread wakes
/// the vCPU loop when the backup is lost (see [`crate::ft::output`]).
pub struct OutputRule {
    /// Alone or halted, once a failover has decided.
    pub decision: SharedDecision,
    releaser: Option<std::thread::JoinHandle<OutputDelays>>,
    watch_done: Arc<AtomicBool>,
    tap_tx: std::sync::mpsc::Sender<Option<crate::nic::TapWriter>>,
}

impl OutputRule {
    /// Starts the releaser (console to standard output, frames to the TAP given with
    /// [`OutputRule::set_tap`]) and the watch
    /// thread, which calls `lost` once when the channel fails. Returns the rule and the
    /// console and frame sink the machine writes to.
    pub fn start(
        sender: Arc<LogSender>,
        lost: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<(Self, HeldOutput)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (tap_tx, tap_rx) = std::sync::mpsc::channel();
        let decision = SharedDecision::default();
        let releaser = spawn_output_releaser(sender.clone(), rx, tap_rx, decision.clone());
        let watch_done = Arc::new(AtomicBool::new(false));
        let done = watch_done.clone();
        let watched = sender.clone();
        std::thread::Builder::new()
            .name("peer-watch".into())
            .spawn(move || {
                crate::hostcpu::unpin_current_thread();
                while !done.load(Ordering::Acquire) {
                    if watched.wait_failure(Duration::from_millis(250)).is_some() {
                        lost();
                        break;
                    }
                }
            })?;
        Ok((
            OutputRule {
                decision,
                releaser: Some(releaser),
                watch_done,
                tap_tx,
            },
            HeldOutput::new(sender, tx),
        ))
    }

    /// The TAP the held frames go out on (the releaser waits for it before its first
    /// release).
    pub fn set_tap(&self, tap: Option<crate::nic::TapWriter>) {
        let _ = self.tap_tx.send(tap);
    }

    /// Ends the rule once the machine has let go of every clone of its [`HeldOutput`]:
    /// waits until the releaser has let out what it may (with the backup there, what its
    /// acks cover; everything, if this side went on alone; nothing more if it halted).
    pub fn finish(mut self) -> OutputDelays {
        self.watch_done.store(true, Ordering::Release);
        if self.decision.get() == Decision::Pending && self.releaser.is_some() {
            tracing::debug!("output rule: waiting for the backup's acks of the held output");
        }
        self.releaser
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for OutputRule {
    fn drop(&mut self) {
        self.watch_done.store(true, Ordering::Release);
    }
}

/// Figures of one re-protect, as the live side measured them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReprotectFigures {
    /// The generation opened.
    pub generation: u64,
    /// The delivery point where the guest stopped.
    pub pos: Position,
    /// Pages sent in each pre-copy round, then at the stop (the last element).
    pub rounds: [u64; 16],
    /// How many of `rounds` are used.
    pub nrounds: usize,
    /// The guest stopped: from the delivery point to the state sent.
    pub pause: Duration,
    /// From the new backup's handshake to the state sent.
    pub total: Duration,
    /// Bytes of pages and state sent.
    pub bytes: u64,
}

impl ReprotectFigures {
    /// Pages per round, the last one the stop.
    pub fn rounds(&self) -> &[u64] {
        &self.rounds[..self.nrounds]
    }

    /// Records a round of `pages` (rounds past the array's size add to the last slot).
    pub fn push_round(&mut self, pages: u64) {
        if self.nrounds < self.rounds.len() {
            self.rounds[self.nrounds] = pages;
            self.nrounds += 1;
        } else {
            self.rounds[self.rounds.len() - 1] += pages;
        }
    }
}

/// Waits until at most [`IN_FLIGHT_BYTES`] of what `sender` sent are unacknowledged.
fn pace(sender: &LogSender) -> Result<(), TransportError> {
    while !sender.wait_in_flight_at_most(u64::MAX, IN_FLIGHT_BYTES, Duration::from_millis(100))? {}
    Ok(())
}

/// Sends pages of `mem` (frame numbers in `gfns`) as [`Entry::TransferPages`] of `round`;
/// `skip_zero` leaves out pages that are all zero (the first round: the new backup's memory
/// starts zero). Stops early, returning `Ok(None)`, once `cancel` is raised. Returns the
/// pages and bytes sent.
pub fn send_pages(
    sender: &LogSender,
    mem: &GuestMemory,
    pos: Position,
    round: u32,
    gfns: impl Iterator<Item = u64>,
    skip_zero: bool,
    cancel: &AtomicBool,
) -> Result<Option<(u64, u64)>, TransferError> {
    let mut batch = Vec::with_capacity(PAGES_PER_ENTRY);
    let (mut pages, mut bytes) = (0u64, 0u64);
    let flush = |batch: &mut Vec<(u64, Vec<u8>)>| -> Result<(), TransferError> {
        if batch.is_empty() {
            return Ok(());
        }
        sender.send(&Entry::TransferPages {
            pos,
            round,
            pages: std::mem::take(batch),
        })?;
        pace(sender)?;
        Ok(())
    };
    for gfn in gfns {
        if cancel.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut page = vec![0u8; crate::dirty::PAGE_SIZE as usize];
        mem.read_slice(&mut page, GuestAddress(gfn * crate::dirty::PAGE_SIZE))
            .map_err(|e| TransferError::Inconsistent(format!("reading page {gfn:#x}: {e}")))?;
        if skip_zero && page.iter().all(|&b| b == 0) {
            continue;
        }
        pages += 1;
        bytes += page.len() as u64;
        batch.push((gfn, page));
        if batch.len() == PAGES_PER_ENTRY {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)?;
    Ok(Some((pages, bytes)))
}

/// Sends the snapshot `bytes` taken at `pos` as [`Entry::TransferState`] pieces.
pub fn send_state(
    sender: &LogSender,
    pos: Position,
    generation: u64,
    bytes: &[u8],
) -> Result<(), TransferError> {
    let total = bytes.len() as u64;
    for (i, piece) in bytes.chunks(STATE_CHUNK).enumerate() {
        sender.send(&Entry::TransferState {
            pos,
            generation,
            offset: (i * STATE_CHUNK) as u64,
            total,
            bytes: piece.to_vec(),
        })?;
        pace(sender)?;
    }
    Ok(())
}

/// What a round's thread ends with: the pages and bytes it sent (`None`: cancelled).
type RoundResult = Result<Option<(u64, u64)>, TransferError>;

/// A pre-copy round running on its own thread while the guest runs.
pub struct Round {
    /// Raised to abandon the round.
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<RoundResult>>,
}

impl Round {
    /// Starts sending `gfns` of `mem` as round `round`; `done` is called when it ends.
    pub fn start(
        sender: Arc<LogSender>,
        mem: GuestMemory,
        pos: Position,
        round: u32,
        gfns: Vec<u64>,
        done: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Self> {
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("reprotect-round".into())
            .spawn(move || {
                crate::hostcpu::unpin_current_thread();
                let r = send_pages(&sender, &mem, pos, round, gfns.into_iter(), round == 0, &c);
                // A halted guest's loop waits for this (see `HostEvent::TransferRound`).
                done();
                r
            })?;
        Ok(Round {
            cancel,
            thread: Some(thread),
        })
    }

    /// Whether the round has sent everything (or failed).
    pub fn is_done(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the round's end: the pages and bytes it sent.
    pub fn join(mut self) -> Result<(u64, u64), TransferError> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(Some(n)))) => Ok(n),
            Some(Ok(Ok(None))) => Err(TransferError::Interrupted),
            Some(Ok(Err(e))) => Err(e),
            _ => Err(TransferError::Inconsistent(
                "the pre-copy thread panicked".into(),
            )),
        }
    }
}

impl Drop for Round {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
    }
}

/// What a joining backup received: the machine to start from, and its pair's generation.
pub struct Received {
    /// The snapshot, with the pre-copied pages laid under it.
    pub snapshot: Snapshot,
    /// The generation the new pair claims.
    pub generation: u64,
    /// Pages received before the state (all rounds).
    pub pages: u64,
    /// From the first entry to the last piece of state.
    pub took: Duration,
}

/// A joining backup receives the live side's state transfer: pages in rounds, then the
/// snapshot's pieces, in order, each within `timeout` of the last (silence, garbage, a
/// peer that vanished, a truncated or corrupt state: an error, and nothing has started).
pub fn receive(
    rx: &mut LogReceiver,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Received, TransferError> {
    let t0 = Instant::now();
    let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut npages = 0u64;
    let mut state: Vec<u8> = Vec::new();
    let mut meta: Option<(u64, u64, u64)> = None; // (pos, generation, total)
    let mut last = Instant::now();
    loop {
        if stop.load(Ordering::Acquire) {
            return Err(TransferError::Interrupted);
        }
        let Some(e) = rx.recv_timeout(Duration::from_millis(100))? else {
            if last.elapsed() > timeout {
                return Err(TransferError::Timeout(timeout, state.len() as u64));
            }
            continue;
        };
        last = Instant::now();
        match e {
            Entry::TransferPages { pages: p, .. } if meta.is_none() => {
                for (gfn, bytes) in p {
                    if bytes.len() != crate::dirty::PAGE_SIZE as usize {
                        return Err(TransferError::Inconsistent(format!(
                            "page {gfn:#x} has {} bytes",
                            bytes.len()
                        )));
                    }
                    npages += 1;
                    pages.insert(gfn, bytes);
                }
            }
            Entry::TransferState {
                pos,
                generation,
                offset,
                total,
                bytes,
            } => {
                let (p, g, t) = *meta.get_or_insert((pos.get(), generation, total));
                if (p, g, t) != (pos.get(), generation, total) {
                    return Err(TransferError::Inconsistent(format!(
                        "a piece for position {} generation {generation} of {total} bytes in the state for position {p} generation {g} of {t} bytes",
                        pos.get()
                    )));
                }
                if offset != state.len() as u64 || offset + bytes.len() as u64 > total {
                    return Err(TransferError::Inconsistent(format!(
                        "a piece at offset {offset} ({} bytes) after {} of {total} bytes",
                        bytes.len(),
                        state.len()
                    )));
                }
                state.extend_from_slice(&bytes);
                if state.len() as u64 == total {
                    let mut snapshot = Snapshot::from_bytes(Path::new("(state transfer)"), &state)?;
                    if snapshot.state.vmm.position != p {
                        return Err(TransferError::Inconsistent(format!(
                            "the state is at position {}, the transfer said {p}",
                            snapshot.state.vmm.position
                        )));
                    }
                    snapshot.overlay(&pages);
                    return Ok(Received {
                        snapshot,
                        generation: g,
                        pages: npages,
                        took: t0.elapsed(),
                    });
                }
            }
            other => {
                return Err(TransferError::Unexpected {
                    expected: if meta.is_none() {
                        "pages or the state"
                    } else {
                        "the rest of the state"
                    },
                    got: crate::rr::describe(&other),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logchannel::transport::LogListener;

    const GUARD: Duration = Duration::from_secs(10);

    fn header() -> LogHeader {
        LogHeader::new([1; 32], [2; 32], "console=ttyS0", 64, 2000, "vm-t")
    }

    /// A live side (`send` on its sender) and a joining backup's [`receive`], over a real
    /// loopback channel.
    fn transfer(send: impl FnOnce(LogSender) + Send + 'static) -> Result<Received, TransferError> {
        let config = ChannelConfig {
            heartbeat_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
        };
        let l = LogListener::bind("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let addr = l.local_addr();
        let live = std::thread::spawn(move || {
            send(LogSender::connect(addr, header(), config).unwrap());
        });
        let ours = header();
        let mut rx = l.accept_timeout(|h| ours.check_matches(h), GUARD).unwrap();
        let r = receive(&mut rx, Duration::from_secs(3), &AtomicBool::new(false));
        live.join().unwrap();
        r
    }

    fn page(b: u8) -> Vec<u8> {
        vec![b; crate::dirty::PAGE_SIZE as usize]
    }

    fn read_page(mem: &GuestMemory, gfn: u64) -> Vec<u8> {
        let mut p = page(0);
        mem.read_slice(&mut p, GuestAddress(gfn * crate::dirty::PAGE_SIZE))
            .unwrap();
        p
    }

    #[test]
    fn pre_copied_pages_under_the_last_round_give_the_live_sides_memory() {
        // Round 0 sent pages 7, 8 and 9; then 8 changed and 9 went back to zero, and the stop
        // carries exactly those two (a zero page included).
        let mem = crate::snapshot::tests::memory(64);
        mem.write_slice(&page(0xbb), GuestAddress(8 * 4096))
            .unwrap();
        let last = [8u64, 9];
        let (bytes, w) = crate::snapshot::encode(
            &crate::snapshot::tests::state(64),
            &mem,
            crate::snapshot::Pages::Only(&last),
        )
        .unwrap();
        assert_eq!(w.pages_stored, 2);
        let got = transfer(move |tx| {
            tx.send(&Entry::TransferPages {
                pos: Position(1000),
                round: 0,
                pages: vec![(7, page(0x77)), (8, page(0x88)), (9, page(0x99))],
            })
            .unwrap();
            send_state(&tx, Position(1234), 5, &bytes).unwrap();
            tx.close().unwrap();
        })
        .unwrap();
        assert_eq!(got.generation, 5);
        assert_eq!(got.pages, 3);
        assert_eq!(got.snapshot.state.vmm.position, 1234);
        let fresh = crate::memory::create_guest_memory(64).unwrap();
        got.snapshot.write_memory(&fresh).unwrap();
        assert_eq!(
            read_page(&fresh, 7),
            page(0x77),
            "pre-copied, unchanged since"
        );
        assert_eq!(read_page(&fresh, 8), page(0xbb), "the last round wins");
        assert_eq!(read_page(&fresh, 9), page(0), "zero again at the stop");
        assert_eq!(read_page(&fresh, 10), page(0), "never sent");
    }

    #[test]
    fn a_live_side_that_vanishes_mid_state_is_an_error() {
        let (bytes, _) = crate::snapshot::encode(
            &crate::snapshot::tests::state(64),
            &crate::snapshot::tests::memory(64),
            crate::snapshot::Pages::NonZero,
        )
        .unwrap();
        let err = transfer(move |tx| {
            // The first piece of a bigger state, then the channel is gone.
            tx.send(&Entry::TransferState {
                pos: Position(1234),
                generation: 2,
                offset: 0,
                total: bytes.len() as u64 + STATE_CHUNK as u64,
                bytes: bytes[..100].to_vec(),
            })
            .unwrap();
            drop(tx);
        })
        .err()
        .expect("a half state must not start a machine");
        assert!(
            matches!(err, TransferError::Channel(_) | TransferError::Timeout(..)),
            "{err}"
        );
    }

    #[test]
    fn garbage_in_a_transfer_is_named() {
        let err = transfer(|tx| {
            tx.send(&Entry::Heartbeat { pos: Position(3) }).unwrap();
            let _ = tx.close();
        })
        .err()
        .unwrap();
        assert!(
            err.to_string()
                .contains("expected pages or the state, got a heartbeat"),
            "{err}"
        );
        let err = transfer(|tx| {
            for offset in [0, 20] {
                tx.send(&Entry::TransferState {
                    pos: Position(3),
                    generation: 2,
                    offset,
                    total: 40,
                    bytes: vec![0; 10],
                })
                .unwrap();
            }
            let _ = tx.close();
        })
        .err()
        .unwrap();
        assert!(
            matches!(&err, TransferError::Inconsistent(m) if m.contains("offset 20")),
            "{err}"
        );
        // A complete state that is no snapshot (or a truncated one).
        let err = transfer(|tx| {
            send_state(&tx, Position(3), 2, b"TWINVMSS\x02\x00garbage").unwrap();
            let _ = tx.close();
        })
        .err()
        .unwrap();
        assert!(matches!(err, TransferError::Snapshot(_)), "{err}");
    }
}
