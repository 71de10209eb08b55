//! Which guest pages changed, for two readers: the state digest (pages dirtied since the
//! last digest) and the preemption point (pages dirtied since the last point the primary and
//! the backup are known to share: a digest or the previous preemption point).
//!
//! Both sources of writes are folded in: KVM's dirty log (the guest's own writes; reading it
//! resets it) and the bitmap of vm-memory (the VMM's writes: received frames, used rings,
//! the pushed-TF scrub, pages a preemption point applied).

use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Bytes in a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// Guest frame numbers dirtied since two different points, per memory slot.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    since_digest: Vec<Vec<u64>>,
    since_common: Vec<Vec<u64>>,
}

/// One bit per page of a slot.
fn words(len: u64) -> usize {
    (len / PAGE_SIZE).div_ceil(64) as usize
}

impl DirtyTracker {
    /// Empty sets for the slots of `mem`.
    pub fn new(mem: &GuestMemory) -> Self {
        let sets: Vec<Vec<u64>> = mem.iter().map(|r| vec![0; words(r.len())]).collect();
        DirtyTracker {
            since_common: sets.clone(),
            since_digest: sets,
        }
    }

    /// Folds KVM's dirty log of every slot and the VMM's own bitmap into both sets, and
    /// resets both sources.
    pub fn collect(&mut self, vm: &VmFd, mem: &GuestMemory) -> Result<(), String> {
        for (slot, region) in mem.iter().enumerate() {
            let len = region.len() as usize;
            let kvm = vm
                .get_dirty_log(slot as u32, len)
                .map_err(|e| format!("reading the dirty log: {e}"))?;
            let vmm = vmm_bitmap(region);
            let npages = region.len() / PAGE_SIZE;
            for page in 0..npages {
                let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
                let dirty = kvm.get(w).is_some_and(|v| v & bit != 0)
                    || vmm.dirty_at((page * PAGE_SIZE) as usize);
                if dirty {
                    self.since_digest[slot][w] |= bit;
                    self.since_common[slot][w] |= bit;
                }
            }
            vmm.reset();
        }
        Ok(())
    }

    /// The guest frame numbers dirtied since the last digest, in order; both sets start
    /// again (a digest is a point both sides share).
    pub fn take_since_digest(&mut self, mem: &GuestMemory) -> Vec<u64> {
        let out = gfns(&self.since_digest, mem);
        clear(&mut self.since_digest);
        clear(&mut self.since_common);
        out
    }

    /// The guest frame numbers dirtied since the last point both sides share, in order; that
    /// set starts again.
    pub fn take_since_common(&mut self, mem: &GuestMemory) -> Vec<u64> {
        let out = gfns(&self.since_common, mem);
        clear(&mut self.since_common);
        out
    }
}

/// Clears vm-memory's record of pages the VMM wrote.
pub fn reset_vmm_dirty(mem: &GuestMemory) {
    for region in mem.iter() {
        vmm_bitmap(region).reset();
    }
}

/// The bitmap of pages the VMM wrote through vm-memory in `region`.
fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

fn clear(sets: &mut [Vec<u64>]) {
    for s in sets {
        s.fill(0);
    }
}

fn gfns(sets: &[Vec<u64>], mem: &GuestMemory) -> Vec<u64> {
    let mut out = Vec::new();
    for (set, region) in sets.iter().zip(mem.iter()) {
        let base = region.start_addr().0 / PAGE_SIZE;
        for (w, &word) in set.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                out.push(base + w as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn vmm_writes_reach_both_sets_and_each_set_resets_on_its_own() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        let mut t = DirtyTracker::new(&mem);
        // Without a VM only the VMM's bitmap is read: fold it by hand as `collect` does.
        mem.write_slice(&[1u8; 8], GuestAddress(3 * PAGE_SIZE))
            .unwrap();
        mem.write_slice(&[1u8; 8], GuestAddress(65 * PAGE_SIZE + 8))
            .unwrap();
        for (slot, region) in mem.iter().enumerate() {
            for page in 0..region.len() / PAGE_SIZE {
                if vmm_bitmap(region).dirty_at((page * PAGE_SIZE) as usize) {
                    t.since_digest[slot][(page / 64) as usize] |= 1 << (page % 64);
                    t.since_common[slot][(page / 64) as usize] |= 1 << (page % 64);
                }
            }
        }
        assert_eq!(t.take_since_common(&mem), vec![3, 65]);
        assert_eq!(t.take_since_common(&mem), Vec::<u64>::new());
        assert_eq!(t.take_since_digest(&mem), vec![3, 65]);
        assert_eq!(t.take_since_digest(&mem), Vec::<u64>::new());
    }
}
