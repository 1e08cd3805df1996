/* A tiny HTTP server for conformance test images (stands in for nginx and httpd, whose tests only need
 * "200 on GET /" from a process of that name). Usage: webserver PORT [PIDFILE|-] [ANY...]. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static const char page[] =
    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 80;
    if (argc > 2 && strcmp(argv[2], "-") != 0) {
        FILE *f = fopen(argv[2], "w");
        if (f) { fprintf(f, "%d\n", (int)getpid()); fclose(f); }
    }
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 64) < 0) { perror("listen"); return 1; }
    /* Named as its program (httpd, nginx): critest looks for the server's name in its log. */
    const char *name = strrchr(argv[0], '/');
    printf("%s: listening on port %d\n", name ? name + 1 : argv[0], port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char buf[4096];
        (void)read(c, buf, sizeof buf);
        (void)write(c, page, sizeof page - 1);
        close(c);
    }
}
