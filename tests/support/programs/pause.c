/* The pause image's /pause: sleeps until a signal ends it. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; exit(0); }

int main(void) {
    signal(SIGTERM, quit);
    signal(SIGINT, quit);
    for (;;) pause();
}
