/*
 * twinvm-memhog: puts the guest under memory pressure.
 *
 * Usage: twinvm-memhog MIB ROUNDS
 *
 * Each round allocates MIB MiB with malloc, writes every page with a pattern
 * that depends on the round, sums a sample of them back, frees it, and prints
 * "memhog round N sum HEX". Run beside files on tmpfs and a small --mem, the
 * kernel has to reclaim page cache and slab while it allocates.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: twinvm-memhog MIB ROUNDS\n");
		return 2;
	}
	long mib = atol(argv[1]), rounds = atol(argv[2]);
	if (mib <= 0 || mib > 4096 || rounds <= 0 || rounds > 1000) {
		fprintf(stderr, "twinvm-memhog: MIB 1..4096, ROUNDS 1..1000\n");
		return 2;
	}
	size_t len = (size_t)mib << 20;
	for (long r = 0; r < rounds; r++) {
		unsigned char *p = malloc(len);
		if (!p) {
			printf("memhog round %ld: allocation of %ld MiB failed\n", r, mib);
			continue;
		}
		for (size_t i = 0; i < len; i += 4096)
			p[i] = (unsigned char)(i / 4096 + r);
		uint64_t sum = 0;
		for (size_t i = 0; i < len; i += 4096 * 7)
			sum = sum * 31 + p[i];
		printf("memhog round %ld sum %016llx\n", r, (unsigned long long)sum);
		fflush(stdout);
		free(p);
	}
	return 0;
}
