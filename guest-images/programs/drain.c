/*
 * twinvm-drain: wait until the console has transmitted everything queued for
 * it (tcdrain), so that /init's last lines are not lost when it powers off.
 *
 * Usage: twinvm-drain [DEVICE]   (default /dev/console)
 *
 * Why: twinvm delivers interrupts only at exits where the guest can take them,
 * so the serial driver's transmit-empty interrupt can lag behind a process
 * that prints and exits at once; `poweroff -f` halts the CPU without flushing
 * the tty, and whatever is still in its buffer never reaches the console.
 */
#include <fcntl.h>
#include <stdio.h>
#include <termios.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *dev = argc > 1 ? argv[1] : "/dev/console";
	int fd = open(dev, O_WRONLY | O_NOCTTY);

	if (fd < 0) {
		perror(dev);
		return 1;
	}
	if (tcdrain(fd) != 0) {
		perror("tcdrain");
		close(fd);
		return 1;
	}
	close(fd);
	return 0;
}
