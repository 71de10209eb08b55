//! The primary's end of the channel: [`LogSender`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::auth::{self, PairSecret, Role, Transcript};
use super::{
    fill, read_message, runtime, write_bytes, write_message, ChannelConfig, Message,
    TransportError, PROTOCOL_VERSION,
};
use crate::entry::{Entry, LogHeader, Position};
use crate::error::{LogError, Record};
use crate::frame::{decode_payload, encode_frame, FrameDecoder, StreamKind};

/// How far the backup has acknowledged the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckState {
    /// Position of the last acked entry.
    pub pos: Position,
    /// Entries acked (the sequence number of the last acked entry).
    pub seq: u64,
    /// Bytes of those entries on the wire.
    pub bytes: u64,
    /// The position the backup's replay has reached (at most `pos`).
    pub replayed: Position,
}

/// Entries queued or sent but not yet acked: the backup's lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InFlight {
    /// Entries not yet acked.
    pub entries: u64,
    /// Their bytes on the wire.
    pub bytes: u64,
    /// Positions between the last acked entry and the last queued one.
    pub positions: u64,
}

/// What an async observer of a [`LogSender`] sees ([`LogSender::status`]).
#[derive(Debug, Clone, Default)]
pub struct ChannelStatus {
    /// The acks so far.
    pub acked: AckState,
    /// The failure that ended the channel, if any.
    pub failure: Option<TransportError>,
}

/// An entry queued for the wire: its encoded frame.
struct Outgoing {
    frame: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    queued_seq: u64,
    queued_bytes: u64,
    queued_pos: Position,
    /// `(seq, pos, cumulative bytes)` of every entry not yet acked, oldest first.
    unacked: VecDeque<(u64, Position, u64)>,
    acked: AckState,
    failure: Option<TransportError>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    status: watch::Sender<ChannelStatus>,
    /// Output released so far (console bytes, frames), sent as `Released` when it moves.
    released: watch::Sender<(u64, u64)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave `State` inconsistent in a way that
        // matters more than losing the channel; keep going with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, st: &State) {
        let status = ChannelStatus {
            acked: st.acked,
            failure: st.failure.clone(),
        };
        self.status.send_replace(status);
        self.cv.notify_all();
    }

    fn fail(&self, err: TransportError) {
        let mut st = self.lock();
        if st.failure.is_none() {
            match &err {
                TransportError::Closed { .. } | TransportError::Shutdown => {
                    info!(error = %err, "log channel closed")
                }
                _ => warn!(error = %err, "log channel failed"),
            }
            st.failure = Some(err);
        }
        self.publish(&st);
    }

    fn ack(
        &self,
        pos: Position,
        seq: u64,
        replayed: Position,
        peer: SocketAddr,
    ) -> Result<(), TransportError> {
        let mut st = self.lock();
        if seq > st.queued_seq || seq < st.acked.seq {
            return Err(TransportError::Protocol {
                peer,
                msg: format!(
                    "ack of entry #{seq} (position {pos}) but {} entries were sent and {} already acked",
                    st.queued_seq, st.acked.seq
                ),
            });
        }
        let mut bytes = st.acked.bytes;
        while let Some(&(s, p, b)) = st.unacked.front() {
            if s > seq {
                break;
            }
            if s == seq && p != pos {
                return Err(TransportError::Protocol {
                    peer,
                    msg: format!("ack of entry #{seq} names position {pos}, the entry is at {p}"),
                });
            }
            bytes = b;
            st.unacked.pop_front();
        }
        let replayed = replayed.max(st.acked.replayed);
        if seq > st.acked.seq || replayed > st.acked.replayed {
            let pos = if seq > st.acked.seq {
                pos
            } else {
                st.acked.pos
            };
            let seq = seq.max(st.acked.seq);
            st.acked = AckState {
                pos,
                seq,
                bytes,
                replayed,
            };
            self.publish(&st);
        }
        Ok(())
    }
}

/// The primary's end of the log channel.
///
/// [`send`](LogSender::send) never blocks: it encodes the entry and queues it for the
/// channel's own thread. The backup's acks are readable with [`acked`](LogSender::acked),
/// awaitable with [`wait_acked`](LogSender::wait_acked) (output rule) and
/// [`wait_in_flight_at_most`](LogSender::wait_in_flight_at_most) (flow control), or
/// observable asynchronously with [`status`](LogSender::status). A lost backup shows as
/// an error from all of these and from `send`.
#[derive(Debug)]
pub struct LogSender {
    shared: Arc<Shared>,
    tx: Option<mpsc::UnboundedSender<Outgoing>>,
    abort: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    peer: SocketAddr,
}

impl LogSender {
    /// Connects to the backup at `addr`, sends `Hello` with `header` and waits for its
    /// `Welcome` (at most [`ChannelConfig::handshake_timeout`]). A `Refuse` is
    /// [`TransportError::Refused`] with the backup's reason. The channel is not
    /// authenticated: see [`connect_with_secret`](Self::connect_with_secret).
    pub fn connect(
        addr: SocketAddr,
        header: LogHeader,
        config: ChannelConfig,
    ) -> Result<LogSender, TransportError> {
        LogSender::connect_with_secret(addr, header, config, None)
    }

    /// [`connect`](Self::connect), authenticating the pair with `secret` if given: the
    /// backup and this primary each prove they hold it (see [`super::auth`]) before any
    /// entry is sent. A backup that fails to prove it is [`TransportError::Auth`]; one
    /// that refuses our proof answers `Refuse` ([`TransportError::Refused`]).
    pub fn connect_with_secret(
        addr: SocketAddr,
        header: LogHeader,
        config: ChannelConfig,
        secret: Option<PairSecret>,
    ) -> Result<LogSender, TransportError> {
        let (status, _) = watch::channel(ChannelStatus::default());
        let (released, _) = watch::channel((0, 0));
        let shared = Arc::new(Shared {
            released,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            status,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (abort_tx, abort_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let shared2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("logchannel-tx".into())
            .spawn(move || {
                let rt = match runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(TransportError::Connect {
                            peer: addr,
                            msg: format!("cannot start the channel runtime: {e}"),
                        }));
                        return;
                    }
                };
                rt.block_on(run(
                    addr, header, config, secret, rx, shared2, abort_rx, ready_tx,
                ));
            })
            .map_err(|e| TransportError::Connect {
                peer: addr,
                msg: format!("cannot start the channel thread: {e}"),
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(LogSender {
                shared,
                tx: Some(tx),
                abort: Some(abort_tx),
                thread: Some(thread),
                peer: addr,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(TransportError::Shutdown)
            }
        }
    }

    /// The backup's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The output rule has released `console` bytes and `frames` frames of the guest's
    /// output in all; the backup is told (coalesced, soon after), so that if it goes live it
    /// re-emits only what came after.
    pub fn set_released(&self, console: u64, frames: u64) {
        self.shared.released.send_replace((console, frames));
    }

    /// Queues `entry` for the backup and returns its sequence number. Never blocks on the
    /// network. Fails if the channel has failed, if the entry is too large for a frame or if
    /// its position is below the previous entry's.
    pub fn send(&self, entry: &Entry) -> Result<u64, TransportError> {
        let mut st = self.shared.lock();
        if let Some(f) = &st.failure {
            return Err(f.clone());
        }
        let seq = st.queued_seq + 1;
        let pos = entry.pos();
        if pos < st.queued_pos {
            return Err(TransportError::Encode(LogError::OutOfOrder {
                entry: Record::Entry(seq - 1),
                offset: st.queued_bytes,
                previous: st.queued_pos,
                found: pos,
            }));
        }
        let mut frame = Vec::new();
        encode_frame(
            &Message::Entry {
                seq,
                entry: entry.clone(),
            },
            Record::Entry(seq - 1),
            st.queued_bytes,
            &mut frame,
        )
        .map_err(TransportError::Encode)?;
        let len = frame.len() as u64;
        let tx = self.tx.as_ref().ok_or(TransportError::Shutdown)?;
        tx.send(Outgoing { frame })
            .map_err(|_| TransportError::Shutdown)?;
        st.queued_seq = seq;
        st.queued_bytes += len;
        st.queued_pos = pos;
        let cum = st.queued_bytes;
        st.unacked.push_back((seq, pos, cum));
        Ok(seq)
    }

    /// Entries queued so far (the sequence number of the last one).
    pub fn sent_seq(&self) -> u64 {
        self.shared.lock().queued_seq
    }

    /// The latest ack.
    pub fn acked(&self) -> AckState {
        self.shared.lock().acked
    }

    /// What is queued or sent but not acked.
    pub fn in_flight(&self) -> InFlight {
        let st = self.shared.lock();
        InFlight {
            entries: st.queued_seq - st.acked.seq,
            bytes: st.queued_bytes - st.acked.bytes,
            positions: st.queued_pos.0.saturating_sub(st.acked.pos.0),
        }
    }

    /// The failure that ended the channel, if any.
    pub fn failure(&self) -> Option<TransportError> {
        self.shared.lock().failure.clone()
    }

    /// A watch of the acks and of failure, for async code (e.g. the output rule's task).
    pub fn status(&self) -> watch::Receiver<ChannelStatus> {
        self.shared.status.subscribe()
    }

    fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&State) -> bool,
    ) -> Result<bool, TransportError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if done(&st) {
                return Ok(true);
            }
            if let Some(f) = &st.failure {
                return Err(f.clone());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until the backup has acked every entry queued at a position `<= pos` (the
    /// output rule for output produced at `pos`). `Ok(false)` on timeout, `Err` if the
    /// channel fails first.
    pub fn wait_acked(&self, pos: Position, timeout: Duration) -> Result<bool, TransportError> {
        self.wait_until(timeout, |st| {
            st.unacked.front().is_none_or(|&(_, p, _)| p > pos)
        })
    }

    /// Replay-lag control: waits until the backup's replay has reached `pos`. `Ok(false)`
    /// on timeout, `Err` if the channel fails first.
    pub fn wait_replayed(&self, pos: Position, timeout: Duration) -> Result<bool, TransportError> {
        self.wait_until(timeout, |st| st.acked.replayed >= pos)
    }

    /// The position of the last entry queued.
    pub fn queued_pos(&self) -> Position {
        self.shared.lock().queued_pos
    }

    /// Waits until the backup has acked entry `seq` (see [`send`](LogSender::send)).
    pub fn wait_acked_seq(&self, seq: u64, timeout: Duration) -> Result<bool, TransportError> {
        self.wait_until(timeout, |st| st.acked.seq >= seq)
    }

    /// Flow control: waits until at most `entries` entries and `bytes` bytes are unacked.
    /// `Ok(false)` on timeout, `Err` if the channel fails first.
    pub fn wait_in_flight_at_most(
        &self,
        entries: u64,
        bytes: u64,
        timeout: Duration,
    ) -> Result<bool, TransportError> {
        self.wait_until(timeout, |st| {
            st.queued_seq - st.acked.seq <= entries && st.queued_bytes - st.acked.bytes <= bytes
        })
    }

    /// Waits up to `timeout` for the channel to fail; returns the failure, if any.
    pub fn wait_failure(&self, timeout: Duration) -> Option<TransportError> {
        self.wait_until(timeout, |_| false).err()
    }

    /// Sends what is queued, closes the connection and waits (at most the peer timeout
    /// after the last byte is written) for the backup's final acks and its close. Returns
    /// the final ack state, or the failure if the channel failed other than by the
    /// backup's orderly close.
    pub fn close(mut self) -> Result<AckState, TransportError> {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let st = self.shared.lock();
        match &st.failure {
            None | Some(TransportError::Closed { .. }) => Ok(st.acked),
            Some(e) => Err(e.clone()),
        }
    }
}

impl Drop for LogSender {
    fn drop(&mut self) {
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(());
        }
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The channel thread: connect, handshake, then write and read until the end.
#[allow(clippy::too_many_arguments)]
async fn run(
    addr: SocketAddr,
    header: LogHeader,
    config: ChannelConfig,
    secret: Option<PairSecret>,
    rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
    mut abort: oneshot::Receiver<()>,
    ready: std::sync::mpsc::SyncSender<Result<(), TransportError>>,
) {
    let (rd, wr, dec) = match handshake(addr, &header, &config, secret.as_ref()).await {
        Ok(v) => {
            let _ = ready.send(Ok(()));
            v
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    info!(
        peer = %addr,
        vm_id = %header.vm_id,
        authenticated = secret.is_some(),
        "log channel to backup up"
    );
    let writer = writer(wr, rx, config, addr, shared.released.subscribe());
    let reader = reader(rd, dec, &shared, config, addr);
    tokio::pin!(writer, reader);
    tokio::select! {
        _ = &mut abort => {
            debug!(peer = %addr, "log sender dropped");
            shared.fail(TransportError::Shutdown);
        }
        w = &mut writer => match w {
            Ok(()) => {
                // Orderly close: everything is written; collect the last acks until the
                // backup closes too (or goes silent).
                tokio::select! {
                    _ = &mut abort => shared.fail(TransportError::Shutdown),
                    r = &mut reader => shared.fail(r),
                }
            }
            Err(e) => shared.fail(e),
        },
        r = &mut reader => shared.fail(r),
    }
}

async fn handshake(
    addr: SocketAddr,
    header: &LogHeader,
    config: &ChannelConfig,
    secret: Option<&PairSecret>,
) -> Result<(OwnedReadHalf, OwnedWriteHalf, FrameDecoder), TransportError> {
    let start = Instant::now();
    let stream = tokio::time::timeout(config.handshake_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::Connect {
            peer: addr,
            msg: format!("no answer within {:?}", config.handshake_timeout),
        })?
        .map_err(|e| TransportError::Connect {
            peer: addr,
            msg: e.to_string(),
        })?;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut dec = FrameDecoder::new(StreamKind::Wire);
    let mut buf = vec![0; 4096];
    let Some(secret) = secret else {
        write_message(
            &mut wr,
            &Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                header: header.clone(),
            },
            addr,
        )
        .await?;
        let reply = read_message(
            &mut rd,
            &mut dec,
            &mut buf,
            addr,
            start,
            config.handshake_timeout,
        )
        .await?;
        return match reply {
            Message::Welcome { protocol_version } if protocol_version == PROTOCOL_VERSION => {
                Ok((rd, wr, dec))
            }
            Message::Welcome { protocol_version } => Err(version_error(addr, protocol_version)),
            Message::Refuse { reason } => Err(TransportError::Refused { peer: addr, reason }),
            other => Err(TransportError::Protocol {
                peer: addr,
                msg: format!("expected Welcome or Refuse, got {}", other.kind()),
            }),
        };
    };

    let auth_err = |msg: String| TransportError::Auth { peer: addr, msg };
    let nonce_primary = auth::nonce().map_err(|e| auth_err(e.to_string()))?;
    write_message(
        &mut wr,
        &Message::AuthHello {
            protocol_version: PROTOCOL_VERSION,
            header: header.clone(),
            nonce: nonce_primary,
        },
        addr,
    )
    .await?;
    let nonce_backup = match read_message(
        &mut rd,
        &mut dec,
        &mut buf,
        addr,
        start,
        config.handshake_timeout,
    )
    .await?
    {
        Message::AuthChallenge { nonce } => nonce,
        Message::Refuse { reason } => return Err(TransportError::Refused { peer: addr, reason }),
        Message::Welcome { .. } => {
            return Err(auth_err(
                "the backup accepted without authenticating (does it run without the pair \
                 secret?); refusing to send it the log"
                    .into(),
            ))
        }
        other => {
            return Err(TransportError::Protocol {
                peer: addr,
                msg: format!("expected AuthChallenge or Refuse, got {}", other.kind()),
            })
        }
    };
    let transcript = Transcript::new(nonce_primary, nonce_backup, header);
    write_message(
        &mut wr,
        &Message::AuthProof {
            mac: transcript.proof(secret, Role::Primary),
        },
        addr,
    )
    .await?;
    match read_message(
        &mut rd,
        &mut dec,
        &mut buf,
        addr,
        start,
        config.handshake_timeout,
    )
    .await?
    {
        Message::AuthWelcome {
            protocol_version,
            mac,
        } => {
            if !transcript.verify(secret, Role::Backup, &mac) {
                return Err(auth_err(
                    "the backup's proof does not match our pair secret: it is not our \
                     backup (or the secrets differ); refusing to send it the log"
                        .into(),
                ));
            }
            if protocol_version != PROTOCOL_VERSION {
                return Err(version_error(addr, protocol_version));
            }
            Ok((rd, wr, dec))
        }
        Message::Refuse { reason } => Err(TransportError::Refused { peer: addr, reason }),
        other => Err(TransportError::Protocol {
            peer: addr,
            msg: format!("expected AuthWelcome or Refuse, got {}", other.kind()),
        }),
    }
}

fn version_error(peer: SocketAddr, theirs: u16) -> TransportError {
    TransportError::Protocol {
        peer,
        msg: format!(
            "the backup speaks protocol version {theirs}, this primary {PROTOCOL_VERSION}"
        ),
    }
}

/// Writes queued entries (batched) and heartbeats until the queue is closed.
async fn writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    config: ChannelConfig,
    peer: SocketAddr,
    mut released: watch::Receiver<(u64, u64)>,
) -> Result<(), TransportError> {
    const BATCH_BYTES: usize = 256 * 1024;
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent_seq = 0u64;
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    loop {
        tokio::select! {
            biased;
            next = rx.recv() => {
                let Some(first) = next else { break };
                batch.clear();
                batch.extend_from_slice(&first.frame);
                sent_seq += 1;
                while batch.len() < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(o) => {
                            batch.extend_from_slice(&o.frame);
                            sent_seq += 1;
                        }
                        Err(_) => break,
                    }
                }
                write_bytes(&mut wr, &batch, peer).await?;
            }
            _ = heartbeat.tick() => {
                write_message(&mut wr, &Message::Heartbeat { seq: sent_seq }, peer).await?;
            }
            Ok(()) = released.changed() => {
                let (console, frames) = *released.borrow_and_update();
                write_message(&mut wr, &Message::Released { console, frames }, peer).await?;
            }
        }
    }
    debug!(peer = %peer, entries = sent_seq, "log sender closing");
    use tokio::io::AsyncWriteExt;
    wr.shutdown().await.map_err(|e| TransportError::Io {
        peer,
        msg: format!("shutdown failed: {e}"),
    })
}

/// Reads acks until the connection ends; returns why it ended.
async fn reader(
    mut rd: OwnedReadHalf,
    mut dec: FrameDecoder,
    shared: &Shared,
    config: ChannelConfig,
    peer: SocketAddr,
) -> TransportError {
    let mut buf = vec![0; 16 * 1024];
    let mut heard = Instant::now();
    loop {
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(source) => return TransportError::Stream { peer, source },
            };
            heard = Instant::now();
            match decode_payload::<Message>(&frame) {
                Ok(Message::Ack { pos, seq, replayed }) => {
                    if let Err(e) = shared.ack(pos, seq, replayed, peer) {
                        return e;
                    }
                }
                Ok(Message::Diverged { pos, what }) => {
                    return TransportError::PeerDiverged {
                        peer,
                        pos: pos.get(),
                        what,
                    }
                }
                Ok(other) => {
                    return TransportError::Protocol {
                        peer,
                        msg: format!(
                            "expected Ack, got {} ({} at byte offset {})",
                            other.kind(),
                            frame.record,
                            frame.offset
                        ),
                    }
                }
                Err(source) => return TransportError::Stream { peer, source },
            }
        }
        if let Err(e) = fill(
            &mut rd,
            &mut dec,
            &mut buf,
            peer,
            heard,
            config.peer_timeout,
        )
        .await
        {
            return e;
        }
    }
}
