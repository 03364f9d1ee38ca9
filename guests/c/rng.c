/* virtio-rng checks for moat's Tier 1 tests, over the one-queue polling
 * driver of virtio.c.
 *
 * Command-line keys (see test.c):
 *   rng=N            N virtio-rng devices must be there; the first is used
 *   rng_read=BYTES   read BYTES in 4 KiB requests; prints the count and
 *                    a checksum ("rng: read N bytes fnv X zeros Z")
 *   rng_quota=N      max-bytes is N in a long period: a request for 2N gets
 *                    N, the next one waits ("rng: throttled"), also after
 *                    a device reset and re-init ("rng: still throttled")
 *   rng_hostile=1    loops, buffers outside RAM or read-only, a 4 GiB
 *                    buffer, a head past the ring; the device must answer
 *                    each (or ask for a reset) and work after a re-init */
#include "lib.h"
#include "virtio.h"

static u8 rng_ring[16384] __attribute__((aligned(4096)));
static u8 rngbuf[131072] __attribute__((aligned(4096)));
static int failures_rng;

#define RCHECK(cond, ...) do { if (!(cond)) { puts_serial("FAIL: "); printf_serial(__VA_ARGS__); puts_serial("\n"); failures_rng++; } } while (0)

int rng_failures(void) { return failures_rng; }

/* One request of `len` device-writable bytes at `buf`; the used length,
 * or -1 (no answer), -2 (DEVICE_NEEDS_RESET). */
static long rng_request(struct vblk *r, void *buf, u32 len) {
    r->desc[0] = (struct vdesc){ (u64)buf, len, VDESC_WRITE, 0 };
    u32 used = 0;
    int s = vblk_submit(r, 0, &used);
    return s < 0 ? s : (long)used;
}

/* Submit a request and give the device a short while: 1 when it answered. */
static int rng_answers_soon(struct vblk *r, void *buf, u32 len) {
    r->desc[1] = (struct vdesc){ (u64)buf, len, VDESC_WRITE, 0 };
    u16 idx = r->avail[1];
    r->avail[2 + idx % r->qsize] = 1;
    __asm__ volatile("" ::: "memory");
    r->avail[1] = (u16)(idx + 1);
    __asm__ volatile("" ::: "memory");
    vmmio_write(r->base, 0x50, 0);
    for (u32 spins = 0; spins < 20000; spins++) {
        if (r->used[1] != r->last_used) return 1;
        cpu_relax();
    }
    return 0;
}

static void rng_hostile(struct vblk *r, u64 base) {
    long n;
    /* A loop 0 -> 1 -> 0: answered, cut at the ring's size of descriptors. */
    r->desc[0] = (struct vdesc){ (u64)rngbuf, 64, VDESC_WRITE | VDESC_NEXT, 1 };
    r->desc[1] = (struct vdesc){ (u64)rngbuf + 64, 64, VDESC_WRITE | VDESC_NEXT, 0 };
    u32 used = 99;
    RCHECK(vblk_submit(r, 0, &used) == 0 && used <= 16 * 64, "descriptor loop: used %u", used);
    n = rng_request(r, (void *)0xfffff0000000UL, 64);
    RCHECK(n == 0, "buffer outside RAM: %ld", n);
    n = rng_request(r, (void *)0xd0000000UL, 64);
    RCHECK(n == 0, "buffer in the MMIO hole: %ld", n);
    /* A read-only buffer: nothing to write into. */
    r->desc[0] = (struct vdesc){ (u64)rngbuf, 64, 0, 0 };
    used = 99;
    RCHECK(vblk_submit(r, 0, &used) == 0 && used == 0, "read-only buffer: used %u", used);
    /* 4 GiB - 1 from the start of RAM, past its end: returned empty. */
    n = rng_request(r, (void *)0x1000UL, 0xffffffffu);
    RCHECK(n == 0, "4 GiB buffer: %ld", n);
    /* 128 KiB: the device fills at most 64 KiB of one request. */
    n = rng_request(r, rngbuf, sizeof rngbuf);
    RCHECK(n == 65536, "128 KiB buffer: %ld", n);
    /* A zero-length buffer. */
    n = rng_request(r, rngbuf, 0);
    RCHECK(n == 0, "empty buffer: %ld", n);
    /* A notify storm. */
    for (int i = 0; i < 1000; i++) vmmio_write(base, 0x50, 0);
    /* A head index past the ring: DEVICE_NEEDS_RESET. */
    int s = vblk_submit(r, 300, &used);
    RCHECK(s == -2, "out-of-range head: no DEVICE_NEEDS_RESET (%d)", s);
    RCHECK(vblk_init(r, base, 16, rng_ring) == 0, "re-init after the attacks failed");
    n = rng_request(r, rngbuf, 512);
    RCHECK(n == 512, "request after the attacks: %ld", n);
    printf_serial("rng: hostile done\n");
}

void rng_checks(const char *cmdline) {
    char v[64];
    u64 bases[16];
    int found = virtio_scan(4, bases, 16);
    if (cmdline_get(cmdline, "rng", v, sizeof v)) {
        printf_serial("rng: %d devices\n", found);
        RCHECK(found == (int)parse_num(v), "found %d virtio-rng devices, expected %s", found, v);
    }
    if (found == 0) return;
    struct vblk r;
    int e = vblk_init(&r, bases[0], 16, rng_ring);
    RCHECK(e == 0, "virtio-rng init failed at step %d", -e);
    if (e) return;
    if (cmdline_get(cmdline, "rng_hostile", v, sizeof v)) rng_hostile(&r, bases[0]);
    if (cmdline_get(cmdline, "rng_read", v, sizeof v)) {
        u64 want = parse_num(v), got = 0, zeros = 0;
        u32 h = 2166136261u;
        printf_serial("rng: reading\n");
        while (got < want) {
            u32 len = want - got < 4096 ? (u32)(want - got) : 4096;
            memset(rngbuf, 0, len);
            long n = rng_request(&r, rngbuf, len);
            if (n <= 0) { RCHECK(0, "rng request failed: %ld after %lu bytes", n, got); break; }
            for (long i = 0; i < n; i++) {
                h = (h ^ rngbuf[i]) * 16777619u;
                zeros += rngbuf[i] == 0;
            }
            got += (u64)n;
        }
        printf_serial("rng: read %lu bytes fnv %x zeros %lu\n", got, h, zeros);
    }
    if (cmdline_get(cmdline, "rng_quota", v, sizeof v)) {
        u64 quota = parse_num(v);
        long n = rng_request(&r, rngbuf, (u32)(2 * quota));
        RCHECK(n == (long)quota, "first request of %lu got %ld bytes, quota %lu", 2 * quota, n, quota);
        RCHECK(!rng_answers_soon(&r, rngbuf, 64), "a request past the quota was answered");
        printf_serial("rng: throttled\n");
        RCHECK(vblk_init(&r, bases[0], 16, rng_ring) == 0, "re-init failed");
        RCHECK(!rng_answers_soon(&r, rngbuf, 64), "a reset refilled the quota");
        printf_serial("rng: still throttled\n");
    }
}
