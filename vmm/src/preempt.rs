//! The preemption watchdog (DESIGN.md, Determinism 4): a guest that computes without exits
//! (a user program's loop runs natively here) would otherwise never take an interrupt. A
//! thread watches the vCPU's runs and kicks it out of `KVM_RUN` once one run has lasted a
//! quantum; the vCPU loop then decides whether that is a preemption point (something is due
//! and the guest can take an interrupt there).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::vstate::VcpuKick;

#[derive(Debug, Default)]
struct Shared {
    /// Odd while the vCPU is inside `KVM_RUN`; one more at every entry and every return.
    runs: AtomicU64,
    quit: AtomicBool,
}

/// Kicks the vCPU when one run outlasts the quantum. Stops its thread when dropped.
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<Shared>,
    quantum: Duration,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the watchdog thread for the vCPU that `kick` reaches.
    pub fn start(kick: VcpuKick, quantum: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("twinvm-preempt".into())
            .spawn(move || {
                crate::hostcpu::unpin_current_thread();
                let mut last = 0;
                while !s.quit.load(Ordering::Acquire) {
                    std::thread::park_timeout(quantum);
                    let now = s.runs.load(Ordering::Acquire);
                    // The same run as a quantum ago, still going: kick it.
                    if now % 2 == 1 && now == last {
                        kick.kick();
                    }
                    last = now;
                }
            })?;
        Ok(Watchdog {
            shared,
            quantum,
            thread: Some(thread),
        })
    }

    /// The quantum.
    pub fn quantum(&self) -> Duration {
        self.quantum
    }

    /// The vCPU is about to enter `KVM_RUN`.
    pub fn entering(&self) {
        self.shared.runs.fetch_add(1, Ordering::AcqRel);
    }

    /// The vCPU returned from `KVM_RUN`.
    pub fn left(&self) {
        self.shared.runs.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
