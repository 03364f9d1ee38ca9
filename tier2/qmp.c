/* A minimal QMP client for the Tier 2 test host, which has no Python:
 *   qmp SOCKET COMMAND-JSON...
 * Connects, negotiates, sends each command and prints its reply (events
 * skipped), one line each. Exits 1 if a reply is an error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static FILE *in;

/* The next line that is not an event. */
static int reply(char *buf, size_t len) {
    while (fgets(buf, (int)len, in)) {
        if (!strstr(buf, "\"event\"")) return 0;
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: qmp SOCKET COMMAND-JSON...\n");
        return 2;
    }
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        perror(argv[1]);
        return 1;
    }
    in = fdopen(s, "r");
    static char buf[1 << 20];
    if (!fgets(buf, sizeof buf, in)) return 1;    /* the greeting */
    const char *caps = "{\"execute\":\"qmp_capabilities\"}\n";
    if (write(s, caps, strlen(caps)) < 0 || reply(buf, sizeof buf)) return 1;
    int rc = 0;
    for (int i = 2; i < argc; i++) {
        if (write(s, argv[i], strlen(argv[i])) < 0 || write(s, "\n", 1) < 0) return 1;
        if (reply(buf, sizeof buf)) return 1;
        fputs(buf, stdout);
        if (strstr(buf, "\"error\"")) rc = 1;
    }
    return rc;
}
