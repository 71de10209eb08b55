/*
 * twinvm-mmapsync: writes a file through a shared mapping and msync()s it back.
 *
 * Usage: twinvm-mmapsync FILE PAGES ROUNDS
 *
 * Creates FILE of PAGES pages, maps it MAP_SHARED, and for each round writes a
 * pattern derived from the round and the previous contents into every page,
 * msync(MS_SYNC)s it, then re-reads the file with read(2) and folds it into an
 * FNV-1a hash, printed per round ("mmap round N hash HEX"). Exercises shared
 * file mappings, page-cache writeback and dirty-page accounting in the guest.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "twinvm-mmapsync: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: twinvm-mmapsync FILE PAGES ROUNDS\n");
		return 2;
	}
	long pages = atol(argv[2]), rounds = atol(argv[3]);
	if (pages <= 0 || pages > 65536 || rounds <= 0 || rounds > 1000) {
		fprintf(stderr, "twinvm-mmapsync: PAGES 1..65536, ROUNDS 1..1000\n");
		return 2;
	}
	size_t len = (size_t)pages * 4096;
	int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die("open");
	if (ftruncate(fd, (off_t)len) != 0)
		die("ftruncate");
	unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED)
		die("mmap");
	unsigned char *buf = malloc(len);
	if (!buf)
		die("malloc");
	for (long r = 0; r < rounds; r++) {
		for (size_t p = 0; p < len; p += 4096) {
			uint64_t x = m[p] + (uint64_t)r * 2654435761u + p;
			for (size_t i = 0; i < 4096; i += 8) {
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				memcpy(m + p + i, &x, 8);
			}
		}
		if (msync(m, len, MS_SYNC) != 0)
			die("msync");
		if (pread(fd, buf, len, 0) != (ssize_t)len)
			die("pread");
		uint64_t h = 0xcbf29ce484222325ULL;
		for (size_t i = 0; i < len; i++) {
			h ^= buf[i];
			h *= 0x100000001b3ULL;
		}
		printf("mmap round %ld hash %016llx\n", r, (unsigned long long)h);
		fflush(stdout);
	}
	munmap(m, len);
	close(fd);
	return 0;
}
