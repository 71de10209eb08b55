//! Machine snapshots (DESIGN.md, "State transfer"): the whole machine at a delivery point,
//! written to a file and restored into a fresh VMM, which then goes on exactly as the
//! original would have from the same position.
//!
//! A snapshot holds the vCPU (see [`vcpu`]), every device, the VMM's own state (the
//! position, the guest's monotonic time, the console hash, the single-step budget, typed
//! input not yet delivered, the pages dirtied since the last digest), the identity of the
//! guest image it belongs to, and all of guest memory.
//!
//! # File format (version [`SNAPSHOT_VERSION`])
//! | bytes | what |
//! |---|---|
//! | 8 | magic `TWINVMSS` |
//! | 2 | format version, u16 LE |
//! | 8 | length N of the state, u64 LE |
//! | N | [`SnapshotState`], postcard |
//! | 8 | guest memory pages P, u64 LE |
//! | ceil(P/8) | bitmap of the pages stored (bit i of byte i/8: page i is not all zero) |
//! | 4096 each | the stored pages, in page order |
//! | 32 | SHA-256 of every byte before it: the checksum, and the snapshot's identity |
//!
//! Pages that are all zero are not stored (a fresh guest memory mapping is zero), so a
//! snapshot is about as large as the memory the guest has touched.

pub mod vcpu;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::BootLayout;
use crate::devices::clock::Clock;
use crate::devices::cmos::CmosState;
use crate::devices::pic::PicPair;
use crate::devices::pit::Pit;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::net::NetState;
use crate::memory::GuestMemory;
pub use vcpu::VcpuState;

/// First bytes of every snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"TWINVMSS";
/// The format this VMM writes and reads. Bump on any change of [`SnapshotState`] or the
/// layout: an old file is refused with both versions named, never misread.
pub const SNAPSHOT_VERSION: u16 = 2;
/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes before the state: magic, version, state length.
const PREAMBLE_LEN: usize = 8 + 2 + 8;
/// Largest state accepted (the state without memory is a few KiB).
const MAX_STATE_LEN: u64 = 64 << 20;

/// Errors of taking, reading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A guest image file could not be read (to compute its identity).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not start with the snapshot magic.
    #[error("{path} is not a twinvm snapshot (no TWINVMSS magic)")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
    },
    /// The file is of another format version.
    #[error(
        "snapshot {path} has format version {found}; this twinvm reads version {supported} only"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u16,
        /// Ours.
        supported: u16,
    },
    /// The file ends before its layout says it should.
    #[error("snapshot {path} is truncated: {len} bytes, its layout needs at least {need}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What its sections add up to.
        need: u64,
    },
    /// The checksum does not match the contents.
    #[error("snapshot {path} is corrupt: its SHA-256 checksum does not match its contents (stored {stored}, computed {computed})")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum in the file.
        stored: String,
        /// The checksum of its contents.
        computed: String,
    },
    /// The contents are inconsistent (the checksum matched, so a bug or a hand-made file).
    #[error("snapshot state is unusable: {0}")]
    Corrupt(String),
    /// The snapshot belongs to another guest image or VM configuration.
    #[error("the snapshot does not belong to this guest: {0}")]
    Mismatch(String),
    /// A KVM call failed.
    #[error("snapshot: cannot {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// KVM did not take or give one of the MSRs.
    #[error("snapshot: KVM could not {what} MSR {msr}")]
    Msr {
        /// Read or write.
        what: &'static str,
        /// Which.
        msr: String,
    },
    /// Guest memory could not be read or written.
    #[error("snapshot: guest memory: {0}")]
    Memory(String),
    /// The machine is in a state a snapshot cannot be taken of.
    #[error("cannot take a snapshot: {0}")]
    Unsupported(String),
}

/// What a snapshot belongs to: the guest image and the VM's shape. A snapshot restores only
/// into a VMM started with the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageId {
    /// SHA-256 of the kernel.
    pub kernel_sha256: [u8; 32],
    /// SHA-256 of the initramfs (zero without one).
    pub initrd_sha256: [u8; 32],
    /// The kernel command line (it announces the NIC, if there is one).
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
}

/// SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], SnapshotError> {
    let io = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io)?;
    Ok(h.finalize().into())
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ImageId {
    /// The identity of the guest `kernel`, `initrd` and `cmdline` in `mem_mib` MiB.
    pub fn of(
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
        mem_mib: u64,
    ) -> Result<Self, SnapshotError> {
        Ok(ImageId {
            kernel_sha256: sha256_file(kernel)?,
            initrd_sha256: match initrd {
                Some(p) => sha256_file(p)?,
                None => [0; 32],
            },
            cmdline: cmdline.to_string(),
            mem_mib,
        })
    }

    /// `Ok` if `ours` (the VMM restoring) is the image the snapshot (`self`) was taken of;
    /// otherwise every difference, with both values.
    pub fn check(&self, ours: &ImageId) -> Result<(), SnapshotError> {
        let mut diffs = Vec::new();
        if self.kernel_sha256 != ours.kernel_sha256 {
            diffs.push(format!(
                "kernel sha256 {} (the snapshot's: {})",
                hex(&ours.kernel_sha256),
                hex(&self.kernel_sha256)
            ));
        }
        if self.initrd_sha256 != ours.initrd_sha256 {
            diffs.push(format!(
                "initrd sha256 {} (the snapshot's: {})",
                hex(&ours.initrd_sha256),
                hex(&self.initrd_sha256)
            ));
        }
        if self.mem_mib != ours.mem_mib {
            diffs.push(format!(
                "{} MiB of guest memory (the snapshot has {} MiB: pass --mem {})",
                ours.mem_mib, self.mem_mib, self.mem_mib
            ));
        }
        if self.cmdline != ours.cmdline {
            let nic = |c: &str| crate::nic::from_cmdline(c).is_some();
            if nic(&self.cmdline) != nic(&ours.cmdline) {
                diffs.push(if nic(&self.cmdline) {
                    "no NIC (the snapshot was taken with one: restore it with --nic or --tap)"
                        .to_string()
                } else {
                    "a NIC (the snapshot was taken without one)".to_string()
                });
            }
            diffs.push(format!(
                "kernel command line {:?} (the snapshot's: {:?})",
                ours.cmdline, self.cmdline
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::Mismatch(format!(
                "this VMM has {}",
                diffs.join("; ")
            )))
        }
    }
}

/// Where in a log a snapshot was taken: a replay of that log can start from it, skipping the
/// entries before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPoint {
    /// SHA-256 of the log's header (see `LogHeader::sha256`).
    pub header_sha256: [u8; 32],
    /// Entries written (or replayed) before the snapshot.
    pub entries: u64,
}

/// The devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// The 8259 pair.
    pub pic: PicPair,
    /// The 8254.
    pub pit: Pit,
    /// The RTC and CMOS RAM.
    pub cmos: CmosState,
    /// The console UART.
    pub serial: SerialSnapshot,
    /// The twinvm clock device.
    pub clock: Clock,
    /// The virtio-net card and its transport, if the guest has one.
    pub nic: Option<TransportState<NetState>>,
}

/// The VMM's own state at the snapshot's delivery point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmState {
    /// The position (synchronous exits) of the delivery point.
    pub position: u64,
    /// Whether the guest had halted at the exit that led to it.
    pub halted: bool,
    /// The guest's monotonic time there, in ns: a restored guest's time goes on from it.
    pub mono_ns: u64,
    /// The running hash of the console output.
    pub console_hash: u64,
    /// Console bytes written.
    pub console_bytes: u64,
    /// Whether the vCPU was being single-stepped towards an interrupt window.
    pub stepping: bool,
    /// Single steps left.
    pub step_budget: u64,
    /// The stepped instruction is a `pushf`.
    pub stepping_pushf: bool,
    /// Console input typed and not yet taken by the UART.
    pub pending_input: Vec<u8>,
    /// Guest page numbers dirtied since the last state digest: the next digest covers them,
    /// in the original and in the restored machine alike.
    pub dirty_since_digest: Vec<u64>,
    /// Where in a log the snapshot was taken, when recording to a file or replaying one.
    pub log: Option<LogPoint>,
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// What the snapshot belongs to.
    pub image: ImageId,
    /// Where the guest was loaded.
    pub layout: BootLayout,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// The devices.
    pub devices: DeviceState,
    /// The VMM.
    pub vmm: VmmState,
}

/// A snapshot read from a file and checked: its state, and guest memory's stored pages.
pub struct Snapshot {
    /// The file it was read from.
    pub path: PathBuf,
    /// Everything but memory.
    pub state: SnapshotState,
    /// The file's SHA-256 trailer: its identity (a log that starts from it names it).
    pub sha256: [u8; 32],
    /// Number of guest pages.
    pages: u64,
    /// One bit per page: stored (not all zero).
    bitmap: Vec<u8>,
    /// The stored pages, in page order.
    data: Vec<u8>,
    /// Time it took to read and check the file.
    pub read_time: std::time::Duration,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.path)
            .field("sha256", &hex(&self.sha256))
            .field("position", &self.state.vmm.position)
            .field("stored_bytes", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// Figures of one snapshot written.
#[derive(Debug, Clone, Copy)]
pub struct WriteStats {
    /// File size.
    pub bytes: u64,
    /// Pages stored (not all zero).
    pub pages_stored: u64,
    /// Pages of guest memory.
    pub pages_total: u64,
    /// The file's SHA-256.
    pub sha256: [u8; 32],
}

/// A writer that hashes what it writes.
struct Hashing<W> {
    out: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b)
    }
}

/// Which guest pages a snapshot stores.
#[derive(Debug, Clone, Copy)]
pub enum Pages<'a> {
    /// Every page that is not all zero (a snapshot restored into fresh memory).
    NonZero,
    /// Exactly these frame numbers, zero or not, in increasing order (the last round of a
    /// state transfer, laid over the pages sent before it: see [`Snapshot::overlay`]).
    Only(&'a [u64]),
}

/// Writes `state` and all of `mem` to `path` (through a temporary file renamed into place,
/// so that a reader never sees half a snapshot).
pub fn write(
    path: &Path,
    state: &SnapshotState,
    mem: &GuestMemory,
) -> Result<WriteStats, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut w = Hashing {
        out: std::io::BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let result = put_snapshot(&mut w, state, mem, Pages::NonZero, &io);
    let (pages_total, pages_stored) = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let sha256: [u8; 32] = w.hash.clone().finalize().into();
    let finish = (|| {
        w.out.write_all(&sha256)?;
        let file = w.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = finish {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(WriteStats {
        bytes: w.bytes + 32,
        pages_stored,
        pages_total,
        sha256,
    })
}

/// The snapshot of `state` and `pages` of `mem` in the file format, in memory (what a state
/// transfer sends over the log channel).
pub fn encode(
    state: &SnapshotState,
    mem: &GuestMemory,
    pages: Pages<'_>,
) -> Result<(Vec<u8>, WriteStats), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: PathBuf::from("(in memory)"),
        source,
    };
    let mut w = Hashing {
        out: Vec::new(),
        hash: Sha256::new(),
        bytes: 0,
    };
    let (pages_total, pages_stored) = put_snapshot(&mut w, state, mem, pages, &io)?;
    let sha256: [u8; 32] = w.hash.clone().finalize().into();
    w.out.extend_from_slice(&sha256);
    let stats = WriteStats {
        bytes: w.bytes + 32,
        pages_stored,
        pages_total,
        sha256,
    };
    Ok((w.out, stats))
}

/// Writes everything of a snapshot but its SHA-256 trailer; returns the pages of guest
/// memory and the pages stored.
fn put_snapshot<W: Write>(
    w: &mut Hashing<W>,
    state: &SnapshotState,
    mem: &GuestMemory,
    pages: Pages<'_>,
    io: &dyn Fn(std::io::Error) -> SnapshotError,
) -> Result<(u64, u64), SnapshotError> {
    let encoded =
        postcard::to_stdvec(state).map_err(|e| SnapshotError::Corrupt(format!("encoding: {e}")))?;
    let mut pages_total = 0u64;
    let mut pages_stored = 0u64;
    w.put(SNAPSHOT_MAGIC).map_err(io)?;
    w.put(&SNAPSHOT_VERSION.to_le_bytes()).map_err(io)?;
    w.put(&(encoded.len() as u64).to_le_bytes()).map_err(io)?;
    w.put(&encoded).map_err(io)?;
    // One pass to find the stored pages, one to write them: the bitmap comes first. Guest
    // memory is one region from address 0 (see `memory`), so a page's index is its
    // frame number.
    let mut bitmap = Vec::new();
    let mut stored = Vec::new();
    let mut only = match pages {
        Pages::Only(gfns) => Some(gfns.iter().copied().peekable()),
        Pages::NonZero => None,
    };
    for region in mem.iter() {
        let len = region.len() as usize;
        let mut buf = vec![0u8; len.min(16 << 20)];
        let mut off = 0usize;
        while off < len {
            let n = buf.len().min(len - off);
            if only.is_none() {
                region
                    .read_slice(&mut buf[..n], vm_memory::MemoryRegionAddress(off as u64))
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
            }
            for page in buf[..n].chunks(PAGE_SIZE) {
                let i = pages_total;
                if bitmap.len() <= (i / 8) as usize {
                    bitmap.push(0u8);
                }
                let keep = match &mut only {
                    Some(gfns) => gfns.next_if_eq(&i).is_some(),
                    None => page.iter().any(|&b| b != 0),
                };
                if keep {
                    bitmap[(i / 8) as usize] |= 1 << (i % 8);
                    stored.push(i);
                    pages_stored += 1;
                }
                pages_total += 1;
            }
            off += n;
        }
    }
    if let Some(mut rest) = only {
        if let Some(gfn) = rest.next() {
            return Err(SnapshotError::Memory(format!(
                "page {gfn:#x} is not in guest memory, or the pages are not in order"
            )));
        }
    }
    w.put(&pages_total.to_le_bytes()).map_err(io)?;
    w.put(&bitmap).map_err(io)?;
    let mut page = [0u8; PAGE_SIZE];
    for gfn in stored {
        mem.read_slice(&mut page, GuestAddress(gfn * PAGE_SIZE as u64))
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        w.put(&page).map_err(io)?;
    }
    Ok((pages_total, pages_stored))
}

/// Reads the SHA-256 trailer of a snapshot file without checking it (cheap: a log header
/// check needs the identity before the whole file is read).
pub fn read_identity(path: &Path) -> Result<[u8; 32], SnapshotError> {
    use std::io::{Seek, SeekFrom};
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut magic = [0u8; 8];
    if len < 8 || f.read_exact(&mut magic).is_err() || &magic != SNAPSHOT_MAGIC {
        return Err(SnapshotError::NotASnapshot {
            path: path.to_path_buf(),
        });
    }
    if len < (PREAMBLE_LEN + 32) as u64 {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            len,
            need: (PREAMBLE_LEN + 32) as u64,
        });
    }
    f.seek(SeekFrom::End(-32)).map_err(io)?;
    let mut sha = [0u8; 32];
    f.read_exact(&mut sha).map_err(io)?;
    Ok(sha)
}

impl Snapshot {
    /// Reads and checks a snapshot file: magic, version, layout, checksum, state.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let t0 = std::time::Instant::now();
        let p = || path.to_path_buf();
        let bytes =
            std::fs::read(path).map_err(|source| SnapshotError::Io { path: p(), source })?;
        let mut snap = Self::parse(path, &bytes)?;
        snap.read_time = t0.elapsed();
        Ok(snap)
    }

    /// Checks and reads a snapshot received as bytes (a state transfer); `label` names it
    /// in errors.
    pub fn from_bytes(label: &Path, bytes: &[u8]) -> Result<Self, SnapshotError> {
        Self::parse(label, bytes)
    }

    /// Lays the snapshot's stored pages over `base` (pages sent before it, by frame
    /// number): the snapshot's own pages win, a page in neither stays zero. A state
    /// transfer's last round stores exactly the pages dirtied since the earlier rounds.
    pub fn overlay(&mut self, base: &std::collections::BTreeMap<u64, Vec<u8>>) {
        if base.is_empty() {
            return;
        }
        let mut bitmap = vec![0u8; self.pages.div_ceil(8) as usize];
        let mut data = Vec::with_capacity(self.data.len() + base.len() * PAGE_SIZE);
        let mut own = self.data.chunks(PAGE_SIZE);
        for gfn in 0..self.pages {
            let (byte, bit) = ((gfn / 8) as usize, 1u8 << (gfn % 8));
            let page = if self.bitmap[byte] & bit != 0 {
                own.next()
            } else {
                base.get(&gfn)
                    .map(Vec::as_slice)
                    .filter(|p| p.len() == PAGE_SIZE)
            };
            if let Some(p) = page {
                bitmap[byte] |= bit;
                data.extend_from_slice(p);
            }
        }
        self.bitmap = bitmap;
        self.data = data;
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let p = || path.to_path_buf();
        let len = bytes.len() as u64;
        let truncated = |need: u64| SnapshotError::Truncated {
            path: p(),
            len,
            need,
        };
        if bytes.len() < 8 || &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::NotASnapshot { path: p() });
        }
        if bytes.len() < 10 {
            return Err(truncated(10));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version {
                path: p(),
                found: version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let u64_at = |off: usize| -> Result<u64, SnapshotError> {
            bytes
                .get(off..off + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or_else(|| truncated(off as u64 + 8 + 32))
        };
        let state_len = u64_at(10)?;
        if state_len > MAX_STATE_LEN {
            return Err(SnapshotError::Corrupt(format!(
                "a state of {state_len} bytes (at most {MAX_STATE_LEN})"
            )));
        }
        let state_end = PREAMBLE_LEN as u64 + state_len;
        let pages = u64_at(state_end as usize).map_err(|_| truncated(state_end + 8 + 32))?;
        if pages > (crate::memory::MAX_MEM_MIB << 20) / PAGE_SIZE as u64 {
            return Err(SnapshotError::Corrupt(format!(
                "{pages} guest pages is more than any guest has"
            )));
        }
        let bitmap_start = state_end + 8;
        let bitmap_len = pages.div_ceil(8);
        let data_start = bitmap_start + bitmap_len;
        let header_need = data_start + 32;
        if len < header_need {
            return Err(truncated(header_need));
        }
        let bitmap = &bytes[bitmap_start as usize..data_start as usize];
        let stored: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
        let need = data_start + stored * PAGE_SIZE as u64 + 32;
        if len < need {
            return Err(truncated(need));
        }
        if len > need {
            return Err(SnapshotError::Corrupt(format!(
                "{} bytes after the checksum",
                len - need
            )));
        }
        let body = &bytes[..(len - 32) as usize];
        let stored_sha: [u8; 32] = bytes[(len - 32) as usize..].try_into().expect("32 bytes");
        let computed: [u8; 32] = Sha256::digest(body).into();
        if computed != stored_sha {
            return Err(SnapshotError::Checksum {
                path: p(),
                stored: hex(&stored_sha),
                computed: hex(&computed),
            });
        }
        let state: SnapshotState =
            postcard::from_bytes(&bytes[PREAMBLE_LEN..state_end as usize])
                .map_err(|e| SnapshotError::Corrupt(format!("decoding the state: {e}")))?;
        if state.image.mem_mib << 20 != pages * PAGE_SIZE as u64 {
            return Err(SnapshotError::Corrupt(format!(
                "the state says {} MiB of memory, the memory section has {pages} pages",
                state.image.mem_mib
            )));
        }
        Ok(Snapshot {
            path: p(),
            state,
            sha256: stored_sha,
            pages,
            bitmap: bitmap.to_vec(),
            data: bytes[data_start as usize..(len - 32) as usize].to_vec(),
            read_time: std::time::Duration::ZERO,
        })
    }

    /// Bytes of guest memory the snapshot stores (its pages that are not all zero).
    pub fn stored_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Writes the stored pages into `mem`, which must be a fresh (all-zero) mapping of the
    /// snapshot's size.
    pub fn write_memory(&self, mem: &GuestMemory) -> Result<(), SnapshotError> {
        let size: u64 = mem.iter().map(|r| r.len()).sum();
        if size != self.pages * PAGE_SIZE as u64 {
            return Err(SnapshotError::Mismatch(format!(
                "guest memory of {} MiB, the snapshot's is {} MiB",
                size >> 20,
                (self.pages * PAGE_SIZE as u64) >> 20
            )));
        }
        let mut data = self.data.chunks(PAGE_SIZE);
        for gfn in 0..self.pages {
            if self.bitmap[(gfn / 8) as usize] & (1 << (gfn % 8)) == 0 {
                continue;
            }
            let page = data.next().ok_or_else(|| {
                SnapshotError::Corrupt("fewer stored pages than the bitmap says".into())
            })?;
            mem.write_slice(page, GuestAddress(gfn * PAGE_SIZE as u64))
                .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
