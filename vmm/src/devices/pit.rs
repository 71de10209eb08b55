//! The 8254 programmable interval timer at ports 0x40-0x43, plus the PC speaker/NMI status
//! port 0x61 that exposes channel 2's gate and output.
//!
//! Time is not read here: every method that needs it takes `now_ns`, the VMM's clock in
//! nanoseconds. That keeps the model a pure function of its inputs, so the record/replay
//! layer decides where time comes from: live, the host clock; in replay, nothing (the
//! results of time-dependent reads come from the log instead).
//!
//! Channel 0 drives IRQ 0. The model reports when channel 0's output next rises
//! ([`Pit::next_irq_deadline`]); the vCPU loop raises the line at its next delivery point
//! after that time, coalescing ticks it was too late for.

/// Input clock of the 8254, in Hz.
pub const PIT_FREQ_HZ: u64 = 1_193_182;
const NS_PER_SEC: u64 = 1_000_000_000;
/// Period of the DRAM refresh toggle seen in port 0x61 bit 4, in ns (as QEMU models it).
const REFRESH_PERIOD_NS: u64 = 15_085;

const RW_LATCH: u8 = 0;
/// Access the low byte only (the match arms' default).
#[allow(dead_code)]
const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;

fn ticks_since(start_ns: u64, now_ns: u64) -> u64 {
    let d = u128::from(now_ns.saturating_sub(start_ns));
    (d * u128::from(PIT_FREQ_HZ) / u128::from(NS_PER_SEC)) as u64
}

fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * u128::from(NS_PER_SEC)).div_ceil(u128::from(PIT_FREQ_HZ)) as u64
}

/// One counter channel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Channel {
    /// Reload value; 0 is stored as 0x10000.
    count: u32,
    load_ns: u64,
    loaded: bool,
    mode: u8,
    bcd: bool,
    rw_mode: u8,
    read_state: u8,
    write_state: u8,
    write_latch: u8,
    latched_count: u16,
    /// Which bytes of `latched_count` are still to be read (an `RW_*` state), 0 for none.
    count_latched: u8,
    status: u8,
    status_latched: bool,
    gate: bool,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            count: 0x10000,
            load_ns: 0,
            loaded: false,
            mode: 0,
            bcd: false,
            rw_mode: RW_WORD0,
            read_state: RW_WORD0,
            write_state: RW_WORD0,
            write_latch: 0,
            latched_count: 0,
            count_latched: 0,
            status: 0,
            status_latched: false,
            gate,
        }
    }

    fn current_count(&self, now_ns: u64) -> u16 {
        if !self.loaded {
            return 0;
        }
        let d = ticks_since(self.load_ns, now_ns);
        let c = u64::from(self.count);
        let v = match self.mode {
            0 | 1 | 4 | 5 => c.wrapping_sub(d) & 0xffff,
            3 => c - ((2 * d) % c),
            _ => c - (d % c),
        };
        v as u16
    }

    fn output(&self, now_ns: u64) -> bool {
        if !self.loaded {
            return false;
        }
        let d = ticks_since(self.load_ns, now_ns);
        let c = u64::from(self.count);
        match self.mode {
            1 => d < c,
            2 => d % c != 0 || d == 0,
            3 => d % c < c.div_ceil(2),
            4 | 5 => d != c,
            _ => d >= c,
        }
    }

    fn load(&mut self, val: u32, now_ns: u64) {
        self.count = if val == 0 { 0x10000 } else { val };
        self.load_ns = now_ns;
        self.loaded = true;
    }

    fn latch_count(&mut self, now_ns: u64) {
        if self.count_latched == 0 {
            self.latched_count = self.current_count(now_ns);
            self.count_latched = self.rw_mode;
        }
    }

    fn latch_status(&mut self, now_ns: u64) {
        if !self.status_latched {
            self.status = (u8::from(self.output(now_ns)) << 7)
                | (u8::from(!self.loaded) << 6)
                | (self.rw_mode << 4)
                | (self.mode << 1)
                | u8::from(self.bcd);
            self.status_latched = true;
        }
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        if self.count_latched != 0 {
            return match self.count_latched {
                RW_MSB => {
                    self.count_latched = 0;
                    (self.latched_count >> 8) as u8
                }
                RW_WORD0 => {
                    self.count_latched = RW_MSB;
                    self.latched_count as u8
                }
                _ => {
                    self.count_latched = 0;
                    self.latched_count as u8
                }
            };
        }
        let count = self.current_count(now_ns);
        match self.read_state {
            RW_MSB => (count >> 8) as u8,
            RW_WORD0 => {
                self.read_state = RW_WORD1;
                count as u8
            }
            RW_WORD1 => {
                self.read_state = RW_WORD0;
                (count >> 8) as u8
            }
            // RW_LSB
            _ => count as u8,
        }
    }

    fn write(&mut self, val: u8, now_ns: u64) {
        match self.write_state {
            RW_MSB => self.load(u32::from(val) << 8, now_ns),
            RW_WORD0 => {
                self.write_latch = val;
                self.write_state = RW_WORD1;
            }
            RW_WORD1 => {
                self.load(u32::from(self.write_latch) | (u32::from(val) << 8), now_ns);
                self.write_state = RW_WORD0;
            }
            _ => self.load(u32::from(val), now_ns),
        }
    }

    fn set_gate(&mut self, gate: bool, now_ns: u64) {
        // A rising gate (re)starts modes 1, 2, 3 and 5.
        if gate && !self.gate && matches!(self.mode, 1 | 2 | 3 | 5) && self.loaded {
            self.load_ns = now_ns;
        }
        self.gate = gate;
    }

    /// The first time strictly after `after_ns` at which the output rises, if ever.
    fn next_rise_after(&self, after_ns: u64) -> Option<u64> {
        if !self.loaded {
            return None;
        }
        let c = u64::from(self.count);
        let d = ticks_since(self.load_ns, after_ns);
        let tick = match self.mode {
            // One-shot: the output rises once, at terminal count.
            0 | 4 => {
                if d >= c {
                    return None;
                }
                c
            }
            // Periodic: once per period.
            2 | 3 => (d / c + 1) * c,
            _ => return None,
        };
        Some(self.load_ns + ticks_to_ns(tick))
    }
}

/// The 8254 with its three channels and port 0x61.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pit {
    channels: [Channel; 3],
    /// Channel 0's next output rise not yet reported as an interrupt.
    next_irq_ns: Option<u64>,
    /// Port 0x61 bits 0 (gate 2) and 1 (speaker data).
    speaker: u8,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT with nothing programmed.
    pub fn new() -> Self {
        Pit {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            next_irq_ns: None,
            speaker: 0,
        }
    }

    /// A guest read of port 0x40 + `offset`.
    pub fn read(&mut self, offset: u64, now_ns: u64) -> u8 {
        match offset {
            0..=2 => self.channels[offset as usize].read(now_ns),
            // The control word register is write-only.
            _ => 0xff,
        }
    }

    /// A guest write of port 0x40 + `offset`.
    pub fn write(&mut self, offset: u64, val: u8, now_ns: u64) {
        match offset {
            0..=2 => {
                let ch = &mut self.channels[offset as usize];
                ch.write(val, now_ns);
                if offset == 0 {
                    self.next_irq_ns = self.channels[0].next_rise_after(now_ns);
                }
            }
            _ => self.write_control(val, now_ns),
        }
    }

    fn write_control(&mut self, val: u8, now_ns: u64) {
        let sel = val >> 6;
        if sel == 3 {
            // Read-back command: bit 5 clear latches counts, bit 4 clear latches status.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if val & (2 << i) != 0 {
                    if val & 0x20 == 0 {
                        ch.latch_count(now_ns);
                    }
                    if val & 0x10 == 0 {
                        ch.latch_status(now_ns);
                    }
                }
            }
            return;
        }
        let ch = &mut self.channels[sel as usize];
        let access = (val >> 4) & 3;
        if access == RW_LATCH {
            ch.latch_count(now_ns);
        } else {
            ch.rw_mode = access;
            ch.read_state = access;
            ch.write_state = access;
            // Modes 6 and 7 are aliases of 2 and 3.
            let mode = (val >> 1) & 7;
            ch.mode = if mode >= 6 { mode - 4 } else { mode };
            ch.bcd = val & 1 != 0;
            // Writing a control word stops the channel until a new count is loaded.
            ch.loaded = false;
            if sel == 0 {
                self.next_irq_ns = None;
            }
        }
    }

    /// A guest read of port 0x61.
    pub fn read_port61(&self, now_ns: u64) -> u8 {
        let out2 = self.channels[2].gate && self.channels[2].output(now_ns);
        let refresh = (now_ns / REFRESH_PERIOD_NS) & 1 == 1;
        self.speaker | (u8::from(refresh) << 4) | (u8::from(out2) << 5)
    }

    /// A guest write of port 0x61.
    pub fn write_port61(&mut self, val: u8, now_ns: u64) {
        self.speaker = val & 3;
        self.channels[2].set_gate(val & 1 != 0, now_ns);
    }

    /// When channel 0's output next rises (the next IRQ 0), if it is counting.
    pub fn next_irq_deadline(&self) -> Option<u64> {
        self.next_irq_ns
    }

    /// Whether IRQ 0 is due at `now_ns`. Consumes every rise up to `now_ns`: rises the VMM
    /// was too late for are coalesced into one interrupt, as a busy PC would lose them.
    pub fn poll_irq(&mut self, now_ns: u64) -> bool {
        match self.next_irq_ns {
            Some(t) if t <= now_ns => {
                self.next_irq_ns = self.channels[0].next_rise_after(now_ns);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Programs channel 0 as Linux's PIT clockevent does for HZ=100 (mode 2, LATCH 11932).
    fn periodic_hz100() -> Pit {
        let mut p = Pit::new();
        p.write(3, 0x34, 0);
        p.write(0, (11932 & 0xff) as u8, 0);
        p.write(0, (11932 >> 8) as u8, 0);
        p
    }

    #[test]
    fn periodic_mode_raises_every_period_and_coalesces() {
        let mut p = periodic_hz100();
        let period = ticks_to_ns(11932);
        assert!((9_999_000..10_001_000).contains(&period));
        assert_eq!(p.next_irq_deadline(), Some(period));
        assert!(!p.poll_irq(5 * MS));
        assert!(p.poll_irq(period));
        assert!(!p.poll_irq(period + MS));
        assert_eq!(p.next_irq_deadline(), Some(2 * period));
        // Three periods late: one interrupt, next deadline in the future.
        assert!(p.poll_irq(5 * period + MS));
        assert!(!p.poll_irq(5 * period + 2 * MS));
        assert_eq!(p.next_irq_deadline(), Some(ticks_to_ns(6 * 11932)));
    }

    #[test]
    fn latched_count_reads_lsb_then_msb_and_freezes() {
        let mut p = periodic_hz100();
        // 1 ms = 1193 ticks after load.
        p.write(3, 0x00, MS);
        let lsb = p.read(0, 9 * MS);
        let msb = p.read(0, 9 * MS);
        let c = u16::from(lsb) | (u16::from(msb) << 8);
        assert_eq!(c, 11932 - 1193);
        // After the latch is consumed, reads follow the live count again.
        let lsb = p.read(0, 2 * MS);
        let msb = p.read(0, 2 * MS);
        assert_eq!(u16::from(lsb) | (u16::from(msb) << 8), 11932 - 2386);
    }

    #[test]
    fn one_shot_mode_fires_once() {
        let mut p = Pit::new();
        p.write(3, 0x30, 0); // ch0, lo/hi, mode 0
        p.write(0, 0xa9, 0);
        p.write(0, 0x04, 0); // 1193 ticks ≈ 1 ms
        let t = p.next_irq_deadline().unwrap();
        assert!((999_000..1_001_000).contains(&t));
        assert!(p.poll_irq(t));
        assert_eq!(p.next_irq_deadline(), None);
        assert!(!p.poll_irq(100 * MS));
    }

    #[test]
    fn control_word_stops_counting_until_reload() {
        let mut p = periodic_hz100();
        p.write(3, 0x34, MS);
        assert_eq!(p.next_irq_deadline(), None);
        assert!(!p.poll_irq(100 * MS));
    }

    #[test]
    fn lsb_only_access_and_read_back_status() {
        let mut p = Pit::new();
        p.write(3, 0x94, 0); // ch2, lsb only, mode 2
        p.write(2, 100, 0);
        // Read-back: latch status of channel 2 only.
        p.write(3, 0xe8, 0);
        let status = p.read(2, 0);
        assert_eq!(status & 0x3f, (RW_LSB << 4) | (2 << 1));
        assert_eq!(status & 0x40, 0, "count was loaded");
        // LSB-only reads of the live count: 50 ticks in.
        assert_eq!(p.read(2, ticks_to_ns(50)), 50);
    }

    #[test]
    fn port61_gate_and_output() {
        let mut p = Pit::new();
        p.write_port61(0x01, 0);
        p.write(3, 0xb0, 0); // ch2, lo/hi, mode 0
        p.write(2, 0xe8, 0);
        p.write(2, 0x03, 0); // 1000 ticks
        assert_eq!(p.read_port61(0) & 0x23, 0x01);
        assert_eq!(p.read_port61(ticks_to_ns(1000)) & 0x20, 0x20);
        // Gate low hides the output.
        p.write_port61(0x00, ticks_to_ns(1000));
        assert_eq!(p.read_port61(ticks_to_ns(1000)) & 0x20, 0);
    }
}
