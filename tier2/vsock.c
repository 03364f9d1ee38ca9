/* The Tier 2 vsock test program, static, for both ends: in L2 on AF_VSOCK,
 * in L1 on the UNIX sockets moat relays to (or AF_VSOCK, under QEMU's
 * vhost-vsock in the benchmark).
 *
 *   vsockt serve ADDR BYTES     accept one connection: receive BYTES, then send BYTES
 *   vsockt connect ADDR BYTES   connect: send BYTES, then receive BYTES
 *   vsockt rtt ADDR N           connect: N one-byte round trips
 *   vsockt echo ADDR            accept connections, echo each until EOF (stream)
 *   vsockt seq-echo ADDR        the same on SEQPACKET, message by message
 *   vsockt seq ADDR             connect SEQPACKET: messages of several sizes,
 *                               each must come back whole
 * ADDR: vsock:CID:PORT, unix:PATH, or unix-connect:PATH:PORT (moat's
 * listener, with Firecracker's "CONNECT PORT\n" / "OK n\n" exchange).
 * Each transfer prints "sent|recv BYTES fnv HASH secs S"; the data is a
 * fixed pseudo-random stream, so both ends print the same hash. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "vsockt: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* Make the socket for ADDR; fill the address. */
static int sock_for(const char *addr, int type, struct sockaddr_storage *sa, socklen_t *len, unsigned *cport) {
    memset(sa, 0, sizeof *sa);
    *cport = 0;
    if (!strncmp(addr, "vsock:", 6)) {
        struct sockaddr_vm *v = (struct sockaddr_vm *)sa;
        v->svm_family = AF_VSOCK;
        v->svm_cid = strtoul(addr + 6, 0, 0);
        v->svm_port = strtoul(strchr(addr + 6, ':') + 1, 0, 0);
        *len = sizeof *v;
        return socket(AF_VSOCK, type, 0);
    }
    struct sockaddr_un *u = (struct sockaddr_un *)sa;
    u->sun_family = AF_UNIX;
    const char *p = strchr(addr, ':') + 1;
    if (!strncmp(addr, "unix-connect:", 13)) {
        const char *c = strrchr(p, ':');
        memcpy(u->sun_path, p, c - p);
        *cport = strtoul(c + 1, 0, 0);
    } else {
        strncpy(u->sun_path, p, sizeof u->sun_path - 1);
    }
    *len = sizeof *u;
    return socket(AF_UNIX, type, 0);
}

static int dial(const char *addr, int type) {
    struct sockaddr_storage sa;
    socklen_t len;
    unsigned cport;
    int s = sock_for(addr, type, &sa, &len, &cport);
    if (s < 0) die("socket");
    for (int i = 0;; i++) {
        if (connect(s, (struct sockaddr *)&sa, len) == 0) break;
        if (i == 50) die("connect");
        usleep(100000);
    }
    if (cport) {
        char line[64];
        int n = snprintf(line, sizeof line, "CONNECT %u\n", cport);
        if (write(s, line, n) != n) die("CONNECT");
        int got = 0;
        while (got < (int)sizeof line - 1) {
            if (read(s, line + got, 1) != 1) die("OK line");
            if (line[got++] == '\n') break;
        }
        line[got] = 0;
        if (strncmp(line, "OK ", 3)) { fprintf(stderr, "vsockt: answer %s\n", line); exit(1); }
    }
    return s;
}

static int listen_on(const char *addr, int type) {
    struct sockaddr_storage sa;
    socklen_t len;
    unsigned cport;
    int s = sock_for(addr, type, &sa, &len, &cport);
    if (s < 0) die("socket");
    if (sa.ss_family == AF_UNIX) unlink(((struct sockaddr_un *)&sa)->sun_path);
    if (bind(s, (struct sockaddr *)&sa, len) || listen(s, 16)) die("bind/listen");
    return s;
}

static uint64_t rng_state;
static void fill(unsigned char *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
        b[i] = rng_state >> 56;
    }
}

static uint32_t fnv(uint32_t h, const unsigned char *b, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 16777619u;
    return h;
}

static unsigned char buf[1 << 20];

static void send_all(int s, size_t total) {
    uint32_t h = 2166136261u;
    double t0 = now();
    rng_state = 42;
    for (size_t done = 0; done < total;) {
        size_t n = total - done < 65536 ? total - done : 65536;
        fill(buf, n);
        h = fnv(h, buf, n);
        for (size_t off = 0; off < n;) {
            ssize_t w = write(s, buf + off, n - off);
            if (w <= 0) die("write");
            off += w;
        }
        done += n;
    }
    printf("sent %zu fnv %08x secs %.3f\n", total, h, now() - t0);
    fflush(stdout);
}

static void recv_all(int s, size_t total) {
    uint32_t h = 2166136261u;
    double t0 = now();
    size_t done = 0;
    while (done < total) {
        size_t want = total - done < sizeof buf ? total - done : sizeof buf;
        ssize_t r = read(s, buf, want);
        if (r <= 0) break;
        h = fnv(h, buf, r);
        done += r;
    }
    printf("recv %zu fnv %08x secs %.3f\n", done, h, now() - t0);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: see vsock.c\n"); return 2; }
    const char *cmd = argv[1], *addr = argv[2];
    size_t n = argc > 3 ? strtoull(argv[3], 0, 0) : 0;
    if (!strcmp(cmd, "serve")) {
        int l = listen_on(addr, SOCK_STREAM);
        printf("listening\n");
        fflush(stdout);
        int s = accept(l, 0, 0);
        if (s < 0) die("accept");
        recv_all(s, n);
        send_all(s, n);
        close(s);
    } else if (!strcmp(cmd, "connect")) {
        int s = dial(addr, SOCK_STREAM);
        send_all(s, n);
        recv_all(s, n);
        close(s);
    } else if (!strcmp(cmd, "rtt")) {
        int s = dial(addr, SOCK_STREAM);
        char c = 'x';
        double t0 = now();
        for (size_t i = 0; i < n; i++)
            if (write(s, &c, 1) != 1 || read(s, &c, 1) != 1) die("round trip");
        printf("rtt %zu avg_us %.1f\n", n, (now() - t0) / n * 1e6);
        close(s);
    } else if (!strcmp(cmd, "echo") || !strcmp(cmd, "seq-echo")) {
        int seq = !strcmp(cmd, "seq-echo");
        int l = listen_on(addr, seq ? SOCK_SEQPACKET : SOCK_STREAM);
        printf("listening\n");
        fflush(stdout);
        for (;;) {
            int s = accept(l, 0, 0);
            if (s < 0) die("accept");
            if (fork() == 0) {
                ssize_t r;
                while ((r = recv(s, buf, sizeof buf, 0)) > 0)
                    if (send(s, buf, r, 0) != r) die("echo send");
                _exit(0);
            }
            close(s);
        }
    } else if (!strcmp(cmd, "seq")) {
        static const size_t sizes[] = { 1, 100, 4096, 5000, 65536, 100000, 7 };
        static unsigned char back[1 << 20];
        int s = dial(addr, SOCK_SEQPACKET);
        int ok = 0;
        rng_state = 7;
        for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
            fill(buf, sizes[i]);
            if (send(s, buf, sizes[i], 0) != (ssize_t)sizes[i]) die("seq send");
            ssize_t r = recv(s, back, sizeof back, 0);
            if (r == (ssize_t)sizes[i] && !memcmp(back, buf, r)) ok++;
            else printf("seq message %zu: %zd bytes back of %zu\n", i, r, sizes[i]);
        }
        printf("seq %d of %zu messages whole\n", ok, sizeof sizes / sizeof *sizes);
        close(s);
    } else {
        fprintf(stderr, "vsockt: unknown command %s\n", cmd);
        return 2;
    }
    return 0;
}
