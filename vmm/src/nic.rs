//! The guest's network card as the machine sees it: the virtio-net device on its virtio-mmio
//! window and ISA line, the TAP it is connected to in a live run, the frames received and
//! not yet taken by the guest, and where transmitted frames go.
//!
//! The card is present when the kernel command line announces it
//! (`virtio_mmio.device=4K@0xd0000000:5`), so a recording, its replay and both sides of a
//! live pair, which share the command line, always have the same device model. Its MAC
//! address comes from `twinvm.mac=` on the command line, or [`DEFAULT_MAC`].

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::devices::virtio::mmio::{cmdline_param, MmioTransport, MMIO_LEN};
use crate::devices::virtio::net::Net;
use crate::memory::GuestMemory;
use crate::tap::{Tap, TapError};

/// Guest physical address of the NIC's virtio-mmio window (above RAM, below 4 GiB).
pub const NIC_MMIO_BASE: u64 = 0xd000_0000;
/// Length of the card's MMIO window (the virtio-mmio register block).
pub const NIC_MMIO_LEN: u64 = MMIO_LEN;
/// ISA interrupt line of the NIC (free on a PC without a second parallel port).
pub const NIC_IRQ: u8 = 5;
/// MAC address used when the command line names none (a locally administered address).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x74, 0x77, 0x01];
/// Frames read from the TAP and waiting for the guest, at most; more are dropped, as a
/// full card would.
const RX_QUEUE_MAX: usize = 256;

/// The kernel command-line words that give the guest the NIC.
pub fn cmdline_words(mac: Option<[u8; 6]>) -> String {
    let mut s = cmdline_param(NIC_MMIO_BASE, NIC_IRQ);
    if let Some(m) = mac {
        s.push_str(&format!(" twinvm.mac={}", format_mac(&m)));
    }
    s
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// Whether `cmdline` gives the guest the NIC, and with which MAC address.
pub fn from_cmdline(cmdline: &str) -> Option<[u8; 6]> {
    let announced = cmdline_param(NIC_MMIO_BASE, NIC_IRQ);
    if !cmdline.split_whitespace().any(|w| w == announced) {
        return None;
    }
    let mac = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("twinvm.mac="))
        .and_then(parse_mac)
        .unwrap_or(DEFAULT_MAC);
    Some(mac)
}

/// A RARP "request reverse" broadcast from `mac`: the frame a moved VM sends so that
/// learning switches update their tables.
pub fn rarp_announce(mac: &[u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0x80, 0x35]); // EtherType RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]); // Ethernet/IPv4, op 3
    f.extend_from_slice(mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(60, 0); // minimum Ethernet frame without FCS
    f
}

/// Where the frames the guest transmits go.
pub trait FrameSink: Send {
    /// Takes one transmitted frame.
    fn frame(&mut self, frame: Vec<u8>);
}

/// Frames go nowhere (a replay, a backup).
#[derive(Debug, Default)]
pub struct DropFrames;

impl FrameSink for DropFrames {
    fn frame(&mut self, _: Vec<u8>) {}
}

/// Frames go to a TAP at once (a live run without a backup).
#[derive(Debug)]
pub struct TapWriter(pub std::fs::File);

impl TapWriter {
    /// A writer on a duplicate of the TAP's descriptor.
    pub fn dup(tap: &Tap) -> std::io::Result<Self> {
        // SAFETY: dup(2) of a descriptor `tap` owns; the new descriptor is owned by the File.
        let fd = unsafe { libc::dup(tap.as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(TapWriter(unsafe { std::fs::File::from_raw_fd(fd) }))
    }

    /// Writes one frame (one write(2) is one frame on a TAP).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.0.write_all(frame)
    }
}

impl FrameSink for TapWriter {
    fn frame(&mut self, frame: Vec<u8>) {
        if let Err(e) = self.write_frame(&frame) {
            tracing::warn!("TAP write of a {}-byte frame: {e}", frame.len());
        }
    }
}

/// The NIC, as the machine drives it.
pub struct Nic {
    /// The virtio-mmio transport and the virtio-net device behind it.
    pub transport: MmioTransport<Net>,
    /// The TAP the card receives from in a live run (none in replay).
    tap: Option<Tap>,
    /// A backup's TAP, opened at start-up and unread until the backup goes live.
    standby: Option<Tap>,
    rx_queue: VecDeque<Vec<u8>>,
    tx: Box<dyn FrameSink>,
    /// Raised by the TAP watcher when frames wait; lowered when the loop drained the TAP.
    armed: Arc<AtomicBool>,
    /// Frames dropped because the receive queue was full.
    pub rx_dropped: u64,
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("rx_queue", &self.rx_queue.len())
            .finish_non_exhaustive()
    }
}

/// Errors setting up the NIC.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// The TAP could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The virtio transport could not be built.
    #[error("virtio-net: {0}")]
    Transport(String),
    /// The TAP descriptor could not be duplicated.
    #[error("TAP {name}: {source}")]
    Dup {
        /// The TAP.
        name: String,
        /// The error.
        source: std::io::Error,
    },
}

impl Nic {
    /// Builds the card with `mac`, connected to the TAP `tap` if given.
    pub fn new(
        mem: &GuestMemory,
        mac: [u8; 6],
        tap: Option<&str>,
        tx: Option<Box<dyn FrameSink>>,
    ) -> Result<Self, NicError> {
        let transport = MmioTransport::new(Net::new(mac), mem.clone())
            .map_err(|e| NicError::Transport(e.to_string()))?;
        let tap = tap.map(Tap::open).transpose()?;
        let tx: Box<dyn FrameSink> = match (tx, &tap) {
            (Some(tx), _) => tx,
            (None, Some(t)) => Box::new(TapWriter::dup(t).map_err(|source| NicError::Dup {
                name: t.name().to_string(),
                source,
            })?),
            (None, None) => Box::new(DropFrames),
        };
        Ok(Nic {
            transport,
            tap,
            standby: None,
            rx_queue: VecDeque::new(),
            tx,
            armed: Arc::new(AtomicBool::new(true)),
            rx_dropped: 0,
        })
    }

    /// Whether `addr` is in the card's MMIO window.
    pub fn claims(&self, addr: u64) -> bool {
        (NIC_MMIO_BASE..NIC_MMIO_BASE + NIC_MMIO_LEN).contains(&addr)
    }

    /// Hands what the guest transmitted to the frame sink.
    pub fn flush_tx(&mut self) {
        if self.transport.device().has_tx_frames() {
            for f in self.transport.device_mut().take_tx_frames() {
                self.tx.frame(f);
            }
        }
    }

    /// Reads every frame waiting on the TAP into the receive queue (live runs).
    pub fn poll_tap(&mut self) {
        let Some(tap) = &mut self.tap else {
            return;
        };
        let mut buf = vec![0u8; 65536];
        loop {
            match tap.read_frame(&mut buf) {
                Ok(Some(n)) => {
                    if self.rx_queue.len() >= RX_QUEUE_MAX {
                        self.rx_dropped += 1;
                    } else {
                        self.rx_queue.push_back(buf[..n].to_vec());
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("TAP {} read: {e}", tap.name());
                    break;
                }
            }
        }
        self.armed.store(true, Ordering::Release);
    }

    /// Whether a received frame waits that the guest has room for (reads the TAP first).
    pub fn rx_waiting(&mut self) -> bool {
        self.poll_tap();
        !self.rx_queue.is_empty() && self.transport.device().rx_ready()
    }

    /// The next received frame the guest has room for, taken from the queue.
    pub fn next_rx(&mut self) -> Option<Vec<u8>> {
        if self.transport.device().rx_ready() {
            self.rx_queue.pop_front()
        } else {
            None
        }
    }

    /// Gives the card of a backup the TAP it will use if it goes live, opened at start-up so
    /// that a TAP that cannot be opened is an error before the backup can win the arbiter.
    pub fn set_standby(&mut self, tap: Tap) {
        self.standby = Some(tap);
    }

    /// Connects the card of a backup that goes live to its standby TAP: frames received
    /// there go to the guest from now on, and transmitted frames go out through it. Returns
    /// whether there was one.
    pub fn go_live(&mut self) -> Result<bool, NicError> {
        let Some(mut t) = self.standby.take() else {
            return Ok(false);
        };
        let tap = t.name().to_string();
        // Frames that queued on the TAP while nobody read it went to the primary too, or
        // were sent after it died and will be sent again: they are not for this guest.
        let mut buf = vec![0u8; 65536];
        let mut stale = 0;
        while let Ok(Some(_)) = t.read_frame(&mut buf) {
            stale += 1;
        }
        if stale > 0 {
            tracing::info!("dropped {stale} frames queued on TAP {tap} before going live");
        }
        self.tx = Box::new(TapWriter::dup(&t).map_err(|source| NicError::Dup {
            name: tap.clone(),
            source,
        })?);
        self.tap = Some(t);
        Ok(true)
    }

    /// Announces the guest's MAC address on the network with RARP broadcasts (as VMware FT
    /// does), so that switches learn its new port.
    pub fn announce(&mut self) {
        let mac = self.transport.device().mac();
        let frame = rarp_announce(&mac);
        for _ in 0..3 {
            self.tx.frame(frame.clone());
        }
    }

    /// Sends `frames` where transmitted frames go now.
    pub fn send_frames(&mut self, frames: Vec<Vec<u8>>) {
        for f in frames {
            self.tx.frame(f);
        }
    }

    /// Whether the card reads from a TAP.
    pub fn has_tap(&self) -> bool {
        self.tap.is_some()
    }

    /// A writer on the card's TAP, for output held elsewhere (the primary's output rule).
    pub fn tap_writer(&self) -> Option<std::io::Result<TapWriter>> {
        self.tap.as_ref().map(TapWriter::dup)
    }

    /// Replaces where transmitted frames go.
    pub fn set_frame_sink(&mut self, tx: Box<dyn FrameSink>) {
        self.tx = tx;
    }

    /// Starts a thread that tells the vCPU loop (through `notify`) when the TAP has frames,
    /// so that a halted guest wakes up for them. It sends one notice per drain of the TAP.
    pub fn spawn_watcher<F>(&self, notify: F) -> std::io::Result<()>
    where
        F: Fn() -> bool + Send + 'static,
    {
        let Some(tap) = &self.tap else {
            return Ok(());
        };
        let fd = tap.as_raw_fd();
        let armed = self.armed.clone();
        std::thread::Builder::new()
            .name("tap-watch".into())
            .spawn(move || loop {
                crate::hostcpu::unpin_current_thread();
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the TAP outlives this thread for as long as the
                // process runs the machine (the thread ends when `notify` reports the loop
                // gone).
                let n = unsafe { libc::poll(&mut p, 1, 50) };
                if n > 0 && armed.swap(false, Ordering::AcqRel) && !notify() {
                    return;
                }
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                } else if n > 0 && !armed.load(Ordering::Acquire) {
                    // Readable but already announced: wait for the loop to drain it.
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_announces_the_card_and_its_mac() {
        let words = cmdline_words(Some([2, 0, 0, 0, 0, 0x2a]));
        assert_eq!(
            words,
            "virtio_mmio.device=4K@0xd0000000:5 twinvm.mac=02:00:00:00:00:2a"
        );
        assert_eq!(
            from_cmdline(&format!("console=ttyS0 {words}")),
            Some([2, 0, 0, 0, 0, 0x2a])
        );
        assert_eq!(
            from_cmdline("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"),
            Some(DEFAULT_MAC)
        );
        assert_eq!(from_cmdline("console=ttyS0"), None);
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(format_mac(&DEFAULT_MAC), "52:54:00:74:77:01");
    }

    #[test]
    fn rarp_announcement_layout() {
        let f = rarp_announce(&DEFAULT_MAC);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &DEFAULT_MAC);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0x00, 0x03]);
        assert_eq!(&f[22..28], &DEFAULT_MAC);
        assert_eq!(&f[32..38], &DEFAULT_MAC);
    }
}
