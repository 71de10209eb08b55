//! The messages of the log channel, each carried in one frame of [`crate::frame`].

use serde::{Deserialize, Serialize};

use crate::entry::{Entry, LogHeader, Position};

/// The version of the channel protocol (messages and their order), sent in
/// [`Message::Hello`] and [`Message::Welcome`].
pub const PROTOCOL_VERSION: u16 = 3;

/// One message on the log channel.
///
/// Primary → backup: `Hello`, then `Entry` and `Heartbeat` interleaved.
/// Backup → primary: `Welcome` or `Refuse`, then `Ack`s, and `Diverged` if its replay
/// stopped matching the log.
///
/// With a pair secret (see [`super::auth`]): `AuthHello`, `AuthChallenge`, `AuthProof`,
/// `AuthWelcome` (or `Refuse`) replace `Hello` and `Welcome`. New variants are appended
/// at the end (postcard numbers variants by index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// The primary's first message: who it is and what it records.
    Hello {
        /// The primary's [`PROTOCOL_VERSION`].
        protocol_version: u16,
        /// The header of the log it will stream.
        header: LogHeader,
    },
    /// The backup accepts the log.
    Welcome {
        /// The backup's [`PROTOCOL_VERSION`].
        protocol_version: u16,
    },
    /// The backup refuses the log (header mismatch, protocol version...); it then closes.
    Refuse {
        /// Why, readable.
        reason: String,
    },
    /// One log entry.
    Entry {
        /// Its sequence number: 1 for the first entry of the connection, then +1 each.
        seq: u64,
        /// The entry.
        entry: Entry,
    },
    /// Liveness, sent every heartbeat interval whether or not entries flow.
    Heartbeat {
        /// The sequence number of the last entry sent before it.
        seq: u64,
    },
    /// The backup has received every entry up to `seq` (sent after each batch of messages
    /// read, heartbeats included, so it doubles as the backup's heartbeat).
    Ack {
        /// The position of entry `seq` (0 if none yet).
        pos: Position,
        /// The number of entries received.
        seq: u64,
        /// The position the backup's replay has reached (it lags the received `pos`): what
        /// a takeover would have to replay first is the difference.
        replayed: Position,
    },
    /// The backup's replay diverged from the log at `pos`: it is no backup any more, and
    /// closes the channel after this message (DESIGN.md, Determinism 7).
    Diverged {
        /// Where the replay found the difference.
        pos: Position,
        /// What differed, readable.
        what: String,
    },
    /// The primary's first message on an authenticated channel (instead of `Hello`).
    AuthHello {
        /// The primary's [`PROTOCOL_VERSION`].
        protocol_version: u16,
        /// The header of the log it will stream.
        header: LogHeader,
        /// The primary's random challenge to the backup.
        nonce: [u8; 32],
    },
    /// The backup's random challenge to the primary.
    AuthChallenge {
        /// The nonce.
        nonce: [u8; 32],
    },
    /// The primary's answer: HMAC-SHA256 of both nonces, its role and the header's hash
    /// under the pair secret.
    AuthProof {
        /// The HMAC.
        mac: [u8; 32],
    },
    /// The backup accepts an authenticated primary and proves itself in turn.
    AuthWelcome {
        /// The backup's [`PROTOCOL_VERSION`].
        protocol_version: u16,
        /// The backup's HMAC (its role instead of the primary's).
        mac: [u8; 32],
    },
    /// How much of the guest's output the primary has released to the outside world (the
    /// output rule): console bytes and transmitted frames, counted from the start. A backup
    /// that goes live emits what its replay produced after this point (DESIGN.md: output at
    /// failover).
    Released {
        /// Console bytes released.
        console: u64,
        /// Frames released.
        frames: u64,
    },
}

impl Message {
    /// The message's name, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Refuse { .. } => "Refuse",
            Message::Entry { .. } => "Entry",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::Ack { .. } => "Ack",
            Message::Diverged { .. } => "Diverged",
            Message::Released { .. } => "Released",
            Message::AuthHello { .. } => "AuthHello",
            Message::AuthChallenge { .. } => "AuthChallenge",
            Message::AuthProof { .. } => "AuthProof",
            Message::AuthWelcome { .. } => "AuthWelcome",
        }
    }
}
