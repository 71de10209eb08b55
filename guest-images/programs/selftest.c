/*
 * twinvm-selftest: checks, inside the guest, the system-call behaviour that
 * kernel patch 0001 (the SYSCALL fix-up) has to get right on this host.
 *
 * Usage: twinvm-selftest   prints "ok NAME" / "FAIL NAME: why" per check,
 *                          then "selftest passed" (exit 0) or
 *                          "selftest failed" (exit 1).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;

static void check(int ok, const char *name, const char *why)
{
	if (ok)
		printf("ok %s\n", name);
	else {
		printf("FAIL %s: %s\n", name, why);
		failures++;
	}
}

/* Raw SYSCALL with CF set before it: the flags come back from R11. */
static long syscall_keeps_carry(long nr, int *carry)
{
	long ret;
	unsigned char c;
	asm volatile("stc\n\tsyscall\n\tsetc %1"
		     : "=a"(ret), "=q"(c)
		     : "0"(nr)
		     : "rcx", "r11", "memory", "cc");
	*carry = c;
	return ret;
}

/* Callee-saved registers survive a system call. */
static int syscall_keeps_registers(void)
{
	unsigned long out[6];
	asm volatile("push %%rbx\n\tpush %%rbp\n\tpush %%r12\n\tpush %%r13\n\tpush %%r14\n\tpush %%r15\n\t"
		     "mov $0x1111, %%rbx\n\tmov $0x2222, %%rbp\n\tmov $0x3333, %%r12\n\t"
		     "mov $0x4444, %%r13\n\tmov $0x5555, %%r14\n\tmov $0x6666, %%r15\n\t"
		     "mov %[nr], %%eax\n\tsyscall\n\t"
		     "mov %%rbx, 0(%[o])\n\tmov %%rbp, 8(%[o])\n\tmov %%r12, 16(%[o])\n\t"
		     "mov %%r13, 24(%[o])\n\tmov %%r14, 32(%[o])\n\tmov %%r15, 40(%[o])\n\t"
		     "pop %%r15\n\tpop %%r14\n\tpop %%r13\n\tpop %%r12\n\tpop %%rbp\n\tpop %%rbx"
		     :
		     : [nr] "i"(SYS_getppid), [o] "D"(out)
		     : "rax", "rcx", "r11", "memory", "cc");
	return out[0] == 0x1111 && out[1] == 0x2222 && out[2] == 0x3333 &&
	       out[3] == 0x4444 && out[4] == 0x5555 && out[5] == 0x6666;
}

static volatile sig_atomic_t ticks;
static void on_alarm(int sig)
{
	(void)sig;
	ticks++;
}

/* A read blocked on a pipe, interrupted by SIGALRM: restarted or EINTR. */
static void interrupted_read(int restart)
{
	int p[2];
	if (pipe(p)) {
		check(0, "pipe", strerror(errno));
		return;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sa.sa_flags = restart ? SA_RESTART : 0;
	sigaction(SIGALRM, &sa, NULL);
	ticks = 0;

	pid_t pid = fork();
	if (pid == 0) {
		close(p[0]);
		usleep(300000);
		if (write(p[1], "x", 1) != 1)
			_exit(1);
		_exit(0);
	}
	close(p[1]);
	struct itimerval it = { { 0, 0 }, { 0, 50000 } }; /* one SIGALRM after 50 ms */
	setitimer(ITIMER_REAL, &it, NULL);
	char c = 0;
	ssize_t n = read(p[0], &c, 1);
	int err = errno;
	waitpid(pid, NULL, 0);
	close(p[0]);
	if (restart)
		check(n == 1 && c == 'x' && ticks == 1, "SA_RESTART read restarted after a signal",
		      n == 1 ? "handler did not run" : strerror(err));
	else
		check(n == -1 && err == EINTR && ticks == 1, "read without SA_RESTART returns EINTR",
		      "wrong result");
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	setvbuf(stdout, NULL, _IOLBF, 0);

	check(getpid() == syscall(SYS_getpid), "getpid", "libc and raw syscall differ");

	errno = 0;
	long r = syscall(4242);
	check(r == -1 && errno == ENOSYS, "unknown syscall number gives ENOSYS", strerror(errno));

	int carry = 0;
	long ppid = syscall_keeps_carry(SYS_getppid, &carry);
	check(ppid == getppid() && carry, "RFLAGS (CF) preserved across SYSCALL", "CF lost");

	check(syscall_keeps_registers(), "callee-saved registers preserved", "a register changed");

	interrupted_read(1);
	interrupted_read(0);

	pid_t pid = fork();
	if (pid == 0) {
		execl("/bin/true", "true", (char *)NULL);
		_exit(127);
	}
	int st = 0;
	waitpid(pid, &st, 0);
	check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "fork + exec + wait", "child failed");

	printf("selftest %s\n", failures ? "failed" : "passed");
	return failures ? 1 : 0;
}
