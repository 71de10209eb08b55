//! The page trail: what a divergence looks like, byte for byte.
//!
//! A digest holds only hashes. With `--page-trail DIR`, record and replay also keep, for the
//! last K digests, the bytes of every page the digest hashed, the registers and the FPU
//! state, in `DIR/<position>.json` and `DIR/<position>.pages`. `twinvm diff` compares two
//! trails (a recording's and a replay's, or two replays') digest by digest and prints the
//! differing byte ranges of each page with a guess at what the page is: a page-table page
//! (and whether only the accessed/dirty bits differ), an FXSAVE image, a page of kernel
//! pointers (a stack or slab), or plain data.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors of the page trail.
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    /// A file could not be read or written.
    #[error("page trail {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file is not a trail file.
    #[error("page trail {path}: {msg}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// One digest's state, as the trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Where.
    pub pos: u64,
    /// The guest's privilege level there.
    pub cpl: u8,
    /// Registers by name.
    pub regs: BTreeMap<String, u64>,
    /// FPU/SSE state by name (x87 registers, XMM registers, control and status words), as
    /// lowercase hex of the little-endian bytes.
    pub fpu: BTreeMap<String, String>,
    /// The pages hashed, in the order of `<pos>.pages`.
    pub gfns: Vec<u64>,
    /// Their bytes (not in the JSON file).
    #[serde(skip)]
    pub pages: Vec<Vec<u8>>,
}

const PAGE: usize = 4096;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrailError + '_ {
    move |source| TrailError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The FPU state as named hex strings.
pub fn fpu_fields(f: &kvm_bindings::kvm_fpu) -> BTreeMap<String, String> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut m = BTreeMap::new();
    for (i, r) in f.fpr.iter().enumerate() {
        m.insert(format!("st{i}"), hex(r));
    }
    for (i, r) in f.xmm.iter().enumerate() {
        m.insert(format!("xmm{i:02}"), hex(r));
    }
    m.insert("fcw".into(), hex(&f.fcw.to_le_bytes()));
    m.insert("fsw".into(), hex(&f.fsw.to_le_bytes()));
    m.insert("ftw".into(), hex(&[f.ftwx]));
    m.insert("mxcsr".into(), hex(&f.mxcsr.to_le_bytes()));
    m.insert("fop".into(), hex(&f.last_opcode.to_le_bytes()));
    m.insert("fip".into(), hex(&f.last_ip.to_le_bytes()));
    m.insert("fdp".into(), hex(&f.last_dp.to_le_bytes()));
    m
}

/// Writes snapshots to a directory, keeping the last `keep`.
#[derive(Debug)]
pub struct TrailWriter {
    dir: PathBuf,
    keep: usize,
    from: Option<u64>,
    written: VecDeque<u64>,
}

impl TrailWriter {
    /// Creates (or reuses) `dir`. Without `from`, the trail keeps the last `keep` digests;
    /// with it, the first `keep` digests at or after position `from` (to look at a
    /// divergence another run reported).
    pub fn new(dir: &Path, keep: usize, from: Option<u64>) -> Result<Self, TrailError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(TrailWriter {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
            from,
            written: VecDeque::new(),
        })
    }

    /// Whether a digest at `pos` is to be kept.
    pub fn wants(&self, pos: u64) -> bool {
        match self.from {
            Some(from) => pos >= from && self.written.len() < self.keep,
            None => true,
        }
    }

    /// Writes one snapshot and drops the oldest beyond `keep`.
    pub fn write(&mut self, s: &Snapshot) -> Result<(), TrailError> {
        if !self.wants(s.pos) {
            return Ok(());
        }
        let json = self.dir.join(format!("{:012}.json", s.pos));
        let pages = self.dir.join(format!("{:012}.pages", s.pos));
        let text = serde_json::to_string(s).map_err(|e| TrailError::Bad {
            path: json.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(&json, text).map_err(io(&json))?;
        std::fs::write(&pages, s.pages.concat()).map_err(io(&pages))?;
        self.written.push_back(s.pos);
        while self.written.len() > self.keep {
            if let Some(old) = self.written.pop_front() {
                let _ = std::fs::remove_file(self.dir.join(format!("{old:012}.json")));
                let _ = std::fs::remove_file(self.dir.join(format!("{old:012}.pages")));
            }
        }
        Ok(())
    }
}

/// The positions a trail directory holds, sorted.
pub fn positions(dir: &Path) -> Result<Vec<u64>, TrailError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(p) = name.strip_suffix(".json").and_then(|n| n.parse().ok()) {
            out.push(p);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads the snapshot at `pos` from `dir`.
pub fn read(dir: &Path, pos: u64) -> Result<Snapshot, TrailError> {
    let json = dir.join(format!("{pos:012}.json"));
    let pages = dir.join(format!("{pos:012}.pages"));
    let text = std::fs::read_to_string(&json).map_err(io(&json))?;
    let mut s: Snapshot = serde_json::from_str(&text).map_err(|e| TrailError::Bad {
        path: json.clone(),
        msg: e.to_string(),
    })?;
    let bytes = std::fs::read(&pages).map_err(io(&pages))?;
    if bytes.len() != s.gfns.len() * PAGE {
        return Err(TrailError::Bad {
            path: pages,
            msg: format!(
                "{} bytes for {} pages (truncated or not this snapshot's)",
                bytes.len(),
                s.gfns.len()
            ),
        });
    }
    s.pages = bytes.chunks(PAGE).map(<[u8]>::to_vec).collect();
    Ok(s)
}

/// A guess at what a page holds, from its bytes (`a`, one side's copy) and the words that
/// differ from the other side's (`b`).
pub fn classify(a: &[u8], b: &[u8]) -> String {
    let words = |p: &[u8]| -> Vec<u64> {
        p.chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()
    };
    let (wa, wb) = (words(a), words(b));
    // A page-table page: every entry is 0 or present with a sane frame and no reserved bits.
    let pte_like = |w: &[u64]| {
        let present = w.iter().filter(|&&e| e & 1 == 1).count();
        present > 0
            && w.iter().all(|&e| {
                e == 0
                    || (e & 1 == 1
                        && (e >> 52) & 0x7ff == 0
                        && (e & 0x000f_ffff_ffff_f000) < (1 << 40))
            })
    };
    if pte_like(&wa) && pte_like(&wb) {
        let diff: Vec<u64> = wa
            .iter()
            .zip(&wb)
            .map(|(x, y)| x ^ y)
            .filter(|&d| d != 0)
            .collect();
        let ad_only = !diff.is_empty() && diff.iter().all(|d| d & !0x60 == 0);
        return if ad_only {
            format!(
                "a page-table page: {} entries differ only in the accessed/dirty bits (bits 5/6), set by the MMU",
                diff.len()
            )
        } else {
            format!("a page-table page: {} entries differ", diff.len())
        };
    }
    // An FXSAVE image: 512-byte aligned, MXCSR (offset 24) 0x1f80-like, MXCSR_MASK at 28.
    for base in (0..a.len()).step_by(512) {
        let mx = u32::from_le_bytes(a[base + 24..base + 28].try_into().unwrap_or([0; 4]));
        let mask = u32::from_le_bytes(a[base + 28..base + 32].try_into().unwrap_or([0; 4]));
        let differs = a[base..base + 512] != b[base..base + 512];
        if differs && mx & 0xffff_0000 == 0 && mx & 0x1f80 == 0x1f80 && mask != 0 {
            return format!(
                "holds an FXSAVE image at offset {base:#x} (MXCSR {mx:#x}), whose bytes differ"
            );
        }
    }
    let kernel_ptrs = wa.iter().filter(|&&w| w >> 40 == 0xff_ffff).count();
    if kernel_ptrs >= 16 {
        return format!(
            "{kernel_ptrs} words are kernel addresses: a kernel stack, or slab objects"
        );
    }
    if a.iter().all(|&x| x == 0) || b.iter().all(|&x| x == 0) {
        return "data: zero on one side".into();
    }
    "data".into()
}

/// The differing byte ranges of two pages, as `(start, end)` offsets (merged when closer
/// than 8 bytes).
pub fn ranges(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for i in (0..a.len().min(b.len())).filter(|&i| a[i] != b[i]) {
        match out.last_mut() {
            Some((_, end)) if i <= *end + 8 => *end = i + 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

/// Compares two trails at every position both hold (or only `only`); a readable report,
/// and whether anything differed.
pub fn diff(
    a: &Path,
    b: &Path,
    only: Option<u64>,
    max_ranges: usize,
) -> Result<(String, bool), TrailError> {
    let pa: BTreeSet<u64> = positions(a)?.into_iter().collect();
    let pb: BTreeSet<u64> = positions(b)?.into_iter().collect();
    let common: Vec<u64> = pa
        .intersection(&pb)
        .copied()
        .filter(|p| only.is_none_or(|o| o == *p))
        .collect();
    let mut out = String::new();
    if common.is_empty() {
        return Err(TrailError::Bad {
            path: b.to_path_buf(),
            msg: format!(
                "no digest position in common with {} (A holds {:?}, B holds {:?}): keep the digests around the divergence on both sides with --page-trail-from POS",
                a.display(),
                pa.iter().collect::<Vec<_>>(),
                pb.iter().collect::<Vec<_>>()
            ),
        });
    }
    let mut any = false;
    for pos in common {
        let (sa, sb) = (read(a, pos)?, read(b, pos)?);
        let mut lines = Vec::new();
        if sa.cpl != sb.cpl {
            lines.push(format!("  CPL: A {} B {}", sa.cpl, sb.cpl));
        }
        for (name, va) in &sa.regs {
            match sb.regs.get(name) {
                Some(vb) if vb == va => {}
                vb => lines.push(format!(
                    "  register {name}: A {va:#x} B {}",
                    vb.map_or("(absent)".into(), |v| format!("{v:#x}"))
                )),
            }
        }
        for (name, va) in &sa.fpu {
            if sb.fpu.get(name) != Some(va) {
                lines.push(format!(
                    "  fpu {name}: A {va} B {}",
                    sb.fpu.get(name).map_or("(absent)", String::as_str)
                ));
            }
        }
        let ga: BTreeMap<u64, &Vec<u8>> = sa.gfns.iter().copied().zip(&sa.pages).collect();
        let gb: BTreeMap<u64, &Vec<u8>> = sb.gfns.iter().copied().zip(&sb.pages).collect();
        for gfn in ga.keys().chain(gb.keys()).collect::<BTreeSet<_>>() {
            match (ga.get(gfn), gb.get(gfn)) {
                (Some(x), Some(y)) if x == y => {}
                (Some(x), Some(y)) => {
                    let r = ranges(x, y);
                    lines.push(format!(
                        "  page gfn {gfn:#x} (gpa {:#x}): {} byte range(s) differ; {}",
                        gfn << 12,
                        r.len(),
                        classify(x, y)
                    ));
                    for (s, e) in r.iter().take(max_ranges) {
                        let show = |p: &[u8]| {
                            p[*s..(*e).min(*s + 32)]
                                .iter()
                                .map(|b| format!("{b:02x}"))
                                .collect::<String>()
                        };
                        lines.push(format!(
                            "    +{s:#05x}..{e:#05x}: A {} B {}",
                            show(x),
                            show(y)
                        ));
                    }
                }
                (Some(_), None) => lines.push(format!("  page gfn {gfn:#x}: dirtied in A only")),
                (None, Some(_)) => lines.push(format!("  page gfn {gfn:#x}: dirtied in B only")),
                (None, None) => {}
            }
        }
        if lines.is_empty() {
            let _ = writeln!(out, "@{pos}: equal ({} pages)", sa.gfns.len());
        } else {
            any = true;
            let _ = writeln!(out, "@{pos}: differs");
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        }
    }
    Ok((out, any))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(pos: u64, page: Vec<u8>) -> Snapshot {
        Snapshot {
            pos,
            cpl: 0,
            regs: [("rip".to_string(), 0xffff_ffff_8100_0000u64)].into(),
            fpu: [("mxcsr".to_string(), "801f0000".to_string())].into(),
            gfns: vec![0x17b8],
            pages: vec![page],
        }
    }

    #[test]
    fn a_trail_round_trips_keeps_the_last_k_and_diff_names_the_bytes() {
        let base = std::env::temp_dir().join(format!("twinvm-trail-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        let mut wa = TrailWriter::new(&a, 2, None).unwrap();
        let mut wb = TrailWriter::new(&b, 2, None).unwrap();
        let page = vec![7u8; PAGE];
        let mut other = page.clone();
        other[0x47b] = 1;
        for pos in [1000, 2000, 3000] {
            wa.write(&snap(pos, page.clone())).unwrap();
            wb.write(&snap(
                pos,
                if pos == 3000 {
                    other.clone()
                } else {
                    page.clone()
                },
            ))
            .unwrap();
        }
        assert_eq!(
            positions(&a).unwrap(),
            vec![2000, 3000],
            "the oldest is dropped"
        );
        let s = read(&a, 2000).unwrap();
        assert_eq!(s, snap(2000, page.clone()));
        let (report, differs) = diff(&a, &b, None, 4).unwrap();
        assert!(differs);
        assert!(report.contains("@2000: equal"), "{report}");
        assert!(report.contains("page gfn 0x17b8"), "{report}");
        assert!(report.contains("+0x47b..0x47c: A 07 B 01"), "{report}");
        // A trail started from a position keeps the first K from there.
        let c = base.join("c");
        let mut wc = TrailWriter::new(&c, 1, Some(2000)).unwrap();
        for pos in [1000, 2000, 3000] {
            wc.write(&snap(pos, page.clone())).unwrap();
        }
        assert_eq!(positions(&c).unwrap(), vec![2000]);
        assert!(
            diff(&c, &base.join("a"), Some(1), 4).is_err(),
            "nothing in common"
        );
        // A truncated pages file is an error, not a shorter page.
        let f = a.join(format!("{:012}.pages", 3000));
        std::fs::write(&f, vec![0u8; 100]).unwrap();
        assert!(matches!(read(&a, 3000), Err(TrailError::Bad { .. })));
        let _ = std::fs::remove_dir_all(base);
    }

    #[test]
    fn classify_recognises_page_tables_and_accessed_dirty_bits() {
        let mut a = vec![0u8; PAGE];
        for i in 0..8u64 {
            let pte = ((0x1000 + i) << 12) | 0x63; // present, rw, accessed, dirty
            a[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&pte.to_le_bytes());
        }
        let mut b = a.clone();
        b[0] &= !0x40; // dirty bit clear in one entry
        assert!(
            classify(&a, &b).contains("accessed/dirty"),
            "{}",
            classify(&a, &b)
        );
        b[9] ^= 0x10; // a frame number bit too
        assert!(
            classify(&a, &b).contains("2 entries differ"),
            "{}",
            classify(&a, &b)
        );
        let data = vec![0x41u8; PAGE];
        assert_eq!(classify(&data, &data), "data");
    }
}
