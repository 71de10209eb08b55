//! Pair authentication and the backup's accept loop, over real TCP sockets on 127.0.0.1:
//! wrong secrets are refused by both sides, strangers (port scans, garbage, wrong versions,
//! peers that close mid-handshake or stay silent) are dropped without stopping the
//! backup, and the right primary still pairs. Timeouts are failure guards only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::auth::{PairSecret, Role, Transcript};
use super::tests::{entry, fast, frame_of, header, localhost, GUARD};
use super::*;
use crate::entry::{LogHeader, Position};
use crate::frame::{FrameDecoder, StreamKind};

fn secret() -> PairSecret {
    PairSecret::new(*b"the pair secret, 32 bytes long!!").unwrap()
}

fn other_secret() -> PairSecret {
    PairSecret::new(*b"not the pair secret, but as long").unwrap()
}

fn authenticated_backup(config: ChannelConfig) -> Arc<LogListener> {
    Arc::new(
        LogListener::bind(localhost(), config)
            .unwrap()
            .with_pair_secret(Some(secret())),
    )
}

/// `wait_for_primary` for our header, in a thread.
fn wait_in_thread(l: &Arc<LogListener>) -> thread::JoinHandle<Result<LogReceiver, TransportError>> {
    let l = l.clone();
    thread::spawn(move || {
        let ours = header();
        l.wait_for_primary(|h| ours.check_matches(h), Some(GUARD))
    })
}

/// Waits until the listener has dropped `n` connections; returns their reasons.
fn rejections_after(l: &LogListener, n: usize) -> Vec<Rejection> {
    let deadline = Instant::now() + GUARD;
    loop {
        let r = l.rejections();
        if r.len() >= n {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "only {} rejections: {r:?}",
            r.len()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn connect_raw(addr: SocketAddr) -> StdStream {
    let s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s
}

/// The next message, or `None` at EOF or on a socket error (the peer dropped us).
fn read_msg(s: &mut StdStream, dec: &mut FrameDecoder) -> Option<Message> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().unwrap() {
            return Some(crate::frame::decode_payload(&f).unwrap());
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => dec.push(&buf[..n]),
        }
    }
}

fn auth_hello(version: u16, header: LogHeader) -> Vec<u8> {
    frame_of(&Message::AuthHello {
        protocol_version: version,
        header,
        nonce: [7; 32],
    })
}

/// Streams `n` entries from `tx` and checks that the backup got exactly those.
fn stream_some(tx: LogSender, mut rx: LogReceiver, n: u64) {
    for i in 0..n {
        tx.send(&entry(i)).unwrap();
    }
    assert!(tx.wait_acked(Position(n - 1), GUARD).unwrap());
    for i in 0..n {
        assert_eq!(rx.recv_timeout(GUARD).unwrap(), Some(entry(i)));
    }
    tx.close().unwrap();
    assert!(matches!(
        rx.recv_timeout(GUARD),
        Err(TransportError::Closed { .. })
    ));
}

#[test]
fn an_authenticated_pair_streams_entries() {
    let l = authenticated_backup(ChannelConfig::default());
    let waiting = wait_in_thread(&l);
    let tx = LogSender::connect_with_secret(
        l.local_addr(),
        header(),
        ChannelConfig::default(),
        Some(secret()),
    )
    .unwrap();
    let rx = waiting.join().unwrap().unwrap();
    assert_eq!(rx.header(), &header());
    assert!(l.rejections().is_empty());
    stream_some(tx, rx, 200);
}

/// A primary with another secret is refused; the backup logs it, keeps listening, and
/// pairs with the right primary.
#[test]
fn a_wrong_secret_is_refused_by_the_backup() {
    let l = authenticated_backup(fast());
    let waiting = wait_in_thread(&l);
    let err =
        LogSender::connect_with_secret(l.local_addr(), header(), fast(), Some(other_secret()))
            .unwrap_err();
    match &err {
        TransportError::Refused { reason, .. } => {
            assert!(reason.contains("authentication failed"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // Nor can a primary without a secret pair with it.
    let err = LogSender::connect(l.local_addr(), header(), fast()).unwrap_err();
    assert!(
        matches!(&err, TransportError::Refused { reason, .. } if reason.contains("requires pair authentication")),
        "{err:?}"
    );
    let r = rejections_after(&l, 2);
    assert_eq!(r[0].reason, RejectReason::WrongSecret);
    assert_eq!(r[1].reason, RejectReason::Unauthenticated);
    assert!(matches!(r[0].error, TransportError::Auth { .. }), "{r:?}");
    assert_eq!(r[0].peer.ip(), l.local_addr().ip());

    let tx =
        LogSender::connect_with_secret(l.local_addr(), header(), fast(), Some(secret())).unwrap();
    let rx = waiting.join().unwrap().unwrap();
    stream_some(tx, rx, 20);
}

/// A fake backup that answers the primary's challenge with `welcome(transcript)`; returns
/// what the primary sent after that (it must send no entry).
fn fake_backup(
    welcome: impl FnOnce(&Transcript) -> Message + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<Vec<Message>>) {
    let l = StdListener::bind(localhost()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut dec = FrameDecoder::new(StreamKind::Wire);
        let Some(Message::AuthHello { header, nonce, .. }) = read_msg(&mut s, &mut dec) else {
            panic!("expected AuthHello")
        };
        let nonce_backup = [9; 32];
        s.write_all(&frame_of(&Message::AuthChallenge {
            nonce: nonce_backup,
        }))
        .unwrap();
        let transcript = Transcript::new(nonce, nonce_backup, &header);
        let Some(Message::AuthProof { mac }) = read_msg(&mut s, &mut dec) else {
            panic!("expected AuthProof")
        };
        // The primary's proof is right (and says nothing of the secret itself).
        assert!(transcript.verify(&secret(), Role::Primary, &mac));
        s.write_all(&frame_of(&welcome(&transcript))).unwrap();
        let mut after = Vec::new();
        while let Some(m) = read_msg(&mut s, &mut dec) {
            after.push(m);
        }
        after
    });
    (addr, t)
}

/// A backup that cannot prove it holds the pair secret gets no log: the primary fails
/// with an authentication error and sends it nothing.
#[test]
fn a_backup_with_the_wrong_secret_is_refused_by_the_primary() {
    let (addr, fake) = fake_backup(|t| Message::AuthWelcome {
        protocol_version: PROTOCOL_VERSION,
        mac: t.proof(&other_secret(), Role::Backup),
    });
    let err = LogSender::connect_with_secret(addr, header(), fast(), Some(secret())).unwrap_err();
    assert!(
        matches!(&err, TransportError::Auth { msg, .. } if msg.contains("not our backup")),
        "{err:?}"
    );
    let sent = fake.join().unwrap();
    assert!(sent.is_empty(), "the primary sent {sent:?}");

    // Reflecting the primary's own proof (its role, not the backup's) fails too.
    let (addr, fake) = fake_backup(|t| Message::AuthWelcome {
        protocol_version: PROTOCOL_VERSION,
        mac: t.proof(&secret(), Role::Primary),
    });
    let err = LogSender::connect_with_secret(addr, header(), fast(), Some(secret())).unwrap_err();
    assert!(matches!(err, TransportError::Auth { .. }), "{err:?}");
    assert!(fake.join().unwrap().is_empty());

    // A backup that accepts without authenticating at all is refused as well.
    let l = StdListener::bind(localhost()).unwrap();
    let addr = l.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut dec = FrameDecoder::new(StreamKind::Wire);
        assert!(matches!(
            read_msg(&mut s, &mut dec),
            Some(Message::AuthHello { .. })
        ));
        s.write_all(&frame_of(&Message::Welcome {
            protocol_version: PROTOCOL_VERSION,
        }))
        .unwrap();
        read_msg(&mut s, &mut dec)
    });
    let err = LogSender::connect_with_secret(addr, header(), fast(), Some(secret())).unwrap_err();
    assert!(
        matches!(&err, TransportError::Auth { msg, .. } if msg.contains("without authenticating")),
        "{err:?}"
    );
    assert_eq!(fake.join().unwrap(), None);

    // And the right backup's proof is accepted (the fake is otherwise the same).
    let (addr, fake) = fake_backup(|t| Message::AuthWelcome {
        protocol_version: PROTOCOL_VERSION,
        mac: t.proof(&secret(), Role::Backup),
    });
    let tx = LogSender::connect_with_secret(addr, header(), fast(), Some(secret())).unwrap();
    tx.send(&entry(0)).unwrap();
    let _ = tx.close(); // flushes; the fake never acks
    let sent = fake.join().unwrap();
    assert!(
        sent.iter()
            .any(|m| matches!(m, Message::Entry { seq: 1, .. })),
        "{sent:?}"
    );
}

/// Everything a stranger can do to the backup's port before the primary arrives; the
/// backup drops each, says why, keeps listening, and the primary then pairs.
#[test]
fn strangers_do_not_stop_the_backup_and_the_primary_still_pairs() {
    let l = authenticated_backup(fast());
    let addr = l.local_addr();
    let waiting = wait_in_thread(&l);
    let mut expected = Vec::new();

    // A port scan: connect, close.
    drop(connect_raw(addr));
    expected.push(RejectReason::Closed);
    rejections_after(&l, expected.len());

    // Garbage (another protocol).
    let mut s = connect_raw(addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    expected.push(RejectReason::Garbage);
    rejections_after(&l, expected.len());
    drop(s);

    // A wrong protocol version: refused with the reason.
    let mut s = connect_raw(addr);
    s.write_all(&auth_hello(PROTOCOL_VERSION + 1, header()))
        .unwrap();
    let mut dec = FrameDecoder::new(StreamKind::Wire);
    assert!(matches!(
        read_msg(&mut s, &mut dec),
        Some(Message::Refuse { reason }) if reason.contains("protocol version")
    ));
    expected.push(RejectReason::WrongVersion);
    rejections_after(&l, expected.len());

    // A plain Hello with a mismatched header: refused for not authenticating, and the
    // header is never checked (a HeaderRefused would end the wait).
    let mut s = connect_raw(addr);
    let mut theirs = header();
    theirs.mem_mib = 4096;
    s.write_all(&frame_of(&Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        header: theirs.clone(),
    }))
    .unwrap();
    let mut dec = FrameDecoder::new(StreamKind::Wire);
    assert!(matches!(
        read_msg(&mut s, &mut dec),
        Some(Message::Refuse { reason }) if !reason.contains("mem_mib")
    ));
    expected.push(RejectReason::Unauthenticated);
    rejections_after(&l, expected.len());

    // Closes mid-handshake, after the challenge.
    let mut s = connect_raw(addr);
    s.write_all(&auth_hello(PROTOCOL_VERSION, header()))
        .unwrap();
    let mut dec = FrameDecoder::new(StreamKind::Wire);
    assert!(matches!(
        read_msg(&mut s, &mut dec),
        Some(Message::AuthChallenge { .. })
    ));
    drop(s);
    expected.push(RejectReason::Closed);
    rejections_after(&l, expected.len());

    // Sends entries instead of a proof: dropped, no entry accepted.
    let mut s = connect_raw(addr);
    let mut bytes = auth_hello(PROTOCOL_VERSION, theirs);
    bytes.extend(frame_of(&Message::Entry {
        seq: 1,
        entry: entry(0),
    }));
    s.write_all(&bytes).unwrap();
    expected.push(RejectReason::Garbage);
    rejections_after(&l, expected.len());

    // Connects and stays silent: dropped at the handshake timeout.
    let silent = connect_raw(addr);
    expected.push(RejectReason::Timeout);
    let r = rejections_after(&l, expected.len());
    drop(silent);

    let got: Vec<_> = r.iter().map(|r| r.reason).collect();
    assert_eq!(got, expected, "{r:#?}");
    assert!(r.iter().all(|r| r.peer.ip() == addr.ip()));
    assert!(
        r[1].error.to_string().contains("byte offset 0"),
        "{}",
        r[1].error
    );

    let tx = LogSender::connect_with_secret(addr, header(), fast(), Some(secret())).unwrap();
    let rx = waiting.join().unwrap().unwrap();
    stream_some(tx, rx, 20);
}

/// Handshakes run side by side: a stranger that connects first and stays silent (the
/// backup gives it a minute) does not keep the primary, whose own handshake limit is far
/// shorter, from pairing.
#[test]
fn a_silent_stranger_does_not_hold_up_the_primary() {
    let patient = ChannelConfig {
        handshake_timeout: Duration::from_secs(60),
        ..fast()
    };
    let l = authenticated_backup(patient);
    let waiting = wait_in_thread(&l);
    let strangers: Vec<_> = (0..3).map(|_| connect_raw(l.local_addr())).collect();
    thread::sleep(Duration::from_millis(50));
    let primary = ChannelConfig {
        handshake_timeout: Duration::from_secs(5),
        ..fast()
    };
    let tx =
        LogSender::connect_with_secret(l.local_addr(), header(), primary, Some(secret())).unwrap();
    let rx = waiting.join().unwrap().unwrap();
    stream_some(tx, rx, 20);
    drop(strangers);
}

/// An authenticated primary whose header does not match is a real, misconfigured
/// primary: both sides are told why, and the backup's wait ends with the error.
#[test]
fn an_authenticated_primary_with_another_header_is_refused() {
    let l = authenticated_backup(fast());
    let waiting = wait_in_thread(&l);
    let mut theirs = header();
    theirs.mem_mib = 256;
    let err =
        LogSender::connect_with_secret(l.local_addr(), theirs, fast(), Some(secret())).unwrap_err();
    assert!(
        matches!(&err, TransportError::Refused { reason, .. } if reason.contains("mem_mib")),
        "{err:?}"
    );
    let err = waiting.join().unwrap().unwrap_err();
    assert!(
        matches!(&err, TransportError::RefusedPeer { reason, .. } if reason.contains("mem_mib")),
        "{err:?}"
    );
}

/// Without a secret the backup behaves as before (the first matching primary pairs), but
/// refuses a primary that wants to authenticate rather than pretend to.
#[test]
fn an_unauthenticated_backup_pairs_as_before_and_refuses_to_fake_authentication() {
    let l = Arc::new(LogListener::bind(localhost(), fast()).unwrap());
    assert!(!l.is_authenticated());
    let waiting = wait_in_thread(&l);
    let err = LogSender::connect_with_secret(l.local_addr(), header(), fast(), Some(secret()))
        .unwrap_err();
    assert!(
        matches!(&err, TransportError::Refused { reason, .. } if reason.contains("no pair secret")),
        "{err:?}"
    );
    assert_eq!(rejections_after(&l, 1)[0].reason, RejectReason::NoSecret);
    // A port scan does not stop it either.
    drop(connect_raw(l.local_addr()));
    assert_eq!(rejections_after(&l, 2)[1].reason, RejectReason::Closed);
    let tx = LogSender::connect(l.local_addr(), header(), fast()).unwrap();
    let rx = waiting.join().unwrap().unwrap();
    stream_some(tx, rx, 20);
}

/// Without a secret, a primary with another header still ends the wait with the refusal,
/// as `accept` always did (the `twinvm backup` exits with the reason).
#[test]
fn an_unauthenticated_primary_with_another_header_ends_the_wait() {
    let l = Arc::new(LogListener::bind(localhost(), fast()).unwrap());
    let waiting = wait_in_thread(&l);
    drop(connect_raw(l.local_addr())); // a scan first: not an end
    let mut theirs = header();
    theirs.mem_mib = 256;
    rejections_after(&l, 1);
    let err = LogSender::connect(l.local_addr(), theirs, fast()).unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
    let err = waiting.join().unwrap().unwrap_err();
    assert!(
        matches!(&err, TransportError::RefusedPeer { reason, .. } if reason.contains("mem_mib")),
        "{err:?}"
    );
}
