//! The host side of the guest's serial console: the terminal mode while the guest runs, and
//! a thread that forwards what the user types.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use crate::machine::{HostEvent, MachineHandle};

/// The terminal settings a [`TerminalGuard`] changed, for [`restore_terminal`].
static SAVED_TERMINAL: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts back the terminal settings a [`TerminalGuard`] changed, if any (at most once): its
/// drop does it, and so does a process that must exit at once without unwinding.
pub fn restore_terminal() {
    let saved = SAVED_TERMINAL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(saved) = saved {
        // SAFETY: restoring settings read from this fd by tcgetattr.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &saved) };
    }
}

/// Puts a terminal on standard input into character-at-a-time mode without local echo (the
/// guest echoes), and restores it when dropped. Signals stay on, so Ctrl-C stops the VMM.
#[derive(Debug)]
pub struct TerminalGuard {
    _private: (),
}

impl TerminalGuard {
    /// Changes the terminal mode if standard input is a terminal; otherwise does nothing.
    pub fn new() -> Self {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return TerminalGuard { _private: () };
        }
        // SAFETY: termios is plain data that tcgetattr fills completely on success.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return TerminalGuard { _private: () };
        }
        *SAVED_TERMINAL.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        // No line editing, no echo, no CR-to-NL translation: keys go to the guest as typed.
        t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
        t.c_iflag &= !(libc::ICRNL | libc::IXON);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: `t` is a valid termios derived from the current settings.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        TerminalGuard { _private: () }
    }
}

impl Default for TerminalGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Starts a thread that reads standard input and hands it to the vCPU loop. The thread ends
/// at end of input; it is detached, since a blocking read cannot be cancelled.
pub fn spawn_stdin_forwarder(handle: MachineHandle) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::hostcpu::unpin_current_thread();
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => {
                        handle.send(HostEvent::InputClosed);
                        break;
                    }
                    Ok(n) => handle.send(HostEvent::Input(buf[..n].to_vec())),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("console input: {e}");
                        handle.send(HostEvent::InputClosed);
                        break;
                    }
                }
            }
        })
        .map(|_| ())
}
