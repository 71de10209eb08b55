//! SIGINT and SIGTERM: the first asks the vCPU loop to stop cleanly; a second one while that
//! stop is still pending ends the process at once, with status 128+N, even if the loop is
//! stuck (a console write that blocks, a guest that never exits to the VMM, a wait that does
//! not look at the stop request).

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::machine::{HostEvent, MachineHandle};

/// Starts the thread that turns SIGINT and SIGTERM into a stop of the machine behind
/// `handle`, and a second one into an immediate exit.
pub fn spawn_stop_on_signals(handle: MachineHandle) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::hostcpu::unpin_current_thread();
            let mut pending = signals.forever();
            let Some(first) = pending.next() else {
                return;
            };
            handle.send(HostEvent::Stop(first));
            if let Some(second) = pending.next() {
                exit_now(second);
            }
        })
        .map(|_| ())
}

/// Starts the thread that turns every SIGUSR1 into a request for a snapshot of the machine
/// behind `handle` (taken at its next delivery point).
pub fn spawn_snapshot_on_sigusr1(handle: MachineHandle) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])?;
    std::thread::Builder::new()
        .name("sigusr1".into())
        .spawn(move || {
            crate::hostcpu::unpin_current_thread();
            for _ in signals.forever() {
                handle.send(HostEvent::Snapshot);
            }
        })
        .map(|_| ())
}

/// The status of a process stopped by signal `sig`.
pub fn signal_status(sig: i32) -> i32 {
    128 + sig
}

/// Ends the process at once after a second stop signal: the terminal mode is put back, and
/// nothing else runs (no destructor, no flush of standard output, whose lock a stuck vCPU
/// thread may hold in a blocked write).
fn exit_now(sig: i32) -> ! {
    let status = signal_status(sig);
    let msg = format!(
        "twinvm: stopped by signal {sig} again while the first stop was pending: exiting at once (status {status})\n"
    );
    // SAFETY: write(2) on the standard error fd with a buffer that lives across the call;
    // it takes no lock that a stuck thread could hold.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    crate::console::restore_terminal();
    // SAFETY: _exit has no preconditions; it ends the process without running atexit
    // handlers or Rust destructors, which is the point here.
    unsafe { libc::_exit(status) }
}
