//! Single-step delivery (DESIGN.md, Determinism 4): when an interrupt is pending and the
//! guest cannot take it at a synchronous exit (interrupts off, or the `sti` shadow), the VMM
//! steps the guest one instruction at a time, each step a counted exit, to the first
//! instruction at which it can, and injects there.
//!
//! This module holds the policy, free of KVM: which instructions may be stepped, the step
//! budget of one delivery, and the trap flag that a stepped `pushf` leaves on the guest's
//! stack. The machine reads the guest's privilege level, the instruction bytes at RIP and
//! the frame an `iret` would pop, asks [`Stepper::decide`], and turns the answer into
//! `KVM_SET_GUEST_DEBUG` and `KVM_INTERRUPT`. Everything here is a function of guest state,
//! so the recording and its replay step the same instructions.

/// Most single steps taken towards one interrupt delivery. A step costs about as much as 40
/// instructions of guest kernel code on this project's hosts, so the budget bounds what one
/// delivery can cost (about 10 ms); past it, the interrupt waits for the next exit at which
/// the guest can take it.
pub const MAX_STEPS: u64 = 500;

/// RFLAGS.TF, the trap flag single-stepping sets.
pub const RFLAGS_TF: u64 = 1 << 8;

/// What the first bytes at RIP are, as far as stepping cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    /// `hlt`: an exit of its own, with interrupts enabled, so never stepped.
    Hlt,
    /// `sysret`/`sysretq`: always returns to user mode.
    Sysret,
    /// `iret`/`iretq`: returns to user mode if the CS it pops has a non-zero RPL.
    Iret,
    /// `pushf` (with an operand-size or REX prefix): pushes RFLAGS, TF included.
    Pushf,
    /// Anything else.
    Other,
}

impl Insn {
    /// Classifies the first three bytes of an instruction.
    pub fn classify(bytes: &[u8; 3]) -> Insn {
        match bytes {
            [0xf4, ..] => Insn::Hlt,
            [0x0f, 0x07, _] | [0x48, 0x0f, 0x07] => Insn::Sysret,
            [0xcf, ..] | [0x48, 0xcf, _] => Insn::Iret,
            [0x9c, ..] | [0x66 | 0x48, 0x9c, _] => Insn::Pushf,
            _ => Insn::Other,
        }
    }
}

/// Why the guest is not stepped towards a pending interrupt; the interrupt then waits for
/// the next exit at which the guest can take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStep {
    /// The budget of this delivery is spent.
    BudgetSpent,
    /// The guest runs user code: this host delivers the step's #DB to the guest at CPL 3.
    UserMode,
    /// The bytes at RIP could not be read (not mapped).
    Unreadable,
    /// A `hlt` exits by itself with interrupts enabled (see [`Stepper::decide`]).
    Hlt,
    /// The instruction returns to user mode (`sysret`, or an `iret` to CPL 3).
    ReturnsToUser,
}

/// What the guest looks like where a step would start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    /// The current privilege level (CS.RPL).
    pub cpl: u8,
    /// The first bytes at RIP, if they could be read.
    pub insn: Option<[u8; 3]>,
}

/// The stepping state of the one vCPU: whether KVM single-steps it, the budget left for the
/// delivery under way, and whether the step under way is of a `pushf`. All three are part
/// of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stepper {
    on: bool,
    budget: u64,
    pushf: bool,
}

impl Default for Stepper {
    fn default() -> Self {
        Stepper::new()
    }
}

impl Stepper {
    /// Not stepping, a full budget.
    pub fn new() -> Stepper {
        Stepper {
            on: false,
            budget: MAX_STEPS,
            pushf: false,
        }
    }

    /// The state kept in a snapshot: (stepping, budget left, stepping a `pushf`).
    pub fn state(&self) -> (bool, u64, bool) {
        (self.on, self.budget, self.pushf)
    }

    /// The stepper of a snapshot's budget and `pushf` state, not stepping yet: the machine
    /// then sets KVM's single-step flag as the snapshot says, through [`Stepper::set_on`].
    pub fn restored(budget: u64, pushf: bool) -> Stepper {
        Stepper {
            on: false,
            budget,
            pushf,
        }
    }

    /// Steps left in the delivery under way.
    pub fn budget_left(&self) -> u64 {
        self.budget
    }

    /// Whether KVM single-steps the guest.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Records that KVM's single-step flag is now `on`; returns whether that changed it
    /// (then the machine must tell KVM), and whether a new stepping episode began.
    pub fn set_on(&mut self, on: bool) -> (bool, bool) {
        if on == self.on {
            return (false, false);
        }
        self.on = on;
        (true, on)
    }

    /// Whether to step the guest towards a pending interrupt that it cannot take here.
    /// `iret_to_user` is asked only for an `iret` in kernel mode: whether the CS it would
    /// pop has a non-zero RPL (the machine reads the frame at RSP + 8; an unreadable frame
    /// counts as user).
    ///
    /// A `hlt` (Linux's idle: `sti; hlt`, stepped to within the `sti` shadow) exits by
    /// itself with interrupts enabled, and the interrupt is injected at that exit. Stepping
    /// it instead was seen to leave a stale exit on this project's software KVM: after the
    /// injection at the HLT exit, the next `KVM_RUN` returned after one instruction of the
    /// interrupt handler, reporting HLT again with interrupts off (read as a power-off).
    pub fn decide<E>(
        &mut self,
        at: At,
        iret_to_user: impl FnOnce() -> Result<bool, E>,
    ) -> Result<Result<(), NoStep>, E> {
        self.pushf = false;
        if self.budget == 0 {
            return Ok(Err(NoStep::BudgetSpent));
        }
        if at.cpl & 3 != 0 {
            return Ok(Err(NoStep::UserMode));
        }
        let Some(bytes) = at.insn else {
            return Ok(Err(NoStep::Unreadable));
        };
        match Insn::classify(&bytes) {
            Insn::Hlt => Ok(Err(NoStep::Hlt)),
            Insn::Sysret => Ok(Err(NoStep::ReturnsToUser)),
            Insn::Iret if iret_to_user()? => Ok(Err(NoStep::ReturnsToUser)),
            Insn::Pushf => {
                self.pushf = true;
                Ok(Ok(()))
            }
            Insn::Iret | Insn::Other => Ok(Ok(())),
        }
    }

    /// A single-step exit: one step of the budget spent. Returns whether the instruction
    /// stepped was a `pushf`, whose pushed RFLAGS then holds TF (see [`scrub_tf`]).
    pub fn stepped(&mut self) -> bool {
        self.budget = self.budget.saturating_sub(1);
        std::mem::take(&mut self.pushf)
    }

    /// An interrupt was injected: the budget is full again for the next delivery. Returns
    /// how many steps this delivery took.
    pub fn injected(&mut self) -> u64 {
        let steps = MAX_STEPS - self.budget;
        self.budget = MAX_STEPS;
        steps
    }
}

/// The RFLAGS image a stepped `pushf` left on the guest's stack, with TF cleared, if TF was
/// set: KVM sets TF to step, and the guest would otherwise restore it later with `popf` and
/// take a debug trap of its own.
pub fn scrub_tf(pushed: u64) -> Option<u64> {
    (pushed & RFLAGS_TF != 0).then_some(pushed & !RFLAGS_TF)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte fixtures as they appear in the guest kernel (x86-64 encodings).
    const IRETQ: [u8; 3] = [0x48, 0xcf, 0x90];
    const IRET: [u8; 3] = [0xcf, 0x00, 0x00];
    const SYSRETQ: [u8; 3] = [0x48, 0x0f, 0x07];
    const SYSRETL: [u8; 3] = [0x0f, 0x07, 0x90];
    const SYSCALL: [u8; 3] = [0x0f, 0x05, 0x90];
    const PUSHF_POP_RAX: [u8; 3] = [0x9c, 0x58, 0x90]; // pushfq; pop %rax (native_save_fl)
    const PUSHFW: [u8; 3] = [0x66, 0x9c, 0x90];
    const POPF: [u8; 3] = [0x9d, 0x90, 0x90];
    const HLT: [u8; 3] = [0xf4, 0xc3, 0x90]; // hlt; ret (native_halt)
    const STI_HLT: [u8; 3] = [0xfb, 0xf4, 0xc3]; // sti; hlt; ret (native_safe_halt)
    const MOV: [u8; 3] = [0x48, 0x89, 0xe5]; // mov %rsp,%rbp

    fn kernel(insn: [u8; 3]) -> At {
        At {
            cpl: 0,
            insn: Some(insn),
        }
    }

    fn never() -> Result<bool, ()> {
        panic!("the iret frame is read only for an iret")
    }

    #[test]
    fn instruction_classes() {
        assert_eq!(Insn::classify(&IRETQ), Insn::Iret);
        assert_eq!(Insn::classify(&IRET), Insn::Iret);
        assert_eq!(Insn::classify(&SYSRETQ), Insn::Sysret);
        assert_eq!(Insn::classify(&SYSRETL), Insn::Sysret);
        assert_eq!(
            Insn::classify(&SYSCALL),
            Insn::Other,
            "syscall is not sysret"
        );
        assert_eq!(Insn::classify(&PUSHF_POP_RAX), Insn::Pushf);
        assert_eq!(Insn::classify(&PUSHFW), Insn::Pushf);
        assert_eq!(Insn::classify(&[0x48, 0x9c, 0x90]), Insn::Pushf);
        assert_eq!(Insn::classify(&POPF), Insn::Other, "popf is not pushf");
        assert_eq!(Insn::classify(&HLT), Insn::Hlt);
        assert_eq!(Insn::classify(&STI_HLT), Insn::Other, "sti is not hlt");
        assert_eq!(Insn::classify(&MOV), Insn::Other);
    }

    #[test]
    fn kernel_code_is_stepped_user_code_and_returns_to_user_are_not() {
        let mut s = Stepper::new();
        assert_eq!(s.decide(kernel(MOV), never), Ok(Ok(())));
        assert_eq!(s.decide(kernel(STI_HLT), never), Ok(Ok(())));
        assert_eq!(s.decide(kernel(HLT), never), Ok(Err(NoStep::Hlt)));
        assert_eq!(
            s.decide(kernel(SYSRETQ), never),
            Ok(Err(NoStep::ReturnsToUser))
        );
        assert_eq!(
            s.decide(kernel(IRETQ), || Ok::<_, ()>(true)),
            Ok(Err(NoStep::ReturnsToUser))
        );
        assert_eq!(s.decide(kernel(IRETQ), || Ok::<_, ()>(false)), Ok(Ok(())));
        let user = At {
            cpl: 3,
            insn: Some(MOV),
        };
        assert_eq!(s.decide(user, never), Ok(Err(NoStep::UserMode)));
        let unmapped = At { cpl: 0, insn: None };
        assert_eq!(s.decide(unmapped, never), Ok(Err(NoStep::Unreadable)));
        // Reading the iret frame can fail: that is the machine's error, passed through.
        assert_eq!(s.decide(kernel(IRET), || Err("no regs")), Err("no regs"));
    }

    #[test]
    fn only_a_stepped_pushf_asks_for_the_scrub() {
        let mut s = Stepper::new();
        assert_eq!(s.decide(kernel(PUSHF_POP_RAX), never), Ok(Ok(())));
        assert!(s.stepped(), "the step was a pushf");
        assert!(!s.stepped(), "asked once per pushf");
        assert_eq!(s.decide(kernel(MOV), never), Ok(Ok(())));
        assert!(!s.stepped());
        // A pushf that was decided on but not stepped (the interrupt was taken instead)
        // does not leak into the next decision.
        assert_eq!(s.decide(kernel(PUSHFW), never), Ok(Ok(())));
        assert_eq!(s.decide(kernel(MOV), never), Ok(Ok(())));
        assert!(!s.stepped());
    }

    #[test]
    fn the_budget_bounds_one_delivery_and_refills_at_injection() {
        let mut s = Stepper::new();
        for _ in 0..MAX_STEPS {
            assert_eq!(s.decide(kernel(MOV), never), Ok(Ok(())));
            s.stepped();
        }
        assert_eq!(s.decide(kernel(MOV), never), Ok(Err(NoStep::BudgetSpent)));
        assert_eq!(s.injected(), MAX_STEPS);
        assert_eq!(s.decide(kernel(MOV), never), Ok(Ok(())));
        s.stepped();
        s.stepped();
        assert_eq!(s.injected(), 2);
        assert_eq!(s.injected(), 0, "an injection without steps");
    }

    #[test]
    fn on_off_changes_are_reported_once() {
        let mut s = Stepper::new();
        assert_eq!(s.set_on(false), (false, false));
        assert_eq!(s.set_on(true), (true, true), "a new episode");
        assert_eq!(s.set_on(true), (false, false));
        assert!(s.is_on());
        assert_eq!(s.set_on(false), (true, false));
    }

    #[test]
    fn a_restored_stepper_keeps_its_budget_and_lets_the_machine_set_kvm() {
        let mut s = Stepper::restored(123, true);
        assert!(!s.is_on(), "KVM's flag is set by the machine after restore");
        assert_eq!(s.set_on(true), (true, true));
        assert_eq!(s.state(), (true, 123, true));
        assert!(
            s.stepped(),
            "the pushf stepped before the snapshot is scrubbed after it"
        );
        assert_eq!(s.injected(), MAX_STEPS - 122);
    }

    #[test]
    fn the_pushed_trap_flag_is_cleared_and_nothing_else() {
        assert_eq!(scrub_tf(0x346), Some(0x246));
        assert_eq!(scrub_tf(0x246), None);
        assert_eq!(scrub_tf(u64::MAX), Some(!RFLAGS_TF));
    }
}
