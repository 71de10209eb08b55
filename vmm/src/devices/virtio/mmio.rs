//! The virtio-mmio transport, version 2 ("modern", virtio 1.x section 4.2.2): a 0x1000-byte
//! register window in front of one [`VirtioDevice`].
//!
//! The transport keeps the queue configuration the driver writes; when the driver sets
//! DRIVER_OK it checks the queues against guest memory and hands copies of them to the device.
//! Registers 0x000-0x0ff are 32 bits wide and must be accessed as such; the device
//! configuration space from 0x100 may be accessed at any width.

use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};

use super::device::{Interrupt, QueueSnapshot, VirtioDevice};
use crate::memory::GuestMemory;

/// Length of the register window.
pub const MMIO_LEN: u64 = 0x1000;

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version: 2, the modern interface.
pub const MMIO_VERSION: u32 = 2;
/// The vendor ID reported to the driver ("TWVM").
pub const VENDOR_ID: u32 = u32::from_be_bytes(*b"TWVM");

/// Register offsets of the window (virtio 1.2, table 4.1).
pub mod reg {
    /// Magic value, read-only.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Transport version, read-only.
    pub const VERSION: u64 = 0x004;
    /// Device ID, read-only.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor ID, read-only.
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 bits of the device features selected by `DEVICE_FEATURES_SEL`, read-only.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects bits 0-31 (0) or 32-63 (1) of the device features.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 bits of the features the driver accepts, selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects bits 0-31 (0) or 32-63 (1) of the driver features.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue (0: no such queue), read-only.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue, write-only.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Whether the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notify: the value is the queue index, write-only.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status, read-only.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge, write-only.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status; writing 0 resets the device.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Shared memory region select.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low 32 bits.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory region base, low 32 bits.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory region base, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Configuration generation, read-only.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// The kernel command line parameter that announces a virtio-mmio device at `base` with ISA
/// interrupt line `irq` (Linux's `virtio_mmio.device=<size>@<base>:<irq>`).
pub fn cmdline_param(base: u64, irq: u8) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device asked for a queue of an impossible size.
    #[error(
        "device queue {index} has an invalid maximum size {size} (must be a power of two <= 32768)"
    )]
    QueueSize {
        /// The queue index.
        index: usize,
        /// The size asked for.
        size: u16,
    },
}

/// A transport's registers and queue configuration, and its device's own state, for a
/// snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TransportState<S> {
    /// The queue configuration as the driver wrote it.
    pub queues: Vec<QueueSnapshot>,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The device status register.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// An interrupt edge the loop had not taken yet.
    pub interrupt_edge: bool,
    /// The device's own state.
    pub device: S,
}

/// A virtio-mmio register window in front of `D`.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemory,
    interrupt: Interrupt,
    /// The queue configuration as the driver wrote it.
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport in its reset state for `device`, whose DMA goes to `mem` (a handle on the
    /// same mapping as the VM's).
    pub fn new(device: D, mem: GuestMemory) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| MmioError::QueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::default(),
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, for the owner's explicit calls (e.g. delivering a received frame).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the device raised its interrupt since the last call; each `true` is one edge
    /// for the 8259.
    pub fn take_irq(&self) -> bool {
        self.interrupt.take_irq()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted (valid once FEATURES_OK is set).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Tells the driver the device configuration changed: bumps the configuration generation
    /// and raises the configuration interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt.signal_config();
        }
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::warn!(
                "virtio-mmio: {}-byte read at register offset {offset:#x} ignored (registers are 32 bits)",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            } else {
                tracing::warn!("virtio-mmio: config write before the driver is loaded ignored");
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte write at register offset {offset:#x} ignored (registers are 32 bits)",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            tracing::warn!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.write_queue_reg(offset, v),
            reg::QUEUE_NOTIFY => self.queue_notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => tracing::warn!(
                "virtio-mmio: write of {v:#x} to read-only or unknown register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let negotiating = self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED) == 0
            && self.status & VIRTIO_CONFIG_S_DRIVER != 0;
        if !negotiating {
            tracing::warn!(
                "virtio-mmio: driver features written in status {:#x} ignored",
                self.status
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                tracing::warn!("virtio-mmio: driver features select {sel} ignored");
                return;
            }
        };
        self.acked_features =
            (self.acked_features & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift);
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        let setup = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status
                & (VIRTIO_CONFIG_S_DRIVER_OK
                    | VIRTIO_CONFIG_S_FAILED
                    | VIRTIO_CONFIG_S_NEEDS_RESET)
                == 0;
        if !setup {
            tracing::warn!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x} ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            tracing::warn!(
                "virtio-mmio: queue register {offset:#x} written for absent queue {sel}"
            );
            return;
        };
        match offset {
            reg::QUEUE_NUM => {
                if q.try_set_size(v.try_into().unwrap_or(0)).is_err() {
                    tracing::warn!("virtio-mmio: queue {sel}: invalid size {v} ignored");
                }
            }
            reg::QUEUE_READY => q.set_ready(v == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => unreachable!("write_queue_reg called for {offset:#x}"),
        }
    }

    fn queue_notify(&mut self, v: u32) {
        if !self.device.is_activated() {
            tracing::debug!("virtio-mmio: notify of queue {v} before activation ignored");
            return;
        }
        let index = v as usize;
        if index >= self.queues.len() {
            tracing::warn!("virtio-mmio: notify of absent queue {v} ignored");
            return;
        }
        self.device.notify(index);
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            tracing::warn!(
                "virtio-mmio: status {v:#x} clears bits of {old:#x} without a reset; ignored"
            );
            return;
        }
        let mut new = v;
        let added = v & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable(old) {
            // The driver reads the status back and sees that FEATURES_OK did not stick.
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                tracing::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK ignored");
                new &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if let Err(e) = self.activate() {
                tracing::warn!("virtio-mmio: device activation failed: {e}");
                new |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal_config();
            }
        }
        self.status = new;
    }

    /// Whether the driver may set FEATURES_OK now, with the features it accepted.
    fn features_acceptable(&self, status: u32) -> bool {
        let want = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        if status & want != want || status & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::warn!("virtio-mmio: FEATURES_OK in status {status:#x} refused");
            return false;
        }
        let offered = self.device.features();
        let extra = self.acked_features & !offered;
        if extra != 0 {
            tracing::warn!("virtio-mmio: driver accepted features {extra:#x} never offered");
            return false;
        }
        if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)");
            return false;
        }
        true
    }

    fn activate(&mut self) -> Result<(), String> {
        let mut live = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                return Err(format!("queue {i} is not ready"));
            }
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i} (size {}, desc {:#x}, avail {:#x}, used {:#x}) is not inside guest memory",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                ));
            }
            live.push(Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e}"))?);
        }
        self.device
            .activate(
                self.mem.clone(),
                self.acked_features,
                live,
                self.interrupt.clone(),
            )
            .map_err(|e| e.to_string())
    }

    /// The transport's and its device's state, for a snapshot.
    pub fn state(&self) -> TransportState<D::State> {
        let (interrupt_status, interrupt_edge) = self.interrupt.state();
        TransportState {
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status,
            interrupt_edge,
            device: self.device.save_state(),
        }
    }

    /// Puts transport and device in a snapshot's state; an error says what does not fit
    /// (another number of queues, a queue virtio-queue refuses, a device state the device
    /// refuses).
    pub fn restore(&mut self, s: &TransportState<D::State>) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "the snapshot's device has {} queues, this one {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        self.queues = s
            .queues
            .iter()
            .map(QueueSnapshot::to_queue)
            .collect::<Result<_, _>>()?;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.interrupt.restore(s.interrupt_status, s.interrupt_edge);
        self.device
            .restore_state(&s.device, self.mem.clone(), self.interrupt.clone())
    }

    /// Resets transport and device (the driver wrote 0 to the status register).
    pub fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::INT_CONFIG;
    use super::super::net::{Net, FEATURES};
    use super::super::testutil::*;
    use super::*;

    fn transport() -> MmioTransport<Net> {
        MmioTransport::new(Net::new([2, 0, 0, 0, 0, 1]), memory()).unwrap()
    }

    #[test]
    fn identity_registers() {
        let mut t = transport();
        assert_eq!(r32(&mut t, reg::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(r32(&mut t, reg::VERSION), 2);
        assert_eq!(r32(&mut t, reg::DEVICE_ID), 1);
        assert_eq!(r32(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r32(&mut t, reg::CONFIG_GENERATION), 0);
        assert_eq!(r32(&mut t, reg::SHM_LEN_LOW), u32::MAX, "no shared memory");
        assert_eq!(
            cmdline_param(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn registers_need_aligned_32_bit_accesses() {
        let mut t = transport();
        let mut two = [0xaa; 2];
        t.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xaa; 4];
        t.read(reg::MAGIC_VALUE + 1, &mut four);
        assert_eq!(four, [0; 4]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        t.write(reg::STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(r32(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn queue_registers_only_between_features_ok_and_driver_ok() {
        let mut t = transport();
        w32(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 256);
        w32(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0, "before FEATURES_OK");
        w32(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 2");
        assert_eq!(negotiate(&mut t, FEATURES) & 8, 8);
        w32(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0, "absent queue");
        // Invalid sizes are refused with a warning, never a panic.
        w32(&mut t, reg::QUEUE_SEL, 0);
        w32(&mut t, reg::QUEUE_NUM, 3);
        w32(&mut t, reg::QUEUE_NUM, 512);
        // Driver features are frozen after FEATURES_OK.
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), FEATURES);
        let mut d = Driver::new(t.mem.clone(), 2);
        d.setup_queues(&mut t);
        w32(&mut t, reg::STATUS, 1 | 2 | 8 | 4);
        assert!(t.device().is_activated());
        // After DRIVER_OK the queue registers are frozen too.
        w32(&mut t, reg::QUEUE_SEL, 0);
        w32(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 1);
        // A notify of an absent queue is ignored.
        w32(&mut t, reg::QUEUE_NOTIFY, 7);
        assert!(!t.take_irq());
    }

    #[test]
    fn status_transitions_are_checked() {
        let mut t = transport();
        // FEATURES_OK before ACKNOWLEDGE | DRIVER does not stick.
        w32(&mut t, reg::STATUS, 8);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        w32(&mut t, reg::STATUS, 1 | 2);
        // DRIVER_OK without FEATURES_OK does not stick.
        w32(&mut t, reg::STATUS, 1 | 2 | 4);
        assert_eq!(r32(&mut t, reg::STATUS), 1 | 2);
        assert!(!t.device().is_activated());
        // Clearing a bit needs a reset.
        w32(&mut t, reg::STATUS, 1);
        assert_eq!(r32(&mut t, reg::STATUS), 1 | 2);
        // FAILED sticks; features can no longer be accepted.
        w32(&mut t, reg::STATUS, 1 | 2 | 0x80);
        w32(&mut t, reg::STATUS, 1 | 2 | 0x80 | 8);
        assert_eq!(r32(&mut t, reg::STATUS), 1 | 2 | 0x80);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn config_change_bumps_generation_and_interrupts_only_a_live_driver() {
        let mut t = transport();
        t.config_changed();
        assert_eq!(r32(&mut t, reg::CONFIG_GENERATION), 1);
        assert!(!t.take_irq());
        let mut d = Driver::new(t.mem.clone(), 2);
        d.bring_up(&mut t);
        t.config_changed();
        assert_eq!(r32(&mut t, reg::CONFIG_GENERATION), 2);
        assert!(t.take_irq());
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        w32(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
    }
}
