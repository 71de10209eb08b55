//! The one framing used on disk and on the wire.
//!
//! A log file is `TWINVMLG` + `u16 LE` [`FORMAT_VERSION`] followed by frames; a channel
//! stream is frames only (its version is in the `Hello` message). A frame is
//!
//! | bytes | field |
//! |---|---|
//! | 4 | payload length, `u32` little-endian, at most [`MAX_PAYLOAD_LEN`] |
//! | 4 | CRC32C (Castagnoli) of the payload, `u32` little-endian |
//! | n | payload: the value in postcard encoding |
//!
//! [`FrameDecoder`] takes bytes in pieces of any size and yields complete frames, checking
//! the preamble, lengths and checksums; every error names the [`Record`] and byte offset.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{LogError, Record};

/// The first 8 bytes of every log file.
pub const LOG_MAGIC: [u8; 8] = *b"TWINVMLG";
/// The version of the file format (preamble, framing, payload encoding and entry model).
pub const FORMAT_VERSION: u16 = 3;
/// Length of the file preamble: magic and version.
pub const PREAMBLE_LEN: usize = 10;
/// Length of a frame header: payload length and CRC.
pub const FRAME_HEADER_LEN: usize = 8;
/// The largest payload a frame may carry (1 MiB). A larger length field is an error, never
/// an allocation.
pub const MAX_PAYLOAD_LEN: u32 = 1 << 20;

static CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// CRC32C (Castagnoli) of `data`, the checksum of frame payloads.
pub fn crc32c(data: &[u8]) -> u32 {
    CRC32C.checksum(data)
}

/// Appends the file preamble (magic and [`FORMAT_VERSION`]) to `out`.
pub fn encode_preamble(out: &mut Vec<u8>) {
    out.extend_from_slice(&LOG_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
}

/// Appends one frame holding `value` to `out` and returns the frame's total length.
///
/// `record` and `offset` only label errors: a payload over [`MAX_PAYLOAD_LEN`] is
/// [`LogError::TooLarge`] and nothing is appended.
pub fn encode_frame<T: Serialize>(
    value: &T,
    record: Record,
    offset: u64,
    out: &mut Vec<u8>,
) -> Result<usize, LogError> {
    let payload = postcard::to_allocvec(value).map_err(|e| LogError::Encode {
        entry: record,
        offset,
        msg: e.to_string(),
    })?;
    if payload.len() > MAX_PAYLOAD_LEN as usize {
        return Err(LogError::TooLarge {
            entry: record,
            offset,
            len: payload.len() as u64,
            max: MAX_PAYLOAD_LEN,
        });
    }
    out.reserve(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(FRAME_HEADER_LEN + payload.len())
}

/// Decodes a frame's payload as a `T`; the payload must be exactly one `T`.
pub fn decode_payload<T: DeserializeOwned>(frame: &Frame) -> Result<T, LogError> {
    let err = |msg: String| LogError::Decode {
        entry: frame.record,
        offset: frame.offset,
        msg,
    };
    let (value, rest) =
        postcard::take_from_bytes::<T>(&frame.payload).map_err(|e| err(e.to_string()))?;
    if !rest.is_empty() {
        return Err(err(format!(
            "{} trailing byte(s) after the value in a {}-byte payload",
            rest.len(),
            frame.payload.len()
        )));
    }
    Ok(value)
}

/// What a [`FrameDecoder`] reads: a log file (preamble, header frame, entries) or a
/// channel stream (messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A log file: the preamble, then frame 0 is the header and frame `n` is entry `n - 1`.
    LogFile,
    /// A channel stream: frame `n` is message `n`.
    Wire,
}

/// One complete, checksum-verified frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame is in its stream.
    pub record: Record,
    /// Byte offset of the frame header in the stream.
    pub offset: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Total length of the frame on the stream (header and payload).
    pub fn len_on_stream(&self) -> usize {
        FRAME_HEADER_LEN + self.payload.len()
    }
}

/// An incremental frame decoder: push bytes as they arrive, pop complete frames.
///
/// On an error the decoder does not advance, so asking again gives the same error.
#[derive(Debug)]
pub struct FrameDecoder {
    kind: StreamKind,
    buf: Vec<u8>,
    start: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    frames: u64,
    preamble_done: bool,
}

impl FrameDecoder {
    /// A decoder for a stream of `kind`, starting at byte offset 0.
    pub fn new(kind: StreamKind) -> Self {
        FrameDecoder {
            kind,
            buf: Vec::new(),
            start: 0,
            offset: 0,
            frames: 0,
            preamble_done: kind == StreamKind::Wire,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Stream offset of the next byte not yet consumed as part of a complete frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes pushed but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Complete frames popped so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The record the next frame will be.
    pub fn next_record(&self) -> Record {
        if !self.preamble_done {
            return Record::Preamble;
        }
        match self.kind {
            StreamKind::Wire => Record::Message(self.frames),
            StreamKind::LogFile if self.frames == 0 => Record::Header,
            StreamKind::LogFile => Record::Entry(self.frames - 1),
        }
    }

    fn check_preamble(&self, avail: &[u8], at_eof: bool) -> Result<bool, LogError> {
        let n = avail.len().min(LOG_MAGIC.len());
        if avail[..n] != LOG_MAGIC[..n] {
            return Err(LogError::BadMagic {
                found: avail[..n].to_vec(),
            });
        }
        if avail.len() < PREAMBLE_LEN {
            if at_eof {
                return Err(LogError::Truncated {
                    entry: Record::Preamble,
                    offset: 0,
                    needed: PREAMBLE_LEN as u64,
                    available: avail.len() as u64,
                });
            }
            return Ok(false);
        }
        let version = u16::from_le_bytes([avail[8], avail[9]]);
        if version != FORMAT_VERSION {
            return Err(LogError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
                offset: LOG_MAGIC.len() as u64,
            });
        }
        Ok(true)
    }

    /// Pops the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, LogError> {
        if !self.preamble_done {
            if !self.check_preamble(&self.buf[self.start..], false)? {
                return Ok(None);
            }
            self.preamble_done = true;
            self.start += PREAMBLE_LEN;
            self.offset += PREAMBLE_LEN as u64;
        }
        let avail = &self.buf[self.start..];
        if avail.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let record = self.next_record();
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]);
        let stored = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
        if len > MAX_PAYLOAD_LEN {
            return Err(LogError::TooLarge {
                entry: record,
                offset: self.offset,
                len: len.into(),
                max: MAX_PAYLOAD_LEN,
            });
        }
        let total = FRAME_HEADER_LEN + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let payload = &avail[FRAME_HEADER_LEN..total];
        let computed = crc32c(payload);
        if computed != stored {
            return Err(LogError::Checksum {
                entry: record,
                offset: self.offset,
                stored,
                computed,
            });
        }
        let frame = Frame {
            record,
            offset: self.offset,
            payload: payload.to_vec(),
        };
        self.start += total;
        self.offset += total as u64;
        self.frames += 1;
        Ok(Some(frame))
    }

    /// Declares the end of the stream: `Ok` only if it ends cleanly at a frame boundary
    /// (after the preamble, for a log file); otherwise the error says what was cut short.
    pub fn finish(&self) -> Result<(), LogError> {
        let avail = &self.buf[self.start..];
        if !self.preamble_done {
            self.check_preamble(avail, true)?;
            // A complete, valid preamble and nothing else: the header frame is missing.
            return Err(LogError::Truncated {
                entry: Record::Header,
                offset: PREAMBLE_LEN as u64,
                needed: FRAME_HEADER_LEN as u64,
                available: 0,
            });
        }
        if avail.is_empty() {
            if self.kind == StreamKind::LogFile && self.frames == 0 {
                return Err(LogError::Truncated {
                    entry: Record::Header,
                    offset: self.offset,
                    needed: FRAME_HEADER_LEN as u64,
                    available: 0,
                });
            }
            return Ok(());
        }
        let needed = if avail.len() < FRAME_HEADER_LEN {
            FRAME_HEADER_LEN as u64
        } else {
            let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]);
            FRAME_HEADER_LEN as u64 + u64::from(len)
        };
        Err(LogError::Truncated {
            entry: self.next_record(),
            offset: self.offset,
            needed,
            available: avail.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Entry, Position};

    fn wire_bytes(entries: &[Entry]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            encode_frame(e, Record::Message(0), 0, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn decodes_frames_pushed_one_byte_at_a_time() {
        let entries: Vec<Entry> = (0..20)
            .map(|i| Entry::ConsoleIn {
                pos: Position(i),
                bytes: vec![i as u8; i as usize],
            })
            .collect();
        let bytes = wire_bytes(&entries);
        let mut dec = FrameDecoder::new(StreamKind::Wire);
        let mut got = Vec::new();
        for b in &bytes {
            dec.push(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().unwrap() {
                assert_eq!(f.record, Record::Message(got.len() as u64));
                got.push(decode_payload::<Entry>(&f).unwrap());
            }
        }
        dec.finish().unwrap();
        assert_eq!(got, entries);
        assert_eq!(dec.offset(), bytes.len() as u64);
    }

    #[test]
    fn oversize_length_is_an_error_not_an_allocation() {
        let mut bytes = wire_bytes(&[Entry::Heartbeat { pos: Position(1) }]);
        let first = bytes.len() as u64;
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        let mut dec = FrameDecoder::new(StreamKind::Wire);
        dec.push(&bytes);
        assert!(dec.next_frame().unwrap().is_some());
        match dec.next_frame() {
            Err(LogError::TooLarge {
                entry: Record::Message(1),
                offset,
                len,
                max: MAX_PAYLOAD_LEN,
            }) => {
                assert_eq!(offset, first);
                assert_eq!(len, u64::from(u32::MAX));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // The decoder does not advance past an error.
        assert!(matches!(dec.next_frame(), Err(LogError::TooLarge { .. })));
    }

    #[test]
    fn encoding_an_oversize_entry_is_refused() {
        let e = Entry::NetRx {
            pos: Position(3),
            frame: vec![0; MAX_PAYLOAD_LEN as usize + 1],
        };
        let mut out = Vec::new();
        let err = encode_frame(&e, Record::Entry(4), 99, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                LogError::TooLarge {
                    entry: Record::Entry(4),
                    offset: 99,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn trailing_bytes_in_a_payload_are_a_decode_error() {
        let mut payload = postcard::to_allocvec(&Entry::Heartbeat { pos: Position(5) }).unwrap();
        payload.push(0);
        let frame = Frame {
            record: Record::Entry(2),
            offset: 40,
            payload,
        };
        let err = decode_payload::<Entry>(&frame).unwrap_err();
        assert!(
            err.to_string().contains("entry #2 at byte offset 40"),
            "{err}"
        );
    }

    /// A tiny deterministic PRNG (xorshift64*), so the garbage test needs no dependency
    /// and is reproducible.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = wire_bytes(&[
            Entry::Inject {
                pos: Position(1),
                vector: 0x20,
            },
            Entry::PioIn {
                pos: Position(2),
                port: 0x40,
                data: vec![1, 2],
            },
        ]);
        for round in 0..2000 {
            let kind = if round % 2 == 0 {
                StreamKind::Wire
            } else {
                StreamKind::LogFile
            };
            let mut bytes = Vec::new();
            if kind == StreamKind::LogFile && round % 4 == 1 {
                encode_preamble(&mut bytes);
            }
            // Either pure garbage, or a valid stream with some bytes mutated.
            if round % 3 == 0 {
                bytes.extend_from_slice(&valid);
                for _ in 0..1 + rng.next() % 4 {
                    let i = (rng.next() as usize) % bytes.len();
                    bytes[i] ^= 1 << (rng.next() % 8);
                }
            } else {
                let n = (rng.next() % 64) as usize;
                bytes.extend((0..n).map(|_| rng.next() as u8));
            }
            let mut dec = FrameDecoder::new(kind);
            let mut pos = 0;
            let mut steps = 0;
            'feed: while pos < bytes.len() {
                let n = 1 + (rng.next() as usize) % 16;
                let end = (pos + n).min(bytes.len());
                dec.push(&bytes[pos..end]);
                pos = end;
                loop {
                    steps += 1;
                    assert!(steps < 10_000, "decoder does not make progress");
                    match dec.next_frame() {
                        Ok(Some(f)) => {
                            let _ = decode_payload::<Entry>(&f);
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
            let _ = dec.finish();
        }
    }
}
