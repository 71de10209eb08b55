/*
 * twinvm-hostile: a guest workload hostile to record/replay.
 *
 * Usage: twinvm-hostile [ROUNDS]   (default 20)
 *
 * Every round it consumes inputs that are not a function of the guest's own
 * state: CLOCK_REALTIME, CLOCK_MONOTONIC, gettimeofday(), the RTC
 * (/dev/rtc0, RTC_RD_TIME), 16 bytes of /dev/urandom, a sleep of 10-50 ms
 * whose length comes from those random bytes, and a forked child whose exit
 * value depends on them. Everything seen is folded into a running FNV-1a 64
 * hash, printed after each round ("round N hash HEX") and at the end
 * ("hostile done hash HEX"). A faithful replay prints the same lines as the
 * recording; a divergence shows as the first round whose hash differs.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/rtc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t hash = 0xcbf29ce484222325ULL; /* FNV-1a 64 offset basis */

static void fold(const void *p, size_t n)
{
	const unsigned char *b = p;
	while (n--) {
		hash ^= *b++;
		hash *= 0x100000001b3ULL; /* FNV-1a 64 prime */
	}
}

static void die(const char *what)
{
	fprintf(stderr, "twinvm-hostile: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Some computation in the child: iterate a xorshift seeded by the random bytes. */
static int child_work(uint64_t seed)
{
	uint64_t x = seed | 1;
	for (int i = 0; i < 200000; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	return (int)(x % 251);
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 20;
	if (rounds <= 0 || rounds > 100000) {
		fprintf(stderr, "usage: twinvm-hostile [ROUNDS 1..100000]\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);

	int rtc = open("/dev/rtc0", O_RDONLY);
	if (rtc < 0)
		printf("note: /dev/rtc0: %s; RTC reads skipped\n", strerror(errno));
	int urandom = open("/dev/urandom", O_RDONLY);
	if (urandom < 0)
		die("/dev/urandom");

	for (int round = 1; round <= rounds; round++) {
		struct timespec rt, mono;
		struct timeval tv;
		unsigned char rnd[16];

		if (clock_gettime(CLOCK_REALTIME, &rt) || clock_gettime(CLOCK_MONOTONIC, &mono))
			die("clock_gettime");
		if (gettimeofday(&tv, NULL))
			die("gettimeofday");
		fold(&rt, sizeof rt);
		fold(&mono, sizeof mono);
		fold(&tv, sizeof tv);

		if (rtc >= 0) {
			struct rtc_time tm;
			memset(&tm, 0, sizeof tm);
			if (ioctl(rtc, RTC_RD_TIME, &tm) == 0) {
				fold(&tm, sizeof tm);
			} else {
				printf("note: RTC_RD_TIME: %s; RTC reads skipped\n", strerror(errno));
				close(rtc);
				rtc = -1;
			}
		}

		if (read(urandom, rnd, sizeof rnd) != (ssize_t)sizeof rnd)
			die("read /dev/urandom");
		fold(rnd, sizeof rnd);

		/* Sleep 10..50 ms, the length chosen by the random bytes. */
		long ms = 10 + rnd[0] % 41;
		struct timespec nap = { 0, ms * 1000000L };
		while (nanosleep(&nap, &nap) && errno == EINTR)
			;

		uint64_t seed;
		memcpy(&seed, rnd + 8, sizeof seed);
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0)
			_exit(child_work(seed));
		int st;
		if (waitpid(pid, &st, 0) != pid)
			die("waitpid");
		int val = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
		fold(&val, sizeof val);

		printf("round %d hash %016llx\n", round, (unsigned long long)hash);
	}
	printf("hostile done hash %016llx\n", (unsigned long long)hash);
	return 0;
}
