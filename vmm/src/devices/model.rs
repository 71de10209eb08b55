//! The legacy PC devices on the port I/O bus, and the host clock they read in a live run.
//! A device's interrupt condition becomes an edge on its PIC line here, at the position of
//! the access that caused it.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::devices::clock::{Clock, CLOCK_BASE, CLOCK_LEN};
use crate::devices::cmos::{Cmos, RtcNow};
use crate::devices::pic::{Chip, PicPair};
use crate::devices::pit::Pit;
use crate::devices::serial::{SerialConsole, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::PioBus;

/// Device ids on the port I/O bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dev {
    Pic(Chip),
    Elcr,
    Pit,
    Port61,
    Cmos,
    Serial,
    Clock,
}

/// The host clock the device model reads in a live run: one monotonic clock that never
/// stops (DESIGN.md, Determinism 5), and the wall clock derived from it, so that the RTC and
/// the twinvm clock device tell the same time.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    start: Instant,
    /// Monotonic nanoseconds at `start`.
    mono_base: u64,
    /// Wall-clock nanoseconds since the Unix epoch at `start`.
    wall_base: u64,
    /// In replay the clock is never read: every time-dependent answer comes from the log.
    frozen: bool,
}

impl HostClock {
    pub(crate) fn new(frozen: bool) -> Self {
        Self::starting_at(0, frozen)
    }

    /// A clock whose monotonic time starts at `mono_ns` now (a backup going live carries on
    /// from the last time its guest read).
    pub(crate) fn starting_at(mono_ns: u64, frozen: bool) -> Self {
        HostClock {
            start: Instant::now(),
            mono_base: mono_ns,
            wall_base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            frozen,
        }
    }

    /// Nanoseconds of guest-visible monotonic time (since the machine was created); 0 when
    /// frozen.
    pub fn mono_ns(&self) -> u64 {
        if self.frozen {
            return 0;
        }
        self.mono_base + self.start.elapsed().as_nanos() as u64
    }

    /// Nanoseconds since the Unix epoch (wall clock); 0 when frozen.
    pub fn wall_ns(&self) -> u64 {
        if self.frozen {
            return 0;
        }
        self.wall_base + self.start.elapsed().as_nanos() as u64
    }
}

/// The legacy PC devices and the bus that reaches them.
#[derive(Debug)]
pub struct Devices {
    bus: PioBus<Dev>,
    /// The interrupt controllers.
    pub pic: PicPair,
    /// The interval timer.
    pub pit: Pit,
    /// The RTC and CMOS RAM.
    pub cmos: Cmos,
    /// The console UART.
    pub serial: SerialConsole,
    /// The twinvm clock (the guest's clocksource).
    pub clock: Clock,
}

impl Devices {
    pub(crate) fn new() -> Self {
        let mut bus = PioBus::new();
        let layout = [
            (0x20, 2, Dev::Pic(Chip::Master)),
            (0xa0, 2, Dev::Pic(Chip::Slave)),
            (0x4d0, 2, Dev::Elcr),
            (0x40, 4, Dev::Pit),
            (0x61, 1, Dev::Port61),
            (0x70, 2, Dev::Cmos),
            (COM1_BASE, COM1_LEN, Dev::Serial),
            (CLOCK_BASE, CLOCK_LEN, Dev::Clock),
        ];
        for (base, len, dev) in layout {
            // The layout is fixed and has no overlaps (checked by the unit test below).
            bus.insert(base, len, dev).expect("fixed device layout");
        }
        Devices {
            bus,
            pic: PicPair::new(),
            pit: Pit::new(),
            cmos: Cmos::new(),
            serial: SerialConsole::new(),
            clock: Clock::new(),
        }
    }

    /// Whether a read of `port` depends on time (and so must be logged when recording).
    pub fn is_time_dependent(&self, port: u16) -> bool {
        match self.bus.resolve(u64::from(port)) {
            Some((Dev::Pit, off)) => off < 3,
            Some((Dev::Port61, _)) => true,
            Some((Dev::Cmos, 1)) => true,
            Some((Dev::Clock, off)) => Clock::is_time_dependent(off),
            _ => false,
        }
    }

    /// What the guest got from a time-dependent read of `port` (the log's value in a
    /// replay): the clock device keeps track of the time its guest has seen.
    pub(crate) fn observe_time_read(&mut self, port: u16, data: &[u8]) {
        if let Some((Dev::Clock, off)) = self.bus.resolve(u64::from(port)) {
            self.clock.observe(off, data);
        }
    }

    /// The time as the RTC sees it: the host's clocks, and the guest's as it last read it.
    pub(crate) fn rtc_now(&self, clock: &HostClock) -> RtcNow {
        RtcNow {
            wall_ns: clock.wall_ns(),
            mono_ns: clock.mono_ns(),
            seen_ns: self.clock.seen_ns(),
        }
    }

    /// One byte-wide guest read of `port`. Unclaimed ports float high, as on a PC.
    pub(crate) fn read_byte(&mut self, port: u16, clock: &HostClock) -> u8 {
        match self.bus.resolve(u64::from(port)) {
            Some((Dev::Pic(chip), off)) => self.pic.read(chip, off),
            Some((Dev::Elcr, off)) => self.pic.read_elcr(off),
            Some((Dev::Pit, off)) => self.pit.read(off, clock.mono_ns()),
            Some((Dev::Port61, _)) => self.pit.read_port61(clock.mono_ns()),
            Some((Dev::Cmos, off)) => self.cmos.read(off, self.rtc_now(clock)),
            Some((Dev::Serial, off)) => self.serial.read(off),
            Some((Dev::Clock, off)) => {
                let mut b = [0u8];
                self.clock.read(off, &mut b, clock.mono_ns());
                b[0]
            }
            None => 0xff,
        }
    }

    /// One byte-wide guest write of `port`.
    pub(crate) fn write_byte(&mut self, port: u16, val: u8, clock: &HostClock) {
        match self.bus.resolve(u64::from(port)) {
            Some((Dev::Pic(chip), off)) => self.pic.write(chip, off, val),
            Some((Dev::Elcr, off)) => self.pic.write_elcr(off, val),
            Some((Dev::Pit, off)) => self.pit.write(off, val, clock.mono_ns()),
            Some((Dev::Port61, _)) => self.pit.write_port61(val, clock.mono_ns()),
            Some((Dev::Cmos, off)) => self.cmos.write(off, val, self.rtc_now(clock)),
            Some((Dev::Serial, off)) => self.serial.write(off, val),
            Some((Dev::Clock, _)) | None => {}
        }
    }

    /// A port access of `size` bytes: the devices here are all 8 bits wide, so a wider
    /// access reaches consecutive ports, as the ISA bus splits it.
    pub(crate) fn pio(
        &mut self,
        port: u16,
        size: usize,
        is_in: bool,
        data: &mut [u8],
        clock: &HostClock,
    ) {
        if let (true, Some((Dev::Clock, off))) = (is_in, self.bus.resolve(u64::from(port))) {
            // The clock's registers are 32 bits wide: one access latches once.
            for access in data.chunks_mut(size.max(1)) {
                self.clock.read(off, access, clock.mono_ns());
            }
            return;
        }
        for access in data.chunks_mut(size.max(1)) {
            for (i, b) in access.iter_mut().enumerate() {
                let p = port.wrapping_add(i as u16);
                if is_in {
                    *b = self.read_byte(p, clock);
                } else {
                    self.write_byte(p, *b, clock);
                }
            }
        }
        // A UART interrupt condition (THR empty, data ready) becomes an edge on its line at
        // the same position as the access that caused it.
        self.raise_lines(None);
    }

    /// Turns the devices' interrupt conditions into edges on their PIC lines: the UART's,
    /// and the network card's if there is one. The one place where device lines reach the
    /// PIC, called at the position of whatever caused the condition (an access, an input
    /// put into a FIFO or ring); the timer's tick, a logged input, is raised by the delivery
    /// point, and a replay raises logged lines itself.
    pub(crate) fn raise_lines(&mut self, nic: Option<&mut crate::nic::Nic>) {
        if self.serial.take_irq() {
            self.pic.pulse(COM1_IRQ);
        }
        if let Some(n) = nic {
            if n.transport.take_irq() {
                self.pic.pulse(crate::nic::NIC_IRQ);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_layout_is_consistent() {
        let d = Devices::new();
        assert!(d.is_time_dependent(0x40));
        assert!(d.is_time_dependent(0x42));
        assert!(!d.is_time_dependent(0x43));
        assert!(d.is_time_dependent(0x61));
        assert!(d.is_time_dependent(0x71));
        assert!(!d.is_time_dependent(0x70));
        assert!(!d.is_time_dependent(0x3f8));
        assert!(!d.is_time_dependent(0x20));
    }

    #[test]
    fn wide_access_splits_into_ports_and_unclaimed_ports_float_high() {
        let mut d = Devices::new();
        let clock = HostClock::new(false);
        let mut data = [0u8; 2];
        // A 16-bit read at 0x20 reads IRR (0x20) and IMR (0x21).
        d.pic.write(Chip::Master, 1, 0x5a);
        d.pio(0x20, 2, true, &mut data, &clock);
        assert_eq!(data, [0x00, 0x5a]);
        let mut data = [0u8; 4];
        d.pio(0x1234, 4, true, &mut data, &clock);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn serial_interrupt_becomes_a_pic_edge() {
        let mut d = Devices::new();
        let clock = HostClock::new(false);
        // Program the PIC as Linux does, then enable THRE interrupts on the UART.
        for (port, val) in [
            (0x20u16, 0x11u8),
            (0x21, 0x30),
            (0x21, 4),
            (0x21, 1),
            (0x21, 0),
        ] {
            d.pio(port, 1, false, &mut [val], &clock);
        }
        d.pio(0x3f9, 1, false, &mut [0x02], &clock);
        assert!(d.pic.has_interrupt());
        assert_eq!(d.pic.ack(), Some(0x34));
    }
}
