//! End-to-end: boot the real guest image under `twinvm` on this machine's KVM, reach the
//! shell, type a command over the serial console and read its answer, then power off.

use std::time::Duration;

use twinvm_tests::{Vm, BOOT_TIMEOUT, PROMPT};

#[test]
fn boots_to_shell_and_answers_over_serial() {
    let mut vm = Vm::spawn(&["run", "--mem", "256"]);
    let at = vm.wait_for(PROMPT, 0, BOOT_TIMEOUT);
    // The answer is computed by the guest's shell, so it cannot be the terminal's echo of
    // what was typed.
    vm.type_text("echo twin$((6*7))vm; cat /proc/interrupts\n");
    let at = vm.wait_for("twin42vm", at, Duration::from_secs(120));
    let at = vm.wait_for(PROMPT, at, Duration::from_secs(120));
    let console = vm.console();
    // The serial line and the timer are interrupt driven through the user-space 8259 pair.
    assert!(
        console.contains("XT-PIC"),
        "no XT-PIC interrupts:\n{console}"
    );
    assert!(
        console.contains("ttyS0") || console.contains("serial"),
        "{console}"
    );
    vm.type_text("poweroff -f\n");
    let status = vm.wait_exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    assert!(vm.stderr().contains("guest powered off"), "{}", vm.stderr());
    let _ = at;
}

#[test]
fn sigterm_stops_the_guest_cleanly() {
    let mut vm = Vm::spawn(&["run"]);
    // Wait until the kernel is running (its first console line), then ask the VMM to stop.
    vm.wait_for("Linux version", 0, BOOT_TIMEOUT);
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vm.stderr());
    assert!(
        vm.stderr().contains("stopped by signal 15"),
        "{}",
        vm.stderr()
    );
}

#[test]
fn run_script_powers_off_with_status_zero() {
    let mut vm = Vm::spawn(&["run", "--append", "twinvm.run=hello"]);
    vm.wait_for("hello from twinvm", 0, BOOT_TIMEOUT);
    let status = vm.wait_exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
}
