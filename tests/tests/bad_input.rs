//! Bad input to `twinvm run` gets one clear error line and a non-zero status, never a panic.

use std::process::Command;

use twinvm_tests::{guest_dir, workspace_bin};

/// Runs twinvm and returns (exit code, stderr).
fn twinvm(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(workspace_bin("twinvm"))
        .args(args)
        .env("TWINVM_GUEST_DIR", guest_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run twinvm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_error_line(code: Option<i32>, stderr: &str, needle: &str) {
    assert_eq!(code, Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("twinvm: error: "), "{stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("twinvm-badinput-{}-{name}", std::process::id()))
}

#[test]
fn missing_kvm_device() {
    let (code, err) = twinvm(&["run", "--kvm", "/nonexistent/kvm"]);
    assert_one_error_line(code, &err, "KVM is not available");
}

#[test]
fn kvm_path_that_is_not_kvm() {
    let (code, err) = twinvm(&["run", "--kvm", "/dev/null"]);
    assert_one_error_line(code, &err, "/dev/null is not a KVM device");
}

#[test]
fn kernel_that_is_not_a_vmlinux() {
    let p = temp("notkernel");
    std::fs::write(&p, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let (code, err) = twinvm(&["run", "--kernel", p.to_str().unwrap()]);
    std::fs::remove_file(&p).unwrap();
    assert_one_error_line(code, &err, "is not an x86-64 vmlinux ELF image");
}

#[test]
fn missing_kernel_file() {
    let (code, err) = twinvm(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_one_error_line(code, &err, "cannot read kernel /nonexistent/vmlinux");
}

#[test]
fn initrd_that_does_not_fit() {
    let p = temp("bigrd");
    let f = std::fs::File::create(&p).unwrap();
    // Sparse: 80 MiB of initrd for a 64 MiB guest.
    f.set_len(80 << 20).unwrap();
    let (code, err) = twinvm(&["run", "--mem", "64", "--initrd", p.to_str().unwrap()]);
    std::fs::remove_file(&p).unwrap();
    assert_one_error_line(code, &err, "does not fit in guest memory");
}

#[test]
fn memory_size_out_of_range() {
    let (code, err) = twinvm(&["run", "--mem", "1"]);
    assert_one_error_line(code, &err, "out of range");
}

#[test]
fn missing_guest_image_dir() {
    let (code, err) = twinvm(&["run", "--guest-dir", "/nonexistent/guest"]);
    assert_one_error_line(code, &err, "guest-images/build.sh");
}
