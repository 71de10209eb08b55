//! The twinvm clock: the guest kernel's clocksource, three 32-bit registers on port I/O.
//!
//! | port | access | what |
//! |---|---|---|
//! | `0x5f0` | read | latches the VMM's monotonic clock (ns since the machine started) and returns its low 32 bits |
//! | `0x5f4` | read | the high 32 bits of the value latched by the last read of `0x5f0` |
//! | `0x5f8` | read | [`CLOCK_MAGIC`] (`"TWCK"`), so the guest can tell the device is there |
//!
//! Writes are ignored. Narrower reads return the corresponding bytes (a read at `0x5f0` of
//! any width latches). The guest kernel patch `0005-twinvm-clock` registers it as a
//! continuous 1 GHz clocksource and emulates user RDTSC from it.
//!
//! Both time registers are time-dependent ([`Clock::is_time_dependent`]): a recording logs
//! every read of them (`PioIn`) and a replay answers from the log, so the guest's time in a
//! replay is the recorded one. Like the PIT, the model never reads a clock itself: the
//! machine passes `now_ns`. It also remembers the last value the guest saw (live, recorded
//! or replayed), so that a backup going live can start its clock where the log left off.

/// First port of the device.
pub const CLOCK_BASE: u64 = 0x5f0;
/// Ports the device decodes.
pub const CLOCK_LEN: u64 = 12;
/// What a read of the id register returns: `"TWCK"` in little-endian ASCII.
pub const CLOCK_MAGIC: u32 = 0x4b43_5754;

const REG_LO: u64 = 0;
const REG_HI: u64 = 4;
const REG_ID: u64 = 8;

/// The clock device.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Clock {
    /// The value latched by the last read of the low register.
    latched: u64,
    /// The highest time the guest has seen (a live or recorded read, or a replayed one).
    seen_ns: u64,
}

impl Clock {
    /// A clock that has latched nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a read at `offset` depends on time (and so is logged).
    pub fn is_time_dependent(offset: u64) -> bool {
        offset < REG_ID
    }

    /// A guest read of `data.len()` bytes at `offset`; `now_ns` is the VMM's monotonic clock.
    pub fn read(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        if offset == REG_LO {
            self.latched = now_ns;
            self.seen_ns = self.seen_ns.max(now_ns);
        }
        let regs = {
            let mut r = [0u8; 12];
            r[..8].copy_from_slice(&self.latched.to_le_bytes());
            r[8..].copy_from_slice(&CLOCK_MAGIC.to_le_bytes());
            r
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    /// What the guest actually got from a time-dependent read at `offset` (in a replay, the
    /// logged value rather than the model's): the latch follows it, so `seen_ns` is the
    /// guest's time in every mode.
    pub fn observe(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.latched.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
        self.latched = u64::from_le_bytes(bytes);
        if offset + data.len() as u64 >= REG_HI + 4 {
            // The high half completes a read of the whole value.
            self.seen_ns = self.seen_ns.max(self.latched);
        }
    }

    /// The latest time the guest has read, in ns.
    pub fn seen_ns(&self) -> u64 {
        self.seen_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(c: &mut Clock, offset: u64, now: u64) -> u32 {
        let mut d = [0u8; 4];
        c.read(offset, &mut d, now);
        u32::from_le_bytes(d)
    }

    #[test]
    fn low_read_latches_and_high_read_returns_the_latched_half() {
        let mut c = Clock::new();
        let t = 0x1234_5678_9abc_def0;
        assert_eq!(read32(&mut c, REG_LO, t), 0x9abc_def0);
        // Time moves on; the high half is still that of the latched value.
        assert_eq!(read32(&mut c, REG_HI, t + (5 << 32)), 0x1234_5678);
        assert_eq!(c.seen_ns(), t);
    }

    #[test]
    fn id_register_and_narrow_reads() {
        let mut c = Clock::new();
        assert_eq!(read32(&mut c, REG_ID, 7), CLOCK_MAGIC);
        let mut b = [0u8; 1];
        c.read(0, &mut b, 0x0000_aa00);
        assert_eq!(b[0], 0x00);
        // Only offset 0 latches: offset 1 reads the latched value's second byte.
        c.read(1, &mut b, 0x1234_5678);
        assert_eq!(b[0], 0xaa);
        let mut b = [0u8; 2];
        c.read(10, &mut b, 0);
        assert_eq!(b, [0x43, 0x4b]);
        assert!(Clock::is_time_dependent(REG_LO));
        assert!(Clock::is_time_dependent(REG_HI + 3));
        assert!(!Clock::is_time_dependent(REG_ID));
    }

    #[test]
    fn replayed_values_set_what_the_guest_has_seen() {
        let mut c = Clock::new();
        // Replay: the model answered from a frozen clock, the log supplied the values.
        let mut d = [0u8; 4];
        c.read(REG_LO, &mut d, 0);
        c.observe(REG_LO, &0x0000_0010u32.to_le_bytes());
        c.read(REG_HI, &mut d, 0);
        c.observe(REG_HI, &0x0000_0002u32.to_le_bytes());
        assert_eq!(c.seen_ns(), (2 << 32) | 0x10);
    }
}
