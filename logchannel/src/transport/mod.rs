//! The live log channel between a primary and its backup, over TCP (tokio inside, plain
//! threads outside).
//!
//! - [`LogSender`] (primary): connects, says `Hello`, then streams entries queued by
//!   [`LogSender::send`] (never blocks) with heartbeats, and tracks the backup's acks for
//!   the output rule and flow control.
//! - [`LogListener`] / [`LogReceiver`] (backup): waits for its primary past strangers
//!   ([`LogListener::wait_for_primary`]), checks its header, acks on receipt and hands
//!   entries to a plain thread.
//! - [`auth`]: with a [`PairSecret`] on both sides, each proves it holds it
//!   (challenge-response, HMAC-SHA256) before any entry flows.
//!
//! Each side runs its socket on a private single-threaded tokio runtime in a thread of its
//! own, so callers need no runtime. Either side declares the other lost
//! ([`TransportError::PeerLost`]) after [`ChannelConfig::peer_timeout`] without a complete
//! message from it.

pub mod auth;
mod message;
mod receiver;
mod sender;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::error::{LogError, Record};
use crate::frame::{decode_payload, encode_frame, FrameDecoder};

pub use auth::{PairSecret, SecretError};
pub use message::{Message, PROTOCOL_VERSION};
pub use receiver::{LogListener, LogReceiver, RejectReason, Rejection};
pub use sender::{AckState, ChannelStatus, InFlight, LogSender};

/// Timing of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// How often the primary sends a heartbeat (the backup answers each with an ack).
    pub heartbeat_interval: Duration,
    /// Silence after which the peer is declared lost. Several heartbeat intervals.
    pub peer_timeout: Duration,
    /// Limit on connecting and on the whole handshake (Hello/Welcome, or the four
    /// messages of the authenticated one), per connection.
    pub handshake_timeout: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            heartbeat_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_millis(1000),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// An error of the log channel. `Clone`, so that every party can be handed the same one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The TCP connection could not be made.
    #[error("cannot connect to {peer}: {msg}")]
    Connect {
        /// The address.
        peer: SocketAddr,
        /// Why.
        msg: String,
    },
    /// The listening socket could not be made or accept failed.
    #[error("cannot listen on {addr}: {msg}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        msg: String,
    },
    /// The backup refused our log (seen by the primary).
    #[error("the backup at {peer} refused the log: {reason}")]
    Refused {
        /// The backup.
        peer: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// We refused the primary's log (seen by the backup); the connection is dropped.
    #[error("refused the primary at {peer}: {reason}")]
    RefusedPeer {
        /// The primary.
        peer: SocketAddr,
        /// Our reason, as sent to it.
        reason: String,
    },
    /// The peer sent a well-formed message that breaks the protocol.
    #[error("protocol error from {peer}: {msg}")]
    Protocol {
        /// The peer.
        peer: SocketAddr,
        /// What was wrong.
        msg: String,
    },
    /// The peer's byte stream is damaged (garbage, bad checksum, cut inside a frame...):
    /// the error names the message number and byte offset in the stream.
    #[error("bad stream from {peer}: {source}")]
    Stream {
        /// The peer.
        peer: SocketAddr,
        /// What and where.
        #[source]
        source: LogError,
    },
    /// Pair authentication failed: the peer does not hold our pair secret, or does not
    /// authenticate at all.
    #[error("authentication with {peer} failed: {msg}")]
    Auth {
        /// The peer.
        peer: SocketAddr,
        /// What went wrong.
        msg: String,
    },
    /// A local entry could not be encoded (too large, position going backwards).
    #[error("cannot send: {0}")]
    Encode(#[source] LogError),
    /// Nothing heard from the peer for too long.
    #[error("peer {peer} lost: nothing heard for {silent:?} (timeout {timeout:?})")]
    PeerLost {
        /// The peer.
        peer: SocketAddr,
        /// How long it has been silent.
        silent: Duration,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The backup reported that its replay diverged from the log ([`Message::Diverged`]).
    #[error("the backup at {peer} diverged from the log at position {pos}: {what}")]
    PeerDiverged {
        /// The backup's address.
        peer: SocketAddr,
        /// Where its replay found the difference.
        pos: u64,
        /// What differed.
        what: String,
    },
    /// The peer closed the connection at a message boundary. For a backup this is a loss
    /// of the primary unless an [`crate::Entry::End`] came before it.
    #[error("peer {peer} closed the channel")]
    Closed {
        /// The peer.
        peer: SocketAddr,
    },
    /// A socket error.
    #[error("I/O error with {peer}: {msg}")]
    Io {
        /// The peer.
        peer: SocketAddr,
        /// The error.
        msg: String,
    },
    /// Nothing happened within the caller's time limit (e.g. no primary connected).
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// This end of the channel has been shut down.
    #[error("the log channel is shut down")]
    Shutdown,
}

/// Reads from `rd` into `dec` until it holds a complete frame, then decodes it as a
/// [`Message`]; `None` never: EOF and silence are errors.
///
/// `deadline` bounds the wait; past it the peer is lost (silent since `since`).
async fn read_message<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
    peer: SocketAddr,
    since: Instant,
    timeout: Duration,
) -> Result<Message, TransportError> {
    loop {
        if let Some(frame) = dec
            .next_frame()
            .map_err(|source| TransportError::Stream { peer, source })?
        {
            return decode_payload(&frame)
                .map_err(|source| TransportError::Stream { peer, source });
        }
        fill(rd, dec, buf, peer, since, timeout).await?;
    }
}

/// One read from `rd` into `dec`, bounded by `since + timeout`. EOF is
/// [`TransportError::Closed`] at a frame boundary, a [`LogError::Truncated`] stream error
/// inside a frame.
async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
    peer: SocketAddr,
    since: Instant,
    timeout: Duration,
) -> Result<(), TransportError> {
    match tokio::time::timeout_at(since + timeout, rd.read(buf)).await {
        Err(_) => Err(TransportError::PeerLost {
            peer,
            silent: since.elapsed(),
            timeout,
        }),
        Ok(Ok(0)) => match dec.finish() {
            Ok(()) => Err(TransportError::Closed { peer }),
            Err(source) => Err(TransportError::Stream { peer, source }),
        },
        Ok(Ok(n)) => {
            dec.push(&buf[..n]);
            Ok(())
        }
        Ok(Err(e)) => Err(TransportError::Io {
            peer,
            msg: format!(
                "read failed after byte offset {}: {e}",
                dec.offset() + dec.buffered() as u64
            ),
        }),
    }
}

/// Encodes and writes one message (the offset only labels encoding errors).
async fn write_message<W: AsyncWrite + Unpin>(
    wr: &mut W,
    msg: &Message,
    peer: SocketAddr,
) -> Result<(), TransportError> {
    let mut out = Vec::new();
    encode_frame(msg, Record::Message(0), 0, &mut out).map_err(TransportError::Encode)?;
    write_bytes(wr, &out, peer).await
}

async fn write_bytes<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bytes: &[u8],
    peer: SocketAddr,
) -> Result<(), TransportError> {
    wr.write_all(bytes).await.map_err(|e| TransportError::Io {
        peer,
        msg: format!("write failed: {e}"),
    })
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod tests;
