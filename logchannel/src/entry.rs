//! The log's data model: the header that identifies the recorded VM, the execution
//! [`Position`], every kind of [`Entry`] and the state [`Digest`] with its [`DigestDiff`].
//!
//! These types are serialized with serde (see [`crate::frame`] for the encoding); the
//! version of the format lives in the framing, not in these types.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// An execution position: the number of synchronous VM exits so far (PIO, MMIO, HLT,
/// interrupt-window and MSR exits), identical on the primary and on the backup
/// (DESIGN.md, Determinism 3).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// The position before the first synchronous exit.
    pub const ZERO: Position = Position(0);

    /// The raw exit count.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The position one synchronous exit later.
    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }

    /// How many positions `earlier` is behind this one (0 if it is not behind).
    pub fn since(self, earlier: Position) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The position `n` synchronous exits earlier (at least [`Position::ZERO`]).
    pub fn back(self, n: u64) -> Position {
        Position(self.0.saturating_sub(n))
    }

    /// Whether this position is a multiple of `interval` (never for an interval of 0).
    pub fn is_multiple_of(self, interval: u64) -> bool {
        interval != 0 && self.0 % interval == 0
    }
}

impl From<u64> for Position {
    fn from(v: u64) -> Self {
        Position(v)
    }
}

impl From<Position> for u64 {
    fn from(p: Position) -> Self {
        p.0
    }
}

/// The plain count, as every message says "at position N" (the VMM's messages printed the
/// count before positions were typed, and tests and operators read them).
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What identifies a recording: the guest's boot inputs and the VM's configuration.
///
/// A backup replays a log only if its own header matches the primary's
/// (see [`LogHeader::check_matches`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeader {
    /// SHA-256 of the guest kernel image.
    pub kernel_sha256: [u8; 32],
    /// SHA-256 of the initramfs.
    pub initrd_sha256: [u8; 32],
    /// The kernel command line.
    pub cmdline: String,
    /// Guest memory size in MiB.
    pub mem_mib: u32,
    /// Positions between two state digests (0: no digests).
    pub digest_interval: u64,
    /// The VM's identity (also its key at the arbiter).
    pub vm_id: String,
    /// What guest programs read with `CPUID` on the recording's host CPU, where the host runs
    /// guest `CPUID` natively (no trap to the VMM); `None` where `CPUID` exits and the VMM's
    /// table answers, which is the same on every host (DESIGN.md, Determinism 6).
    pub cpuid: Option<Vec<CpuidLeaf>>,
    /// The SHA-256 of the machine snapshot the recording starts from (`twinvm record
    /// --restore`); `None` for a recording that starts with a boot. A replay must restore
    /// the same snapshot.
    pub snapshot_sha256: Option<[u8; 32]>,
}

/// One `CPUID` leaf and sub-leaf as a host CPU answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CpuidLeaf {
    /// EAX on input.
    pub leaf: u32,
    /// ECX on input.
    pub subleaf: u32,
    /// EAX, EBX, ECX, EDX on output.
    pub regs: [u32; 4],
}

impl fmt::Display for CpuidLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.regs;
        write!(
            f,
            "leaf {:#x}.{} = eax {a:#010x} ebx {b:#010x} ecx {c:#010x} edx {d:#010x}",
            self.leaf, self.subleaf
        )
    }
}

/// The leaves of two `CPUID` fingerprints that differ, one line each ("ours" and "theirs").
pub fn cpuid_diff(ours: &[CpuidLeaf], theirs: &[CpuidLeaf]) -> Vec<String> {
    let key = |l: &CpuidLeaf| (l.leaf, l.subleaf);
    let mut out = Vec::new();
    let theirs_map: BTreeMap<(u32, u32), &CpuidLeaf> = theirs.iter().map(|l| (key(l), l)).collect();
    let ours_map: BTreeMap<(u32, u32), &CpuidLeaf> = ours.iter().map(|l| (key(l), l)).collect();
    for (k, o) in &ours_map {
        match theirs_map.get(k) {
            Some(t) if t.regs == o.regs => {}
            Some(t) => {
                let names = ["eax", "ebx", "ecx", "edx"];
                let regs: Vec<String> = (0..4)
                    .filter(|&i| o.regs[i] != t.regs[i])
                    .map(|i| {
                        format!(
                            "{} ours {:#010x} theirs {:#010x}",
                            names[i], o.regs[i], t.regs[i]
                        )
                    })
                    .collect();
                out.push(format!("leaf {:#x}.{}: {}", k.0, k.1, regs.join(", ")));
            }
            None => out.push(format!("leaf {:#x}.{}: only ours", k.0, k.1)),
        }
    }
    for k in theirs_map.keys().filter(|k| !ours_map.contains_key(k)) {
        out.push(format!("leaf {:#x}.{}: only theirs", k.0, k.1));
    }
    out
}

impl LogHeader {
    /// Builds a header.
    pub fn new(
        kernel_sha256: [u8; 32],
        initrd_sha256: [u8; 32],
        cmdline: impl Into<String>,
        mem_mib: u32,
        digest_interval: u64,
        vm_id: impl Into<String>,
    ) -> Self {
        LogHeader {
            kernel_sha256,
            initrd_sha256,
            cmdline: cmdline.into(),
            mem_mib,
            digest_interval,
            vm_id: vm_id.into(),
            cpuid: None,
            snapshot_sha256: None,
        }
    }

    /// The same header for a recording that starts from the snapshot with this SHA-256.
    pub fn with_snapshot(mut self, snapshot_sha256: Option<[u8; 32]>) -> Self {
        self.snapshot_sha256 = snapshot_sha256;
        self
    }

    /// SHA-256 of the header's encoding: names the recording a snapshot was taken in.
    pub fn sha256(&self) -> [u8; 32] {
        use sha2::Digest as _;
        // Encoding a header into memory cannot fail (no maps with non-string keys, no
        // unsupported types); were it to, the empty encoding still gives a fixed hash.
        let bytes = postcard::to_stdvec(self).unwrap_or_default();
        sha2::Sha256::digest(&bytes).into()
    }

    /// The same header naming the host CPU's `CPUID` fingerprint (see [`LogHeader::cpuid`]).
    pub fn with_cpuid(mut self, cpuid: Option<Vec<CpuidLeaf>>) -> Self {
        self.cpuid = cpuid;
        self
    }

    /// `Ok` if `other` describes the same VM; otherwise a readable reason naming every
    /// field that differs, with both values (`self` is "ours", `other` is "theirs").
    pub fn check_matches(&self, other: &LogHeader) -> Result<(), String> {
        let mut diffs = Vec::new();
        if self.vm_id != other.vm_id {
            diffs.push(format!(
                "vm_id: ours {:?}, theirs {:?}",
                self.vm_id, other.vm_id
            ));
        }
        if self.kernel_sha256 != other.kernel_sha256 {
            diffs.push(format!(
                "kernel_sha256: ours {}, theirs {}",
                hex(&self.kernel_sha256),
                hex(&other.kernel_sha256)
            ));
        }
        if self.initrd_sha256 != other.initrd_sha256 {
            diffs.push(format!(
                "initrd_sha256: ours {}, theirs {}",
                hex(&self.initrd_sha256),
                hex(&other.initrd_sha256)
            ));
        }
        if self.cmdline != other.cmdline {
            diffs.push(format!(
                "cmdline: ours {:?}, theirs {:?}",
                self.cmdline, other.cmdline
            ));
        }
        if self.mem_mib != other.mem_mib {
            diffs.push(format!(
                "mem_mib: ours {}, theirs {}",
                self.mem_mib, other.mem_mib
            ));
        }
        if self.digest_interval != other.digest_interval {
            diffs.push(format!(
                "digest_interval: ours {}, theirs {}",
                self.digest_interval, other.digest_interval
            ));
        }
        // The CPUID fingerprint is not compared here: a backup picks a host CPU that matches
        // the primary's (see the VMM's `hostcpu` module); only whether CPUID is trapped at
        // all must agree.
        if self.cpuid.is_some() != other.cpuid.is_some() {
            let says = |c: &Option<Vec<CpuidLeaf>>| match c {
                Some(_) => "guest CPUID runs natively (host CPU fingerprint)",
                None => "guest CPUID is trapped (the VMM's table)",
            };
            diffs.push(format!(
                "cpuid: ours {}, theirs {}",
                says(&self.cpuid),
                says(&other.cpuid)
            ));
        }
        if self.snapshot_sha256 != other.snapshot_sha256 {
            let says = |s: &Option<[u8; 32]>| match s {
                Some(h) => format!("starts from snapshot {}", hex(h)),
                None => "starts with a boot".to_string(),
            };
            diffs.push(format!(
                "snapshot: ours {}, theirs {}",
                says(&self.snapshot_sha256),
                says(&other.snapshot_sha256)
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(format!("log header mismatch: {}", diffs.join("; ")))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a recording ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (or triple-faulted into a reset).
    Reset,
    /// The operator stopped the VM.
    Stopped,
    /// The VMM failed; the message says how.
    Error(String),
    /// The backup went live at this position (failover): nothing follows on this log.
    GoLive,
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::PowerOff => f.write_str("power off"),
            EndReason::Reset => f.write_str("reset"),
            EndReason::Stopped => f.write_str("stopped"),
            EndReason::Error(m) => write!(f, "error: {m}"),
            EndReason::GoLive => f.write_str("go live"),
        }
    }
}

/// One non-deterministic input (or check) of the recorded guest, at its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// An asynchronous source (PIT timer, console rx, NIC rx) raised PIC line `line`.
    IrqLine {
        /// Where it was raised.
        pos: Position,
        /// The PIC input line (0..=15).
        line: u8,
    },
    /// The vector injected with `KVM_INTERRUPT` at this position; replay checks it.
    Inject {
        /// Where it was injected.
        pos: Position,
        /// The interrupt vector.
        vector: u8,
    },
    /// The result of a time-dependent port read (PIT counter, CMOS RTC).
    PioIn {
        /// The position of the `IN` exit.
        pos: Position,
        /// The I/O port.
        port: u16,
        /// The bytes the guest read.
        data: Vec<u8>,
    },
    /// The result of a non-deterministic MMIO read.
    MmioRead {
        /// The position of the MMIO exit.
        pos: Position,
        /// The guest-physical address.
        addr: u64,
        /// The bytes the guest read.
        data: Vec<u8>,
    },
    /// Bytes typed at the serial console.
    ConsoleIn {
        /// Where they entered the device.
        pos: Position,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// A received network frame.
    NetRx {
        /// Where it entered the device.
        pos: Position,
        /// The Ethernet frame.
        frame: Vec<u8>,
    },
    /// A state digest to compare on replay (DESIGN.md, Determinism 6).
    Digest(Digest),
    /// A watchdog landmark (DESIGN.md, Determinism 4): the backup must reach this
    /// position with this RIP and register hash before it injects what follows.
    Landmark {
        /// The position of the forced exit.
        pos: Position,
        /// The guest RIP there.
        rip: u64,
        /// A hash of the general registers there.
        regs_hash: u64,
    },
    /// A preemption point (DESIGN.md, Determinism 4): the primary kicked its vCPU out of a
    /// run that had lasted a quantum without a synchronous exit, at no position of its own,
    /// to deliver an interrupt. The backup does not run that stretch: once it has reached
    /// `pos` it takes this state instead, and the entries at `pos` that follow (the lines
    /// raised and the vector injected there) apply from it.
    Preempt {
        /// The position of the last synchronous exit before the kick.
        pos: Position,
        /// The vCPU's state at the kick, in the VMM's own encoding.
        vcpu: Vec<u8>,
        /// Every page dirtied since the last point both sides share (a digest or the
        /// previous preemption point): frame number and its 4 KiB of bytes.
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// Pages of the preemption point that follows at the same position, when it has more
    /// than one entry can carry (an entry's payload is bounded).
    PreemptPages {
        /// The position of the preemption point.
        pos: Position,
        /// Frame number and 4 KiB of bytes of each page.
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// A liveness/progress mark in the log.
    Heartbeat {
        /// The primary's position when it was written.
        pos: Position,
    },
    /// The end of the recording.
    End {
        /// The last position.
        pos: Position,
        /// Why it ended.
        reason: EndReason,
    },
    /// A machine snapshot was taken at this delivery point (it comes first there). Taking
    /// one resets the VM's memory mappings, which KVM's dirty log can depend on: a replay
    /// does the same here, so that its digests go on matching.
    Snapshot {
        /// The delivery point.
        pos: Position,
        /// The snapshot file's SHA-256.
        sha256: [u8; 32],
    },
    /// Re-protect (a new backup joins a live side): guest pages sent before the machine's
    /// state, while the guest runs (a pre-copy round) or at the stop (the pages dirtied
    /// since the last round). The joining backup writes them into its memory in order; the
    /// state ([`Entry::TransferState`]) comes after them.
    TransferPages {
        /// The live side's position when they were read.
        pos: Position,
        /// The round: 0 is the first pass over memory, the last one is taken at the stop.
        round: u32,
        /// Frame number and 4 KiB of bytes of each page.
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// Re-protect: a piece of the machine snapshot taken at the delivery point `pos` where
    /// the live side stopped its guest; the log of the new pair follows the last piece.
    TransferState {
        /// The delivery point.
        pos: Position,
        /// The arbiter generation the new pair claims when it loses a side.
        generation: u64,
        /// Offset of `bytes` in the snapshot.
        offset: u64,
        /// The snapshot's size.
        total: u64,
        /// The piece.
        bytes: Vec<u8>,
    },
}

impl Entry {
    /// The position this entry applies at.
    pub fn pos(&self) -> Position {
        match self {
            Entry::IrqLine { pos, .. }
            | Entry::Inject { pos, .. }
            | Entry::PioIn { pos, .. }
            | Entry::MmioRead { pos, .. }
            | Entry::ConsoleIn { pos, .. }
            | Entry::NetRx { pos, .. }
            | Entry::Landmark { pos, .. }
            | Entry::Preempt { pos, .. }
            | Entry::PreemptPages { pos, .. }
            | Entry::Heartbeat { pos }
            | Entry::End { pos, .. }
            | Entry::Snapshot { pos, .. }
            | Entry::TransferPages { pos, .. }
            | Entry::TransferState { pos, .. } => *pos,
            Entry::Digest(d) => d.pos,
        }
    }

    /// A short name of the entry's kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::IrqLine { .. } => "IrqLine",
            Entry::Inject { .. } => "Inject",
            Entry::PioIn { .. } => "PioIn",
            Entry::MmioRead { .. } => "MmioRead",
            Entry::ConsoleIn { .. } => "ConsoleIn",
            Entry::NetRx { .. } => "NetRx",
            Entry::Digest(_) => "Digest",
            Entry::Landmark { .. } => "Landmark",
            Entry::Preempt { .. } => "Preempt",
            Entry::PreemptPages { .. } => "PreemptPages",
            Entry::Heartbeat { .. } => "Heartbeat",
            Entry::End { .. } => "End",
            Entry::Snapshot { .. } => "Snapshot",
            Entry::TransferPages { .. } => "TransferPages",
            Entry::TransferState { .. } => "TransferState",
        }
    }
}

/// A digest of the guest's state at a position: named vCPU registers, an FPU hash and
/// the hashes of the memory pages dirtied since the previous digest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Digest {
    /// Where it was taken.
    pub pos: Position,
    /// Register name and value (e.g. `("rip", 0xffff_ffff_8100_0000)`), in any order.
    pub regs: Vec<(String, u64)>,
    /// A hash of the FPU/SSE state.
    pub fpu_hash: u64,
    /// Guest frame number and page hash of every page dirtied since the last digest.
    pub pages: Vec<(u64, u64)>,
}

/// A register that differs between a recorded and a replayed [`Digest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegDiff {
    /// The register's name.
    pub name: String,
    /// Its recorded value (`None`: absent from the recorded digest).
    pub recorded: Option<u64>,
    /// Its replayed value (`None`: absent from the replayed digest).
    pub replayed: Option<u64>,
}

/// A page that differs between a recorded and a replayed [`Digest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDiff {
    /// The guest frame number.
    pub gfn: u64,
    /// Its recorded hash (`None`: not in the recorded digest's dirty set).
    pub recorded: Option<u64>,
    /// Its replayed hash (`None`: not in the replayed digest's dirty set).
    pub replayed: Option<u64>,
}

/// What differs between a recorded digest and a replayed one ([`Digest::diff`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestDiff {
    /// The recorded digest's position.
    pub recorded_pos: Position,
    /// The replayed digest's position.
    pub replayed_pos: Position,
    /// Differing or missing registers, sorted by name.
    pub regs: Vec<RegDiff>,
    /// `(recorded, replayed)` FPU hashes if they differ.
    pub fpu: Option<(u64, u64)>,
    /// Differing or missing pages, sorted by frame number.
    pub pages: Vec<PageDiff>,
}

impl DigestDiff {
    /// `true` if the two digests agree entirely.
    pub fn is_empty(&self) -> bool {
        self.recorded_pos == self.replayed_pos
            && self.regs.is_empty()
            && self.fpu.is_none()
            && self.pages.is_empty()
    }
}

fn opt_hex(v: Option<u64>) -> String {
    match v {
        Some(v) => format!("{v:#018x}"),
        None => "(absent)".to_string(),
    }
}

impl fmt::Display for DigestDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "digests at {} agree", self.recorded_pos);
        }
        if self.recorded_pos == self.replayed_pos {
            writeln!(
                f,
                "state digest mismatch at position {}:",
                self.recorded_pos
            )?;
        } else {
            writeln!(
                f,
                "state digest mismatch: recorded at {}, replayed at {}",
                self.recorded_pos, self.replayed_pos
            )?;
        }
        for r in &self.regs {
            writeln!(
                f,
                "  register {:<8} recorded {}  replayed {}",
                r.name,
                opt_hex(r.recorded),
                opt_hex(r.replayed)
            )?;
        }
        if let Some((rec, rep)) = self.fpu {
            writeln!(
                f,
                "  fpu hash        recorded {rec:#018x}  replayed {rep:#018x}"
            )?;
        }
        for p in &self.pages {
            writeln!(
                f,
                "  page gfn {:#x} (gpa {:#x}) recorded {}  replayed {}",
                p.gfn,
                p.gfn << 12,
                opt_hex(p.recorded),
                opt_hex(p.replayed)
            )?;
        }
        write!(
            f,
            "  ({} register(s), {} page(s) differ{})",
            self.regs.len(),
            self.pages.len(),
            if self.fpu.is_some() {
                ", fpu differs"
            } else {
                ""
            }
        )
    }
}

impl Digest {
    /// Compares `self` (the recorded digest) with `other` (the replayed one) and lists
    /// every register and page that differs or is present on one side only.
    pub fn diff(&self, other: &Digest) -> DigestDiff {
        let mine: BTreeMap<&str, u64> = self.regs.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let theirs: BTreeMap<&str, u64> =
            other.regs.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let mut names: Vec<&str> = mine.keys().chain(theirs.keys()).copied().collect();
        names.sort_unstable();
        names.dedup();
        let regs = names
            .into_iter()
            .filter_map(|n| {
                let (a, b) = (mine.get(n).copied(), theirs.get(n).copied());
                (a != b).then(|| RegDiff {
                    name: n.to_string(),
                    recorded: a,
                    replayed: b,
                })
            })
            .collect();

        let mine: BTreeMap<u64, u64> = self.pages.iter().copied().collect();
        let theirs: BTreeMap<u64, u64> = other.pages.iter().copied().collect();
        let mut gfns: Vec<u64> = mine.keys().chain(theirs.keys()).copied().collect();
        gfns.sort_unstable();
        gfns.dedup();
        let pages = gfns
            .into_iter()
            .filter_map(|g| {
                let (a, b) = (mine.get(&g).copied(), theirs.get(&g).copied());
                (a != b).then_some(PageDiff {
                    gfn: g,
                    recorded: a,
                    replayed: b,
                })
            })
            .collect();

        DigestDiff {
            recorded_pos: self.pos,
            replayed_pos: other.pos,
            regs,
            fpu: (self.fpu_hash != other.fpu_hash).then_some((self.fpu_hash, other.fpu_hash)),
            pages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_arithmetic_saturates_and_intervals_of_zero_never_match() {
        let p = Position(2000);
        assert_eq!(p.since(Position(500)), 1500);
        assert_eq!(Position(500).since(p), 0, "a later position is not behind");
        assert_eq!(p.back(500), Position(1500));
        assert_eq!(p.back(5000), Position::ZERO);
        assert!(p.is_multiple_of(1000));
        assert!(!p.is_multiple_of(3000));
        assert!(
            !p.is_multiple_of(0),
            "digest interval 0: none but the final one"
        );
        assert_eq!(p.next(), Position(2001));
        assert_eq!(p.to_string(), "2000");
    }

    fn digest(pos: u64, rip: u64, pages: Vec<(u64, u64)>) -> Digest {
        Digest {
            pos: Position(pos),
            regs: vec![("rax".into(), 1), ("rip".into(), rip)],
            fpu_hash: 7,
            pages,
        }
    }

    #[test]
    fn equal_digests_have_an_empty_diff() {
        let a = digest(10, 0x1000, vec![(1, 11), (2, 22)]);
        let mut b = a.clone();
        b.pages.reverse();
        b.regs.reverse();
        let d = a.diff(&b);
        assert!(d.is_empty(), "{d}");
    }

    #[test]
    fn diff_names_registers_and_pages() {
        let a = digest(10, 0x1000, vec![(1, 11), (2, 22)]);
        let mut b = digest(10, 0x2000, vec![(1, 11), (2, 23), (3, 33)]);
        b.regs.push(("cr3".into(), 5));
        b.fpu_hash = 8;
        let d = a.diff(&b);
        assert!(!d.is_empty());
        assert_eq!(
            d.regs,
            vec![
                RegDiff {
                    name: "cr3".into(),
                    recorded: None,
                    replayed: Some(5)
                },
                RegDiff {
                    name: "rip".into(),
                    recorded: Some(0x1000),
                    replayed: Some(0x2000)
                },
            ]
        );
        assert_eq!(d.fpu, Some((7, 8)));
        assert_eq!(
            d.pages.iter().map(|p| p.gfn).collect::<Vec<_>>(),
            vec![2, 3]
        );
        let text = d.to_string();
        assert!(text.contains("position 10"), "{text}");
        assert!(text.contains("register rip"), "{text}");
        assert!(text.contains("0x0000000000002000"), "{text}");
        assert!(text.contains("page gfn 0x3"), "{text}");
    }

    #[test]
    fn a_pair_from_another_snapshot_or_from_a_boot_is_refused() {
        let boot = LogHeader::new([1; 32], [2; 32], "console=ttyS0", 128, 1000, "vm1");
        let snap = boot.clone().with_snapshot(Some([9; 32]));
        let other = boot.clone().with_snapshot(Some([8; 32]));
        assert!(snap.check_matches(&snap.clone()).is_ok());
        let e = boot.check_matches(&snap).unwrap_err();
        assert!(
            e.contains("ours starts with a boot, theirs starts from snapshot 0909"),
            "{e}"
        );
        assert!(snap.check_matches(&other).is_err());
        // The header hash names the recording: the snapshot is part of it.
        assert_ne!(snap.sha256(), other.sha256());
        assert_eq!(snap.sha256(), snap.clone().sha256());
    }

    #[test]
    fn header_mismatch_names_the_fields() {
        let a = LogHeader::new([1; 32], [2; 32], "console=ttyS0", 128, 1000, "vm1");
        assert!(a.check_matches(&a.clone()).is_ok());
        let mut b = a.clone();
        b.mem_mib = 256;
        b.kernel_sha256[0] = 9;
        let why = a.check_matches(&b).unwrap_err();
        assert!(why.contains("mem_mib: ours 128, theirs 256"), "{why}");
        assert!(why.contains("kernel_sha256"), "{why}");
        assert!(!why.contains("cmdline"), "{why}");
    }
}
