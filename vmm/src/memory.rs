//! Guest memory: one anonymous mapping from guest physical address 0, with vm-memory's dirty
//! bitmap so that pages the VMM itself writes are tracked (KVM's dirty log does not see them).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest guest memory accepted, in MiB: RAM stays below the 32-bit MMIO gap at 3 GiB.
pub const MAX_MEM_MIB: u64 = 3072;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is out of range.
    #[error("guest memory of {0} MiB is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB} MiB)")]
    Size(u64),
    /// The mapping failed.
    #[error("cannot map {mib} MiB of guest memory: {msg}")]
    Map {
        /// The size asked for.
        mib: u64,
        /// What failed.
        msg: String,
    },
}

/// Maps `mib` MiB of guest RAM at guest physical address 0.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemory, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let size = (mib << 20) as usize;
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).map_err(|e| MemoryError::Map {
        mib,
        msg: e.to_string(),
    })
}
