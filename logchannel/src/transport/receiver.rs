//! The backup's end of the channel: [`LogListener`] accepts a primary, [`LogReceiver`]
//! yields its entries.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::auth::{self, PairSecret, Role, Transcript};
use super::{
    fill, read_message, runtime, write_message, ChannelConfig, Message, TransportError,
    PROTOCOL_VERSION,
};
use crate::entry::{Entry, LogHeader, Position};
use crate::frame::{decode_payload, FrameDecoder, StreamKind};

/// Handshakes [`LogListener::wait_for_primary`] runs at once; further connections wait
/// in the kernel's backlog until one ends (each ends within the handshake timeout).
pub const MAX_PENDING_HANDSHAKES: usize = 32;
/// Rejected connections remembered by a [`LogListener`] (the most recent ones).
const REJECTIONS_KEPT: usize = 64;

/// Why the backup dropped a connection to its log channel port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Bytes that are not the channel's frames, or a message out of place (a port scan,
    /// another protocol).
    Garbage,
    /// A protocol version other than ours.
    WrongVersion,
    /// A proof that does not match our pair secret.
    WrongSecret,
    /// A plain `Hello` to a backup that requires pair authentication.
    Unauthenticated,
    /// An authenticating primary, but this backup has no pair secret.
    NoSecret,
    /// The log header was refused by the caller's check (a real but mismatched primary).
    HeaderRefused,
    /// The handshake did not complete within the handshake timeout.
    Timeout,
    /// The peer closed the connection during the handshake.
    Closed,
    /// A socket error.
    Io,
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RejectReason::Garbage => "garbage",
            RejectReason::WrongVersion => "wrong protocol version",
            RejectReason::WrongSecret => "wrong pair secret",
            RejectReason::Unauthenticated => "unauthenticated",
            RejectReason::NoSecret => "authenticating, but this backup has no pair secret",
            RejectReason::HeaderRefused => "header refused",
            RejectReason::Timeout => "handshake timeout",
            RejectReason::Closed => "closed during the handshake",
            RejectReason::Io => "socket error",
        })
    }
}

/// A connection the backup dropped during the handshake.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Who connected.
    pub peer: SocketAddr,
    /// Why it was dropped.
    pub reason: RejectReason,
    /// The error, in full.
    pub error: TransportError,
}

/// A failed handshake: why, and the error.
struct Failure {
    reason: RejectReason,
    error: TransportError,
}

impl Failure {
    /// A failure to read the peer's next message.
    fn read(error: TransportError) -> Failure {
        let reason = match &error {
            TransportError::PeerLost { .. } => RejectReason::Timeout,
            TransportError::Closed { .. } => RejectReason::Closed,
            TransportError::Io { .. } => RejectReason::Io,
            _ => RejectReason::Garbage,
        };
        Failure { reason, error }
    }
}

/// The backup's listening socket.
///
/// Its methods block the calling thread; do not call them from async code.
#[derive(Debug)]
pub struct LogListener {
    rt: Runtime,
    listener: TcpListener,
    addr: SocketAddr,
    config: ChannelConfig,
    secret: Option<PairSecret>,
    rejections: Mutex<VecDeque<Rejection>>,
}

impl LogListener {
    /// Listens on `addr` (port 0: an ephemeral port, see [`local_addr`](Self::local_addr)).
    pub fn bind(addr: SocketAddr, config: ChannelConfig) -> Result<Self, TransportError> {
        let err = |msg: String| TransportError::Listen { addr, msg };
        let rt = runtime().map_err(|e| err(format!("cannot start the channel runtime: {e}")))?;
        let listener = rt
            .block_on(TcpListener::bind(addr))
            .map_err(|e| err(e.to_string()))?;
        let addr = listener.local_addr().map_err(|e| err(e.to_string()))?;
        debug!(%addr, "log channel listening");
        Ok(LogListener {
            rt,
            listener,
            addr,
            config,
            secret: None,
            rejections: Mutex::new(VecDeque::new()),
        })
    }

    /// Requires every primary to authenticate with `secret` (and proves itself to it; see
    /// [`super::auth`]). `None`: no authentication (anyone who connects first with a
    /// matching header is the primary).
    pub fn with_pair_secret(mut self, secret: Option<PairSecret>) -> Self {
        self.secret = secret;
        self
    }

    /// Whether primaries must authenticate.
    pub fn is_authenticated(&self) -> bool {
        self.secret.is_some()
    }

    /// The most recent connections dropped by [`wait_for_primary`](Self::wait_for_primary)
    /// (oldest first, at most 64).
    pub fn rejections(&self) -> Vec<Rejection> {
        let r = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().cloned().collect()
    }

    fn reject(&self, peer: SocketAddr, failure: Failure) {
        warn!(
            %peer,
            why = %failure.reason,
            error = %failure.error,
            "log channel: dropped a connection that is not our primary; still listening"
        );
        let mut r = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() == REJECTIONS_KEPT {
            r.pop_front();
        }
        r.push_back(Rejection {
            peer,
            reason: failure.reason,
            error: failure.error,
        });
    }

    /// Waits for the primary, handshaking with every connection (several at once, each
    /// bounded by [`ChannelConfig::handshake_timeout`]) and dropping those that are not
    /// it: garbage, a wrong protocol version, a failed or missing authentication, silence,
    /// a close. Each is logged with the peer's address and why, and kept for
    /// [`rejections`](Self::rejections); the listener keeps listening. Ends with the
    /// first primary that completes the handshake, or with [`TransportError::RefusedPeer`]
    /// if `check` refuses a primary's header (a real primary, authenticated if a secret is
    /// set, that does not match this backup: a configuration error), or with
    /// [`TransportError::Timeout`] after `timeout`, if given.
    pub fn wait_for_primary(
        &self,
        check: impl Fn(&LogHeader) -> Result<(), String>,
        timeout: Option<Duration>,
    ) -> Result<LogReceiver, TransportError> {
        if self.secret.is_none() {
            info!(
                addr = %self.addr,
                "the log channel is unauthenticated: whoever connects first with a matching \
                 header becomes the primary (set a pair secret to authenticate it)"
            );
        }
        type Pending<'a> = Pin<
            Box<
                dyn Future<
                        Output = (
                            SocketAddr,
                            Result<(TcpStream, LogHeader, FrameDecoder), Failure>,
                        ),
                    > + 'a,
            >,
        >;
        // One event per connection attempt: the size difference costs nothing worth a box.
        #[allow(clippy::large_enum_variant)]
        enum Event {
            Accepted(std::io::Result<(TcpStream, SocketAddr)>),
            // Boxed: a finished handshake is rare, an accepted connection common.
            Done(
                SocketAddr,
                Box<Result<(TcpStream, LogHeader, FrameDecoder), Failure>>,
            ),
        }
        let check = &check;
        let (stream, peer, header, dec) = self.rt.block_on(async {
            let deadline = timeout.map(|t| Instant::now() + t);
            let mut pending: Vec<Pending<'_>> = Vec::new();
            loop {
                let next = std::future::poll_fn(|cx| {
                    for i in 0..pending.len() {
                        if let Poll::Ready((peer, r)) = pending[i].as_mut().poll(cx) {
                            drop(pending.swap_remove(i));
                            return Poll::Ready(Event::Done(peer, Box::new(r)));
                        }
                    }
                    if pending.len() < MAX_PENDING_HANDSHAKES {
                        if let Poll::Ready(r) = self.listener.poll_accept(cx) {
                            return Poll::Ready(Event::Accepted(r));
                        }
                    }
                    Poll::Pending
                });
                let event = match (deadline, timeout) {
                    (Some(d), Some(t)) => tokio::time::timeout_at(d, next).await.map_err(|_| {
                        TransportError::Timeout {
                            what: "a primary to connect",
                            after: t,
                        }
                    })?,
                    _ => next.await,
                };
                match event {
                    Event::Accepted(Ok((mut stream, peer))) => {
                        debug!(%peer, "log channel: connection, handshaking");
                        let _ = stream.set_nodelay(true);
                        let config = &self.config;
                        let secret = self.secret.as_ref();
                        pending.push(Box::pin(async move {
                            let r = handshake(&mut stream, peer, config, secret, check).await;
                            (peer, r.map(|(header, dec)| (stream, header, dec)))
                        }));
                    }
                    Event::Accepted(Err(e)) => {
                        // Out of descriptors and the like: transient, keep listening.
                        warn!(addr = %self.addr, error = %e, "log channel: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Event::Done(peer, done) => match *done {
                        Ok((stream, header, dec)) => {
                            return Ok::<_, TransportError>((stream, peer, header, dec));
                        }
                        Err(f) if f.reason == RejectReason::HeaderRefused => {
                            return Err(f.error);
                        }
                        Err(f) => self.reject(peer, f),
                    },
                }
            }
        })?;
        self.start_receiver(stream, peer, header, dec)
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for a primary, then checks its `Hello`: a protocol version other than ours,
    /// or a header `check` rejects, is answered with `Refuse` (the reason is sent to the
    /// primary) and returned as [`TransportError::RefusedPeer`]. A connection that sends
    /// garbage or nothing within the handshake timeout is dropped with an error. The
    /// listener stays usable after an error.
    pub fn accept(
        &self,
        check: impl FnOnce(&LogHeader) -> Result<(), String>,
    ) -> Result<LogReceiver, TransportError> {
        self.accept_inner(check, None)
    }

    /// [`accept`](Self::accept), giving up with [`TransportError::Timeout`] if no primary
    /// connects within `timeout`.
    pub fn accept_timeout(
        &self,
        check: impl FnOnce(&LogHeader) -> Result<(), String>,
        timeout: Duration,
    ) -> Result<LogReceiver, TransportError> {
        self.accept_inner(check, Some(timeout))
    }

    fn accept_inner(
        &self,
        check: impl FnOnce(&LogHeader) -> Result<(), String>,
        timeout: Option<Duration>,
    ) -> Result<LogReceiver, TransportError> {
        let (stream, peer, header, dec) = self.rt.block_on(async {
            let accept = self.listener.accept();
            let (mut stream, peer) =
                match timeout {
                    Some(t) => tokio::time::timeout(t, accept).await.map_err(|_| {
                        TransportError::Timeout {
                            what: "a primary to connect",
                            after: t,
                        }
                    })?,
                    None => accept.await,
                }
                .map_err(|e| TransportError::Listen {
                    addr: self.addr,
                    msg: format!("accept failed: {e}"),
                })?;
            let _ = stream.set_nodelay(true);
            let (header, dec) =
                handshake(&mut stream, peer, &self.config, self.secret.as_ref(), check)
                    .await
                    .map_err(|f| {
                        warn!(%peer, why = %f.reason, error = %f.error, "log channel: dropped a connection");
                        f.error
                    })?;
            Ok::<_, TransportError>((stream, peer, header, dec))
        })?;
        self.start_receiver(stream, peer, header, dec)
    }

    /// Hands an accepted, handshaken connection to the receiving thread.
    fn start_receiver(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        header: LogHeader,
        dec: FrameDecoder,
    ) -> Result<LogReceiver, TransportError> {
        let stream = stream.into_std().map_err(|e| TransportError::Io {
            peer,
            msg: format!("cannot hand the socket to the channel thread: {e}"),
        })?;
        info!(
            %peer,
            vm_id = %header.vm_id,
            authenticated = self.secret.is_some(),
            "log channel from primary up"
        );

        let (tx, rx) = std::sync::mpsc::channel();
        let (abort_tx, abort_rx) = oneshot::channel();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let progress = Arc::new(Progress::default());
        let progress2 = progress.clone();
        let config = self.config;
        let thread = std::thread::Builder::new()
            .name("logchannel-rx".into())
            .spawn(move || {
                let result = runtime().map_err(|e| TransportError::Io {
                    peer,
                    msg: format!("cannot start the channel runtime: {e}"),
                });
                let rt = match result {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let stream = match TcpStream::from_std(stream) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(TransportError::Io {
                                peer,
                                msg: e.to_string(),
                            }));
                            return;
                        }
                    };
                    tokio::select! {
                        _ = abort_rx => debug!(%peer, "log receiver dropped"),
                        e = receive(stream, dec, peer, config, &tx, &progress2, ctl_rx) => {
                            match &e {
                                TransportError::Closed { .. } => info!(%peer, "primary closed the log channel"),
                                _ => warn!(%peer, error = %e, "log channel from primary failed"),
                            }
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| TransportError::Io {
                peer,
                msg: format!("cannot start the channel thread: {e}"),
            })?;
        Ok(LogReceiver {
            rx,
            header,
            peer,
            end: None,
            received: 0,
            progress,
            ctl: ctl_tx,
            abort: Some(abort_tx),
            thread: Some(thread),
        })
    }
}

/// The backup's side of the handshake (see [`super::auth`] for the authenticated one):
/// the primary's header is shown to `check` only once the primary has authenticated.
async fn handshake(
    stream: &mut TcpStream,
    peer: SocketAddr,
    config: &ChannelConfig,
    secret: Option<&PairSecret>,
    check: impl FnOnce(&LogHeader) -> Result<(), String>,
) -> Result<(LogHeader, FrameDecoder), Failure> {
    let start = Instant::now();
    let mut dec = FrameDecoder::new(StreamKind::Wire);
    let mut buf = vec![0; 4096];
    let (mut rd, mut wr) = stream.split();
    let write_failed = |error| Failure {
        reason: RejectReason::Io,
        error,
    };
    let hello = read_message(
        &mut rd,
        &mut dec,
        &mut buf,
        peer,
        start,
        config.handshake_timeout,
    )
    .await
    .map_err(Failure::read)?;
    let (protocol_version, header, nonce_primary) = match hello {
        Message::Hello {
            protocol_version,
            header,
        } => (protocol_version, header, None),
        Message::AuthHello {
            protocol_version,
            header,
            nonce,
        } => (protocol_version, header, Some(nonce)),
        other => {
            return Err(Failure {
                reason: RejectReason::Garbage,
                error: TransportError::Protocol {
                    peer,
                    msg: format!("expected Hello or AuthHello, got {}", other.kind()),
                },
            })
        }
    };
    if protocol_version != PROTOCOL_VERSION {
        let reason = format!(
            "the primary speaks protocol version {protocol_version}, this backup {PROTOCOL_VERSION}"
        );
        return Err(refuse(&mut wr, peer, RejectReason::WrongVersion, reason).await);
    }
    let Some(secret) = secret else {
        if nonce_primary.is_some() {
            let reason = "this backup has no pair secret and cannot authenticate \
                          (give both sides the same --pair-secret-file)"
                .to_string();
            return Err(refuse(&mut wr, peer, RejectReason::NoSecret, reason).await);
        }
        if let Err(reason) = check(&header) {
            return Err(refuse(&mut wr, peer, RejectReason::HeaderRefused, reason).await);
        }
        let welcome = Message::Welcome {
            protocol_version: PROTOCOL_VERSION,
        };
        write_message(&mut wr, &welcome, peer)
            .await
            .map_err(write_failed)?;
        return Ok((header, dec));
    };
    let Some(nonce_primary) = nonce_primary else {
        let reason = "this backup requires pair authentication and the primary sent none \
                      (give both sides the same --pair-secret-file)"
            .to_string();
        return Err(refuse(&mut wr, peer, RejectReason::Unauthenticated, reason).await);
    };
    let nonce_backup = auth::nonce().map_err(|e| Failure {
        reason: RejectReason::Io,
        error: TransportError::Auth {
            peer,
            msg: e.to_string(),
        },
    })?;
    write_message(
        &mut wr,
        &Message::AuthChallenge {
            nonce: nonce_backup,
        },
        peer,
    )
    .await
    .map_err(write_failed)?;
    let mac = match read_message(
        &mut rd,
        &mut dec,
        &mut buf,
        peer,
        start,
        config.handshake_timeout,
    )
    .await
    .map_err(Failure::read)?
    {
        Message::AuthProof { mac } => mac,
        other => {
            return Err(Failure {
                reason: RejectReason::Garbage,
                error: TransportError::Protocol {
                    peer,
                    msg: format!("expected AuthProof, got {}", other.kind()),
                },
            })
        }
    };
    let transcript = Transcript::new(nonce_primary, nonce_backup, &header);
    if !transcript.verify(secret, Role::Primary, &mac) {
        let refusal = Message::Refuse {
            reason: "authentication failed: the proof does not match this backup's pair secret"
                .into(),
        };
        let _ = write_message(&mut wr, &refusal, peer).await;
        return Err(Failure {
            reason: RejectReason::WrongSecret,
            error: TransportError::Auth {
                peer,
                msg: "the primary's proof does not match our pair secret".into(),
            },
        });
    }
    if let Err(reason) = check(&header) {
        return Err(refuse(&mut wr, peer, RejectReason::HeaderRefused, reason).await);
    }
    let welcome = Message::AuthWelcome {
        protocol_version: PROTOCOL_VERSION,
        mac: transcript.proof(secret, Role::Backup),
    };
    write_message(&mut wr, &welcome, peer)
        .await
        .map_err(write_failed)?;
    Ok((header, dec))
}

/// Sends `Refuse { reason }` (best effort: the connection is dropped anyway) and returns
/// the failure.
async fn refuse<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    peer: SocketAddr,
    why: RejectReason,
    reason: String,
) -> Failure {
    let refusal = Message::Refuse {
        reason: reason.clone(),
    };
    if let Err(e) = write_message(wr, &refusal, peer).await {
        debug!(%peer, error = %e, "could not send Refuse");
    }
    if why == RejectReason::HeaderRefused {
        warn!(%peer, %reason, "refusing primary");
    }
    Failure {
        reason: why,
        error: TransportError::RefusedPeer { peer, reason },
    }
}

/// What the two ends of a backup's channel share: how far the replay is (sent in acks) and
/// how much output the primary says it has released (from its `Released` messages).
#[derive(Debug, Default)]
struct Progress {
    replayed: AtomicU64,
    released: (AtomicU64, AtomicU64),
}

/// What the backup's own side asks the channel to do.
enum Control {
    /// Send this message, and say so once it is written (boxed: a message carries a log
    /// header, far larger than the other variant).
    Send(Box<Message>, oneshot::Sender<()>),
    /// Ack now if the replayed position moved since the last ack.
    Progress,
}

/// Reads entries and heartbeats, hands entries to `tx` and acks after each read (with the
/// replay's position from `replayed`); writes the control messages that come on `ctl`;
/// returns why the connection ended.
async fn receive(
    stream: TcpStream,
    mut dec: FrameDecoder,
    peer: SocketAddr,
    config: ChannelConfig,
    tx: &Sender<Result<Entry, TransportError>>,
    progress: &Progress,
    mut ctl: mpsc::UnboundedReceiver<Control>,
) -> TransportError {
    let replayed = &progress.replayed;
    let released = &progress.released;
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = vec![0; 64 * 1024];
    let mut heard = Instant::now();
    let mut seq = 0u64;
    let mut pos = Position::ZERO;
    let mut acked_replayed = 0u64;
    loop {
        let mut got = false;
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(source) => return TransportError::Stream { peer, source },
            };
            let msg = match decode_payload::<Message>(&frame) {
                Ok(m) => m,
                Err(source) => return TransportError::Stream { peer, source },
            };
            got = true;
            match msg {
                Message::Entry { seq: s, entry } if s == seq + 1 => {
                    seq = s;
                    pos = entry.pos();
                    if tx.send(Ok(entry)).is_err() {
                        return TransportError::Shutdown;
                    }
                }
                Message::Heartbeat { seq: s } if s == seq => {}
                Message::Released { console, frames } => {
                    released.0.fetch_max(console, Ordering::AcqRel);
                    released.1.fetch_max(frames, Ordering::AcqRel);
                }
                Message::Entry { seq: s, .. } | Message::Heartbeat { seq: s } => {
                    return TransportError::Protocol {
                        peer,
                        msg: format!(
                            "{} at byte offset {} carries sequence number {s} after entry #{seq}",
                            frame.record, frame.offset
                        ),
                    }
                }
                other => {
                    return TransportError::Protocol {
                        peer,
                        msg: format!(
                            "expected Entry or Heartbeat, got {} ({} at byte offset {})",
                            other.kind(),
                            frame.record,
                            frame.offset
                        ),
                    }
                }
            }
        }
        if got {
            heard = Instant::now();
            acked_replayed = replayed.load(Ordering::Acquire);
            let ack = Message::Ack {
                pos,
                seq,
                replayed: Position(acked_replayed),
            };
            if let Err(e) = write_message(&mut wr, &ack, peer).await {
                return e;
            }
        }
        // A read is cancel-safe: a control message interrupting it loses no bytes.
        tokio::select! {
            r = fill(&mut rd, &mut dec, &mut buf, peer, heard, config.peer_timeout) => {
                if let Err(e) = r {
                    return e;
                }
            }
            Some(c) = ctl.recv() => match c {
                Control::Send(msg, done) => {
                    if let Err(e) = write_message(&mut wr, &msg, peer).await {
                        return e;
                    }
                    let _ = done.send(());
                }
                Control::Progress => {
                    let now = replayed.load(Ordering::Acquire);
                    if now > acked_replayed {
                        acked_replayed = now;
                        let ack = Message::Ack { pos, seq, replayed: Position(now) };
                        if let Err(e) = write_message(&mut wr, &ack, peer).await {
                            return e;
                        }
                    }
                }
            },
        }
    }
}

/// The backup's end of an accepted channel: entries in the order the primary sent them.
///
/// Every entry received before a failure is delivered before the failure itself, so a
/// backup that loses its primary can still replay everything it acked.
#[derive(Debug)]
pub struct LogReceiver {
    rx: Receiver<Result<Entry, TransportError>>,
    header: LogHeader,
    peer: SocketAddr,
    end: Option<TransportError>,
    received: u64,
    progress: Arc<Progress>,
    ctl: mpsc::UnboundedSender<Control>,
    abort: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LogReceiver {
    /// The primary's log header (accepted by the `check` given to accept).
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The primary's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Entries returned so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// How much output the primary said it has released: (console bytes, frames).
    pub fn released(&self) -> (u64, u64) {
        (
            self.progress.released.0.load(Ordering::Acquire),
            self.progress.released.1.load(Ordering::Acquire),
        )
    }

    /// The replay has reached `pos`: the next acks say so (the primary bounds the lag).
    pub fn set_replayed(&self, pos: Position) {
        self.progress
            .replayed
            .fetch_max(pos.get(), Ordering::AcqRel);
    }

    /// Acks now if the replayed position moved since the last ack (a replay that waits for
    /// the primary's next entry calls this, so a primary held back for it learns at once).
    pub fn flush_progress(&self) {
        let _ = self.ctl.send(Control::Progress);
    }

    /// Tells the primary that the replay diverged at `pos` ([`Message::Diverged`]) and waits
    /// (at most `timeout`) until the message is written. `false` if it could not be.
    pub fn report_divergence(&self, pos: Position, what: &str, timeout: Duration) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        let msg = Message::Diverged {
            pos,
            what: what.to_string(),
        };
        if self
            .ctl
            .send(Control::Send(Box::new(msg), done_tx))
            .is_err()
        {
            return false;
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut done_rx = done_rx;
        loop {
            match done_rx.try_recv() {
                Ok(()) => return true,
                Err(oneshot::error::TryRecvError::Closed) => return false,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn deliver(
        &mut self,
        item: Result<Result<Entry, TransportError>, RecvTimeoutError>,
    ) -> Result<Option<Entry>, TransportError> {
        match item {
            Ok(Ok(entry)) => {
                self.received += 1;
                Ok(Some(entry))
            }
            Ok(Err(e)) => {
                self.end = Some(e.clone());
                Err(e)
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                let e = TransportError::Shutdown;
                self.end = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The next entry, waiting as long as it takes. After the entries, the error that
    /// ended the channel ([`TransportError::Closed`] after an orderly close), again on every
    /// later call.
    pub fn recv(&mut self) -> Result<Entry, TransportError> {
        if let Some(e) = &self.end {
            return Err(e.clone());
        }
        let item = self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected);
        self.deliver(item)?.ok_or(TransportError::Shutdown)
    }

    /// The next entry, or `Ok(None)` if none arrives within `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Entry>, TransportError> {
        if let Some(e) = &self.end {
            return Err(e.clone());
        }
        let item = self.rx.recv_timeout(timeout);
        self.deliver(item)
    }
}

impl Drop for LogReceiver {
    fn drop(&mut self) {
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
