//! The errors of the log format: every one names what was being read or written
//! ([`Record`]) and the byte offset where it starts.

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::entry::Position;

/// Which part of a log or of a channel stream an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Record {
    /// The file preamble (magic and format version).
    Preamble,
    /// The header frame of a log file.
    Header,
    /// Entry number `n` of a log file (0-based, the header not counted).
    Entry(u64),
    /// Message number `n` on a channel stream (0-based).
    Message(u64),
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Preamble => f.write_str("the preamble"),
            Record::Header => f.write_str("the header frame"),
            Record::Entry(n) => write!(f, "entry #{n}"),
            Record::Message(n) => write!(f, "message #{n}"),
        }
    }
}

/// An error reading or writing the log (file or wire).
///
/// Offsets are byte offsets from the start of the file or stream, of the frame (or field)
/// at fault. The type is `Clone` so that a channel can hand the same error to every party.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The stream does not start with `TWINVMLG`.
    #[error(
        "bad magic at byte offset 0: found {found:02x?}, expected \"TWINVMLG\" (not a twinvm log)"
    )]
    BadMagic {
        /// The bytes found instead (up to 8).
        found: Vec<u8>,
    },
    /// The format version is not one this build reads.
    #[error("unsupported log format version {found} at byte offset {offset} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version in the file.
        found: u16,
        /// The version this build reads.
        supported: u16,
        /// Where the version field is.
        offset: u64,
    },
    /// A frame's payload does not match its CRC32C.
    #[error("checksum mismatch in {entry} at byte offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The frame at fault.
        entry: Record,
        /// Where the frame starts.
        offset: u64,
        /// The CRC in the frame header.
        stored: u32,
        /// The CRC of the payload as read.
        computed: u32,
    },
    /// The stream ends inside a frame (or inside the preamble).
    #[error("truncated {entry} at byte offset {offset}: it needs {needed} bytes, only {available} are present")]
    Truncated {
        /// The frame that is cut short.
        entry: Record,
        /// Where it starts.
        offset: u64,
        /// Bytes the frame (header and payload) needs.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// A frame declares (or would need) a payload over [`crate::frame::MAX_PAYLOAD_LEN`].
    #[error("{entry} at byte offset {offset} has a {len}-byte payload, over the {max}-byte limit")]
    TooLarge {
        /// The frame at fault.
        entry: Record,
        /// Where it starts.
        offset: u64,
        /// The payload length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A frame's payload is intact (checksum good) but does not decode.
    #[error("cannot decode {entry} at byte offset {offset}: {msg}")]
    Decode {
        /// The frame at fault.
        entry: Record,
        /// Where it starts.
        offset: u64,
        /// What the decoder said.
        msg: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode {entry} at byte offset {offset}: {msg}")]
    Encode {
        /// What was being encoded.
        entry: Record,
        /// Where it would have been written.
        offset: u64,
        /// What the encoder said.
        msg: String,
    },
    /// An entry's position is lower than the previous entry's.
    #[error(
        "{entry} at byte offset {offset} goes back in time: position {found} after {previous}"
    )]
    OutOfOrder {
        /// The entry at fault.
        entry: Record,
        /// Where it starts.
        offset: u64,
        /// The previous entry's position.
        previous: Position,
        /// This entry's position.
        found: Position,
    },
    /// An I/O error.
    #[error("I/O error on {path} at byte offset {offset}: {source}")]
    Io {
        /// The file (or peer) concerned.
        path: String,
        /// The offset reached.
        offset: u64,
        /// The error.
        #[source]
        source: Arc<io::Error>,
    },
}

impl LogError {
    /// Wraps an I/O error with where it happened.
    pub fn io(path: impl fmt::Display, offset: u64, source: io::Error) -> Self {
        LogError::Io {
            path: path.to_string(),
            offset,
            source: Arc::new(source),
        }
    }

    /// The byte offset the error names.
    pub fn offset(&self) -> u64 {
        match self {
            LogError::BadMagic { .. } => 0,
            LogError::UnsupportedVersion { offset, .. }
            | LogError::Checksum { offset, .. }
            | LogError::Truncated { offset, .. }
            | LogError::TooLarge { offset, .. }
            | LogError::Decode { offset, .. }
            | LogError::Encode { offset, .. }
            | LogError::OutOfOrder { offset, .. }
            | LogError::Io { offset, .. } => *offset,
        }
    }
}
