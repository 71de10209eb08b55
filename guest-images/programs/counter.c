/*
 * twinvm-counter: a TCP service for the network and failover tests.
 *
 * Usage: twinvm-counter [PORT]   (default 7000)
 *
 * Listens on 0.0.0.0:PORT and serves any number of clients at once with
 * poll(). For every line received (terminated by '\n') it replies
 * "<n> <line>\n", where n is the total number of lines served since the
 * service started, across all clients. The count lives only in this
 * process, so a client that sees the numbers continue without a gap across a
 * failover knows the backup carried on from the primary's exact state.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXCLIENTS 64
#define LINEMAX 4096

struct client {
	int fd;
	size_t len;
	char buf[LINEMAX];
};

static struct client clients[MAXCLIENTS];
static unsigned long long served;

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(fd, p, n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

static void drop(struct client *c)
{
	close(c->fd);
	c->fd = -1;
	c->len = 0;
}

/* Answer every complete line in the buffer; returns -1 if the client went away. */
static int serve_lines(struct client *c)
{
	char *start = c->buf, *nl;
	while ((nl = memchr(start, '\n', c->len - (size_t)(start - c->buf)))) {
		size_t linelen = (size_t)(nl - start);
		if (linelen && start[linelen - 1] == '\r')
			linelen--;
		char out[LINEMAX + 32];
		int n = snprintf(out, sizeof out, "%llu %.*s\n", ++served, (int)linelen, start);
		if (write_all(c->fd, out, (size_t)n))
			return -1;
		start = nl + 1;
	}
	size_t rest = c->len - (size_t)(start - c->buf);
	memmove(c->buf, start, rest);
	c->len = rest;
	if (c->len == sizeof c->buf) { /* an over-long line: serve it as is */
		char out[LINEMAX + 32];
		int n = snprintf(out, sizeof out, "%llu %.*s\n", ++served, (int)c->len, c->buf);
		c->len = 0;
		if (write_all(c->fd, out, (size_t)n))
			return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 7000;
	if (port <= 0 || port > 65535) {
		fprintf(stderr, "usage: twinvm-counter [PORT]\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);

	int ls = socket(AF_INET, SOCK_STREAM, 0);
	if (ls < 0) {
		perror("twinvm-counter: socket");
		return 1;
	}
	int one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port),
				  .sin_addr.s_addr = htonl(INADDR_ANY) };
	if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 16)) {
		perror("twinvm-counter: bind/listen");
		return 1;
	}
	printf("twinvm-counter: listening on port %d\n", port);
	fflush(stdout);

	for (int i = 0; i < MAXCLIENTS; i++)
		clients[i].fd = -1;

	for (;;) {
		struct pollfd pfd[MAXCLIENTS + 1];
		int idx[MAXCLIENTS + 1];
		int n = 0;
		pfd[n] = (struct pollfd){ .fd = ls, .events = POLLIN };
		idx[n++] = -1;
		for (int i = 0; i < MAXCLIENTS; i++)
			if (clients[i].fd >= 0) {
				pfd[n] = (struct pollfd){ .fd = clients[i].fd, .events = POLLIN };
				idx[n++] = i;
			}
		if (poll(pfd, (nfds_t)n, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("twinvm-counter: poll");
			return 1;
		}
		for (int k = 1; k < n; k++) {
			if (!pfd[k].revents)
				continue;
			struct client *c = &clients[idx[k]];
			ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0) {
				drop(c);
				continue;
			}
			c->len += (size_t)r;
			if (serve_lines(c))
				drop(c);
		}
		if (pfd[0].revents & POLLIN) {
			int fd = accept(ls, NULL, NULL);
			if (fd < 0)
				continue;
			int i;
			for (i = 0; i < MAXCLIENTS && clients[i].fd >= 0; i++)
				;
			if (i == MAXCLIENTS) {
				close(fd); /* full: refuse politely by closing */
				continue;
			}
			clients[i].fd = fd;
			clients[i].len = 0;
		}
	}
}
