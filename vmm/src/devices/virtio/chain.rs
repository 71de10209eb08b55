//! Checking a descriptor chain the guest offered before the device touches the memory it
//! describes.
//!
//! virtio-queue's [`DescriptorChain`] iterator stops quietly at a next index beyond the queue,
//! at a chain longer than the queue (a loop) or at an unreadable descriptor. [`walk`] turns
//! every such stop into a [`ChainError`] that says what was wrong, and also checks the
//! direction of every buffer and that it lies in guest memory, so that the device either gets a
//! list of buffers it may use in full or an error, never a half-checked chain.

use std::ops::Deref;

use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

/// One buffer of a checked chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// The direction a device needs the buffers of a chain to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device reads them (the driver's output, e.g. a frame to transmit).
    DeviceReads,
    /// The device writes them (room for input, e.g. a received frame).
    DeviceWrites,
}

/// A malformed descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head index is not a descriptor of the table (or the table cannot be read there).
    #[error("chain head {head} is not a readable descriptor of a queue of size {queue_size}")]
    BadHead {
        /// The head index.
        head: u16,
        /// The queue size.
        queue_size: u16,
    },
    /// A descriptor's next index is beyond the descriptor table.
    #[error(
        "chain {head}: descriptor {index} links to {next}, beyond the queue size {queue_size}"
    )]
    NextOutOfRange {
        /// The chain's head.
        head: u16,
        /// Position of the offending descriptor in the chain.
        index: usize,
        /// Its next index.
        next: u16,
        /// The queue size.
        queue_size: u16,
    },
    /// The chain has more descriptors than the queue: it loops.
    #[error("chain {head} is longer than the queue size {queue_size}: a loop")]
    Loop {
        /// The chain's head.
        head: u16,
        /// The queue size.
        queue_size: u16,
    },
    /// The chain stopped at a descriptor that could not be read (or its total length
    /// overflowed 32 bits, or an indirect table was bad).
    #[error("chain {head}: descriptor after position {index} cannot be read")]
    Unreadable {
        /// The chain's head.
        head: u16,
        /// Position of the last good descriptor.
        index: usize,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("chain {head}: buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// The chain's head.
        head: u16,
        /// The buffer's address.
        addr: u64,
        /// The buffer's length.
        len: u32,
    },
    /// A buffer has the wrong direction (device-writable where the device must only read, or
    /// the opposite).
    #[error("chain {head}: descriptor {index} is {found}, the device expects {expected}")]
    Direction {
        /// The chain's head.
        head: u16,
        /// Position in the chain.
        index: usize,
        /// What the descriptor says.
        found: &'static str,
        /// What the device needs.
        expected: &'static str,
    },
    /// The buffers add up to more than the device accepts.
    #[error("chain {head} holds more than {max} bytes")]
    TooLong {
        /// The chain's head.
        head: u16,
        /// The most the device accepts.
        max: usize,
    },
}

fn direction_name(writable: bool) -> &'static str {
    if writable {
        "device-writable"
    } else {
        "device-readable"
    }
}

/// Walks `chain` (of a queue of size `queue_size`) and checks it: every descriptor readable,
/// linked within the table, no loop, every buffer in `dir` and inside `mem`, at most
/// `max_len` bytes in total. Zero-length buffers are dropped from the result.
pub fn walk<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    queue_size: u16,
    dir: Direction,
    max_len: usize,
) -> Result<Vec<Buffer>, ChainError>
where
    M: Deref<Target = GuestMemory>,
{
    let head = chain.head_index();
    let mut buffers = Vec::new();
    let mut total: usize = 0;
    let mut count = 0usize;
    let mut last: Option<Descriptor> = None;
    for desc in chain {
        let writable = desc.is_write_only();
        let want_writable = dir == Direction::DeviceWrites;
        if writable != want_writable {
            return Err(ChainError::Direction {
                head,
                index: count,
                found: direction_name(writable),
                expected: direction_name(want_writable),
            });
        }
        total = total.saturating_add(desc.len() as usize);
        if total > max_len {
            return Err(ChainError::TooLong { head, max: max_len });
        }
        if desc.len() > 0 {
            if !GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize) {
                return Err(ChainError::OutOfMemory {
                    head,
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            buffers.push(Buffer {
                addr: desc.addr(),
                len: desc.len(),
            });
        }
        count += 1;
        last = Some(desc);
    }
    match last {
        None => Err(ChainError::BadHead { head, queue_size }),
        // The iterator stopped although the last descriptor links on: find out why.
        Some(d) if d.has_next() => {
            if d.next() >= queue_size {
                Err(ChainError::NextOutOfRange {
                    head,
                    index: count - 1,
                    next: d.next(),
                    queue_size,
                })
            } else if count >= queue_size as usize {
                Err(ChainError::Loop { head, queue_size })
            } else {
                Err(ChainError::Unreadable {
                    head,
                    index: count - 1,
                })
            }
        }
        Some(_) => Ok(buffers),
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    use super::super::testutil::*;
    use super::*;

    /// A ready queue of size `QSIZE` on the driver's queue 0 rings.
    fn queue(d: &Driver) -> Queue {
        d.put(Driver::desc_table(0), &[0u8; 0x3000]);
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_desc_table_address(Some(Driver::desc_table(0) as u32), Some(0));
        q.set_avail_ring_address(Some(Driver::avail_ring(0) as u32), Some(0));
        q.set_used_ring_address(Some(Driver::used_ring(0) as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Offers `head` and walks it.
    fn offer_and_walk(
        d: &mut Driver,
        q: &mut Queue,
        head: u16,
        dir: Direction,
        max: usize,
    ) -> Result<Vec<Buffer>, ChainError> {
        d.offer(0, head);
        let mem = d.mem.clone();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        walk(&mem, chain, QSIZE, dir, max)
    }

    #[test]
    fn every_kind_of_bad_chain_is_named() {
        let mut d = Driver::new(memory(), 1);
        let mut q = queue(&d);
        let reads = Direction::DeviceReads;
        d.set_desc(0, 0, BUF_BASE, 10, F_NEXT, 1);
        d.set_desc(0, 1, BUF_BASE + 0x100, 0, F_NEXT, 2);
        d.set_desc(0, 2, BUF_BASE + 0x200, 30, 0, 0);
        assert_eq!(
            offer_and_walk(&mut d, &mut q, 0, reads, 1000).unwrap(),
            vec![
                Buffer {
                    addr: GuestAddress(BUF_BASE),
                    len: 10
                },
                Buffer {
                    addr: GuestAddress(BUF_BASE + 0x200),
                    len: 30
                },
            ],
            "zero-length buffers are dropped"
        );
        assert_eq!(
            offer_and_walk(&mut d, &mut q, 0, reads, 39),
            Err(ChainError::TooLong { head: 0, max: 39 })
        );
        assert!(matches!(
            offer_and_walk(&mut d, &mut q, 0, Direction::DeviceWrites, 1000),
            Err(ChainError::Direction { index: 0, .. })
        ));
        d.set_desc(0, 3, BUF_BASE, 10, F_NEXT, 4);
        d.set_desc(0, 4, BUF_BASE, 10, F_NEXT, 3);
        assert_eq!(
            offer_and_walk(&mut d, &mut q, 3, reads, usize::MAX),
            Err(ChainError::Loop {
                head: 3,
                queue_size: QSIZE
            })
        );
        d.set_desc(0, 5, BUF_BASE, 10, F_NEXT, QSIZE);
        assert_eq!(
            offer_and_walk(&mut d, &mut q, 5, reads, usize::MAX),
            Err(ChainError::NextOutOfRange {
                head: 5,
                index: 0,
                next: QSIZE,
                queue_size: QSIZE
            })
        );
        d.set_desc(0, 6, (64 << 20) - 4, 8, 0, 0);
        assert_eq!(
            offer_and_walk(&mut d, &mut q, 6, reads, usize::MAX),
            Err(ChainError::OutOfMemory {
                head: 6,
                addr: (64 << 20) - 4,
                len: 8
            })
        );
        d.set_desc(0, 7, u64::MAX - 2, 8, 0, 0);
        assert!(matches!(
            offer_and_walk(&mut d, &mut q, 7, reads, usize::MAX),
            Err(ChainError::OutOfMemory { head: 7, .. })
        ));
        assert_eq!(
            offer_and_walk(&mut d, &mut q, QSIZE + 3, reads, usize::MAX),
            Err(ChainError::BadHead {
                head: QSIZE + 3,
                queue_size: QSIZE
            })
        );
        // Two descriptors whose lengths overflow 32 bits together: the iterator stops.
        d.set_desc(0, 8, BUF_BASE, u32::MAX, F_NEXT, 9);
        d.set_desc(0, 9, BUF_BASE, 2, 0, 0);
        assert!(offer_and_walk(&mut d, &mut q, 8, reads, usize::MAX).is_err());
    }
}
