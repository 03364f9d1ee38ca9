/* A minimal polling virtio-net driver for moat's Tier 1 tests: it echoes
 * frames back to the host (source and destination MAC swapped), floods
 * frames flat out, follows the link state, and attacks the device with
 * malformed descriptor chains and control commands.
 *
 * Command-line keys (see test.c):
 *   net=N          N virtio-net devices must be there; the first is used
 *   net_nomrg=1    do not negotiate MRG_RXBUF (one buffer per frame)
 *   net_bigrx=1    receive buffers of 16 KiB (frames above 2 KiB without MRG_RXBUF)
 *   net_pairs=N    ask for N queue pairs (VQ_PAIRS_SET) and serve them all
 *   net_hostile=1  attack the device first; it must still work after
 *   net_echo=1     echo until a frame of type 0x88b5 carrying "STOP";
 *                  "RESET" in such a frame resets and re-initialises the
 *                  device mid-traffic; "FILTER" and "FILTER2" send receive-filter
 *                  commands; link changes are printed ("net: link down") 
 *   net_flood=N    send N frames of net_size bytes (0: forever) flat out
 * Frames of type 0x88b5 are the test's own (IEEE local experimental). */
#include "lib.h"
#include "virtio.h"

#define barrier() __asm__ volatile("" ::: "memory")

#define NET_QSIZE 64
#define SMALL_BUF 2048
#define BIG_BUF 16384
#define MAX_PAIRS 2
#define HDR 12

/* Feature bits. */
#define F_CSUM 0
#define F_MTU 3
#define F_MAC 5
#define F_MRG 15
#define F_STATUS 16
#define F_CTRL_VQ 17
#define F_CTRL_RX 18
#define F_MQ 22
#define F_CTRL_MAC 23
#define F_EVENT_IDX 29


struct vnet {
    u64 base, features;
    int pairs, max_pairs, mrg, bufsize;
    struct vq rx[MAX_PAIRS], tx[MAX_PAIRS], ctrl;
    u16 tx_next[MAX_PAIRS];
};

static u8 net_rings[2 * MAX_PAIRS + 1][16384] __attribute__((aligned(4096)));
/* Receive buffers: NET_QSIZE of SMALL_BUF per pair, or 8 of BIG_BUF. */
static u8 rxmem[MAX_PAIRS][NET_QSIZE * SMALL_BUF] __attribute__((aligned(4096)));
static u8 txmem[MAX_PAIRS][NET_QSIZE][SMALL_BUF] __attribute__((aligned(4096)));
static u8 frame[70000] __attribute__((aligned(4096)));
static u8 ctrlbuf[4096] __attribute__((aligned(4096)));
static int failures_net;

#define NCHECK(cond, ...) do { if (!(cond)) { puts_serial("FAIL: "); printf_serial(__VA_ARGS__); puts_serial("\n"); failures_net++; } } while (0)

int net_failures(void) { return failures_net; }

u16 vnet_status(u64 base) { return (u16)(vmmio_read(base, 0x104) >> 16); }

static void post_rx(struct vnet *n, int p, u16 d) {
    struct vq *q = &n->rx[p];
    q->desc[d] = (struct vdesc){ (u64)&rxmem[p][(u64)d * n->bufsize], (u32)n->bufsize, VDESC_WRITE, 0 };
    vq_push(q, d);
}

/* One control command: class, command, `len` bytes of data; the ack. */
static int ctrl_cmd(struct vnet *n, u8 class, u8 cmd, const void *data, u32 len) {
    struct vq *q = &n->ctrl;
    ctrlbuf[0] = class;
    ctrlbuf[1] = cmd;
    memcpy(ctrlbuf + 2, data, len);
    ctrlbuf[2048] = 0xee;
    q->desc[0] = (struct vdesc){ (u64)ctrlbuf, 2 + len, VDESC_NEXT, 1 };
    q->desc[1] = (struct vdesc){ (u64)ctrlbuf + 2048, 1, VDESC_WRITE, 0 };
    vq_push(q, 0);
    vq_kick(q);
    u32 id, l;
    if (vq_wait(q, &id, &l) <= 0) return -1;
    return ctrlbuf[2048];
}

/* Reset and set up the device: `want` features (of those offered), `pairs`
 * queue pairs. 0, or a negative step. */
int vnet_init(struct vnet *n, u64 base, u64 want, int pairs, int bigrx) {
    n->base = base;
    int e = virtio_negotiate(base, want, &n->features);
    if (e) return e;
    u64 f = n->features;
    n->max_pairs = (f >> F_MQ & 1) ? (int)(vmmio_read(base, 0x108) & 0xffff) : 1;
    n->pairs = pairs < n->max_pairs ? pairs : n->max_pairs;
    if (n->pairs > MAX_PAIRS) n->pairs = MAX_PAIRS;
    if (n->pairs < 1) n->pairs = 1;
    n->mrg = f >> F_MRG & 1;
    n->bufsize = bigrx ? BIG_BUF : SMALL_BUF;
    u16 rxq = bigrx ? (u16)(NET_QSIZE * SMALL_BUF / BIG_BUF) : NET_QSIZE;
    for (int p = 0; p < n->pairs; p++) {
        if (vq_init(base, (u16)(2 * p), &n->rx[p], net_rings[2 * p], rxq, n->features >> F_EVENT_IDX & 1)) return -4;
        if (vq_init(base, (u16)(2 * p + 1), &n->tx[p], net_rings[2 * p + 1], NET_QSIZE, n->features >> F_EVENT_IDX & 1)) return -5;
        n->tx_next[p] = 0;
    }
    if (f >> F_CTRL_VQ & 1) {
        u16 ci = (f >> F_MQ & 1) ? (u16)(2 * n->max_pairs) : 2;
        if (vq_init(base, ci, &n->ctrl, net_rings[2 * MAX_PAIRS], 16, n->features >> F_EVENT_IDX & 1)) return -6;
    }
    vmmio_write(base, 0x70, 1 | 2 | 8 | 4);
    for (int p = 0; p < n->pairs; p++) {
        for (u16 d = 0; d < n->rx[p].qsize; d++) post_rx(n, p, d);
        vq_kick(&n->rx[p]);
    }
    if (n->pairs > 1) {
        u16 np = (u16)n->pairs;
        if (ctrl_cmd(n, 4, 0, &np, 2) != 0) return -7;
    }
    return 0;
}

/* Send `len` bytes of `data` (frame without header) on pair `p`, waiting for
 * a free slot; 0 on timeout. */
static int send_frame(struct vnet *n, int p, const u8 *data, u32 len) {
    struct vq *q = &n->tx[p];
    u16 slot = n->tx_next[p] % q->qsize;
    if ((u16)(n->tx_next[p] - q->last_used) >= q->qsize) {
        u32 id, l;
        if (vq_wait(q, &id, &l) <= 0) return 0;
    }
    u8 *b = txmem[p][slot];
    memset(b, 0, HDR);
    if (len > SMALL_BUF - HDR) len = SMALL_BUF - HDR;
    memcpy(b + HDR, data, len);
    q->desc[slot] = (struct vdesc){ (u64)b, HDR + len, 0, 0 };
    vq_push(q, slot);
    n->tx_next[p]++;
    vq_kick(q);
    return 1;
}

/* Take one received frame from pair `p` into `frame` (without header);
 * its length, or -1 when none is there. Buffers go back to the device. */
static int recv_frame(struct vnet *n, int p) {
    struct vq *q = &n->rx[p];
    u32 id, len;
    if (!vq_pop(q, &id, &len)) return -1;
    u8 *buf = &rxmem[p][(u64)id * n->bufsize];
    u16 count = n->mrg ? (u16)(buf[10] | buf[11] << 8) : 1;
    u32 total = 0;
    if (len >= HDR) {
        memcpy(frame, buf + HDR, len - HDR);
        total = len - HDR;
    }
    post_rx(n, p, (u16)id);
    if (len < HDR) {               /* a frame the device dropped: the buffer came back empty */
        vq_kick(q);
        return -1;
    }
    for (u16 i = 1; i < count; i++) {
        u32 spins = 0;
        while (!vq_pop(q, &id, &len)) {
            if (++spins > 10000000) return -1;
            cpu_relax();
        }
        buf = &rxmem[p][(u64)id * n->bufsize];
        if (total + len <= sizeof frame) memcpy(frame + total, buf, len);
        total += len;
        post_rx(n, p, (u16)id);
    }
    vq_kick(q);
    return (int)total;
}

static int is_ours(const u8 *f, int len, const char *word) {
    int wl = (int)strlen(word);
    return len >= 14 + wl && f[12] == 0x88 && f[13] == 0xb5 && !memcmp(f + 14, word, wl);
}

static void swap_macs(u8 *f) {
    u8 t[6];
    memcpy(t, f, 6);
    memcpy(f, f + 6, 6);
    memcpy(f + 6, t, 6);
}

/* Malformed chains and commands; the device must go on working. */
static void hostile(struct vnet *n) {
    struct vq *q = &n->tx[0];
    u32 id, len;
    int r;
    /* Transmit: a loop 0 -> 1 -> 0, a buffer outside RAM, one in the MMIO
     * hole, one too short for the header, one longer than any frame, a
     * write-only buffer. Each must come back used. */
    struct vdesc cases[][2] = {
        { { (u64)txmem[0][0], 64, VDESC_NEXT, 1 }, { (u64)txmem[0][1], 64, VDESC_NEXT, 0 } },
        { { 0xfffff0000000UL, 64, 0, 0 }, { 0, 0, 0, 0 } },
        { { 0xd0000000UL, 64, 0, 0 }, { 0, 0, 0, 0 } },
        { { (u64)txmem[0][0], 5, 0, 0 }, { 0, 0, 0, 0 } },
        { { (u64)frame, 70000, 0, 0 }, { 0, 0, 0, 0 } },
        { { (u64)txmem[0][0], 64, VDESC_WRITE, 0 }, { 0, 0, 0, 0 } },
    };
    for (u32 c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        q->desc[0] = cases[c][0];
        q->desc[1] = cases[c][1];
        vq_push(q, 0);
        vq_kick(q);
        r = vq_wait(q, &id, &len);
        NCHECK(r == 1 && id == 0, "hostile tx case %u: %d", c, r);
        n->tx_next[0] = q->last_used;
    }
    /* A notify storm on every queue. */
    for (int i = 0; i < 300; i++) { vq_notify(&n->tx[0]); vq_notify(&n->rx[0]); vq_notify(&n->ctrl); }
    /* Control queue: unknown class and command, short data, a MAC table
     * whose count runs past the chain, more pairs than offered, zero pairs. */
    u8 data[64];
    memset(data, 0, sizeof data);
    NCHECK(ctrl_cmd(n, 0x77, 0, data, 1) == 1, "unknown class acked");
    NCHECK(ctrl_cmd(n, 0, 0x55, data, 1) == 1, "unknown rx command acked");
    NCHECK(ctrl_cmd(n, 0, 0, data, 0) == 1, "rx command without data acked");
    u32 huge = 1000000;
    memcpy(data, &huge, 4);
    NCHECK(ctrl_cmd(n, 1, 0, data, 4) == 1, "MAC table count past the chain acked");
    u16 pairs = 17;
    NCHECK(ctrl_cmd(n, 4, 0, &pairs, 2) == 1, "17 queue pairs acked");
    pairs = 0;
    NCHECK(ctrl_cmd(n, 4, 0, &pairs, 2) == 1, "0 queue pairs acked");
    /* A control chain with no room for the ack: returned used, nothing written. */
    ctrlbuf[2048] = 0xee;
    n->ctrl.desc[0] = (struct vdesc){ (u64)ctrlbuf, 3, 0, 0 };
    vq_push(&n->ctrl, 0);
    vq_kick(&n->ctrl);
    r = vq_wait(&n->ctrl, &id, &len);
    NCHECK(r == 1 && len == 0, "ack-less control chain: %d len %u", r, len);
    /* A good one still works: promiscuous on. */
    data[0] = 1;
    NCHECK(ctrl_cmd(n, 0, 0, data, 1) == 0, "promiscuous refused after the attacks");
    /* A head index beyond the ring: DEVICE_NEEDS_RESET, then a re-init works. */
    vq_push(q, 200);
    vq_kick(q);
    r = vq_wait(q, &id, &len);
    NCHECK(r == -2, "out-of-range head: no DEVICE_NEEDS_RESET (%d)", r);
    printf_serial("net: hostile done\n");
}

static struct vnet net;

/* Receive-filter commands Linux sends, for the monitor's NIC_RX_FILTER_CHANGED
 * and query-rx-filter: promiscuous off, a MAC table, all-multicast on. */
static void set_filters(struct vnet *n) {
    u8 d[64];
    d[0] = 0;
    NCHECK(ctrl_cmd(n, 0, 0, d, 1) == 0, "PROMISC off refused");
    static const u8 table[] = { 1, 0, 0, 0, 0x02, 0, 0, 0, 0, 0x01,
                                2, 0, 0, 0, 0x01, 0, 0x5e, 0, 0, 0x01, 0x33, 0x33, 0, 0, 0, 0x01 };
    NCHECK(ctrl_cmd(n, 1, 0, table, sizeof table) == 0, "MAC_TABLE_SET refused");
    d[0] = 1;
    NCHECK(ctrl_cmd(n, 0, 1, d, 1) == 0, "ALLMULTI on refused");
    printf_serial("net: filters set\n");
}

static void echo(struct vnet *n, u64 want, int pairs, int bigrx) {
    u64 frames = 0, per_pair[MAX_PAIRS] = { 0 };
    u32 idle = 0;
    int link = vnet_status(n->base) & 1;
    printf_serial("net: echo ready\n");
    for (;;) {
        if (++idle % 256 == 0) {
            int now = vnet_status(n->base) & 1;
            if (now != link) printf_serial("net: link %s\n", now ? "up" : "down");
            link = now;
        }
        for (int p = 0; p < n->pairs; p++) {
            int len = recv_frame(n, p);
            if (len < 0) continue;
            idle = 0;
            frames++;
            per_pair[p]++;
            if (is_ours(frame, len, "STOP")) {
                printf_serial("net: echoed %lu frames (pair 0: %lu, pair 1: %lu)\n", frames - 1,
                              per_pair[0], per_pair[1]);
                return;
            }
            if (is_ours(frame, len, "RESET")) {
                int r = vnet_init(n, n->base, want, pairs, bigrx);
                NCHECK(r == 0, "re-init mid-traffic failed at step %d", -r);
                printf_serial("net: reinit\n");
                continue;
            }
            if (is_ours(frame, len, "FILTER2")) {
                static const u8 mac[6] = { 0x52, 0x54, 0, 0, 0, 0x99 };
                NCHECK(ctrl_cmd(n, 1, 1, mac, 6) == 0, "MAC_ADDR_SET refused");
                printf_serial("net: mac set\n");
            } else if (is_ours(frame, len, "FILTER")) {
                set_filters(n);
            }
            swap_macs(frame);
            /* (Frames above one transmit buffer are echoed cut to it.) */
            if (!send_frame(n, p, frame, (u32)len)) NCHECK(0, "echo: transmit timed out");
        }
    }
}

static u8 flood_frame[SMALL_BUF];

static void flood(struct vnet *n, u64 count, u32 size) {
    u8 *f = flood_frame;
    memset(f, 0x5a, SMALL_BUF);
    memset(f, 0xff, 6);           /* broadcast */
    f[6] = 0x52; f[7] = 0x54; f[8] = 0; f[9] = 0x12; f[10] = 0x34; f[11] = 0x56;
    f[12] = 0x88; f[13] = 0xb5;
    if (size > SMALL_BUF - HDR) size = SMALL_BUF - HDR;
    printf_serial("net: flooding\n");
    for (u64 i = 0; count == 0 || i < count; i++) {
        memcpy(f + 14, &i, 8);
        if (!send_frame(n, 0, f, size)) { NCHECK(0, "flood: transmit timed out at %lu", i); return; }
    }
    printf_serial("net: flood done\n");
}

void net_checks(const char *cmdline) {
    char v[64];
    u64 bases[16];
    int found = virtio_scan(1, bases, 16);
    printf_serial("net: %d devices\n", found);
    if (cmdline_get(cmdline, "net", v, sizeof v)) NCHECK(found == (int)parse_num(v), "found %d virtio-net devices, expected %s", found, v);
    if (found == 0) return;
    u64 want = 1UL << F_MAC | 1UL << F_STATUS | 1UL << F_CTRL_VQ | 1UL << F_CTRL_RX | 1UL << F_MRG | 1UL << F_MQ |
               1UL << F_MTU | 1UL << F_CTRL_MAC | 1UL << F_EVENT_IDX;
    if (cmdline_get(cmdline, "net_nomrg", v, sizeof v)) want &= ~(1UL << F_MRG);
    if (cmdline_get(cmdline, "net_noevidx", v, sizeof v)) want &= ~(1UL << F_EVENT_IDX);
    int pairs = cmdline_get(cmdline, "net_pairs", v, sizeof v) ? (int)parse_num(v) : 1;
    int bigrx = cmdline_get(cmdline, "net_bigrx", v, sizeof v);
    int r = vnet_init(&net, bases[0], want, pairs, bigrx);
    NCHECK(r == 0, "virtio-net init failed at step %d", -r);
    if (r) return;
    u32 m0 = vmmio_read(bases[0], 0x100), m1 = vmmio_read(bases[0], 0x104);
    printf_serial("net: mac %x:%x:%x:%x:%x:%x link %s pairs %d/%d features %lx mtu %u\n",
                  m0 & 0xff, m0 >> 8 & 0xff, m0 >> 16 & 0xff, m0 >> 24, m1 & 0xff, m1 >> 8 & 0xff,
                  m1 >> 16 & 1 ? "up" : "down", net.pairs, net.max_pairs, net.features,
                  vmmio_read(bases[0], 0x108) >> 16);
    if (cmdline_get(cmdline, "net_hostile", v, sizeof v)) {
        hostile(&net);
        r = vnet_init(&net, bases[0], want, pairs, bigrx);
        NCHECK(r == 0, "virtio-net re-init after the attacks failed at step %d", -r);
    }
    if (cmdline_get(cmdline, "net_flood", v, sizeof v)) {
        char s[24];
        u32 size = cmdline_get(cmdline, "net_size", s, sizeof s) ? (u32)parse_num(s) : 1000;
        flood(&net, parse_num(v), size);
    }
    if (cmdline_get(cmdline, "net_echo", v, sizeof v)) echo(&net, want, pairs, bigrx);
}
