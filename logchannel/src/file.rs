//! Log files: [`LogWriter`] records, [`LogReader`] replays, and two helpers for tests that
//! tamper with a recorded log ([`rewrite_entry`], [`flip_payload_bit`]).

use std::fs::{self, File};
use std::io::{BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use tracing::debug;

use crate::entry::{Entry, LogHeader, Position};
use crate::error::{LogError, Record};
use crate::frame::{
    decode_payload, encode_frame, encode_preamble, Frame, FrameDecoder, StreamKind,
    FRAME_HEADER_LEN,
};

/// Writes a log file: the preamble and header at creation, then one frame per entry.
///
/// Entries must come in non-decreasing position order. Writes are buffered: call
/// [`flush`](LogWriter::flush) or [`sync`](LogWriter::sync) to make them visible or
/// durable, and [`finish`](LogWriter::finish) at the end.
#[derive(Debug)]
pub struct LogWriter {
    out: BufWriter<File>,
    path: PathBuf,
    offset: u64,
    entries: u64,
    last_pos: Option<Position>,
    scratch: Vec<u8>,
    /// The first I/O error: after it the file's tail is unknown, so nothing more is written.
    failed: Option<LogError>,
}

impl LogWriter {
    /// Creates (or truncates) the file at `path` and writes the preamble and `header`.
    pub fn create(path: impl AsRef<Path>, header: &LogHeader) -> Result<Self, LogError> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| LogError::io(path.display(), 0, e))?;
        let mut w = LogWriter {
            out: BufWriter::with_capacity(256 * 1024, file),
            path,
            offset: 0,
            entries: 0,
            last_pos: None,
            scratch: Vec::with_capacity(4096),
            failed: None,
        };
        encode_preamble(&mut w.scratch);
        encode_frame(
            header,
            Record::Header,
            w.scratch.len() as u64,
            &mut w.scratch,
        )?;
        w.write_scratch()?;
        debug!(path = %w.path.display(), vm_id = %header.vm_id, "log file created");
        Ok(w)
    }

    fn check_failed(&self) -> Result<(), LogError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn write_scratch(&mut self) -> Result<(), LogError> {
        self.check_failed()?;
        if let Err(e) = self.out.write_all(&self.scratch) {
            let e = LogError::io(self.path.display(), self.offset, e);
            self.failed = Some(e.clone());
            return Err(e);
        }
        self.offset += self.scratch.len() as u64;
        self.scratch.clear();
        Ok(())
    }

    /// Appends one entry. An entry whose position is lower than the previous one's is
    /// refused ([`LogError::OutOfOrder`]), as is one over the frame size limit (both leave
    /// the log as it was). After an I/O error every call fails with that error.
    pub fn append(&mut self, entry: &Entry) -> Result<(), LogError> {
        let record = Record::Entry(self.entries);
        if let Some(previous) = self.last_pos {
            if entry.pos() < previous {
                return Err(LogError::OutOfOrder {
                    entry: record,
                    offset: self.offset,
                    previous,
                    found: entry.pos(),
                });
            }
        }
        self.scratch.clear();
        encode_frame(entry, record, self.offset, &mut self.scratch)?;
        self.write_scratch()?;
        self.entries += 1;
        self.last_pos = Some(entry.pos());
        Ok(())
    }

    /// Writes buffered entries to the file (no fsync).
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.check_failed()?;
        if let Err(e) = self.out.flush() {
            let e = LogError::io(self.path.display(), self.offset, e);
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    /// Flushes and waits until the data is on stable storage (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| LogError::io(self.path.display(), self.offset, e))
    }

    /// Flushes, syncs and closes the file; returns the number of entries written.
    pub fn finish(mut self) -> Result<u64, LogError> {
        self.sync()?;
        debug!(path = %self.path.display(), entries = self.entries, bytes = self.offset, "log file finished");
        Ok(self.entries)
    }

    /// Entries appended so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Bytes written so far (buffered or not), preamble and header included.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a log file: the header at opening, then an iterator of entries.
///
/// The iterator yields `Err` once (then ends) if the log is damaged: a bad checksum, a
/// truncated tail, an undecodable entry or a position going backwards. Only a clean end at
/// a frame boundary ends it without an error; a log is never silently shorter.
#[derive(Debug)]
pub struct LogReader<R = File> {
    src: R,
    name: String,
    dec: FrameDecoder,
    header: LogHeader,
    entries: u64,
    last_pos: Option<Position>,
    eof: bool,
    done: bool,
    chunk: Vec<u8>,
}

impl LogReader<File> {
    /// Opens the log at `path` and reads its preamble and header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LogError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| LogError::io(path.display(), 0, e))?;
        LogReader::from_reader(file, path.display())
    }
}

impl<R: Read> LogReader<R> {
    /// Reads a log from any byte source; `name` labels errors (e.g. the path).
    pub fn from_reader(src: R, name: impl std::fmt::Display) -> Result<Self, LogError> {
        let mut r = LogReader {
            src,
            name: name.to_string(),
            dec: FrameDecoder::new(StreamKind::LogFile),
            header: LogHeader::new([0; 32], [0; 32], "", 0, 0, ""),
            entries: 0,
            last_pos: None,
            eof: false,
            done: false,
            chunk: vec![0; 64 * 1024],
        };
        let frame = r.next_raw()?.ok_or_else(|| LogError::Truncated {
            entry: Record::Header,
            offset: r.dec.offset(),
            needed: FRAME_HEADER_LEN as u64,
            available: 0,
        })?;
        r.header = decode_payload(&frame)?;
        Ok(r)
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Entries read so far.
    pub fn entries_read(&self) -> u64 {
        self.entries
    }

    /// Byte offset just past the last complete frame read.
    pub fn offset(&self) -> u64 {
        self.dec.offset()
    }

    /// The next complete frame, `None` at a clean end.
    fn next_raw(&mut self) -> Result<Option<Frame>, LogError> {
        loop {
            if let Some(frame) = self.dec.next_frame()? {
                return Ok(Some(frame));
            }
            if self.eof {
                self.dec.finish()?;
                return Ok(None);
            }
            match self.src.read(&mut self.chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.dec.push(&self.chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let at = self.dec.offset() + self.dec.buffered() as u64;
                    return Err(LogError::io(&self.name, at, e));
                }
            }
        }
    }

    fn next_entry(&mut self) -> Result<Option<Entry>, LogError> {
        let Some(frame) = self.next_raw()? else {
            return Ok(None);
        };
        let entry: Entry = decode_payload(&frame)?;
        if let Some(previous) = self.last_pos {
            if entry.pos() < previous {
                return Err(LogError::OutOfOrder {
                    entry: frame.record,
                    offset: frame.offset,
                    previous,
                    found: entry.pos(),
                });
            }
        }
        self.last_pos = Some(entry.pos());
        self.entries += 1;
        Ok(Some(entry))
    }
}

impl<R: Read> Iterator for LogReader<R> {
    type Item = Result<Entry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_entry() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                debug!(log = %self.name, error = %e, "damaged log");
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Reads a whole log file and locates entry `index`'s frame: `(bytes, frame)`.
fn locate_entry(path: &Path, index: u64) -> Result<(Vec<u8>, Frame), LogError> {
    let bytes = fs::read(path).map_err(|e| LogError::io(path.display(), 0, e))?;
    let mut dec = FrameDecoder::new(StreamKind::LogFile);
    dec.push(&bytes);
    loop {
        match dec.next_frame()? {
            Some(f) if f.record == Record::Entry(index) => return Ok((bytes, f)),
            Some(_) => {}
            None => {
                dec.finish()?;
                return Err(LogError::Truncated {
                    entry: Record::Entry(index),
                    offset: dec.offset(),
                    needed: FRAME_HEADER_LEN as u64,
                    available: 0,
                });
            }
        }
    }
}

/// Test helper: decodes entry `index` (0-based) of the log at `path`, lets `f` change it,
/// and writes it back re-encoded with a correct checksum (the rest of the file is kept
/// byte for byte). For tests that make a replay see a different, well-formed input.
pub fn rewrite_entry(
    path: impl AsRef<Path>,
    index: u64,
    f: impl FnOnce(&mut Entry),
) -> Result<(), LogError> {
    let path = path.as_ref();
    let (bytes, frame) = locate_entry(path, index)?;
    let mut entry: Entry = decode_payload(&frame)?;
    f(&mut entry);
    let start = frame.offset as usize;
    let end = start + frame.len_on_stream();
    let mut out = Vec::with_capacity(bytes.len() + 64);
    out.extend_from_slice(&bytes[..start]);
    encode_frame(&entry, frame.record, frame.offset, &mut out)?;
    out.extend_from_slice(&bytes[end..]);
    fs::write(path, &out).map_err(|e| LogError::io(path.display(), 0, e))
}

/// Test helper: flips bit `bit` (modulo the payload's size in bits) of entry `index`'s
/// payload without fixing the checksum, so reading it gives [`LogError::Checksum`].
/// Returns the byte offset of the damaged frame.
pub fn flip_payload_bit(path: impl AsRef<Path>, index: u64, bit: u64) -> Result<u64, LogError> {
    let path = path.as_ref();
    let (mut bytes, frame) = locate_entry(path, index)?;
    let bits = frame.payload.len() as u64 * 8;
    let bit = bit % bits.max(1);
    let at = frame.offset as usize + FRAME_HEADER_LEN + (bit / 8) as usize;
    bytes[at] ^= 1 << (bit % 8);
    fs::write(path, &bytes).map_err(|e| LogError::io(path.display(), 0, e))?;
    Ok(frame.offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Digest, EndReason};
    use crate::frame::{FORMAT_VERSION, LOG_MAGIC, MAX_PAYLOAD_LEN, PREAMBLE_LEN};

    fn header() -> LogHeader {
        LogHeader::new(
            [0xaa; 32],
            [0xbb; 32],
            "console=ttyS0 lpj=1000",
            64,
            500,
            "vm-a",
        )
    }

    /// One entry of every kind, in position order.
    fn every_variant() -> Vec<Entry> {
        vec![
            Entry::IrqLine {
                pos: Position(1),
                line: 0,
            },
            Entry::Inject {
                pos: Position(2),
                vector: 0x20,
            },
            Entry::PioIn {
                pos: Position(3),
                port: 0x40,
                data: vec![0x12],
            },
            Entry::MmioRead {
                pos: Position(4),
                addr: 0xfee0_0000,
                data: vec![1, 2, 3, 4],
            },
            Entry::ConsoleIn {
                pos: Position(5),
                bytes: b"ls\n".to_vec(),
            },
            Entry::NetRx {
                pos: Position(6),
                frame: (0..1514).map(|i| i as u8).collect(),
            },
            Entry::Digest(Digest {
                pos: Position(7),
                regs: vec![("rip".into(), 0xffff_ffff_8100_0000), ("rsp".into(), 42)],
                fpu_hash: 0xdead_beef,
                pages: vec![(0x100, 1), (0x101, 2)],
            }),
            Entry::Landmark {
                pos: Position(8),
                rip: 0x1234,
                regs_hash: 0x5678,
            },
            Entry::Heartbeat { pos: Position(9) },
            Entry::Snapshot {
                pos: Position(9),
                sha256: [7; 32],
            },
            Entry::TransferPages {
                pos: Position(9),
                round: 1,
                pages: vec![(3, vec![1; 4096])],
            },
            Entry::TransferState {
                pos: Position(9),
                generation: 2,
                offset: 0,
                total: 3,
                bytes: vec![1, 2, 3],
            },
            Entry::End {
                pos: Position(10),
                reason: EndReason::Error("triple fault".into()),
            },
            Entry::End {
                pos: Position(10),
                reason: EndReason::PowerOff,
            },
            Entry::End {
                pos: Position(10),
                reason: EndReason::Reset,
            },
            Entry::End {
                pos: Position(10),
                reason: EndReason::Stopped,
            },
            Entry::End {
                pos: Position(10),
                reason: EndReason::GoLive,
            },
        ]
    }

    fn write_log(path: &Path, entries: &[Entry]) {
        let mut w = LogWriter::create(path, &header()).unwrap();
        for e in entries {
            w.append(e).unwrap();
        }
        assert_eq!(w.finish().unwrap(), entries.len() as u64);
    }

    fn read_all(path: &Path) -> Result<Vec<Entry>, LogError> {
        LogReader::open(path)?.collect()
    }

    #[test]
    fn every_variant_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let entries = every_variant();
        write_log(&path, &entries);
        let mut r = LogReader::open(&path).unwrap();
        assert_eq!(r.header(), &header());
        let got: Vec<Entry> = r.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(got, entries);
        assert_eq!(r.entries_read(), entries.len() as u64);
        assert_eq!(r.offset(), fs::metadata(&path).unwrap().len());
        let bytes = fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"TWINVMLG");
        assert_eq!(&bytes[8..10], &FORMAT_VERSION.to_le_bytes());
    }

    #[test]
    fn every_variant_round_trips_through_the_incremental_decoder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.log");
        let entries = every_variant();
        write_log(&path, &entries);
        let bytes = fs::read(&path).unwrap();
        let mut dec = FrameDecoder::new(StreamKind::LogFile);
        let mut got_header = None;
        let mut got = Vec::new();
        for chunk in bytes.chunks(7) {
            dec.push(chunk);
            while let Some(f) = dec.next_frame().unwrap() {
                match f.record {
                    Record::Header => got_header = Some(decode_payload::<LogHeader>(&f).unwrap()),
                    Record::Entry(n) => {
                        assert_eq!(n, got.len() as u64);
                        got.push(decode_payload::<Entry>(&f).unwrap());
                    }
                    other => panic!("unexpected record {other:?}"),
                }
            }
        }
        dec.finish().unwrap();
        assert_eq!(got_header, Some(header()));
        assert_eq!(got, entries);
    }

    #[test]
    fn empty_log_has_a_header_and_no_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.log");
        write_log(&path, &[]);
        assert_eq!(read_all(&path).unwrap(), vec![]);
    }

    /// Frame offsets of a log: the header's, then each entry's.
    fn frame_offsets(bytes: &[u8]) -> Vec<u64> {
        let mut dec = FrameDecoder::new(StreamKind::LogFile);
        dec.push(bytes);
        let mut v = Vec::new();
        while let Some(f) = dec.next_frame().unwrap() {
            v.push(f.offset);
        }
        v
    }

    #[test]
    fn a_flipped_bit_is_a_checksum_error_naming_entry_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flip.log");
        let entries = every_variant();
        write_log(&path, &entries);
        let offsets = frame_offsets(&fs::read(&path).unwrap());
        for (index, bit) in [(0u64, 3u64), (5, 777), (6, 12), (13, 0)] {
            write_log(&path, &entries);
            let at = flip_payload_bit(&path, index, bit).unwrap();
            assert_eq!(at, offsets[index as usize + 1]);
            let mut r = LogReader::open(&path).unwrap();
            for e in &entries[..index as usize] {
                assert_eq!(&r.next().unwrap().unwrap(), e);
            }
            let err = r.next().unwrap().unwrap_err();
            match &err {
                LogError::Checksum { entry, offset, .. } => {
                    assert_eq!(*entry, Record::Entry(index));
                    assert_eq!(*offset, at);
                }
                other => panic!("expected a checksum error, got {other:?}"),
            }
            let text = err.to_string();
            assert!(
                text.contains(&format!("entry #{index} at byte offset {at}")),
                "{text}"
            );
            assert!(r.next().is_none(), "the reader stops after an error");
        }
    }

    #[test]
    fn a_flipped_bit_in_the_header_is_reported_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.log");
        write_log(&path, &every_variant());
        let mut bytes = fs::read(&path).unwrap();
        bytes[PREAMBLE_LEN + FRAME_HEADER_LEN + 2] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let err = LogReader::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                LogError::Checksum {
                    entry: Record::Header,
                    offset: 10,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn truncation_at_every_offset_is_an_error_never_a_shorter_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.log");
        let entries = vec![
            Entry::Inject {
                pos: Position(1),
                vector: 0x30,
            },
            Entry::PioIn {
                pos: Position(2),
                port: 0x71,
                data: vec![0x59],
            },
            Entry::End {
                pos: Position(3),
                reason: EndReason::PowerOff,
            },
        ];
        write_log(&path, &entries);
        let full = fs::read(&path).unwrap();
        let offsets = frame_offsets(&full);
        let boundaries: Vec<usize> = offsets[1..]
            .iter()
            .map(|&o| o as usize)
            .chain([full.len()])
            .collect();
        let cut_path = dir.path().join("cut.log");
        for cut in 0..=full.len() {
            fs::write(&cut_path, &full[..cut]).unwrap();
            let result = read_all(&cut_path);
            if let Some(k) = boundaries.iter().position(|&b| b == cut) {
                // A clean frame boundary: a valid (shorter) log, exactly k entries.
                assert_eq!(result.unwrap(), entries[..k].to_vec(), "cut at {cut}");
                continue;
            }
            let err = result.expect_err(&format!("cut at {cut} must be an error"));
            match err {
                LogError::Truncated {
                    entry,
                    offset,
                    needed,
                    available,
                } => {
                    assert!(offset <= cut as u64, "cut at {cut}: offset {offset}");
                    assert_eq!(available, cut as u64 - offset, "cut at {cut}");
                    assert!(needed > available, "cut at {cut}");
                    let expected = match offsets.iter().rposition(|&o| o <= cut as u64) {
                        _ if cut < PREAMBLE_LEN => Record::Preamble,
                        Some(0) | None => Record::Header,
                        Some(i) => Record::Entry(i as u64 - 1),
                    };
                    assert_eq!(entry, expected, "cut at {cut}");
                }
                other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_magic_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        fs::write(&path, b"#!/bin/sh\necho hello\n").unwrap();
        let err = LogReader::open(&path).unwrap_err();
        assert!(matches!(err, LogError::BadMagic { .. }), "{err:?}");
        assert!(err.to_string().contains("not a twinvm log"), "{err}");
        fs::write(&path, b"TWINX").unwrap();
        assert!(matches!(
            LogReader::open(&path).unwrap_err(),
            LogError::BadMagic { .. }
        ));
    }

    #[test]
    fn a_future_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        write_log(&path, &every_variant());
        let mut bytes = fs::read(&path).unwrap();
        bytes[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let err = LogReader::open(&path).unwrap_err();
        match &err {
            LogError::UnsupportedVersion {
                found,
                supported,
                offset,
            } => {
                assert_eq!(*found, FORMAT_VERSION + 1);
                assert_eq!(*supported, FORMAT_VERSION);
                assert_eq!(*offset, LOG_MAGIC.len() as u64);
            }
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
    }

    #[test]
    fn an_oversize_length_field_is_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        let entries = every_variant();
        write_log(&path, &entries);
        let offsets = frame_offsets(&fs::read(&path).unwrap());
        let mut bytes = fs::read(&path).unwrap();
        let at = offsets[3] as usize; // entry #2
        bytes[at..at + 4].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let got: Vec<_> = LogReader::open(&path).unwrap().collect();
        assert_eq!(got.len(), 3);
        match got[2].as_ref().unwrap_err() {
            LogError::TooLarge {
                entry, offset, len, ..
            } => {
                assert_eq!(*entry, Record::Entry(2));
                assert_eq!(*offset, at as u64);
                assert_eq!(*len, u64::from(MAX_PAYLOAD_LEN) + 1);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn rewrite_entry_changes_one_entry_and_keeps_the_log_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rw.log");
        let mut entries = every_variant();
        write_log(&path, &entries);
        rewrite_entry(&path, 1, |e| {
            if let Entry::Inject { vector, .. } = e {
                *vector = 0x31;
            }
        })
        .unwrap();
        // Changing a length (re-encoding resizes the frame) is fine too.
        rewrite_entry(&path, 4, |e| {
            if let Entry::ConsoleIn { bytes, .. } = e {
                bytes.extend_from_slice(b"-la\n");
            }
        })
        .unwrap();
        entries[1] = Entry::Inject {
            pos: Position(2),
            vector: 0x31,
        };
        entries[4] = Entry::ConsoleIn {
            pos: Position(5),
            bytes: b"ls\n-la\n".to_vec(),
        };
        assert_eq!(read_all(&path).unwrap(), entries);
        let err = rewrite_entry(&path, 99, |_| {}).unwrap_err();
        assert!(
            matches!(
                err,
                LogError::Truncated {
                    entry: Record::Entry(99),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn positions_going_backwards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.log");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        w.append(&Entry::Heartbeat { pos: Position(5) }).unwrap();
        let err = w
            .append(&Entry::Heartbeat { pos: Position(4) })
            .unwrap_err();
        assert!(matches!(err, LogError::OutOfOrder { .. }), "{err:?}");
        w.append(&Entry::Heartbeat { pos: Position(5) }).unwrap();
        w.append(&Entry::Heartbeat { pos: Position(6) }).unwrap();
        w.finish().unwrap();
        rewrite_entry(&path, 2, |e| *e = Entry::Heartbeat { pos: Position(1) }).unwrap();
        let got: Vec<_> = LogReader::open(&path).unwrap().collect();
        assert_eq!(got.len(), 3);
        let err = got[2].as_ref().unwrap_err();
        assert!(
            matches!(
                err,
                LogError::OutOfOrder {
                    entry: Record::Entry(2),
                    previous: Position(5),
                    found: Position(1),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_write_error_is_reported_and_sticks() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let mut w = LogWriter::create("/dev/full", &header()).unwrap();
        w.append(&Entry::Heartbeat { pos: Position(1) }).unwrap();
        let err = w.flush().unwrap_err();
        assert!(matches!(err, LogError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/dev/full"), "{err}");
        assert!(w.append(&Entry::Heartbeat { pos: Position(2) }).is_err());
        assert!(w.finish().is_err());
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.log");
        let err = LogReader::open(&path).unwrap_err();
        assert!(matches!(err, LogError::Io { .. }));
        assert!(err.to_string().contains("nope.log"), "{err}");
    }
}
