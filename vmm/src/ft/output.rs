//! The output rule on the primary: console bytes and frames the guest produces are held
//! until the backup has acknowledged the log entries sent before them, then released (to
//! standard output and the TAP); the backup is told how far, so that, going live, it emits
//! only what came after (DESIGN.md, output at failover). If the backup is lost, held output
//! waits for the failover decision: released if this primary goes on alone, never if it
//! halts.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::Role;

/// The primary's console: output is handed to a thread that writes it to standard output
/// only once the backup has acknowledged every log entry sent before it was produced (the
/// output rule), while the guest keeps running.
#[derive(Clone)]
pub struct HeldOutput {
    sender: Arc<logchannel::transport::LogSender>,
    tx: std::sync::mpsc::Sender<Held>,
}

/// One piece of output waiting for the backup's ack of log entry `seq`.
pub struct Held {
    seq: u64,
    what: HeldKind,
    at: std::time::Instant,
}

enum HeldKind {
    Console(Vec<u8>),
    Frame(Vec<u8>),
}

impl HeldOutput {
    /// Output that `tx` hands to the releaser, each piece tagged with the last entry
    /// `sender` sent.
    pub fn new(
        sender: Arc<logchannel::transport::LogSender>,
        tx: std::sync::mpsc::Sender<Held>,
    ) -> Self {
        HeldOutput { sender, tx }
    }

    fn hold(&self, what: HeldKind) -> bool {
        let held = Held {
            seq: self.sender.sent_seq(),
            what,
            at: std::time::Instant::now(),
        };
        self.tx.send(held).is_ok()
    }
}

impl std::io::Write for HeldOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.hold(HeldKind::Console(buf.to_vec())) {
            return Err(std::io::Error::other("the output thread has ended"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::nic::FrameSink for HeldOutput {
    fn frame(&mut self, frame: Vec<u8>) {
        if !self.hold(HeldKind::Frame(frame)) {
            tracing::warn!("a transmitted frame was dropped: the output thread has ended");
        }
    }
}

/// What the output rule measured: the delay it added to each chunk of output.
#[derive(Debug, Default)]
pub struct OutputDelays {
    /// The delay of each chunk.
    pub delays: Vec<std::time::Duration>,
    /// Console bytes released.
    pub bytes: u64,
    /// Frames released.
    pub frames: u64,
}

impl OutputDelays {
    /// The `p` quantile (0..=1) of the delays.
    pub fn percentile(&self, p: f64) -> std::time::Duration {
        let mut d = self.delays.clone();
        d.sort();
        if d.is_empty() {
            return std::time::Duration::ZERO;
        }
        d[((d.len() - 1) as f64 * p).round() as usize]
    }
}

/// What became of a primary whose backup is gone, as the releaser sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The peer is there, or the arbiter has not answered yet: output waits for acks.
    Pending,
    /// This side goes on alone: everything held is released.
    Alone,
    /// This side halted: nothing more is released (the side that took over produces it).
    Halted,
}

/// A [`Decision`] shared between the vCPU loop (which learns it) and the releaser.
#[derive(Debug, Clone)]
pub struct SharedDecision(Arc<AtomicU8>);

impl Default for SharedDecision {
    fn default() -> Self {
        SharedDecision(Arc::new(AtomicU8::new(Decision::Pending as u8)))
    }
}

impl SharedDecision {
    /// The decision so far.
    pub fn get(&self) -> Decision {
        match self.0.load(Ordering::Acquire) {
            x if x == Decision::Alone as u8 => Decision::Alone,
            x if x == Decision::Halted as u8 => Decision::Halted,
            _ => Decision::Pending,
        }
    }

    /// Records the decision.
    pub fn set(&self, d: Decision) {
        self.0.store(d as u8, Ordering::Release);
    }

    /// Follows the primary's role changes: alone or halted are decisions.
    pub fn follow(&self, role: Role) {
        match role {
            Role::Alone => self.set(Decision::Alone),
            Role::Halted => self.set(Decision::Halted),
            _ => {}
        }
    }
}

/// Starts the thread that releases the primary's held output (see [`HeldOutput`]):
/// console bytes to standard output and frames to the TAP writer that comes on `tap_rx`
/// once the machine has opened it. Returns what it measured when `rx` closes.
pub fn spawn_output_releaser(
    sender: Arc<logchannel::transport::LogSender>,
    rx: std::sync::mpsc::Receiver<Held>,
    tap_rx: std::sync::mpsc::Receiver<Option<crate::nic::TapWriter>>,
    decision: SharedDecision,
) -> std::thread::JoinHandle<OutputDelays> {
    std::thread::spawn(move || {
        crate::hostcpu::unpin_current_thread();
        let mut out = std::io::stdout();
        let mut stats = OutputDelays::default();
        // The TAP writer comes once the machine (which opens the TAP) exists.
        let mut tap = tap_rx.recv().ok().flatten();
        for Held { seq, what, at } in rx {
            // Held until acknowledged. If the backup is lost first, the output waits for the
            // arbiter: released if this primary goes on alone, dropped for good if it halts
            // (the backup that took over produces it instead).
            loop {
                if decision.get() == Decision::Alone {
                    break;
                }
                match sender.wait_acked_seq(seq, std::time::Duration::from_millis(200)) {
                    Ok(true) => break,
                    Ok(false) => continue,
                    Err(_) => match decision.get() {
                        Decision::Alone => break,
                        Decision::Halted => return stats,
                        Decision::Pending => {
                            std::thread::sleep(std::time::Duration::from_millis(20))
                        }
                    },
                }
            }
            stats.delays.push(at.elapsed());
            match what {
                HeldKind::Console(bytes) => {
                    stats.bytes += bytes.len() as u64;
                    use std::io::Write as _;
                    let _ = out.write_all(&bytes).and_then(|()| out.flush());
                }
                HeldKind::Frame(frame) => {
                    stats.frames += 1;
                    if let Some(t) = &mut tap {
                        if let Err(e) = t.write_frame(&frame) {
                            tracing::warn!("TAP write of a {}-byte frame: {e}", frame.len());
                        }
                    }
                }
            }
            // The backup learns how far the outside world has seen the output, so that, if
            // it goes live, it re-emits only what came after (at least once, never lost).
            sender.set_released(stats.bytes, stats.frames);
        }
        stats
    })
}
