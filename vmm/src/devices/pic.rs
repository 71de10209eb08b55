//! The 8259A programmable interrupt controller pair (master at 0x20, slave at 0xa0, cascaded
//! on master line 2), with the ELCR edge/level registers at 0x4d0/0x4d1.
//!
//! The semantics follow the 8259A datasheet as QEMU models it: edge-triggered lines latch into
//! IRR on a rising edge, the highest-priority request (with rotation) is delivered when it
//! outranks everything in service, and an acknowledge moves it from IRR to ISR (unless in
//! auto-EOI mode). The slave's output drives the master's line 2 as a level.

/// Offset of the command/status port within a chip's two ports.
const PORT_COMMAND: u64 = 0;

/// One 8259A.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pic8259 {
    last_irr: u8,
    irr: u8,
    imr: u8,
    isr: u8,
    priority_add: u8,
    irq_base: u8,
    read_reg_select: bool,
    poll: bool,
    special_mask: bool,
    /// 0: operational; 1, 2, 3: waiting for ICW2, ICW3, ICW4.
    init_state: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    init4: bool,
    single_mode: bool,
    elcr: u8,
    elcr_mask: u8,
    is_master: bool,
}

impl Pic8259 {
    fn new(is_master: bool) -> Self {
        Pic8259 {
            is_master,
            elcr_mask: if is_master { 0xf8 } else { 0xde },
            ..Default::default()
        }
    }

    /// Priority (0 highest, 8 none) of the highest set bit of `mask`, rotation applied.
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        let mut p = 0;
        while mask & (1 << ((p + self.priority_add) & 7)) == 0 {
            p += 1;
        }
        p
    }

    /// The line this chip would deliver now, if any.
    fn get_irq(&self) -> Option<u8> {
        let req = self.priority(self.irr & !self.imr);
        if req == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            in_service &= !(1 << 2);
        }
        (req < self.priority(in_service)).then_some((req + self.priority_add) & 7)
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
        } else if level {
            if self.last_irr & mask == 0 {
                self.irr |= mask;
            }
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    fn intack(&mut self, irq: u8) {
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= 1 << irq;
        }
        if self.elcr & (1 << irq) == 0 {
            self.irr &= !(1 << irq);
        }
    }

    fn init_reset(&mut self) {
        *self = Pic8259 {
            elcr: self.elcr,
            elcr_mask: self.elcr_mask,
            is_master: self.is_master,
            ..Default::default()
        };
    }

    fn write(&mut self, offset: u64, val: u8) {
        if offset == PORT_COMMAND {
            if val & 0x10 != 0 {
                // ICW1
                self.init_reset();
                self.init_state = 1;
                self.init4 = val & 1 != 0;
                self.single_mode = val & 2 != 0;
                if val & 0x08 != 0 {
                    tracing::warn!("8259: level-triggered mode (ICW1 LTIM) is not modelled");
                }
            } else if val & 0x08 != 0 {
                // OCW3
                if val & 0x04 != 0 {
                    self.poll = true;
                }
                if val & 0x02 != 0 {
                    self.read_reg_select = val & 1 != 0;
                }
                if val & 0x40 != 0 {
                    self.special_mask = (val >> 5) & 1 != 0;
                }
            } else {
                // OCW2
                let cmd = val >> 5;
                match cmd {
                    0 | 4 => self.rotate_on_auto_eoi = cmd == 4,
                    1 | 5 => {
                        let p = self.priority(self.isr);
                        if p != 8 {
                            let irq = (p + self.priority_add) & 7;
                            self.isr &= !(1 << irq);
                            if cmd == 5 {
                                self.priority_add = (irq + 1) & 7;
                            }
                        }
                    }
                    3 => self.isr &= !(1 << (val & 7)),
                    6 => self.priority_add = (val + 1) & 7,
                    7 => {
                        let irq = val & 7;
                        self.isr &= !(1 << irq);
                        self.priority_add = (irq + 1) & 7;
                    }
                    _ => {}
                }
            }
        } else {
            match self.init_state {
                0 => self.imr = val,
                1 => {
                    self.irq_base = val & 0xf8;
                    self.init_state = match (self.single_mode, self.init4) {
                        (true, true) => 3,
                        (true, false) => 0,
                        (false, _) => 2,
                    };
                }
                2 => self.init_state = if self.init4 { 3 } else { 0 },
                _ => {
                    self.special_fully_nested = (val >> 4) & 1 != 0;
                    self.auto_eoi = (val >> 1) & 1 != 0;
                    self.init_state = 0;
                }
            }
        }
    }

    fn read(&mut self, offset: u64) -> u8 {
        if self.poll {
            self.poll = false;
            return match self.get_irq() {
                Some(irq) => {
                    self.intack(irq);
                    irq | 0x80
                }
                None => 0,
            };
        }
        if offset == PORT_COMMAND {
            if self.read_reg_select {
                self.isr
            } else {
                self.irr
            }
        } else {
            self.imr
        }
    }
}

/// Which chip of the pair a port access is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chip {
    /// Ports 0x20-0x21, lines 0-7.
    Master,
    /// Ports 0xa0-0xa1, lines 8-15.
    Slave,
}

/// The cascaded pair, as on every PC: lines 0-15, slave on master line 2.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PicPair {
    master: Pic8259,
    slave: Pic8259,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// A pair in its power-on state (all lines unmasked, vector base 0: the guest programs it).
    pub fn new() -> Self {
        PicPair {
            master: Pic8259::new(true),
            slave: Pic8259::new(false),
        }
    }

    fn update_cascade(&mut self) {
        let level = self.slave.get_irq().is_some();
        self.master.set_irq(2, level);
    }

    /// Drives line `irq` (0-15) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        debug_assert!(irq < 16);
        if irq >= 8 {
            self.slave.set_irq(irq - 8, level);
            self.update_cascade();
        } else {
            self.master.set_irq(irq, level);
        }
    }

    /// An edge on line `irq`: how the ISA devices here signal an interrupt.
    pub fn pulse(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    /// Whether the pair's output to the CPU (INTR) is asserted.
    pub fn has_interrupt(&self) -> bool {
        self.master.get_irq().is_some()
    }

    /// The CPU's interrupt acknowledge: returns the vector to inject, if any, and moves the
    /// request into service.
    pub fn ack(&mut self) -> Option<u8> {
        let irq = self.master.get_irq()?;
        let vector = if irq == 2 {
            let slave_irq = match self.slave.get_irq() {
                Some(i) => {
                    self.slave.intack(i);
                    i
                }
                // Spurious interrupt on the slave.
                None => 7,
            };
            self.slave.irq_base + slave_irq
        } else {
            self.master.irq_base + irq
        };
        self.master.intack(irq);
        self.update_cascade();
        Some(vector)
    }

    /// A guest read of `chip`'s port at `offset` (0 or 1).
    pub fn read(&mut self, chip: Chip, offset: u64) -> u8 {
        let v = match chip {
            Chip::Master => self.master.read(offset),
            Chip::Slave => self.slave.read(offset),
        };
        self.update_cascade();
        v
    }

    /// A guest write to `chip`'s port at `offset` (0 or 1).
    pub fn write(&mut self, chip: Chip, offset: u64, val: u8) {
        match chip {
            Chip::Master => self.master.write(offset, val),
            Chip::Slave => self.slave.write(offset, val),
        }
        self.update_cascade();
    }

    /// A guest read of the ELCR at 0x4d0 + `offset`.
    pub fn read_elcr(&self, offset: u64) -> u8 {
        if offset == 0 {
            self.master.elcr
        } else {
            self.slave.elcr
        }
    }

    /// A guest write of the ELCR at 0x4d0 + `offset`.
    pub fn write_elcr(&mut self, offset: u64, val: u8) {
        let chip = if offset == 0 {
            &mut self.master
        } else {
            &mut self.slave
        };
        chip.elcr = val & chip.elcr_mask;
    }

    /// Lines (0-15) whose request waits in IRR unmasked; the master's cascade line 2 is
    /// left out (the slave's own lines stand for it).
    pub fn pending_lines(&self) -> u16 {
        let master = self.master.irr & !self.master.imr & !(1 << 2);
        let slave = self.slave.irr & !self.slave.imr;
        u16::from(master) | (u16::from(slave) << 8)
    }

    /// Whether a line other than `line` (0-15) waits to be delivered: requested in IRR and
    /// unmasked (a slave line only while the master's cascade line is unmasked too), whether
    /// or not a request of higher priority is in service at this moment. `has_interrupt` is
    /// false while, say, IRQ 0 is in service and IRQ 4 waits behind it; this is not.
    pub fn others_waiting(&self, line: u8) -> bool {
        let mut lines = self.pending_lines();
        if self.master.imr & (1 << 2) != 0 {
            lines &= 0x00ff;
        }
        lines & !(1u16 << line) != 0
    }

    /// Interrupt mask register of the master (bits 0-7) and slave (bits 8-15).
    pub fn masks(&self) -> u16 {
        u16::from(self.master.imr) | (u16::from(self.slave.imr) << 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Programs the pair the way Linux's `init_8259A()` does.
    fn linux_init() -> PicPair {
        let mut p = PicPair::new();
        p.write(Chip::Master, 1, 0xff);
        p.write(Chip::Slave, 1, 0xff);
        p.write(Chip::Master, 0, 0x11); // ICW1: edge, cascade, ICW4
        p.write(Chip::Master, 1, 0x30); // ICW2: vector base 0x30
        p.write(Chip::Master, 1, 1 << 2); // ICW3: slave on IR2
        p.write(Chip::Master, 1, 0x01); // ICW4: 8086, normal EOI
        p.write(Chip::Slave, 0, 0x11);
        p.write(Chip::Slave, 1, 0x38);
        p.write(Chip::Slave, 1, 0x02);
        p.write(Chip::Slave, 1, 0x01);
        p.write(Chip::Master, 1, 0x00); // unmask all
        p.write(Chip::Slave, 1, 0x00);
        p
    }

    #[test]
    fn init_sequence_sets_base_and_mask() {
        let mut p = linux_init();
        assert_eq!(p.masks(), 0);
        p.write(Chip::Master, 1, 0xfb);
        assert_eq!(p.read(Chip::Master, 1), 0xfb);
        assert!(!p.has_interrupt());
        assert_eq!(p.ack(), None);
    }

    #[test]
    fn edge_raises_and_ack_moves_to_isr() {
        let mut p = linux_init();
        p.pulse(0);
        assert!(p.has_interrupt());
        // IRR reads back the request (OCW3 default: read IRR).
        assert_eq!(p.read(Chip::Master, 0), 0x01);
        assert_eq!(p.ack(), Some(0x30));
        assert!(!p.has_interrupt());
        // OCW3: read ISR.
        p.write(Chip::Master, 0, 0x0b);
        assert_eq!(p.read(Chip::Master, 0), 0x01);
        // Non-specific EOI clears it.
        p.write(Chip::Master, 0, 0x20);
        assert_eq!(p.read(Chip::Master, 0), 0x00);
    }

    #[test]
    fn level_held_high_does_not_retrigger_an_edge_line() {
        let mut p = linux_init();
        p.set_irq(4, true);
        assert_eq!(p.ack(), Some(0x34));
        p.write(Chip::Master, 0, 0x20);
        // The line stayed high: no new edge, no new request.
        p.set_irq(4, true);
        assert!(!p.has_interrupt());
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(p.has_interrupt());
    }

    #[test]
    fn masked_line_waits_in_irr() {
        let mut p = linux_init();
        p.write(Chip::Master, 1, 0x01);
        p.pulse(0);
        assert!(!p.has_interrupt());
        p.write(Chip::Master, 1, 0x00);
        assert_eq!(p.ack(), Some(0x30));
    }

    #[test]
    fn priority_and_nesting() {
        let mut p = linux_init();
        p.pulse(4);
        assert_eq!(p.ack(), Some(0x34));
        // A lower-priority request waits while 4 is in service.
        p.pulse(6);
        assert!(!p.has_interrupt());
        // A higher-priority one preempts.
        p.pulse(1);
        assert_eq!(p.ack(), Some(0x31));
        // Specific EOI for line 1, then non-specific EOI ends 4; then 6 is delivered.
        p.write(Chip::Master, 0, 0x61);
        assert!(!p.has_interrupt());
        p.write(Chip::Master, 0, 0x20);
        assert_eq!(p.ack(), Some(0x36));
    }

    #[test]
    fn slave_lines_cascade_through_line_two() {
        let mut p = linux_init();
        p.pulse(12);
        assert!(p.has_interrupt());
        assert_eq!(p.ack(), Some(0x3c));
        // Both chips have it in service.
        p.write(Chip::Master, 0, 0x0b);
        p.write(Chip::Slave, 0, 0x0b);
        assert_eq!(p.read(Chip::Master, 0), 0x04);
        assert_eq!(p.read(Chip::Slave, 0), 0x10);
        // A second slave request waits for the EOIs.
        p.pulse(9);
        assert!(!p.has_interrupt());
        p.write(Chip::Slave, 0, 0x20);
        // The master still has line 2 in service.
        assert!(!p.has_interrupt());
        p.write(Chip::Master, 0, 0x20);
        assert_eq!(p.ack(), Some(0x39));
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut p = PicPair::new();
        p.write(Chip::Master, 0, 0x13); // single, ICW4
        p.write(Chip::Master, 1, 0x40);
        p.write(Chip::Master, 1, 0x03); // auto EOI
        p.pulse(3);
        assert_eq!(p.ack(), Some(0x43));
        p.write(Chip::Master, 0, 0x0b);
        assert_eq!(p.read(Chip::Master, 0), 0);
        p.pulse(3);
        assert_eq!(p.ack(), Some(0x43));
    }

    #[test]
    fn poll_command_acknowledges() {
        let mut p = linux_init();
        p.pulse(5);
        p.write(Chip::Master, 0, 0x0c); // OCW3 poll
        assert_eq!(p.read(Chip::Master, 0), 0x85);
        assert!(!p.has_interrupt());
        p.write(Chip::Master, 0, 0x0c);
        assert_eq!(p.read(Chip::Master, 0), 0x00);
    }

    #[test]
    fn elcr_masks_reserved_lines_and_level_mode_keeps_irr() {
        let mut p = linux_init();
        p.write_elcr(0, 0xff);
        assert_eq!(p.read_elcr(0), 0xf8);
        p.write_elcr(1, 0xff);
        assert_eq!(p.read_elcr(1), 0xde);
        // Line 11 is level-triggered now: the request stays while the line is high.
        p.set_irq(11, true);
        assert_eq!(p.ack(), Some(0x3b));
        p.write(Chip::Slave, 0, 0x20);
        p.write(Chip::Master, 0, 0x20);
        assert!(p.has_interrupt());
        // Dropping the line withdraws the slave's request; the edge the master already
        // latched on line 2 then acknowledges as the slave's spurious vector (IR7), as on
        // real hardware.
        p.set_irq(11, false);
        assert_eq!(p.ack(), Some(0x3f));
        assert!(!p.has_interrupt());
    }

    #[test]
    fn a_line_behind_an_in_service_timer_still_counts_as_waiting() {
        let mut p = linux_init();
        p.pulse(0);
        assert_eq!(p.ack(), Some(0x30));
        // IRQ 4 arrives while IRQ 0 is in service: INTR stays low (lower priority)...
        p.pulse(4);
        assert!(!p.has_interrupt());
        // ...but it waits, and the timer must not be raised in front of it again.
        assert!(p.others_waiting(0));
        assert!(!p.others_waiting(4));
        // Masked, it does not wait.
        p.write(Chip::Master, 1, 1 << 4);
        assert!(!p.others_waiting(0));
        p.write(Chip::Master, 1, 0);
        // Once IRQ 0 is acknowledged by EOI, IRQ 4 is delivered and waits no more.
        p.write(Chip::Master, 0, 0x60);
        assert_eq!(p.ack(), Some(0x34));
        assert!(!p.others_waiting(0));
        // A slave line waits only while the cascade line is unmasked.
        p.pulse(11);
        assert!(p.others_waiting(0));
        p.write(Chip::Master, 1, 1 << 2);
        assert!(!p.others_waiting(0));
    }
}
