/*
 * twinvm-clock: print the guest's clocks on one line, for the time tests.
 *
 * Usage: twinvm-clock [LABEL]
 * Prints "clock LABEL mono SECONDS.NS real SECONDS.NS uptime SECONDS.CS"
 * (CLOCK_MONOTONIC, CLOCK_REALTIME, and the first field of /proc/uptime).
 * tests/tests/guest_time.rs compares these against the host's clock.
 */
#include <stdio.h>
#include <time.h>

int main(int argc, char **argv)
{
	struct timespec mono, real;
	char uptime[64] = "?";
	FILE *f;

	clock_gettime(CLOCK_MONOTONIC, &mono);
	clock_gettime(CLOCK_REALTIME, &real);
	f = fopen("/proc/uptime", "r");
	if (f) {
		if (fscanf(f, "%63s", uptime) != 1)
			uptime[0] = '?', uptime[1] = 0;
		fclose(f);
	}
	printf("clock %s mono %lld.%09ld real %lld.%09ld uptime %s\n", argc > 1 ? argv[1] : "-",
	       (long long)mono.tv_sec, mono.tv_nsec, (long long)real.tv_sec, real.tv_nsec,
	       uptime);
	return 0;
}
