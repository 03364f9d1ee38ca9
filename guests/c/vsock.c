/* A minimal polling virtio-vsock driver for moat's Tier 1 tests: an echo
 * server for host-initiated connections, guest-initiated connections to
 * host listeners (stream and SEQPACKET), and attacks on the device.
 *
 * Command-line keys (see test.c):
 *   vsock=CID          the device must be there with guest CID CID
 *   vsock_echo=PORT    accept connections to PORT and echo every packet
 *                      (flags kept: SEQPACKET boundaries come back as
 *                      sent); data "RESET" resets and re-initialises the
 *                      device; a connection to port 9999 ends the loop
 *   vsock_connect=P    connect to host port P (stream), send 256 KiB in
 *                      4 KiB packets within moat's credit, expect them
 *                      echoed, shut down, expect RST ("vsock: stream ok")
 *   vsock_seq=P        the same on SEQPACKET with messages of 10, 3000 and
 *                      9000 bytes, each echoed whole ("vsock: seqpacket ok")
 *   vsock_hostile=P    malformed packets, 2000 requests to a port nobody
 *                      listens on, 300 to host port P (which accepts and
 *                      never reads), credit overflow, a notify storm, a
 *                      head past the ring; the device must answer each and
 *                      work after a re-init ("vsock: hostile done") */
#include "lib.h"
#include "virtio.h"

/* (Small: the test guest must fit in 4 MiB of RAM for other tests.) */
#define QSIZE 32
#define RXBUF (44 + 4096)
#define TXBUF (44 + 4096)
#define TXSLOTS 8
#define F_SEQPACKET 1
#define F_EVENT_IDX 29
#define HOST 2
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define STREAM 1
#define SEQPACKET 2
#define EOM 1
#define BUF_ALLOC (1u << 20)

struct vhdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct vsock {
    u64 base, cid;
    struct vq rx, tx, ev;
    int tx_busy;     /* tx slots the device has not returned */
    u16 tx_next;
};

/* What the guest knows of one connection. */
struct conn {
    int used;
    u32 port, peer;   /* guest port, host port */
    u16 type;
    u32 fwd_cnt, tx_cnt, peer_buf_alloc, peer_fwd_cnt;
};

static u8 vs_rings[3][16384] __attribute__((aligned(4096)));
static u8 vs_rx[QSIZE][RXBUF] __attribute__((aligned(4096)));
static u8 vs_tx[TXSLOTS][TXBUF] __attribute__((aligned(4096)));
static u8 vs_ev[QSIZE][8];
static u8 msg[16384];
static u8 got[16384];
static struct conn conns[16];
static int failures_vsock;
/* Replies counted by op while waiting for something else. */
static u32 seen[8];

#define VCHECK(cond, ...) do { if (!(cond)) { puts_serial("FAIL: "); printf_serial(__VA_ARGS__); puts_serial("\n"); failures_vsock++; } } while (0)

int vsock_failures(void) { return failures_vsock; }

static void post_rx(struct vsock *s, u16 d) {
    s->rx.desc[d] = (struct vdesc){ (u64)vs_rx[d], RXBUF, VDESC_WRITE, 0 };
    vq_push(&s->rx, d);
}

static int vsock_init(struct vsock *s, u64 base) {
    s->base = base;
    u64 f;
    int e = virtio_negotiate(base, 1UL << F_SEQPACKET | 1UL << F_EVENT_IDX, &f);
    if (e) return e;
    if (!(f >> F_SEQPACKET & 1)) return -2;
    int evidx = f >> F_EVENT_IDX & 1;
    if (vq_init(base, 0, &s->rx, vs_rings[0], QSIZE, evidx)) return -4;
    if (vq_init(base, 1, &s->tx, vs_rings[1], 2 * TXSLOTS, evidx)) return -5;
    if (vq_init(base, 2, &s->ev, vs_rings[2], QSIZE, evidx)) return -6;
    s->cid = vmmio_read(base, 0x100) | (u64)vmmio_read(base, 0x104) << 32;
    vmmio_write(base, 0x70, 1 | 2 | 8 | 4);
    for (u16 d = 0; d < QSIZE; d++) post_rx(s, d);
    vq_kick(&s->rx);
    for (u16 d = 0; d < QSIZE; d++) {
        s->ev.desc[d] = (struct vdesc){ (u64)vs_ev[d], 8, VDESC_WRITE, 0 };
        vq_push(&s->ev, d);
    }
    vq_kick(&s->ev);
    s->tx_busy = 0;
    s->tx_next = 0;
    memset(conns, 0, sizeof conns);
    return 0;
}

static struct conn *find(u32 port, u32 peer) {
    for (int i = 0; i < 16; i++)
        if (conns[i].used && conns[i].port == port && conns[i].peer == peer) return &conns[i];
    return 0;
}

static struct conn *add(u32 port, u32 peer, u16 type) {
    for (int i = 0; i < 16; i++)
        if (!conns[i].used) {
            conns[i] = (struct conn){ 1, port, peer, type, 0, 0, 0, 0 };
            return &conns[i];
        }
    return 0;
}

/* The next packet from the device into `h` and `data`: 1, or 0 when none
 * came within `spins`. Replenishes the buffer. */
static int recv_pkt(struct vsock *s, struct vhdr *h, u8 *data, u64 spins) {
    u32 id, len;
    for (u64 i = 0; !vq_pop(&s->rx, &id, &len); i++) {
        if (i >= spins) return 0;
        cpu_relax();
    }
    if (id >= QSIZE || len < sizeof *h) {
        VCHECK(0, "rx used id %u len %u", id, len);
        memset(h, 0, sizeof *h);
    } else {
        memcpy(h, vs_rx[id], sizeof *h);
        u32 n = len - sizeof *h;
        VCHECK(n == h->len, "rx used len %u for a %u-byte packet", len, h->len);
        if (data && n <= 4096) memcpy(data, vs_rx[id] + sizeof *h, n);
    }
    if (id < QSIZE) {
        post_rx(s, (u16)id);
        vq_kick(&s->rx);
    }
    struct conn *c = find(h->dst_port, h->src_port);
    if (c) {
        c->peer_buf_alloc = h->buf_alloc;
        c->peer_fwd_cnt = h->fwd_cnt;
        if (h->op == OP_RW) c->fwd_cnt += h->len;
    }
    if (h->op < 8) seen[h->op]++;
    return 1;
}

/* Packets the device sent while the caller waited for something else. */
static void drain_rx(struct vsock *s) {
    struct vhdr h;
    while (recv_pkt(s, &h, 0, 0)) {}
}

/* Send a packet: `desc_len` bytes of descriptor for header + data (0: as
 * needed), in one descriptor or (split) two. */
static void send_raw(struct vsock *s, const struct vhdr *h, const void *data, u32 n, u32 desc_len, int split) {
    u32 id, len;
    while (vq_pop(&s->tx, &id, &len)) s->tx_busy--;
    for (u64 i = 0; s->tx_busy >= TXSLOTS; i++) {
        /* The device may wait for receive buffers before taking more. */
        drain_rx(s);
        while (vq_pop(&s->tx, &id, &len)) s->tx_busy--;
        if (i > 200000000UL) { VCHECK(0, "transmit queue stuck"); return; }
        cpu_relax();
    }
    u16 d = s->tx_next++ % TXSLOTS;
    u8 *b = vs_tx[d];
    memcpy(b, h, sizeof *h);
    if (n) memcpy(b + sizeof *h, data, n);
    if (!desc_len) desc_len = sizeof *h + n;
    if (split && desc_len > sizeof *h) {
        /* Header and data in two descriptors: d, then d + TXSLOTS. */
        s->tx.desc[d] = (struct vdesc){ (u64)b, sizeof *h, VDESC_NEXT, (u16)(d + TXSLOTS) };
        s->tx.desc[d + TXSLOTS] = (struct vdesc){ (u64)b + sizeof *h, desc_len - (u32)sizeof *h, 0, 0 };
    } else {
        s->tx.desc[d] = (struct vdesc){ (u64)b, desc_len, 0, 0 };
    }
    vq_push(&s->tx, d);
    s->tx_busy++;
    vq_kick(&s->tx);
}

static struct vhdr hdr_for(struct vsock *s, struct conn *c, u16 op) {
    return (struct vhdr){ s->cid, HOST, c->port, c->peer, 0, c->type, op, 0, BUF_ALLOC, c->fwd_cnt };
}

/* (Every other data packet is laid out as header + data descriptors, as
 * Linux before 6.2 does; the others in one descriptor, as Linux since.) */
static void send_conn(struct vsock *s, struct conn *c, u16 op, u32 flags, const void *data, u32 n) {
    struct vhdr h = hdr_for(s, c, op);
    h.len = n;
    h.flags = flags;
    c->tx_cnt += n;
    send_raw(s, &h, data, n, 0, n ? c->tx_cnt / n % 2 : 0);
}

/* Wait for a packet of connection `c` (or any, when 0) with op `op`;
 * others are counted and dropped. 1 when it came. */
static int wait_op(struct vsock *s, struct conn *c, u16 op, struct vhdr *h, u8 *data) {
    for (int i = 0; i < 100000; i++) {
        if (!recv_pkt(s, h, data, 2000000)) return 0;
        if (h->op == op && (!c || (h->dst_port == c->port && h->src_port == c->peer))) return 1;
    }
    return 0;
}

static u32 credit(struct conn *c) {
    u32 in_flight = c->tx_cnt - c->peer_fwd_cnt;
    return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

/* Wait until moat's credit allows `n` more bytes on `c`. */
static int wait_credit(struct vsock *s, struct conn *c, u32 n) {
    struct vhdr h;
    for (int i = 0; credit(c) < n; i++) {
        if (i == 0) send_conn(s, c, OP_CREDIT_REQUEST, 0, 0, 0);
        if (!recv_pkt(s, &h, 0, 20000000UL)) return 0;
    }
    return 1;
}

static void echo(struct vsock *s, u64 base, u32 port) {
    struct vhdr h;
    printf_serial("vsock: listening on %u\n", port);
    for (;;) {
        if (!recv_pkt(s, &h, msg, ~0UL)) continue;
        if (h.op == OP_REQUEST) {
            struct conn *c = h.dst_port == port ? add(port, h.src_port, h.type) : 0;
            struct vhdr r = { s->cid, HOST, h.dst_port, h.src_port, 0, h.type, c ? OP_RESPONSE : OP_RST, 0, BUF_ALLOC, 0 };
            send_raw(s, &r, 0, 0, 0, 0);
            if (c) {
                c->peer_buf_alloc = h.buf_alloc;
                c->peer_fwd_cnt = h.fwd_cnt;
            }
            if (h.dst_port == 9999) break;
            continue;
        }
        struct conn *c = find(h.dst_port, h.src_port);
        if (!c) continue;
        if (h.op == OP_RW) {
            if (h.len == 5 && !memcmp(msg, "RESET", 5)) {
                printf_serial("vsock: resetting\n");
                VCHECK(vsock_init(s, base) == 0, "re-init failed");
                continue;
            }
            VCHECK(credit(c) >= h.len, "echo past moat's credit (%u of %u)", h.len, credit(c));
            send_conn(s, c, OP_RW, h.flags, msg, h.len);
        } else if (h.op == OP_SHUTDOWN) {
            struct vhdr r = hdr_for(s, c, OP_RST);
            send_raw(s, &r, 0, 0, 0, 0);
            c->used = 0;
        } else if (h.op == OP_RST) {
            c->used = 0;
        } else if (h.op == OP_CREDIT_REQUEST) {
            send_conn(s, c, OP_CREDIT_UPDATE, 0, 0, 0);
        }
    }
    printf_serial("vsock: echo done\n");
}

static u8 pattern(u32 i) { return (u8)(i * 7 + (i >> 9)); }

/* Connect to host port `p` from guest port `local`: the connection, or 0. */
static struct conn *connect(struct vsock *s, u32 local, u32 p, u16 type) {
    struct conn *c = add(local, p, type);
    struct vhdr h;
    send_conn(s, c, OP_REQUEST, 0, 0, 0);
    for (int i = 0; i < 1000; i++) {
        if (!recv_pkt(s, &h, 0, 20000000UL)) break;
        if (h.dst_port != local || h.src_port != p) continue;
        if (h.op == OP_RESPONSE) return c;
        if (h.op == OP_RST) break;
    }
    c->used = 0;
    return 0;
}

/* Close as Linux does: SHUTDOWN both ways, then moat's RST. */
static int close_conn(struct vsock *s, struct conn *c) {
    struct vhdr h;
    send_conn(s, c, OP_SHUTDOWN, 3, 0, 0);
    int ok = wait_op(s, c, OP_RST, &h, 0);
    c->used = 0;
    return ok;
}

static void guest_stream(struct vsock *s, u32 p) {
    struct conn *c = connect(s, 40000, p, STREAM);
    VCHECK(c, "stream connection to host port %u refused", p);
    if (!c) return;
    u32 total = 256 * 1024, sent = 0, back = 0, bad = 0;
    struct vhdr h;
    while (back < total) {
        if (sent < total && credit(c) >= 4096) {
            for (u32 i = 0; i < 4096; i++) msg[i] = pattern(sent + i);
            send_conn(s, c, OP_RW, 0, msg, 4096);
            sent += 4096;
            continue;
        }
        if (!recv_pkt(s, &h, got, 50000000UL)) break;
        if (h.op != OP_RW || h.dst_port != c->port) continue;
        for (u32 i = 0; i < h.len; i++) bad += got[i] != pattern(back + i);
        back += h.len;
    }
    VCHECK(back == total && !bad, "stream echo: %u of %u bytes back, %u wrong", back, total, bad);
    VCHECK(close_conn(s, c), "no RST after the stream's shutdown");
    if (back == total && !bad) printf_serial("vsock: stream ok\n");
}

static void guest_seqpacket(struct vsock *s, u32 p) {
    struct conn *c = connect(s, 40001, p, SEQPACKET);
    VCHECK(c, "seqpacket connection to host port %u refused", p);
    if (!c) return;
    static const u32 sizes[3] = { 10, 3000, 9000 };
    int ok = 1;
    for (int m = 0; m < 3; m++) {
        u32 n = sizes[m];
        for (u32 i = 0; i < n; i++) msg[i] = pattern(i + m);
        for (u32 off = 0; off < n; off += 4096) {
            u32 part = n - off < 4096 ? n - off : 4096;
            if (!wait_credit(s, c, part)) { VCHECK(0, "no credit"); return; }
            send_conn(s, c, OP_RW, off + part == n ? EOM : 0, msg + off, part);
        }
        /* The message comes back whole, EOM on its last packet only. */
        u32 back = 0;
        struct vhdr h;
        for (;;) {
            if (!wait_op(s, c, OP_RW, &h, got + back)) { ok = 0; break; }
            back += h.len;
            if (h.flags & EOM || back >= n) break;
        }
        VCHECK(back == n && (h.flags & EOM), "message %d: %u of %u bytes back, flags %x", m, back, n, h.flags);
        ok &= back == n && !memcmp(got, msg, n);
    }
    VCHECK(ok, "seqpacket messages did not come back as sent");
    VCHECK(close_conn(s, c), "no RST after the seqpacket shutdown");
    if (ok) printf_serial("vsock: seqpacket ok\n");
}

static void hostile(struct vsock *s, u64 base, u32 p) {
    struct vhdr h, r;
    /* A packet from another CID is dropped; the bad op after it is not. */
    h = (struct vhdr){ s->cid + 1, HOST, 5, 6, 0, STREAM, OP_RW, 0, 0, 0 };
    send_raw(s, &h, 0, 0, 0, 0);
    h = (struct vhdr){ s->cid, HOST, 7, 8, 0, STREAM, 99, 0, 0, 0 };
    send_raw(s, &h, 0, 0, 0, 0);
    VCHECK(recv_pkt(s, &r, 0, 50000000UL) && r.op == OP_RST && r.dst_port == 7 && r.src_port == 8,
           "bad op: op %u to %u", r.op, r.dst_port);
    /* To another CID, an unknown type, a len past 64 KiB, a len past the
     * chain, RW for no connection: each answered RST. */
    struct vhdr bad[5] = {
        { s->cid, 7, 10, 11, 0, STREAM, OP_REQUEST, 0, 0, 0 },
        { s->cid, HOST, 12, 13, 0, 9, OP_REQUEST, 0, 0, 0 },
        { s->cid, HOST, 14, 15, 70000, STREAM, OP_RW, 0, 0, 0 },
        { s->cid, HOST, 16, 17, 4096, STREAM, OP_RW, 0, 0, 0 },
        { s->cid, HOST, 18, 19, 4, STREAM, OP_RW, 0, 0, 0 },
    };
    for (int i = 0; i < 5; i++) {
        /* (The 70000-byte one needs no data: its header is refused first.) */
        send_raw(s, &bad[i], msg, i == 4 ? 4 : 0, i == 3 ? 44 + 10 : 0, 0);
        int got_it = recv_pkt(s, &r, 0, 50000000UL);
        VCHECK(got_it && r.op == OP_RST && r.dst_port == bad[i].src_port, "bad packet %d: op %u port %u", i, r.op, r.dst_port);
    }
    /* A header cut short: nothing to answer, nothing breaks. */
    h = (struct vhdr){ s->cid, HOST, 20, 21, 0, STREAM, OP_REQUEST, 0, 0, 0 };
    send_raw(s, &h, 0, 0, 20, 0);
    /* 2000 requests for a port nobody listens on: 2000 RSTs. */
    memset(seen, 0, sizeof seen);
    for (u32 i = 0; i < 2000; i++) {
        h = (struct vhdr){ s->cid, HOST, 1000 + i, p + 3, 0, STREAM, OP_REQUEST, 0, BUF_ALLOC, 0 };
        send_raw(s, &h, 0, 0, 0, 0);
    }
    while (seen[OP_RST] < 2000 && recv_pkt(s, &r, 0, 50000000UL)) {}
    VCHECK(seen[OP_RST] == 2000 && seen[OP_RESPONSE] == 0, "2000 requests: %u RST, %u RESPONSE", seen[OP_RST], seen[OP_RESPONSE]);
    /* 300 to a port that accepts: at most moat's 256, the rest RST. */
    memset(seen, 0, sizeof seen);
    for (u32 i = 0; i < 300; i++) {
        h = (struct vhdr){ s->cid, HOST, 5000 + i, p, 0, STREAM, OP_REQUEST, 0, BUF_ALLOC, 0 };
        send_raw(s, &h, 0, 0, 0, 0);
    }
    while (seen[OP_RST] + seen[OP_RESPONSE] < 300 && recv_pkt(s, &r, 0, 50000000UL)) {}
    VCHECK(seen[OP_RESPONSE] + seen[OP_RST] == 300 && seen[OP_RESPONSE] <= 256 && seen[OP_RESPONSE] > 0,
           "300 requests: %u RESPONSE, %u RST", seen[OP_RESPONSE], seen[OP_RST]);
    printf_serial("vsock: %u of 300 connections\n", seen[OP_RESPONSE]);
    /* Past the credit on a connection whose host end never reads: RST. */
    memset(seen, 0, sizeof seen);
    u32 sent = 0;
    for (; sent < 8u << 20 && !seen[OP_RST]; sent += 4096) {
        h = (struct vhdr){ s->cid, HOST, 5000, p, 4096, STREAM, OP_RW, 0, BUF_ALLOC, 0 };
        send_raw(s, &h, msg, 4096, 0, 0);
        drain_rx(s);
    }
    VCHECK(seen[OP_RST], "no RST after %u bytes past the credit", sent);
    printf_serial("vsock: reset after %u KiB\n", sent >> 10);
    /* Close the rest. */
    for (u32 i = 1; i < 300; i++) {
        h = (struct vhdr){ s->cid, HOST, 5000 + i, p, 0, STREAM, OP_RST, 0, 0, 0 };
        send_raw(s, &h, 0, 0, 0, 0);
    }
    drain_rx(s);
    /* A notify storm, then a head past the ring: DEVICE_NEEDS_RESET. */
    for (int i = 0; i < 1000; i++) { vq_notify(&s->tx); vq_notify(&s->rx); vq_notify(&s->ev); }
    s->tx.avail[2 + s->tx.avail_idx % s->tx.qsize] = 300;
    s->tx.avail_idx++;
    s->tx.avail[1] = s->tx.avail_idx;
    vq_notify(&s->tx);
    int reset = 0;
    for (u64 i = 0; i < 100000000UL && !reset; i++) reset = vmmio_read(base, 0x70) & 0x40;
    VCHECK(reset, "head past the ring: no DEVICE_NEEDS_RESET");
    VCHECK(vsock_init(s, base) == 0, "re-init after the attacks failed");
    h = (struct vhdr){ s->cid, HOST, 30, p + 3, 0, STREAM, OP_REQUEST, 0, BUF_ALLOC, 0 };
    send_raw(s, &h, 0, 0, 0, 0);
    VCHECK(recv_pkt(s, &r, 0, 50000000UL) && r.op == OP_RST && r.dst_port == 30, "after re-init: op %u", r.op);
    printf_serial("vsock: hostile done\n");
}

void vsock_checks(const char *cmdline) {
    char v[64];
    u64 bases[4];
    if (!cmdline_get(cmdline, "vsock", v, sizeof v)) return;
    int found = virtio_scan(19, bases, 4);
    VCHECK(found == 1, "found %d virtio-vsock devices", found);
    if (found != 1) return;
    struct vsock s;
    int e = vsock_init(&s, bases[0]);
    VCHECK(e == 0, "virtio-vsock init failed at step %d", -e);
    if (e) return;
    printf_serial("vsock: cid %lu\n", s.cid);
    VCHECK(s.cid == parse_num(v), "guest CID %lu, expected %s", s.cid, v);
    if (cmdline_get(cmdline, "vsock_hostile", v, sizeof v)) hostile(&s, bases[0], (u32)parse_num(v));
    if (cmdline_get(cmdline, "vsock_connect", v, sizeof v)) guest_stream(&s, (u32)parse_num(v));
    if (cmdline_get(cmdline, "vsock_seq", v, sizeof v)) guest_seqpacket(&s, (u32)parse_num(v));
    if (cmdline_get(cmdline, "vsock_echo", v, sizeof v)) echo(&s, bases[0], (u32)parse_num(v));
}
