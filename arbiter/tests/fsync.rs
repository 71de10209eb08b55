//! The fsync behind every answer, observed and faulted. SIGKILL (tests/crash.rs) leaves the
//! page cache intact, so it cannot tell a decision that was fsync'd from one that was only
//! written; these tests put a [`LogSink`] between the store and its log file that can
//! hold an fsync back or make it fail, and talk to the real HTTP server in this process.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arbiter::client::{BlockingClient, ClientConfig, ClientError};
use arbiter::server::{Server, ServerConfig};
use arbiter::store::{LogSink, Store};
use arbiter::{Auth, Outcome};

/// What the sink was asked to do, and what it lets through.
#[derive(Default)]
struct Control {
    /// Bytes appended (written to the file, not yet known durable).
    appended: Mutex<Vec<u8>>,
    /// Bytes covered by a successful fsync.
    synced: Mutex<Vec<u8>>,
    /// Fsyncs are held back while this is true.
    hold: Mutex<bool>,
    released: Condvar,
    /// Fsyncs waiting on `hold`.
    waiting: AtomicUsize,
    /// Fsyncs fail (EIO) while this is true.
    fail: AtomicBool,
}

struct Sink {
    file: File,
    control: Arc<Control>,
}

impl LogSink for Sink {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.append(bytes)?;
        self.control
            .appended
            .lock()
            .unwrap()
            .extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let c = &self.control;
        c.waiting.fetch_add(1, Ordering::SeqCst);
        let mut hold = c.hold.lock().unwrap();
        while *hold {
            hold = c.released.wait(hold).unwrap();
        }
        drop(hold);
        c.waiting.fetch_sub(1, Ordering::SeqCst);
        if c.fail.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        self.file.sync()?;
        let appended = c.appended.lock().unwrap().clone();
        *c.synced.lock().unwrap() = appended;
        Ok(())
    }
}

fn libc_eio() -> i32 {
    5 // EIO on Linux
}

/// An arbiter server in this process over a store whose appends go through [`Sink`].
struct InProcess {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(dir: &Path, control: Arc<Control>) -> InProcess {
        let store = Store::open_with_sink(dir, move |file| Box::new(Sink { file, control }))
            .expect("open the store");
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), Auth::Disabled);
                let server = Server::bind(config, Arc::new(store)).await.unwrap();
                addr_tx.send(server.local_addr().unwrap()).unwrap();
                server
                    .serve(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap().to_string();
        InProcess {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn client(&self) -> BlockingClient {
        let config = ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(20),
            attempts: 1,
            ..ClientConfig::default()
        };
        BlockingClient::with_config(self.addr.clone(), None, config).unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn holds(bytes: &[u8], vm: &str, holder: &str) -> bool {
    let needle = format!(r#""vm":"{vm}","generation":1,"holder":"{holder}""#);
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn hold(control: &Control, on: bool) {
    *control.hold.lock().unwrap() = on;
    control.released.notify_all();
}

/// A grant is answered only once the fsync covering its record has returned: while the
/// fsync is held back, the record is written but the claimant hears nothing; the answer
/// comes after the fsync, and the synced bytes hold the grant. A store that answered
/// before its fsync, or never fsync'd, fails here (SIGKILL tests cannot see either).
#[test]
fn a_grant_is_answered_only_after_its_fsync() {
    let tmp = tempfile::tempdir().unwrap();
    let control = Arc::new(Control::default());
    let server = InProcess::start(tmp.path(), control.clone());

    hold(&control, true);
    let (tx, rx) = mpsc::channel();
    let client = server.client();
    let claim = std::thread::spawn(move || {
        tx.send(client.test_and_set("vm", "first", 1)).unwrap();
    });
    // Wait until the record is written and its fsync is waiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while control.waiting.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no fsync was asked for"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(holds(&control.appended.lock().unwrap(), "vm", "first"));
    assert!(!holds(&control.synced.lock().unwrap(), "vm", "first"));
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the claim was answered before its fsync returned"
    );
    // A rival asking meanwhile is not told anything either (not even `lost`: the state
    // it would reveal is not durable yet).
    let (tx2, rx2) = mpsc::channel();
    let client2 = server.client();
    let rival = std::thread::spawn(move || {
        tx2.send(client2.test_and_set("vm", "second", 1)).unwrap();
    });
    assert!(rx2.recv_timeout(Duration::from_millis(300)).is_err());

    hold(&control, false);
    let answer = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(answer.outcome, Outcome::Won);
    assert!(
        holds(&control.synced.lock().unwrap(), "vm", "first"),
        "answered `won` but the grant is not covered by a successful fsync"
    );
    let rival_answer = rx2.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(rival_answer.outcome, Outcome::Lost);
    assert_eq!(rival_answer.holder.as_deref(), Some("first"));
    claim.join().unwrap();
    rival.join().unwrap();
}

/// When the fsync fails, the claimant is answered an error (503), never `won`; the store
/// then answers nobody until restarted, so a rival is not told `won` or `lost` about a
/// state that may not be on disk. After a restart the claim is decided from what the disk
/// holds, and at most one claimant is ever told `won`.
#[test]
fn a_failed_fsync_answers_an_error_and_grants_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let control = Arc::new(Control::default());
    let server = InProcess::start(tmp.path(), control.clone());
    let client = server.client();
    assert_eq!(
        client.test_and_set("before", "x", 1).unwrap().outcome,
        Outcome::Won
    );

    control.fail.store(true, Ordering::SeqCst);
    let err = client
        .test_and_set("vm", "first", 1)
        .expect_err("a claim whose fsync failed must not be answered `won`");
    assert!(
        matches!(&err, ClientError::Unavailable { last, .. } if last.contains("503")),
        "{err}"
    );
    control.fail.store(false, Ordering::SeqCst);
    // Poisoned: the store no longer decides, even with a healthy disk.
    for call in [
        client.test_and_set("vm", "second", 1).map(|_| ()),
        client.get("vm").map(|_| ()),
        client.test_and_set("other", "second", 1).map(|_| ()),
    ] {
        let err = call.expect_err("a poisoned store must not answer");
        assert!(
            matches!(&err, ClientError::Unavailable { last, .. } if last.contains("503")),
            "{err}"
        );
    }
    drop(server);

    // Restarted on the same directory: the state is what the disk holds; whoever holds
    // `vm`, only one claimant can ever be told `won`.
    let server = InProcess::start(tmp.path(), Arc::new(Control::default()));
    let client = server.client();
    assert_eq!(
        client.get("before").unwrap().unwrap().holder.as_deref(),
        Some("x")
    );
    let winners: Vec<_> = ["first", "second"]
        .into_iter()
        .filter(|c| client.test_and_set("vm", c, 1).unwrap().outcome == Outcome::Won)
        .collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(
        client.get("other").unwrap(),
        None,
        "a poisoned store decided something"
    );
}
