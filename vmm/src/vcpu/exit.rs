//! What one `KVM_RUN` returned, reduced to what the run loop acts on (DESIGN.md,
//! Determinism 3): a kick is not a position; every exit a guest instruction causes is one.
//! MMIO accesses are handed to the MMIO bus, as port I/O is to the port bus.

use kvm_ioctls::VcpuExit;

/// A synchronous exit: caused by a guest instruction, so it counts as a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Port I/O (`in`/`out`, string forms included); the data is in the run structure.
    Pio,
    /// An MMIO access, already answered by the bus.
    Mmio,
    /// `hlt`.
    Hlt,
    /// KVM's interrupt-window exit (not requested by twinvm: imprecise on this host).
    Window,
    /// A single-step debug exit.
    Step,
    /// A triple fault or a reset.
    Shutdown,
    /// KVM could not emulate something.
    Internal,
    /// KVM refused to enter the guest (the hardware reason).
    FailEntry(u64),
    /// An exit twinvm does not expect (its debug form).
    Other(String),
}

/// An MMIO access, for the bus to complete.
#[derive(Debug)]
pub enum MmioAccess<'a> {
    /// A read: the device fills `data`.
    Read {
        /// Guest physical address.
        addr: u64,
        /// The bytes read, as many as the access is wide.
        data: &'a mut [u8],
    },
    /// A write of `data`.
    Write {
        /// Guest physical address.
        addr: u64,
        /// The bytes written.
        data: &'a [u8],
    },
}

impl MmioAccess<'_> {
    /// The guest physical address accessed.
    pub fn addr(&self) -> u64 {
        match self {
            MmioAccess::Read { addr, .. } | MmioAccess::Write { addr, .. } => *addr,
        }
    }
}

/// What one `KVM_RUN` returned.
#[derive(Debug)]
pub enum Run<'a> {
    /// A kick (a signal, `KVM_EXIT_INTR`, or `EINTR`/`EAGAIN`): not caused by the guest, so
    /// not a position, and no ordinary delivery point.
    Kick,
    /// An MMIO access: a synchronous exit once the bus has completed it.
    Mmio(MmioAccess<'a>),
    /// Any other synchronous exit.
    Exit(Exit),
}

/// Classifies the result of `KVM_RUN`; an error other than an interruption is returned.
pub fn classify(
    result: Result<VcpuExit<'_>, kvm_ioctls::Error>,
) -> Result<Run<'_>, kvm_ioctls::Error> {
    let exit = match result {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(Run::Kick),
        Err(e) => return Err(e),
    };
    Ok(match exit {
        VcpuExit::Intr => Run::Kick,
        VcpuExit::MmioRead(addr, data) => Run::Mmio(MmioAccess::Read { addr, data }),
        VcpuExit::MmioWrite(addr, data) => Run::Mmio(MmioAccess::Write { addr, data }),
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => Run::Exit(Exit::Pio),
        VcpuExit::Hlt => Run::Exit(Exit::Hlt),
        VcpuExit::IrqWindowOpen => Run::Exit(Exit::Window),
        VcpuExit::Debug(_) => Run::Exit(Exit::Step),
        VcpuExit::Shutdown => Run::Exit(Exit::Shutdown),
        VcpuExit::InternalError => Run::Exit(Exit::Internal),
        VcpuExit::FailEntry(reason, _) => Run::Exit(Exit::FailEntry(reason)),
        other => Run::Exit(Exit::Other(format!("{other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(result: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Option<Exit> {
        match classify(result).unwrap() {
            Run::Exit(e) => Some(e),
            Run::Kick => None,
            Run::Mmio(a) => panic!("unexpected MMIO {a:?}"),
        }
    }

    #[test]
    fn kicks_are_not_positions() {
        assert_eq!(exit(Ok(VcpuExit::Intr)), None);
        assert_eq!(exit(Err(kvm_ioctls::Error::new(libc::EINTR))), None);
        assert_eq!(exit(Err(kvm_ioctls::Error::new(libc::EAGAIN))), None);
        let err = classify(Err(kvm_ioctls::Error::new(libc::EFAULT))).unwrap_err();
        assert_eq!(err.errno(), libc::EFAULT);
    }

    #[test]
    fn guest_instructions_are_synchronous_exits() {
        let mut data = [0u8; 1];
        assert_eq!(exit(Ok(VcpuExit::IoIn(0x3fd, &mut data))), Some(Exit::Pio));
        assert_eq!(exit(Ok(VcpuExit::IoOut(0x3f8, b"x"))), Some(Exit::Pio));
        assert_eq!(exit(Ok(VcpuExit::Hlt)), Some(Exit::Hlt));
        assert_eq!(exit(Ok(VcpuExit::IrqWindowOpen)), Some(Exit::Window));
        assert_eq!(
            exit(Ok(VcpuExit::Debug(Default::default()))),
            Some(Exit::Step)
        );
        assert_eq!(exit(Ok(VcpuExit::Shutdown)), Some(Exit::Shutdown));
        assert_eq!(exit(Ok(VcpuExit::InternalError)), Some(Exit::Internal));
        assert_eq!(
            exit(Ok(VcpuExit::FailEntry(7, 0))),
            Some(Exit::FailEntry(7))
        );
        assert!(
            matches!(exit(Ok(VcpuExit::SystemEvent(1, &[]))), Some(Exit::Other(w)) if w.contains("SystemEvent"))
        );
    }

    #[test]
    fn mmio_goes_to_the_bus_with_its_address_and_width() {
        let mut data = [0u8; 4];
        match classify(Ok(VcpuExit::MmioRead(0xd000_0070, &mut data))).unwrap() {
            Run::Mmio(MmioAccess::Read { addr, data }) => {
                assert_eq!((addr, data.len()), (0xd000_0070, 4));
                data.copy_from_slice(&[1, 2, 3, 4]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            data,
            [1, 2, 3, 4],
            "the device's answer reaches the exit's data"
        );
        let access = match classify(Ok(VcpuExit::MmioWrite(0xd000_0050, &[0, 0]))).unwrap() {
            Run::Mmio(a) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(access.addr(), 0xd000_0050);
        assert!(matches!(access, MmioAccess::Write { data: [0, 0], .. }));
    }
}
