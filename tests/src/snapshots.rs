//! A booted guest at its shell prompt, as a snapshot shared by the tests that only need one
//! (DESIGN.md, "State transfer": tests start from a booted guest).
//!
//! The snapshot is cached by what it depends on: the guest image's hashes (kernel, initramfs,
//! command line), the VMM's snapshot format version and the memory size. The first test that
//! needs it boots a guest to the prompt and snapshots it (about a minute here); every later
//! one, in this process or another, restores it in well under a second. A file lock keeps two
//! test threads (or two test binaries) from both building it.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::{guest_dir, Vm, BOOT_TIMEOUT, PROMPT};

/// Guest memory of the cached snapshot, in MiB (`twinvm`'s default).
pub const PROMPT_MEM_MIB: u64 = 256;

/// The cache directory: `$TWINVM_SNAPSHOT_CACHE`, or `snapshots` under `$XDG_CACHE_HOME/twinvm`
/// (`~/.cache/twinvm`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TWINVM_SNAPSHOT_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("twinvm/snapshots")
}

/// The cache key of the prompt snapshot of the guest image in `guest_dir()`.
fn prompt_key() -> String {
    let dir = guest_dir();
    let mut ids = Vec::new();
    for name in ["vmlinux", "initramfs.cpio", "cmdline"] {
        let h = vmm::snapshot::sha256_file(&dir.join(name))
            .unwrap_or_else(|e| panic!("hashing the guest image: {e}"));
        ids.extend_from_slice(&h);
    }
    let key = vmm::machine::hash_bytes(&ids);
    format!(
        "prompt-{key:016x}-v{}-{PROMPT_MEM_MIB}m.snap",
        vmm::snapshot::SNAPSHOT_VERSION
    )
}

/// An exclusive lock on `path` (flock), released when dropped.
struct FileLock(std::fs::File);

impl FileLock {
    fn take(path: &std::path::Path) -> FileLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        // SAFETY: flock(2) on a descriptor this File owns for the call's duration.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            r,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        FileLock(f)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as in `take`; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Boots the guest to its prompt and snapshots it into `path`.
fn build_prompt_snapshot(path: &std::path::Path) {
    let tmp = path.with_extension(format!("building-{}", std::process::id()));
    let t0 = std::time::Instant::now();
    let mut vm = Vm::spawn(&[
        "run",
        "--mem",
        &PROMPT_MEM_MIB.to_string(),
        "--snapshot-on-sigusr1",
        tmp.to_str().unwrap(),
    ]);
    vm.wait_for(PROMPT, 0, BOOT_TIMEOUT);
    vm.signal(libc::SIGUSR1);
    let line = vm.wait_for_stderr("twinvm: snapshot at position ", Duration::from_secs(120));
    vm.signal(libc::SIGTERM);
    vm.wait_exit(Duration::from_secs(60));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("moving the snapshot into {}: {e}", path.display()));
    let _ = writeln!(
        std::io::stderr(),
        "twinvm-tests: built the prompt snapshot {} in {:.1} s (position {line})",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
}

/// The snapshot of a guest booted to its shell prompt (`twinvm# `), with `--mem 256` and no
/// NIC, built on first use. Restore it with `twinvm run|record --restore PATH`: the guest
/// waits at the prompt for typed input (the prompt itself is not printed again).
pub fn prompt_snapshot() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = cache_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join(prompt_key());
        let _lock = FileLock::take(&path.with_extension("lock"));
        if !path.exists() {
            build_prompt_snapshot(&path);
        }
        path
    })
    .clone()
}
