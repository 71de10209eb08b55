//! An I/O bus: device ids inserted at `(base, length)` ranges, resolved to (id, offset).
//! The same bus serves port I/O ([`PioBus`]: ports) and MMIO ([`MmioBus`]: guest physical
//! addresses).

use std::collections::BTreeMap;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already inserted.
    #[error("range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range.
    #[error("range at {0:#x} has zero length")]
    ZeroLength(u64),
}

/// Maps address ranges to device ids of type `Id`. The devices themselves are owned by the
/// machine, which dispatches on the id; this keeps the bus free of shared ownership.
#[derive(Debug)]
pub struct Bus<Id: Copy> {
    /// base -> (length, device)
    ranges: BTreeMap<u64, (u64, Id)>,
}

/// The port I/O bus: ports to devices.
pub type PioBus<Id> = Bus<Id>;

/// The MMIO bus: guest physical addresses to devices.
pub type MmioBus<Id> = Bus<Id>;

impl<Id: Copy> Default for Bus<Id> {
    fn default() -> Self {
        Bus {
            ranges: BTreeMap::new(),
        }
    }
}

impl<Id: Copy> Bus<Id> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: Id) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        if let Some((&b, &(l, _))) = self.ranges.range(..base + len).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// Finds the device covering `addr`: its id and the offset of `addr` within it.
    pub fn resolve(&self, addr: u64) -> Option<(Id, u64)> {
        let (&base, &(len, id)) = self.ranges.range(..=addr).next_back()?;
        (addr < base + len).then_some((id, addr - base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_and_overlap() {
        let mut bus = PioBus::<u32>::new();
        bus.insert(0x20, 2, 1).unwrap();
        bus.insert(0x40, 4, 2).unwrap();
        assert_eq!(bus.resolve(0x21), Some((1, 1)));
        assert_eq!(bus.resolve(0x22), None);
        assert_eq!(bus.resolve(0x43), Some((2, 3)));
        assert_eq!(bus.resolve(0x1f), None);
        assert_eq!(
            bus.insert(0x3f, 2, 3),
            Err(BusError::Overlap { base: 0x3f, len: 2 })
        );
        assert_eq!(
            bus.insert(0x21, 1, 3),
            Err(BusError::Overlap { base: 0x21, len: 1 })
        );
        assert_eq!(bus.insert(0x50, 0, 3), Err(BusError::ZeroLength(0x50)));
        bus.insert(0x44, 1, 3).unwrap();
    }
}
