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
    // A line several times the UART's 64-byte receive FIFO, typed at once: the rest of it
    // reaches the guest only if the UART's interrupt is not starved by the timer's (it was,
    // once guest time ran at host speed: a long command was never read).
    let long = format!("echo {} | wc -c\n", "x".repeat(250));
    vm.type_text(&long);
    let at = vm.wait_for("251\r\n", at, Duration::from_secs(120));
    vm.wait_for(PROMPT, at, Duration::from_secs(120));
    vm.type_text("poweroff -f\n");
    let status = vm.wait_exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr());
    assert!(vm.stderr().contains("guest powered off"), "{}", vm.stderr());
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

/// Kills the process when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_signal_ends_a_vmm_whose_first_stop_is_stuck() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    // Standard output is a one-page pipe that nobody reads: the guest's boot messages fill
    // it, and the vCPU thread blocks in its console write, where no stop request reaches it.
    let mut fds = [0; 2];
    // SAFETY: pipe fills the two-element array on success.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds were just created and are owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a pipe fd we own.
    let size = unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        size > 0,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    let mut child = Command::new(twinvm_tests::workspace_bin("twinvm"))
        .arg("run")
        .env("TWINVM_GUEST_DIR", twinvm_tests::guest_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn twinvm");
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let mut vm = KillOnDrop(child);
    let pid = vm.0.id() as libc::pid_t;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(read_end.as_raw_fd(), libc::FIONREAD, &mut queued) };
        if queued as usize >= size as usize {
            break;
        }
        assert!(vm.0.try_wait().unwrap().is_none(), "twinvm ended early");
        assert!(Instant::now() < deadline, "the console pipe never filled");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill sends a signal to the child we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        vm.0.try_wait().unwrap().is_none(),
        "the first stop was expected to be stuck behind the blocked console write"
    );
    let asked = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = loop {
        if let Some(st) = vm.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "a second SIGTERM did not end the stuck VMM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let err = err.join().unwrap();
    assert!(
        err.contains("again while the first stop was pending"),
        "{err}"
    );
    drop(read_end);
}
