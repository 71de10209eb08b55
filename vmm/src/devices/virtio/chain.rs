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
