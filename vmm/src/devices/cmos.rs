//! The MC146818 CMOS real-time clock and its 128 bytes of RAM, at ports 0x70 (index) and
//! 0x71 (data).
//!
//! Like the PIT, the model never reads a clock itself: every access takes an [`RtcNow`],
//! supplied by the VMM. Date and time are presented in BCD or binary and 24- or 12-hour
//! format as register B asks. The RTC's own interrupts (IRQ 8: periodic, alarm, update) are
//! not raised.
//!
//! Until the guest sets it, the RTC tells the host's wall clock. Once the guest sets it, the
//! RTC counts from the set time on the *guest's* monotonic clock (the twinvm clock device),
//! anchored at the time the guest had last read: a function of the log, the same on both
//! sides of a pair. So a guest that set its RTC while a backup replayed it reads, once the
//! backup is live, a time that carries on from what it set (the live clock continues from the
//! replayed guest time), not one computed against the replay's stopped clock. (One corner
//! stays host-dependent: a guest that sets only some of the time registers of a never-set
//! RTC keeps the others, and the weekday, from the host's wall clock, which a replay does
//! not have; Linux writes all but the weekday, which it never reads.)

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const REG_A_UIP: u8 = 0x80;
const REG_B_SET: u8 = 0x80;
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const REG_D_VRT: u8 = 0x80;
/// How long before each second boundary the update-in-progress bit reads as set.
const UIP_NS: u64 = 244_000;
const NS_PER_SEC: i128 = 1_000_000_000;

/// A calendar date and time of day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: i64,
    /// 1-12.
    pub month: u32,
    /// 1-31.
    pub day: u32,
    /// 0-23.
    pub hour: u32,
    /// 0-59.
    pub minute: u32,
    /// 0-59.
    pub second: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A civil date to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    /// The date and time `secs` seconds after the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }

    /// Seconds since the Unix epoch.
    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

/// What the RTC needs to know of time at a guest access.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtcNow {
    /// The host's wall clock, ns since the Unix epoch (0 in a replay, whose answers come
    /// from the log).
    pub wall_ns: u64,
    /// The guest's monotonic clock now, ns (0 in a replay).
    pub mono_ns: u64,
    /// The latest monotonic time the guest has read (recorded, replayed or live): the same
    /// on both sides of a pair at the same position.
    pub seen_ns: u64,
}

/// Where the RTC's time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RtcBase {
    /// The host's wall clock plus an offset (0 until the guest sets the time).
    Host,
    /// The guest set `set_ns` (ns since the epoch) when its monotonic clock read `at_ns`.
    Set {
        /// The time the guest set, ns since the epoch.
        set_ns: i128,
        /// The guest's monotonic clock when it did.
        at_ns: u64,
    },
}

/// The CMOS RTC and RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    base: RtcBase,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

/// What a snapshot keeps of the CMOS (see [`Cmos::state`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    /// The selected register.
    pub index: u8,
    /// All 128 bytes of RAM (clock registers included).
    pub ram: Vec<u8>,
    /// Where the RTC's time comes from.
    pub base: RtcBase,
}

impl Cmos {
    /// The device's state, for a snapshot.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
            base: self.base,
        }
    }

    /// The device in a snapshot's state; `None` if the RAM is not 128 bytes.
    pub fn from_state(s: &CmosState) -> Option<Self> {
        Some(Cmos {
            index: s.index,
            ram: s.ram.as_slice().try_into().ok()?,
            base: s.base,
        })
    }

    /// A CMOS in 24-hour BCD mode, the PC default, with valid RAM.
    pub fn new() -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[REG_B as usize] = REG_B_24H;
        ram[REG_D as usize] = REG_D_VRT;
        Cmos {
            index: 0,
            ram,
            base: RtcBase::Host,
        }
    }

    /// The RTC's time, ns since the epoch.
    fn guest_ns(&self, now: RtcNow) -> i128 {
        match self.base {
            RtcBase::Host => i128::from(now.wall_ns),
            RtcBase::Set { set_ns, at_ns } => {
                let mono = now.mono_ns.max(now.seen_ns);
                set_ns + i128::from(mono) - i128::from(at_ns)
            }
        }
    }

    fn encode(&self, v: u32) -> u8 {
        if self.ram[REG_B as usize] & REG_B_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.ram[REG_B as usize] & REG_B_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.ram[REG_B as usize] & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = hour >= 12;
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if pm { 0x80 } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.ram[REG_B as usize] & REG_B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h + 12
        } else {
            h
        }
    }

    fn now(&self, now: RtcNow) -> DateTime {
        let secs = self.guest_ns(now).div_euclid(NS_PER_SEC) as i64;
        DateTime::from_unix(secs)
    }

    /// A guest read of port 0x70 + `offset`.
    pub fn read(&mut self, offset: u64, now: RtcNow) -> u8 {
        if offset == 0 {
            // The index register is write-only.
            return 0xff;
        }
        let updating = self.ram[REG_B as usize] & REG_B_SET != 0;
        let t = self.now(now);
        match self.index {
            // While the guest holds SET, the time registers hold what it wrote.
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY
                if updating =>
            {
                self.ram[self.index as usize]
            }
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode(t.year.div_euclid(100) as u32),
            REG_A => {
                let in_second = self.guest_ns(now).rem_euclid(NS_PER_SEC) as u64;
                let uip = !updating && in_second >= 1_000_000_000 - UIP_NS;
                (self.ram[REG_A as usize] & !REG_A_UIP) | if uip { REG_A_UIP } else { 0 }
            }
            REG_C => {
                // Interrupt flags: none are raised by this model; reading clears them.
                let v = self.ram[REG_C as usize];
                self.ram[REG_C as usize] = 0;
                v
            }
            i => self.ram[i as usize],
        }
    }

    /// A guest write of port 0x70 + `offset`.
    pub fn write(&mut self, offset: u64, val: u8, now: RtcNow) {
        if offset == 0 {
            // Bit 7 is the NMI mask, which has nothing to mask here.
            self.index = val & 0x7f;
            return;
        }
        match self.index {
            REG_A => self.ram[REG_A as usize] = val & !REG_A_UIP,
            REG_B => {
                let was_set = self.ram[REG_B as usize] & REG_B_SET != 0;
                if val & REG_B_SET != 0 && !was_set {
                    // Freeze the current time into the registers so that a guest that
                    // writes only some of them keeps the rest.
                    self.snapshot_time(now);
                }
                self.ram[REG_B as usize] = val;
                if was_set && val & REG_B_SET == 0 {
                    self.apply_written_time(now);
                }
            }
            REG_C | REG_D => {}
            i => {
                self.ram[i as usize] = val;
            }
        }
    }

    fn snapshot_time(&mut self, now: RtcNow) {
        let t = self.now(now);
        self.ram[REG_SECONDS as usize] = self.encode(t.second);
        self.ram[REG_MINUTES as usize] = self.encode(t.minute);
        self.ram[REG_HOURS as usize] = self.encode_hour(t.hour);
        self.ram[REG_WEEKDAY as usize] = self.encode(t.weekday + 1);
        self.ram[REG_DAY as usize] = self.encode(t.day);
        self.ram[REG_MONTH as usize] = self.encode(t.month);
        self.ram[REG_YEAR as usize] = self.encode(t.year.rem_euclid(100) as u32);
        self.ram[REG_CENTURY as usize] = self.encode(t.year.div_euclid(100) as u32);
    }

    fn apply_written_time(&mut self, now: RtcNow) {
        let r = |i: u8| self.ram[i as usize];
        let year =
            i64::from(self.decode(r(REG_CENTURY))) * 100 + i64::from(self.decode(r(REG_YEAR)));
        let t = DateTime {
            year,
            month: self.decode(r(REG_MONTH)).clamp(1, 12),
            day: self.decode(r(REG_DAY)).clamp(1, 31),
            hour: self.decode_hour(r(REG_HOURS)).min(23),
            minute: self.decode(r(REG_MINUTES)).min(59),
            second: self.decode(r(REG_SECONDS)).min(59),
            weekday: 0,
        };
        // Anchored at the guest's time as it last read it, never at a host clock: the
        // same on every side (a replay's clocks stand at 0), and carried on by the live
        // clock of a backup that goes live.
        self.base = RtcBase::Set {
            set_ns: i128::from(t.to_unix()) * NS_PER_SEC,
            at_ns: now.seen_ns,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-26 01:02:03 UTC, a Thursday.
    const T: u64 = 1_795_654_923 * 1_000_000_000;
    const SEC: u64 = 1_000_000_000;

    /// A live access at wall time `wall`, the guest's clock at `wall - T` (and read just
    /// now).
    fn at(wall: u64) -> RtcNow {
        RtcNow {
            wall_ns: wall,
            mono_ns: wall - T,
            seen_ns: wall - T,
        }
    }

    fn read_at(c: &mut Cmos, idx: u8, now: RtcNow) -> u8 {
        c.write(0, idx, now);
        c.read(1, now)
    }

    fn read_reg(c: &mut Cmos, idx: u8, wall: u64) -> u8 {
        read_at(c, idx, at(wall))
    }

    /// The guest sets 2030-11-26 01:02:03, every field, as Linux's `mc146818_set_time`
    /// (`hwclock -w`) does.
    fn set_year_2030(c: &mut Cmos, now: RtcNow) {
        c.write(0, REG_B, now);
        c.write(1, REG_B_SET | REG_B_24H, now);
        for (reg, v) in [
            (REG_SECONDS, 0x03),
            (REG_MINUTES, 0x02),
            (REG_HOURS, 0x01),
            (REG_DAY, 0x26),
            (REG_MONTH, 0x11),
            (REG_YEAR, 0x30),
            (REG_CENTURY, 0x20),
        ] {
            c.write(0, reg, now);
            c.write(1, v, now);
        }
        c.write(0, REG_B, now);
        c.write(1, REG_B_24H, now);
    }

    #[test]
    fn calendar_round_trip() {
        let t = DateTime::from_unix(1_795_654_923);
        assert_eq!((t.year, t.month, t.day), (2026, 11, 26));
        assert_eq!((t.hour, t.minute, t.second, t.weekday), (1, 2, 3, 4));
        assert_eq!(t.to_unix(), 1_795_654_923);
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn reads_time_in_bcd_24h_by_default() {
        let mut c = Cmos::new();
        assert_eq!(read_reg(&mut c, REG_SECONDS, T), 0x03);
        assert_eq!(read_reg(&mut c, REG_MINUTES, T), 0x02);
        assert_eq!(read_reg(&mut c, REG_HOURS, T), 0x01);
        assert_eq!(read_reg(&mut c, REG_DAY, T), 0x26);
        assert_eq!(read_reg(&mut c, REG_MONTH, T), 0x11);
        assert_eq!(read_reg(&mut c, REG_YEAR, T), 0x26);
        assert_eq!(read_reg(&mut c, REG_CENTURY, T), 0x20);
        assert_eq!(read_reg(&mut c, REG_WEEKDAY, T), 5);
        assert_eq!(read_reg(&mut c, REG_D, T), REG_D_VRT);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut c = Cmos::new();
        c.write(0, REG_B, at(T));
        c.write(1, REG_B_BINARY, at(T));
        let pm = T + 13 * 3600 * 1_000_000_000; // 14:02:03
        assert_eq!(read_reg(&mut c, REG_HOURS, pm), 0x80 | 2);
        assert_eq!(read_reg(&mut c, REG_DAY, pm), 26);
        assert_eq!(read_reg(&mut c, REG_YEAR, pm), 26);
    }

    #[test]
    fn update_in_progress_near_second_boundary() {
        let mut c = Cmos::new();
        assert_eq!(read_reg(&mut c, REG_A, T) & REG_A_UIP, 0);
        assert_eq!(
            read_reg(&mut c, REG_A, T + 999_900_000) & REG_A_UIP,
            REG_A_UIP
        );
    }

    #[test]
    fn guest_set_time_sticks_and_runs_on_the_guests_clock() {
        let mut c = Cmos::new();
        set_year_2030(&mut c, at(T));
        assert_eq!(read_reg(&mut c, REG_YEAR, T), 0x30);
        assert_eq!(read_reg(&mut c, REG_MONTH, T), 0x11);
        // Time keeps running from what was set.
        assert_eq!(read_reg(&mut c, REG_SECONDS, T + 5 * SEC), 0x08);
    }

    #[test]
    fn a_time_set_in_a_replay_carries_on_when_the_backup_goes_live() {
        // The replay: no host clock (the log answers every read); the guest had read its
        // clock at 40 s.
        let replay = RtcNow {
            wall_ns: 0,
            mono_ns: 0,
            seen_ns: 40 * SEC,
        };
        let mut replayed = Cmos::new();
        set_year_2030(&mut replayed, replay);
        // The primary did the same live, at the same guest time.
        let mut recorded = Cmos::new();
        set_year_2030(
            &mut recorded,
            RtcNow {
                wall_ns: T + 86_400 * SEC,
                mono_ns: 40 * SEC + 1000,
                seen_ns: 40 * SEC,
            },
        );
        assert_eq!(
            replayed.base, recorded.base,
            "the time base is a function of the log"
        );
        // Live, the backup's clock carries on from the replayed 40 s: 3 s later the RTC
        // reads 2030, three seconds on, whatever the backup host's wall clock says.
        let live = RtcNow {
            wall_ns: T + 1000 * SEC,
            mono_ns: 43 * SEC,
            seen_ns: 40 * SEC,
        };
        assert_eq!(read_at(&mut replayed, REG_YEAR, live), 0x30);
        assert_eq!(read_at(&mut replayed, REG_CENTURY, live), 0x20);
        assert_eq!(read_at(&mut replayed, REG_MONTH, live), 0x11);
        assert_eq!(read_at(&mut replayed, REG_SECONDS, live), 0x06);
    }

    #[test]
    fn ram_bytes_are_plain_storage() {
        let mut c = Cmos::new();
        c.write(0, 0x80 | 0x40, at(T)); // NMI mask bit is ignored
        c.write(1, 0xab, at(T));
        assert_eq!(read_reg(&mut c, 0x40, T), 0xab);
        assert_eq!(c.read(0, at(T)), 0xff);
    }
}
