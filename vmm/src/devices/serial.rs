//! The 16550A UART of the guest's console (COM1: ports 0x3f8-0x3ff, IRQ 4), built on
//! vm-superio's register model.
//!
//! The UART does not write to the terminal itself: transmitted bytes collect in a buffer the
//! vCPU loop drains at each exit, so that the output rule can hold them until the backup has
//! the log up to the position that produced them. Its interrupt output sets a flag that the
//! loop turns into an edge on the PIC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// Base port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports of a 16550.
pub const COM1_LEN: u64 = 8;
/// ISA interrupt line of COM1.
pub const COM1_IRQ: u8 = 4;

/// An interrupt output that remembers it fired until the loop takes it.
#[derive(Debug, Clone, Default)]
pub struct IrqFlag(Arc<AtomicBool>);

impl IrqFlag {
    /// Whether the device raised its interrupt since the last call; clears the flag.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl Trigger for IrqFlag {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// What a snapshot keeps of the UART: its registers, the receive FIFO, and whether its
/// interrupt output fired without the loop having taken it yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes the guest has not read, oldest first.
    pub in_buffer: Vec<u8>,
    /// The interrupt output fired and the loop has not taken it.
    pub irq_pending: bool,
}

/// The console UART.
pub struct SerialConsole {
    uart: Serial<IrqFlag, NoEvents, Vec<u8>>,
    irq: IrqFlag,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole")
            .field("pending_output", &self.uart.writer().len())
            .finish()
    }
}

impl Default for SerialConsole {
    fn default() -> Self {
        Self::new()
    }
}

impl SerialConsole {
    /// A UART in its reset state with no output pending.
    pub fn new() -> Self {
        let irq = IrqFlag::default();
        SerialConsole {
            uart: Serial::new(irq.clone(), Vec::new()),
            irq,
        }
    }

    /// The UART's state, for a snapshot. Transmitted bytes not yet taken are not part of it:
    /// the owner takes them first (see [`SerialConsole::has_output`]).
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            irq_pending: self.irq.0.load(Ordering::Acquire),
        }
    }

    /// A UART in a snapshot's state; an error names what is wrong with it (a receive FIFO
    /// longer than the UART's).
    pub fn from_state(s: &SerialSnapshot) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = IrqFlag::default();
        let uart = Serial::from_state(&state, irq.clone(), NoEvents, Vec::new())
            .map_err(|e| format!("UART state: {e:?}"))?;
        // `from_state` raises the interrupt output for a pending THR-empty or data-ready
        // condition; the snapshot says whether the loop had taken it, which is what decides
        // whether the PIC sees one more edge.
        irq.0.store(s.irq_pending, Ordering::Release);
        Ok(SerialConsole { uart, irq })
    }

    /// A guest read of port `COM1_BASE + offset`.
    pub fn read(&mut self, offset: u64) -> u8 {
        self.uart.read(offset as u8)
    }

    /// A guest write of port `COM1_BASE + offset`.
    pub fn write(&mut self, offset: u64, val: u8) {
        // Writing to a Vec cannot fail and the trigger is infallible.
        if let Err(e) = self.uart.write(offset as u8, val) {
            tracing::warn!("serial write at offset {offset}: {e}");
        }
    }

    /// Whether the UART raised its interrupt since the last call.
    pub fn take_irq(&self) -> bool {
        self.irq.take()
    }

    /// Takes the bytes the guest transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.uart.writer_mut())
    }

    /// Whether transmitted bytes are waiting to be taken.
    pub fn has_output(&self) -> bool {
        !self.uart.writer().is_empty()
    }

    /// How many received bytes the FIFO can take now.
    pub fn rx_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Puts received bytes into the FIFO; returns how many fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input: {e}");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    #[test]
    fn transmit_collects_output_and_raises_thre_when_enabled() {
        let mut s = SerialConsole::new();
        s.write(THR, b'a');
        assert!(!s.take_irq(), "THRE interrupt is disabled after reset");
        s.write(IER, 0x02);
        // Enabling THRE with an empty transmitter raises it at once.
        assert!(s.take_irq());
        assert_eq!(s.read(IIR) & 0x0f, 0x02);
        // Reading IIR acknowledged it.
        assert_eq!(s.read(IIR) & 0x0f, 0x01);
        s.write(THR, b'b');
        assert!(s.take_irq());
        assert!(s.has_output());
        assert_eq!(s.take_output(), b"ab");
        assert!(!s.has_output());
    }

    #[test]
    fn receive_sets_data_ready_and_raises_rda() {
        let mut s = SerialConsole::new();
        s.write(IER, 0x01);
        assert_eq!(s.read(LSR) & 0x01, 0);
        assert_eq!(s.enqueue_input(b"hi"), 2);
        assert!(s.take_irq());
        assert_eq!(s.read(IIR) & 0x0f, 0x04);
        assert_eq!(s.read(LSR) & 0x01, 0x01);
        assert_eq!(s.read(THR), b'h');
        assert_eq!(s.read(THR), b'i');
        assert_eq!(s.read(LSR) & 0x01, 0);
    }

    #[test]
    fn fifo_capacity_bounds_input() {
        let mut s = SerialConsole::new();
        let cap = s.rx_capacity();
        let big = vec![b'x'; cap + 10];
        assert_eq!(s.enqueue_input(&big), cap);
        assert_eq!(s.rx_capacity(), 0);
        assert_eq!(s.enqueue_input(b"y"), 0);
    }

    #[test]
    fn divisor_latch_and_scratch() {
        let mut s = SerialConsole::new();
        s.write(LCR, 0x80);
        s.write(0, 0x01);
        s.write(1, 0x00);
        assert_eq!(s.read(0), 0x01);
        s.write(LCR, 0x03);
        assert!(!s.has_output(), "divisor writes are not data");
        s.write(SCR, 0x5a);
        assert_eq!(s.read(SCR), 0x5a);
        // Transmitter always empty.
        assert_eq!(s.read(LSR) & 0x60, 0x60);
    }
}
