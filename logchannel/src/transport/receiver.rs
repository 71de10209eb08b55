//! The backup's end of the channel: [`LogListener`] accepts a primary, [`LogReceiver`]
//! yields its entries.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{
    fill, read_message, runtime, write_message, ChannelConfig, Message, TransportError,
    PROTOCOL_VERSION,
};
use crate::entry::{Entry, LogHeader, Position};
use crate::frame::{decode_payload, FrameDecoder, StreamKind};

/// The backup's listening socket.
///
/// Its methods block the calling thread; do not call them from async code.
#[derive(Debug)]
pub struct LogListener {
    rt: Runtime,
    listener: TcpListener,
    addr: SocketAddr,
    config: ChannelConfig,
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
        })
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
            let (header, dec) = handshake(&mut stream, peer, &self.config, check).await?;
            Ok::<_, TransportError>((stream, peer, header, dec))
        })?;
        let stream = stream.into_std().map_err(|e| TransportError::Io {
            peer,
            msg: format!("cannot hand the socket to the channel thread: {e}"),
        })?;
        info!(%peer, vm_id = %header.vm_id, "log channel from primary up");

        let (tx, rx) = std::sync::mpsc::channel();
        let (abort_tx, abort_rx) = oneshot::channel();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let replayed = Arc::new(AtomicU64::new(0));
        let replayed2 = replayed.clone();
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
                        e = receive(stream, dec, peer, config, &tx, &replayed2, ctl_rx) => {
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
            replayed,
            ctl: ctl_tx,
            abort: Some(abort_tx),
            thread: Some(thread),
        })
    }
}

async fn handshake(
    stream: &mut TcpStream,
    peer: SocketAddr,
    config: &ChannelConfig,
    check: impl FnOnce(&LogHeader) -> Result<(), String>,
) -> Result<(LogHeader, FrameDecoder), TransportError> {
    let mut dec = FrameDecoder::new(StreamKind::Wire);
    let mut buf = vec![0; 4096];
    let (mut rd, mut wr) = stream.split();
    let hello = read_message(
        &mut rd,
        &mut dec,
        &mut buf,
        peer,
        Instant::now(),
        config.handshake_timeout,
    )
    .await?;
    let (protocol_version, header) = match hello {
        Message::Hello {
            protocol_version,
            header,
        } => (protocol_version, header),
        other => {
            return Err(TransportError::Protocol {
                peer,
                msg: format!("expected Hello, got {}", other.kind()),
            })
        }
    };
    let verdict = if protocol_version != PROTOCOL_VERSION {
        Err(format!(
            "the primary speaks protocol version {protocol_version}, this backup {PROTOCOL_VERSION}"
        ))
    } else {
        check(&header)
    };
    match verdict {
        Ok(()) => {
            write_message(
                &mut wr,
                &Message::Welcome {
                    protocol_version: PROTOCOL_VERSION,
                },
                peer,
            )
            .await?;
            Ok((header, dec))
        }
        Err(reason) => {
            warn!(%peer, %reason, "refusing primary");
            write_message(
                &mut wr,
                &Message::Refuse {
                    reason: reason.clone(),
                },
                peer,
            )
            .await?;
            Err(TransportError::RefusedPeer { peer, reason })
        }
    }
}

/// A message the backup's own side asks the channel to send, and who to tell once it is
/// written.
type Control = (Message, oneshot::Sender<()>);

/// Reads entries and heartbeats, hands entries to `tx` and acks after each read (with the
/// replay's position from `replayed`); writes the control messages that come on `ctl`;
/// returns why the connection ended.
async fn receive(
    stream: TcpStream,
    mut dec: FrameDecoder,
    peer: SocketAddr,
    config: ChannelConfig,
    tx: &Sender<Result<Entry, TransportError>>,
    replayed: &AtomicU64,
    mut ctl: mpsc::UnboundedReceiver<Control>,
) -> TransportError {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = vec![0; 64 * 1024];
    let mut heard = Instant::now();
    let mut seq = 0u64;
    let mut pos = Position::ZERO;
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
            let ack = Message::Ack {
                pos,
                seq,
                replayed: Position(replayed.load(Ordering::Acquire)),
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
            Some((msg, done)) = ctl.recv() => {
                if let Err(e) = write_message(&mut wr, &msg, peer).await {
                    return e;
                }
                let _ = done.send(());
            }
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
    replayed: Arc<AtomicU64>,
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

    /// The replay has reached `pos`: the next acks say so (the primary bounds the lag).
    pub fn set_replayed(&self, pos: Position) {
        self.replayed.fetch_max(pos.get(), Ordering::AcqRel);
    }

    /// Tells the primary that the replay diverged at `pos` ([`Message::Diverged`]) and waits
    /// (at most `timeout`) until the message is written. `false` if it could not be.
    pub fn report_divergence(&self, pos: Position, what: &str, timeout: Duration) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        let msg = Message::Diverged {
            pos,
            what: what.to_string(),
        };
        if self.ctl.send((msg, done_tx)).is_err() {
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
