//! Channel tests over real TCP sockets on 127.0.0.1 (ephemeral ports). Timeouts here are
//! failure guards, never assertions about speed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::thread;
use std::time::Duration;

use super::*;
use crate::entry::{EndReason, Entry, LogHeader, Position};
use crate::error::{LogError, Record};
use crate::frame::{encode_frame, FrameDecoder, StreamKind};

/// Generous guard for anything that must happen.
pub(super) const GUARD: Duration = Duration::from_secs(20);

pub(super) fn header() -> LogHeader {
    LogHeader::new(
        [1; 32],
        [2; 32],
        "console=ttyS0 clearcpuid=tsc",
        128,
        10_000,
        "vm-t",
    )
}

pub(super) fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Short timeouts so that silence tests end quickly.
pub(super) fn fast() -> ChannelConfig {
    ChannelConfig {
        heartbeat_interval: Duration::from_millis(20),
        peer_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(300),
    }
}

pub(super) fn entry(i: u64) -> Entry {
    let pos = Position(i);
    match i % 5 {
        0 => Entry::Inject {
            pos,
            vector: (i % 256) as u8,
        },
        1 => Entry::PioIn {
            pos,
            port: 0x40,
            data: vec![i as u8],
        },
        2 => Entry::NetRx {
            pos,
            frame: vec![i as u8; (i % 1500) as usize],
        },
        3 => Entry::ConsoleIn {
            pos,
            bytes: b"x".to_vec(),
        },
        _ => Entry::IrqLine { pos, line: 4 },
    }
}

pub(super) fn frame_of(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(msg, Record::Message(0), 0, &mut out).unwrap();
    out
}

fn hello() -> Vec<u8> {
    frame_of(&Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        header: header(),
    })
}

/// Reads one message from a raw blocking socket (read timeout as a guard).
pub(super) fn raw_read(s: &mut StdStream, dec: &mut FrameDecoder) -> Option<Message> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().unwrap() {
            return Some(crate::frame::decode_payload(&f).unwrap());
        }
        match s.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => dec.push(&buf[..n]),
            Err(e) => panic!("raw read failed: {e}"),
        }
    }
}

/// A raw primary: connects, says Hello, expects Welcome.
fn raw_primary(addr: SocketAddr) -> (StdStream, FrameDecoder) {
    let mut s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(&hello()).unwrap();
    let mut dec = FrameDecoder::new(StreamKind::Wire);
    assert_eq!(
        raw_read(&mut s, &mut dec),
        Some(Message::Welcome {
            protocol_version: PROTOCOL_VERSION
        })
    );
    (s, dec)
}

/// Accepts on a listener in a thread; returns the join handle of `f(listener)`.
fn backup<T: Send + 'static>(
    config: ChannelConfig,
    f: impl FnOnce(LogListener) -> T + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<T>) {
    let l = LogListener::bind(localhost(), config).unwrap();
    let addr = l.local_addr();
    (addr, thread::spawn(move || f(l)))
}

fn accept_ours(l: &LogListener) -> Result<LogReceiver, TransportError> {
    let expected = header();
    l.accept_timeout(|h| expected.check_matches(h), GUARD)
}

#[test]
fn streams_10k_entries_and_every_ack_comes_back() {
    const N: u64 = 10_000;
    let (addr, rx_thread) = backup(ChannelConfig::default(), |l| {
        let mut r = accept_ours(&l).unwrap();
        assert_eq!(r.header(), &header());
        let mut got = Vec::new();
        loop {
            match r.recv_timeout(GUARD) {
                Ok(Some(e)) => got.push(e),
                Ok(None) => panic!("no entry within the guard after {}", got.len()),
                Err(e) => return (got, e),
            }
        }
    });
    let tx = LogSender::connect(addr, header(), ChannelConfig::default()).unwrap();
    for i in 0..N {
        assert_eq!(tx.send(&entry(i)).unwrap(), i + 1);
    }
    assert_eq!(tx.sent_seq(), N);
    assert!(tx.wait_acked(Position(N - 1), GUARD).unwrap());
    let acked = tx.acked();
    assert_eq!(acked.seq, N);
    assert_eq!(acked.pos, Position(N - 1));
    assert_eq!(tx.in_flight(), InFlight::default());
    assert!(tx.status().borrow().failure.is_none());
    let end = tx.close().unwrap();
    assert_eq!(end.seq, N);

    let (got, why) = rx_thread.join().unwrap();
    assert_eq!(got.len() as u64, N);
    assert!(got.iter().enumerate().all(|(i, e)| *e == entry(i as u64)));
    assert!(matches!(why, TransportError::Closed { .. }), "{why:?}");
}

#[test]
fn header_mismatch_is_refused_on_both_sides() {
    let (addr, rx_thread) = backup(fast(), |l| accept_ours(&l).map(|_| ()));
    let mut theirs = header();
    theirs.mem_mib = 256;
    let err = LogSender::connect(addr, theirs, fast()).unwrap_err();
    match &err {
        TransportError::Refused { reason, .. } => {
            assert!(reason.contains("mem_mib: ours 128, theirs 256"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    let err = rx_thread.join().unwrap().unwrap_err();
    match &err {
        TransportError::RefusedPeer { reason, .. } => assert!(reason.contains("mem_mib")),
        other => panic!("expected RefusedPeer, got {other:?}"),
    }
}

#[test]
fn a_wrong_protocol_version_is_refused() {
    let (addr, rx_thread) = backup(fast(), |l| accept_ours(&l).map(|_| ()));
    let mut s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(&frame_of(&Message::Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        header: header(),
    }))
    .unwrap();
    let mut dec = FrameDecoder::new(StreamKind::Wire);
    match raw_read(&mut s, &mut dec) {
        Some(Message::Refuse { reason }) => assert!(reason.contains("protocol version")),
        other => panic!("expected Refuse, got {other:?}"),
    }
    assert!(matches!(
        rx_thread.join().unwrap(),
        Err(TransportError::RefusedPeer { .. })
    ));
}

#[test]
fn garbage_instead_of_hello_is_an_error_naming_the_offset() {
    let (addr, rx_thread) = backup(fast(), |l| {
        let first = accept_ours(&l).map(|_| ());
        // The listener survives a bad connection: a real primary can still connect.
        let second = accept_ours(&l).map(|r| r.header().clone());
        (first, second)
    });
    let mut s = StdStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let tx = LogSender::connect(addr, header(), fast());
    let (first, second) = rx_thread.join().unwrap();
    let err = first.unwrap_err();
    match &err {
        TransportError::Stream {
            source:
                LogError::TooLarge {
                    entry: Record::Message(0),
                    offset: 0,
                    ..
                },
            ..
        } => {}
        other => panic!("expected a TooLarge stream error, got {other:?}"),
    }
    assert!(err.to_string().contains("byte offset 0"), "{err}");
    assert_eq!(second.unwrap(), header());
    drop(tx);
}

#[test]
fn garbage_after_entries_delivers_the_entries_then_an_error() {
    let (addr, rx_thread) = backup(fast(), |l| {
        let mut r = accept_ours(&l).unwrap();
        let a = r.recv_timeout(GUARD).unwrap();
        let b = r.recv_timeout(GUARD).unwrap();
        let err = r.recv_timeout(GUARD).unwrap_err();
        (a, b, err)
    });
    let (mut s, mut dec) = raw_primary(addr);
    let mut bytes = Vec::new();
    for i in 0..2 {
        bytes.extend(frame_of(&Message::Entry {
            seq: i + 1,
            entry: entry(i),
        }));
    }
    let bad_offset = (hello().len() + bytes.len()) as u64;
    // A plausible frame header (small length) with a checksum that does not match.
    bytes.extend_from_slice(&4u32.to_le_bytes());
    bytes.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    bytes.extend_from_slice(b"junk");
    s.write_all(&bytes).unwrap();
    let (a, b, err) = rx_thread.join().unwrap();
    assert_eq!(a, Some(entry(0)));
    assert_eq!(b, Some(entry(1)));
    match &err {
        TransportError::Stream {
            source: LogError::Checksum { entry, offset, .. },
            ..
        } => {
            assert_eq!(*entry, Record::Message(3));
            assert_eq!(*offset, bad_offset);
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    // The backup dropped the connection: after any acks, the raw primary reads EOF.
    while let Some(m) = raw_read(&mut s, &mut dec) {
        assert!(matches!(m, Message::Ack { .. }), "{m:?}");
    }
}

#[test]
fn a_primary_vanishing_mid_frame_is_detected() {
    let (addr, rx_thread) = backup(fast(), |l| {
        let mut r = accept_ours(&l).unwrap();
        let a = r.recv_timeout(GUARD).unwrap();
        let err = r.recv_timeout(GUARD).unwrap_err();
        (a, err)
    });
    let (mut s, _dec) = raw_primary(addr);
    let first = frame_of(&Message::Entry {
        seq: 1,
        entry: entry(0),
    });
    let second = frame_of(&Message::Entry {
        seq: 2,
        entry: entry(102), // a NetRx of 102 bytes: cut inside its payload
    });
    s.write_all(&first).unwrap();
    s.write_all(&second[..second.len() / 2]).unwrap();
    drop(s);
    let (a, err) = rx_thread.join().unwrap();
    assert_eq!(a, Some(entry(0)));
    match &err {
        TransportError::Stream {
            source:
                LogError::Truncated {
                    entry,
                    offset,
                    needed,
                    available,
                },
            ..
        } => {
            assert_eq!(*entry, Record::Message(2));
            assert_eq!(*offset, (hello().len() + first.len()) as u64);
            assert_eq!(*needed, second.len() as u64);
            assert_eq!(*available, (second.len() / 2) as u64);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn a_silent_connection_times_out_in_the_handshake() {
    let (addr, rx_thread) = backup(fast(), |l| accept_ours(&l).map(|_| ()));
    let s = StdStream::connect(addr).unwrap();
    let err = rx_thread.join().unwrap().unwrap_err();
    assert!(matches!(err, TransportError::PeerLost { .. }), "{err:?}");
    drop(s);
}

#[test]
fn a_silent_primary_is_lost_after_the_timeout() {
    let (addr, rx_thread) = backup(fast(), |l| {
        let mut r = accept_ours(&l).unwrap();
        let a = r.recv_timeout(GUARD).unwrap();
        let err = r.recv_timeout(GUARD).unwrap_err();
        // The failure is sticky.
        let again = r.recv().unwrap_err();
        (a, err, again)
    });
    let (mut s, _dec) = raw_primary(addr);
    s.write_all(&frame_of(&Message::Entry {
        seq: 1,
        entry: entry(1),
    }))
    .unwrap();
    // ...then nothing: no heartbeat.
    let (a, err, again) = rx_thread.join().unwrap();
    assert_eq!(a, Some(entry(1)));
    match err {
        TransportError::PeerLost {
            silent, timeout, ..
        } => {
            assert_eq!(timeout, fast().peer_timeout);
            assert!(silent >= timeout);
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(matches!(again, TransportError::PeerLost { .. }));
    drop(s);
}

#[test]
fn heartbeats_keep_an_idle_channel_alive() {
    // No entries for many peer timeouts: heartbeats and their acks keep both sides up.
    let config = ChannelConfig {
        heartbeat_interval: Duration::from_millis(10),
        peer_timeout: Duration::from_millis(800),
        handshake_timeout: GUARD,
    };
    // The backup says when its idle period is over, so the entry cannot arrive inside it
    // however the two threads are scheduled.
    let (idle_done, idle_over) = std::sync::mpsc::channel();
    let (addr, rx_thread) = backup(config, move |l| {
        let mut r = accept_ours(&l).unwrap();
        // Idle well past the peer timeout; nothing must arrive and nothing must fail.
        assert_eq!(r.recv_timeout(Duration::from_millis(2000)).unwrap(), None);
        idle_done.send(()).unwrap();
        let e = r.recv_timeout(GUARD).unwrap();
        (e, r.recv_timeout(GUARD).unwrap_err())
    });
    let tx = LogSender::connect(addr, header(), config).unwrap();
    idle_over.recv_timeout(GUARD).unwrap();
    assert_eq!(tx.failure().map(|e| e.to_string()), None);
    tx.send(&entry(7)).unwrap();
    assert!(tx.wait_acked(Position(7), GUARD).unwrap());
    tx.close().unwrap();
    let (e, end) = rx_thread.join().unwrap();
    assert_eq!(e, Some(entry(7)));
    assert!(matches!(end, TransportError::Closed { .. }), "{end:?}");
}

/// A raw backup: accepts one connection, reads Hello, answers Welcome, then runs `f`.
fn raw_backup<T: Send + 'static>(
    f: impl FnOnce(StdStream, FrameDecoder) -> T + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<T>) {
    let l = StdListener::bind(localhost()).unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut dec = FrameDecoder::new(StreamKind::Wire);
        assert!(matches!(
            raw_read(&mut s, &mut dec),
            Some(Message::Hello { .. })
        ));
        s.write_all(&frame_of(&Message::Welcome {
            protocol_version: PROTOCOL_VERSION,
        }))
        .unwrap();
        f(s, dec)
    });
    (addr, h)
}

#[test]
fn a_silent_backup_is_lost_and_unacked_entries_are_counted() {
    let (addr, h) = raw_backup(|mut s, mut dec| {
        // Read the three entries, never ack; hold the socket open until the primary gives up.
        let mut entries = 0;
        while let Some(m) = raw_read(&mut s, &mut dec) {
            if matches!(m, Message::Entry { .. }) {
                entries += 1;
            }
        }
        entries
    });
    let tx = LogSender::connect(addr, header(), fast()).unwrap();
    let mut bytes = 0;
    for i in 0..3 {
        tx.send(&entry(i)).unwrap();
        bytes += frame_of(&Message::Entry {
            seq: i + 1,
            entry: entry(i),
        })
        .len() as u64;
    }
    let lag = tx.in_flight();
    assert_eq!(lag.entries, 3);
    assert_eq!(lag.bytes, bytes);
    assert_eq!(lag.positions, 2);
    let err = tx
        .wait_failure(GUARD)
        .expect("the backup must be declared lost");
    assert!(matches!(err, TransportError::PeerLost { .. }), "{err:?}");
    assert!(matches!(
        tx.send(&entry(3)),
        Err(TransportError::PeerLost { .. })
    ));
    assert!(tx.wait_acked(Position(0), GUARD).is_err());
    assert!(tx.status().borrow().failure.is_some());
    drop(tx);
    assert_eq!(h.join().unwrap(), 3);
}

#[test]
fn partial_acks_drive_the_output_rule_and_flow_control() {
    let (addr, h) = raw_backup(|mut s, mut dec| {
        let mut got = Vec::new();
        while got.len() < 5 {
            match raw_read(&mut s, &mut dec) {
                Some(Message::Entry { seq, entry }) => got.push((seq, entry)),
                Some(_) => {}
                None => panic!("primary closed early"),
            }
        }
        // Ack the first two only.
        s.write_all(&frame_of(&Message::Ack {
            pos: got[1].1.pos(),
            seq: 2,
            replayed: Position(0),
        }))
        .unwrap();
        // Wait for the primary's signal (a sixth entry), then ack an entry never sent.
        loop {
            match raw_read(&mut s, &mut dec) {
                Some(Message::Entry { seq: 6, .. }) => break,
                Some(_) => {}
                None => panic!("primary closed early"),
            }
        }
        s.write_all(&frame_of(&Message::Ack {
            pos: Position(99),
            seq: 99,
            replayed: Position(0),
        }))
        .unwrap();
        while raw_read(&mut s, &mut dec).is_some() {}
    });
    let tx = LogSender::connect(
        addr,
        header(),
        ChannelConfig {
            peer_timeout: GUARD,
            ..fast()
        },
    )
    .unwrap();
    // Positions 10, 20, 30, 40, 50.
    for i in 1..=5 {
        tx.send(&Entry::Heartbeat {
            pos: Position(i * 10),
        })
        .unwrap();
    }
    assert!(tx.wait_in_flight_at_most(3, u64::MAX, GUARD).unwrap());
    assert_eq!(tx.acked().seq, 2);
    assert_eq!(tx.acked().pos, Position(20));
    assert_eq!(tx.in_flight().entries, 3);
    assert_eq!(tx.in_flight().positions, 30);
    // Output produced at position 25 only needs entries up to 20: released.
    assert!(tx.wait_acked(Position(25), GUARD).unwrap());
    // Output at 30 is held: the entry at 30 is not acked (the raw backup never will ack it).
    assert!(!tx
        .wait_acked(Position(30), Duration::from_millis(50))
        .unwrap());
    assert!(!tx.wait_acked_seq(3, Duration::ZERO).unwrap());
    // A bogus ack is a protocol error that ends the channel.
    tx.send(&Entry::Heartbeat { pos: Position(60) }).unwrap();
    let err = tx.wait_failure(GUARD).unwrap();
    match &err {
        TransportError::Protocol { msg, .. } => assert!(msg.contains("#99"), "{msg}"),
        other => panic!("expected Protocol, got {other:?}"),
    }
    drop(tx);
    h.join().unwrap();
}

#[test]
fn garbage_from_the_backup_fails_the_handshake() {
    let l = StdListener::bind(localhost()).unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&[0x05, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9])
            .unwrap();
        s
    });
    let err = LogSender::connect(addr, header(), fast()).unwrap_err();
    match &err {
        TransportError::Stream {
            source:
                LogError::Checksum {
                    entry: Record::Message(0),
                    offset: 0,
                    ..
                },
            ..
        } => {}
        other => panic!("expected a checksum error, got {other:?}"),
    }
    drop(h.join().unwrap());
}

#[test]
fn a_backup_going_away_ends_the_primary_channel() {
    let (addr, rx_thread) = backup(fast(), |l| {
        let mut r = accept_ours(&l).unwrap();
        r.recv_timeout(GUARD).unwrap()
        // `r` is dropped here: the connection closes.
    });
    let tx = LogSender::connect(addr, header(), fast()).unwrap();
    tx.send(&Entry::End {
        pos: Position(1),
        reason: EndReason::Stopped,
    })
    .unwrap();
    assert!(rx_thread.join().unwrap().is_some());
    let err = tx.wait_failure(GUARD).expect("the primary must notice");
    assert!(
        matches!(
            err,
            TransportError::Closed { .. }
                | TransportError::Io { .. }
                | TransportError::PeerLost { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn sending_out_of_order_or_oversize_is_refused_locally() {
    let (addr, rx_thread) = backup(ChannelConfig::default(), |l| {
        let mut r = accept_ours(&l).unwrap();
        let mut got = Vec::new();
        while let Ok(e) = r.recv() {
            got.push(e);
        }
        got
    });
    let tx = LogSender::connect(addr, header(), ChannelConfig::default()).unwrap();
    tx.send(&entry(5)).unwrap();
    assert!(matches!(
        tx.send(&entry(4)),
        Err(TransportError::Encode(LogError::OutOfOrder { .. }))
    ));
    let big = Entry::NetRx {
        pos: Position(6),
        frame: vec![0; crate::frame::MAX_PAYLOAD_LEN as usize],
    };
    assert!(matches!(
        tx.send(&big),
        Err(TransportError::Encode(LogError::TooLarge { .. }))
    ));
    // The channel is still fine.
    tx.send(&entry(6)).unwrap();
    assert_eq!(tx.close().unwrap().seq, 2);
    assert_eq!(rx_thread.join().unwrap(), vec![entry(5), entry(6)]);
}

#[test]
fn channel_ends_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<LogSender>();
    send::<LogReceiver>();
    send::<LogListener>();
    send_sync::<TransportError>();
}

#[test]
fn acks_carry_the_replayed_position_and_the_primary_can_wait_for_it() {
    let (addr, rx_thread) = backup(fast(), |l| {
        let mut r = accept_ours(&l).unwrap();
        let mut got = 0u64;
        while got < 10 {
            if r.recv_timeout(GUARD).unwrap().is_some() {
                got += 1;
            }
        }
        // Received everything, replayed up to position 7 only.
        r.set_replayed(Position(7));
        // Acks go out after every read; keep reading until the primary closes.
        loop {
            match r.recv_timeout(GUARD) {
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    });
    let tx = LogSender::connect(addr, header(), fast()).unwrap();
    for i in 1..=10 {
        tx.send(&Entry::Heartbeat { pos: Position(i) }).unwrap();
    }
    assert!(tx.wait_acked(Position(10), GUARD).unwrap());
    assert!(tx.wait_replayed(Position(7), GUARD).unwrap());
    let a = tx.acked();
    assert_eq!(a.replayed, Position(7));
    assert_eq!(a.seq, 10);
    // Position 8 is never replayed: the wait times out rather than passing.
    assert!(!tx
        .wait_replayed(Position(8), Duration::from_millis(200))
        .unwrap());
    tx.close().unwrap();
    let why = rx_thread.join().unwrap();
    assert!(matches!(why, TransportError::Closed { .. }), "{why:?}");
}

#[test]
fn a_diverged_backup_is_reported_to_the_primary_at_once() {
    let (addr, rx_thread) = backup(fast(), |l| {
        let mut r = accept_ours(&l).unwrap();
        while r.recv_timeout(GUARD).unwrap().is_none() {}
        assert!(r.report_divergence(Position(1), "page gfn 0x17b8 differs", GUARD));
        r
    });
    let cfg = ChannelConfig {
        // Long enough that only the Diverged message can explain a prompt failure.
        peer_timeout: GUARD,
        ..fast()
    };
    let tx = LogSender::connect(addr, header(), cfg).unwrap();
    tx.send(&Entry::Heartbeat { pos: Position(1) }).unwrap();
    let t0 = std::time::Instant::now();
    let failure = tx.wait_failure(GUARD).expect("the channel fails");
    assert!(t0.elapsed() < GUARD);
    match &failure {
        TransportError::PeerDiverged { pos, what, .. } => {
            assert_eq!(*pos, 1);
            assert!(what.contains("0x17b8"), "{what}");
        }
        other => panic!("expected PeerDiverged, got {other:?}"),
    }
    assert!(tx.send(&Entry::Heartbeat { pos: Position(2) }).is_err());
    drop(rx_thread.join().unwrap());
}
