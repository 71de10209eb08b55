//! The record/replay log of twinvm.
//!
//! - [`entry`]: the data model: [`LogHeader`], [`Position`], [`Entry`], [`Digest`].
//! - [`frame`]: the one framing (length, CRC32C, postcard payload) used on disk and on the
//!   wire, and the incremental [`FrameDecoder`].
//! - [`mod@file`]: log files ([`LogWriter`], [`LogReader`]).
//! - [`mod@error`]: [`LogError`], which names the record and byte offset at fault.
//! - [`transport`]: the live channel over TCP: [`LogSender`] on the primary,
//!   [`LogListener`] and [`LogReceiver`] on the backup, acks, heartbeats, peer loss.
//!
//! See `logchannel/README.md` for the byte layout and the channel protocol.

pub mod entry;
pub mod error;
pub mod file;
pub mod frame;
pub mod transport;

pub use entry::{Digest, DigestDiff, EndReason, Entry, LogHeader, PageDiff, Position, RegDiff};
pub use error::{LogError, Record};
pub use file::{flip_payload_bit, rewrite_entry, LogReader, LogWriter};
pub use frame::{Frame, FrameDecoder, StreamKind, FORMAT_VERSION, MAX_PAYLOAD_LEN};
pub use transport::{
    AckState, ChannelConfig, ChannelStatus, InFlight, LogListener, LogReceiver, LogSender, Message,
    TransportError, PROTOCOL_VERSION,
};
