/*
 * twinvm-rdtsc: read the TSC from user space, as a program may, and print it.
 *
 * Usage: twinvm-rdtsc [COUNT]   (default 10)
 *
 * The twinvm guest kernel sets CR4.TSD, so user RDTSC/RDTSCP fault and the
 * kernel emulates them from its clocksource (the VMM's recorded clock):
 * TSC = CLOCK_MONOTONIC in ns x 2 (a nominal 2 GHz).  The first line says
 * whether that is what happened here ("rdtsc emulated": the value lies between
 * 2x CLOCK_MONOTONIC read just before and just after) or whether RDTSC ran
 * natively ("rdtsc native": a host whose virtualization ignores CR4.TSD, as
 * this project's software KVM does).  Then COUNT lines "rdtsc I VALUE" (and
 * RDTSCP), 20 ms apart, and "rdtsc monotonic yes|no".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

static uint64_t rdtscp(uint32_t *aux)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(*aux));
	return (uint64_t)hi << 32 | lo;
}

static uint64_t mono_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv)
{
	int count = argc > 1 ? atoi(argv[1]) : 10;
	uint64_t before = mono_ns(), t = rdtsc(), after = mono_ns(), last = 0;
	int monotonic = 1;
	uint32_t aux;

	if (t >= 2 * before && t <= 2 * after) {
		printf("rdtsc emulated\n");
	} else {
		/* Print no raw host value: it would differ in a replay. */
		printf("rdtsc native\n");
		return 0;
	}
	for (int i = 0; i < count; i++) {
		uint64_t a = rdtsc(), b = rdtscp(&aux);

		printf("rdtsc %d %llu rdtscp %llu aux %u\n", i, (unsigned long long)a,
		       (unsigned long long)b, aux);
		if (a < last || b < a)
			monotonic = 0;
		last = b;
		nanosleep(&(struct timespec){ .tv_nsec = 20000000 }, NULL);
	}
	printf("rdtsc monotonic %s\n", monotonic ? "yes" : "no");
	return 0;
}
