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
//! | [`Mode::time_read`] | a guest read of a time-dependent port (PIT, port 0x61, RTC) | `PioIn` | returns the logged value |
//! | digest | at every position that is a multiple of the interval, and at the end | `Digest` | compares, stops on the first mismatch |
//! | asynchronous inputs | at a delivery point | `IrqLine`, `ConsoleIn` | applies the logged ones at this position |
//! | injection | at a delivery point, when the guest can take the PIC's vector | `Inject` | checks the logged vector |
//! | end | power-off, reset, stop | `End` | checks the reason |
//!
//! Any mismatch between the log and what the replaying guest does is a divergence, reported
//! with the position, the log entry and what differed; never tolerated.

use std::path::Path;

use logchannel::entry::{Digest, EndReason, Entry, LogHeader, Position};
use logchannel::error::LogError;
use logchannel::file::{LogReader, LogWriter};

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
    /// Reading the vCPU or memory for a digest failed.
    #[error("taking a state digest: {0}")]
    Kvm(String),
    /// The image to replay is not the one recorded.
    #[error("{0}")]
    ImageMismatch(String),
}

/// Writes a recording.
#[derive(Debug)]
pub struct Recorder {
    writer: LogWriter,
}

/// Feeds a replay from a log file.
#[derive(Debug)]
pub struct Replayer {
    reader: LogReader,
    /// The next entry, read ahead.
    next: Option<Entry>,
    /// Index of `next` in the log.
    index: u64,
    eof: bool,
    /// Digests compared so far (all matched, or the replay would have stopped).
    pub digests_matched: u64,
}

/// Where the machine's non-deterministic inputs come from.
#[derive(Debug)]
pub enum Mode {
    /// Host clock and terminal, nothing logged.
    Live,
    /// Host clock and terminal, everything logged.
    Record(Recorder),
    /// Everything from the log.
    Replay(Replayer),
}

impl Recorder {
    /// Creates the log file at `path` with `header`.
    pub fn create(path: &Path, header: &LogHeader) -> Result<Self, RrError> {
        Ok(Recorder {
            writer: LogWriter::create(path, header)?,
        })
    }

    /// Appends one entry.
    pub fn append(&mut self, e: &Entry) -> Result<(), RrError> {
        self.writer.append(e).map_err(RrError::from)
    }

    /// Flushes and syncs the log; returns the bytes written.
    pub fn finish(self) -> Result<u64, RrError> {
        let bytes = self.writer.bytes_written();
        self.writer.finish()?;
        Ok(bytes)
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.writer.entries()
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.writer.bytes_written()
    }
}

impl Replayer {
    /// Opens a log for replay.
    pub fn open(path: &Path) -> Result<Self, RrError> {
        Ok(Replayer {
            reader: LogReader::open(path)?,
            next: None,
            index: 0,
            eof: false,
            digests_matched: 0,
        })
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        self.reader.header()
    }

    /// Entries consumed so far.
    pub fn consumed(&self) -> u64 {
        self.index
    }

    fn fill(&mut self, pos: u64) -> Result<(), RrError> {
        if self.next.is_none() && !self.eof {
            match self.reader.next() {
                Some(Ok(e)) => self.next = Some(e),
                Some(Err(e)) => return Err(e.into()),
                None => self.eof = true,
            }
        }
        if self.next.is_none() {
            return Err(RrError::NoEnd {
                entries: self.index,
                pos,
            });
        }
        Ok(())
    }

    /// The next entry if it is at `pos`. An entry at an earlier position was skipped over:
    /// that is a divergence.
    pub fn peek_at(&mut self, pos: u64) -> Result<Option<&Entry>, RrError> {
        self.fill(pos)?;
        let e = self.next.as_ref().expect("filled");
        let at = e.pos().get();
        if at < pos {
            return Err(RrError::Divergence {
                pos,
                entry: self.index,
                what: format!(
                    "the log has {} at position {at}, which the replay passed without it",
                    describe(e)
                ),
            });
        }
        Ok((at == pos).then_some(e))
    }

    /// Takes the entry `peek_at` returned.
    pub fn take(&mut self) -> Entry {
        self.index += 1;
        self.next.take().expect("take after a successful peek")
    }

    fn diverged(&self, pos: u64, what: String) -> RrError {
        RrError::Divergence {
            pos,
            entry: self.index,
            what,
        }
    }

    /// The next entry, which must be at `pos`: `what` says what the replay expected.
    fn expect_at(&mut self, pos: u64, what: &str) -> Result<Entry, RrError> {
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
        Entry::Heartbeat { .. } => "a heartbeat".to_string(),
        Entry::End { reason, .. } => format!("the end ({reason:?})"),
    }
}

impl Mode {
    /// Whether inputs come from the log.
    pub fn is_replay(&self) -> bool {
        matches!(self, Mode::Replay(_))
    }

    /// Whether anything needs digests (and so KVM's dirty log).
    pub fn wants_digests(&self) -> bool {
        !matches!(self, Mode::Live)
    }

    /// A guest read of a time-dependent port at `pos`: `data` holds the device model's live
    /// answer; recorded, or replaced by the recorded one.
    pub fn time_read(&mut self, pos: u64, port: u16, data: &mut [u8]) -> Result<(), RrError> {
        match self {
            Mode::Live => Ok(()),
            Mode::Record(r) => r.append(&Entry::PioIn {
                pos: Position(pos),
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
                        pos,
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
        pos: u64,
        take: impl FnOnce() -> Result<Digest, RrError>,
    ) -> Result<(), RrError> {
        match self {
            Mode::Live => Ok(()),
            Mode::Record(r) => {
                let d = take()?;
                r.append(&Entry::Digest(d))
            }
            Mode::Replay(r) => {
                let recorded = match r.expect_at(pos, "a state digest")? {
                    Entry::Digest(d) => d,
                    other => {
                        return Err(RrError::Divergence {
                            pos,
                            entry: r.index - 1,
                            what: format!(
                                "the replay takes a state digest here, where the log has {}",
                                describe(&other)
                            ),
                        })
                    }
                };
                let mine = take()?;
                let diff = recorded.diff(&mine);
                if diff.is_empty() {
                    r.digests_matched += 1;
                    Ok(())
                } else {
                    Err(RrError::Divergence {
                        pos,
                        entry: r.index - 1,
                        what: diff.to_string(),
                    })
                }
            }
        }
    }

    /// Records that asynchronous source `line` was raised at `pos` (record only).
    pub fn irq_line(&mut self, pos: u64, line: u8) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => r.append(&Entry::IrqLine {
                pos: Position(pos),
                line,
            }),
            _ => Ok(()),
        }
    }

    /// Records console input put into the UART at `pos` (record only).
    pub fn console_in(&mut self, pos: u64, bytes: &[u8]) -> Result<(), RrError> {
        match self {
            Mode::Record(r) => r.append(&Entry::ConsoleIn {
                pos: Position(pos),
                bytes: bytes.to_vec(),
            }),
            _ => Ok(()),
        }
    }

    /// In replay, the next asynchronous input logged at `pos`, if any (`IrqLine` or
    /// `ConsoleIn`).
    pub fn next_async(&mut self, pos: u64) -> Result<Option<Entry>, RrError> {
        let Mode::Replay(r) = self else {
            return Ok(None);
        };
        match r.peek_at(pos)? {
            Some(Entry::IrqLine { .. } | Entry::ConsoleIn { .. }) => Ok(Some(r.take())),
            _ => Ok(None),
        }
    }

    /// The PIC's vector that the loop is about to inject at `pos` (or `None` if it injects
    /// nothing): recorded, or checked against the log.
    pub fn inject(&mut self, pos: u64, vector: Option<u8>) -> Result<(), RrError> {
        match self {
            Mode::Live => Ok(()),
            Mode::Record(r) => match vector {
                Some(v) => r.append(&Entry::Inject {
                    pos: Position(pos),
                    vector: v,
                }),
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
    pub fn stopped_here(&mut self, pos: u64) -> Result<bool, RrError> {
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
    pub fn end(&mut self, pos: u64, reason: EndReason) -> Result<(), RrError> {
        match self {
            Mode::Live => Ok(()),
            Mode::Record(r) => r.append(&Entry::End {
                pos: Position(pos),
                reason,
            }),
            Mode::Replay(r) => {
                let e = r.expect_at(pos, &format!("the end of the run ({reason:?})"))?;
                match e {
                    Entry::End { reason: logged, .. } if logged == reason => Ok(()),
                    other => Err(RrError::Divergence {
                        pos,
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
