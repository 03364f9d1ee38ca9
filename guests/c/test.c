/* moat's Tier 1 test guest. The command line says what to check:
 *   mem=BYTES        e820: RAM above 1 MiB + 1 MiB == BYTES
 *   cpus=N           CPUs listed by the ACPI MADT (or MP table)
 *   acpi=0|1         whether ACPI tables must be present
 *   smp=1            start every AP (INIT-SIPI-SIPI); each checks its APIC ID
 *   initrd_len=N initrd_sum=X   the initrd's size and FNV-1a 32 checksum
 *   rtc=YYYYMMDD[,YYYYMMDD]     the CMOS date (either)
 *   spam=N           print N filler lines (serial back-pressure tests)
 *   pio_loop=N       N writes to port 0x80, a vCPU exit each (bench/sandbox.py)
 *   action=poweroff|reset|triple|reboot-once|mmio-exec|count|wait-powerdown|wait-cad|halt
 *                    what to do at the end (count: print a counter forever;
 *                    wait-powerdown: poll the ACPI GED for the power button;
 *                    wait-cad: poll the i8042 for CTRL+ALT+DEL scancodes);
 *                    (mmio-exec jumps into the MMIO hole: KVM cannot run it);
 *                    reboot-once resets (how=kbd|triple|acpi) on the first
 *                    boot, counted in CMOS RAM, and powers off on the second
 *   blk=N            N virtio-blk devices; on the first: blk_len=L blk_sum=X
 *                    (FNV of its first L bytes), blk_serial=S (GET_ID),
 *                    blk_write=1 (writes sectors 8..15 with a pattern, flushes),
 *                    blk_oob=1 (a read past the end fails); on the second:
 *                    blk_ro=1 (it is read-only: writes fail)
 *   blk_queue=N      use queue N of the first disk (negotiating MQ), not 0
 *   blk_fill=BYTES   write BYTES of a pattern from sector 0 (every write must
 *                    succeed), flush, read back: "blk: filled BYTES fnv X"
 *   blk_storm=N      N pseudo-random 4 KiB writes (0: forever), see blk_checks;
 *                    blk_noflush=1: never flush (moat must at exit)
 *   blk_bench=MODE   endless I/O for bench/io.py (blk_bs=SIZE); virtio_base=,
 *                    virtio_stride= move the virtio-mmio scan (QEMU microvm)
 *   blk_hostile=1    attack the first device (loops, bad addresses, bad queue)
 *                    and check it still serves requests afterwards
 *   blk_wedge=LEN    queue 25 reads of 8 x LEN bytes each (every data descriptor
 *                    on the same RAM at 64 MiB), then reset the device while
 *                    it works on them; "wedge: reset returned" after the
 *                    status write (the device must not hold the vCPU)
 *   net=N, net_*     virtio-net: see net.c
 *   rng=N, rng_*     virtio-rng: see rng.c
 * It prints "cmdline: ..." and then PASS or FAIL lines. */
#include "lib.h"
#include "virtio.h"

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { puts_serial("FAIL: "); printf_serial(__VA_ARGS__); puts_serial("\n"); failures++; } } while (0)

extern u8 ap_trampoline[], ap_trampoline_end[], tables_ready;
extern u64 pml4[512], pdpt[512], pd[2048];
extern volatile u32 ap_next;
static volatile u32 ap_ok, ap_bad;

#define LAPIC 0xfee00000UL

void ap_main(u32 index) {
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    u32 cpuid_id = b >> 24;
    u32 lapic_id = mmio_read32(LAPIC + 0x20) >> 24;
    if (cpuid_id == lapic_id) __atomic_add_fetch(&ap_ok, 1, __ATOMIC_SEQ_CST);
    else __atomic_add_fetch(&ap_bad, 1, __ATOMIC_SEQ_CST);
    (void)index;
    halt_forever();
}

static void build_page_tables(void) {
    if (tables_ready) return;
    pml4[0] = (u64)pdpt | 3;
    for (u64 i = 0; i < 4; i++) pdpt[i] = ((u64)pd + i * 4096) | 3;
    for (u64 i = 0; i < 2048; i++) pd[i] = (i << 21) | 0x83;
    tables_ready = 1;
}

static void start_aps(const u32 *ids, int n) {
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    u32 self = b >> 24;
    build_page_tables();
    memcpy((void *)0x8000, ap_trampoline, (size_t)(ap_trampoline_end - ap_trampoline));
    mmio_write32(LAPIC + 0xf0, mmio_read32(LAPIC + 0xf0) | 0x100);   /* software enable */
    for (int i = 0; i < n; i++) {
        if (ids[i] == self) continue;
        mmio_write32(LAPIC + 0x310, ids[i] << 24);
        mmio_write32(LAPIC + 0x300, 0x4500);                       /* INIT */
        for (int k = 0; k < 2; k++) {
            mmio_write32(LAPIC + 0x310, ids[i] << 24);
            mmio_write32(LAPIC + 0x300, 0x4600 | (0x8000 >> 12)); /* SIPI */
        }
    }
    u64 spins = 0;
    while (ap_ok + ap_bad < (u32)(n - 1) && spins++ < 200000000UL) cpu_relax();
    CHECK(ap_ok == (u32)(n - 1), "%u of %d APs started with a matching APIC ID (%u mismatched)", ap_ok, n - 1, ap_bad);
    printf_serial("smp: %u APs up\n", ap_ok);
}

static u8 rings[2][16384] __attribute__((aligned(4096)));
static u8 blkbuf[65536] __attribute__((aligned(4096)));
static u8 bigbuf[1 << 20] __attribute__((aligned(4096)));

static u32 fnv1a(const u8 *p, u64 n);

static void blk_hostile(u64 base) {
    struct vblk b;
    u32 used;
    int r;
    /* An absurd queue size: the device must refuse DRIVER_OK with NEEDS_RESET. */
    vmmio_write(base, 0x70, 0);
    vmmio_write(base, 0x70, 3);
    vmmio_write(base, 0x24, 1); vmmio_write(base, 0x20, 1);
    vmmio_write(base, 0x70, 11);
    vmmio_write(base, 0x30, 0);
    vmmio_write(base, 0x38, 60000);
    vmmio_write(base, 0x80, 0x123);  /* misaligned too */
    vmmio_write(base, 0x44, 1);
    vmmio_write(base, 0x70, 15);
    CHECK(vmmio_read(base, 0x70) & 0x40, "bad queue accepted (status %x)", vmmio_read(base, 0x70));

    CHECK(vblk_init(&b, base, 8, rings[0]) == 0, "re-init after reset failed");
    /* A descriptor loop: 0 -> 1 -> 0. */
    b.desc[0] = (struct vdesc){ (u64)blkbuf, 16, VDESC_NEXT, 1 };
    b.desc[1] = (struct vdesc){ (u64)blkbuf + 512, 512, VDESC_NEXT | VDESC_WRITE, 0 };
    CHECK(vblk_submit(&b, 0, &used) == 0, "descriptor loop hung the device");
    /* Data outside guest RAM and inside the MMIO hole. */
    r = vblk_request(&b, VBLK_T_IN, 0, (void *)0xfffff0000000UL, 512, 1, &used);
    CHECK(r != 0, "read into non-RAM reported success");
    r = vblk_request(&b, VBLK_T_IN, 0, (void *)0xd0000000UL, 512, 1, &used);
    CHECK(r != 0, "read into the MMIO hole reported success");
    /* A length that overflows, a head index beyond the queue. */
    r = vblk_request(&b, VBLK_T_IN, 0, blkbuf, 0xfffffe00u, 1, &used);
    CHECK(r != 0, "overflowing read reported success");
    /* Status in a read-only descriptor: the device must not write it. */
    b.desc[0] = (struct vdesc){ (u64)blkbuf, 16, VDESC_NEXT, 1 };
    b.desc[1] = (struct vdesc){ (u64)blkbuf + 16, 1, 0, 0 };
    memset(blkbuf, 0, 32);
    blkbuf[16] = 0x5a;
    CHECK(vblk_submit(&b, 0, &used) == 0 && used == 0 && blkbuf[16] == 0x5a, "read-only status written");
    /* A notify storm. */
    for (int i = 0; i < 1000; i++) vmmio_write(base, 0x50, 0);
    /* And the device still works. */
    r = vblk_request(&b, VBLK_T_IN, 0, blkbuf, 512, 1, &used);
    CHECK(r == 0 && used == 513, "device broken after the attacks (status %d, used %u)", r, used);
    /* A head index beyond the queue breaks the protocol: DEVICE_NEEDS_RESET,
     * and after a reset the device works again. */
    CHECK(vblk_submit(&b, 200, &used) == -2, "out-of-range head: no DEVICE_NEEDS_RESET");
    CHECK(vblk_init(&b, base, 8, rings[0]) == 0, "re-init after NEEDS_RESET failed");
    r = vblk_request(&b, VBLK_T_IN, 0, blkbuf, 512, 1, &used);
    CHECK(r == 0 && used == 513, "device broken after reset (status %d, used %u)", r, used);
    printf_serial("blk: hostile requests survived\n");
}

static void blk_wedge(u64 base, u32 dlen) {
    struct vblk b;
    CHECK(vblk_init(&b, base, 256, rings[1]) == 0, "wedge: init failed");
    struct { u32 type, reserved; u64 sector; } *h = (void *)blkbuf;
    h->type = VBLK_T_IN;
    h->reserved = 0;
    h->sector = 0;
    /* 25 requests of 10 descriptors: header, 8 x dlen of data, status. */
    for (u16 r = 0; r < 25; r++) {
        u16 d = r * 10;
        b.desc[d] = (struct vdesc){ (u64)blkbuf, 16, VDESC_NEXT, (u16)(d + 1) };
        for (u16 i = 1; i < 9; i++)
            b.desc[d + i] = (struct vdesc){ 64UL << 20, dlen, VDESC_NEXT | VDESC_WRITE, (u16)(d + i + 1) };
        b.desc[d + 9] = (struct vdesc){ (u64)blkbuf + 64 + r, 1, VDESC_WRITE, 0 };
        b.avail[2 + r] = d;
    }
    __asm__ volatile("" ::: "memory");
    b.avail[1] = 25;
    __asm__ volatile("" ::: "memory");
    vmmio_write(base, 0x50, 0);
    /* Let the device start on them (each status read is an exit). */
    for (int i = 0; i < 2000; i++) (void)vmmio_read(base, 0x70);
    printf_serial("wedge: resetting\n");
    vmmio_write(base, 0x70, 0);
    printf_serial("wedge: reset returned\n");
}

static void blk_checks(const char *cmdline) {
    char v[64];
    u64 bases[16];
    if (cmdline_get(cmdline, "virtio_base", v, sizeof v)) virtio_mmio_base = parse_num(v);
    if (cmdline_get(cmdline, "virtio_stride", v, sizeof v)) virtio_mmio_stride = parse_num(v);
    int n = vblk_scan(bases, 16);
    printf_serial("blk: %d devices\n", n);
    if (cmdline_get(cmdline, "blk", v, sizeof v)) CHECK(n == (int)parse_num(v), "found %d virtio-blk devices, expected %s", n, v);
    if (n == 0) return;
    if (cmdline_get(cmdline, "blk_hostile", v, sizeof v)) blk_hostile(bases[0]);
    if (cmdline_get(cmdline, "blk_wedge", v, sizeof v)) { blk_wedge(bases[0], (u32)parse_num(v)); return; }
    struct vblk b;
    if (cmdline_get(cmdline, "blk_queue", v, sizeof v)) vblk_queue = (u16)parse_num(v);
    int r = vblk_init(&b, bases[0], 64, rings[0]);
    vblk_queue = 0;
    CHECK(r == 0, "virtio-blk init failed at step %d", -r);
    if (r) return;
    printf_serial("blk: capacity %lu sectors, features %lx, queues %u\n", b.capacity, b.features,
                  vmmio_read(bases[0], 0x100 + 32) >> 16);
    u32 used;
    if (cmdline_get(cmdline, "blk_len", v, sizeof v)) {
        u64 len = parse_num(v), done = 0;
        u32 h = 2166136261u;
        while (done < len) {
            u32 chunk = len - done > sizeof blkbuf ? sizeof blkbuf : (u32)(len - done);
            r = vblk_request(&b, VBLK_T_IN, done / 512, blkbuf, chunk, 1, &used);
            CHECK(r == 0 && used == chunk + 1, "read at %lu: status %d used %u", done, r, used);
            for (u32 i = 0; i < chunk; i++) { h ^= blkbuf[i]; h *= 16777619u; }
            done += chunk;
        }
        if (cmdline_get(cmdline, "blk_sum", v, sizeof v)) CHECK(h == (u32)parse_num(v), "disk checksum %x, expected %s", h, v);
    }
    if (cmdline_get(cmdline, "blk_serial", v, sizeof v)) {
        memset(blkbuf, 0, 32);
        r = vblk_request(&b, VBLK_T_GET_ID, 0, blkbuf, 20, 1, &used);
        blkbuf[20] = 0;
        CHECK(r == 0 && !memcmp(blkbuf, v, strlen(v) + 1), "serial '%s', expected '%s'", (char *)blkbuf, v);
    }
    if (cmdline_get(cmdline, "blk_write", v, sizeof v)) {
        for (u32 i = 0; i < 4096; i++) blkbuf[i] = (u8)(i * 7 + 3);
        r = vblk_request(&b, VBLK_T_OUT, 8, blkbuf, 4096, 0, &used);
        CHECK(r == 0, "write: status %d", r);
        r = vblk_request(&b, VBLK_T_FLUSH, 0, 0, 0, 0, &used);
        CHECK(r == 0, "flush: status %d", r);
        memset(blkbuf, 0, 4096);
        r = vblk_request(&b, VBLK_T_IN, 8, blkbuf, 4096, 1, &used);
        CHECK(r == 0 && blkbuf[4095] == (u8)(4095 * 7 + 3), "read back after write failed");
    }
    if (cmdline_get(cmdline, "blk_fill", v, sizeof v)) {
        /* Write BYTES of a pattern from sector 0 in 64 KiB requests (each
         * must succeed: a host disk that fills up stops the VM until the
         * space is there), flush, read it all back: its FNV-1a. */
        u64 len = parse_num(v), done;
        for (done = 0; done < len; done += sizeof blkbuf) {
            for (u32 i = 0; i < sizeof blkbuf; i++) blkbuf[i] = (u8)((done + i) * 13 + (done + i) / 4099);
            r = vblk_request(&b, VBLK_T_OUT, done / 512, blkbuf, sizeof blkbuf, 0, &used);
            CHECK(r == 0, "fill: write at %lu: status %d", done, r);
        }
        r = vblk_request(&b, VBLK_T_FLUSH, 0, 0, 0, 0, &used);
        CHECK(r == 0, "fill: flush: status %d", r);
        u32 h = 2166136261u;
        for (done = 0; done < len; done += sizeof blkbuf) {
            r = vblk_request(&b, VBLK_T_IN, done / 512, blkbuf, sizeof blkbuf, 1, &used);
            CHECK(r == 0, "fill: read at %lu: status %d", done, r);
            for (u32 i = 0; i < sizeof blkbuf; i++) { h ^= blkbuf[i]; h *= 16777619u; }
        }
        printf_serial("blk: filled %lu fnv %x\n", len, h);
    }
    if (cmdline_get(cmdline, "blk_bench", v, sizeof v)) {
        /* I/O without end for bench/io.py: seqread|seqwrite|randread|randwrite
         * in blk_bs-byte requests (default 4096), one at a time. */
        char bs[24];
        u64 size = cmdline_get(cmdline, "blk_bs", bs, sizeof bs) ? parse_num(bs) : 4096;
        int write = v[3] == 'w' || v[4] == 'w', rnd = v[0] == 'r' && v[1] == 'a';
        u64 units = b.capacity * 512 / size, i = 0;
        u32 x = 1;
        CHECK(size >= 512 && size <= sizeof bigbuf && units > 0, "bad blk_bs");
        printf_serial("blk: bench running\n");
        for (;;) {
            u64 unit = i++ % units;
            if (rnd) { x ^= x << 13; x ^= x >> 17; x ^= x << 5; unit = x % units; }
            r = vblk_request(&b, write ? VBLK_T_OUT : VBLK_T_IN, unit * size / 512, bigbuf, (u32)size, !write, &used);
            if (r != 0) { CHECK(0, "bench request: status %d", r); break; }
        }
    }
    if (cmdline_get(cmdline, "blk_storm", v, sizeof v)) {
        /* N writes of 4 KiB at pseudo-random 4 KiB blocks k (xorshift32
         * from 1), block k holding byte i = i*7 + k*13 + 1, a flush every 64
         * writes; N=0 runs forever (for kill -9 tests). The host replays it. */
        u64 n = parse_num(v), blocks = b.capacity / 8;
        int flush = !cmdline_get(cmdline, "blk_noflush", v, sizeof v);
        u32 x = 1;
        for (u64 w = 0; n == 0 || w < n; w++) {
            x ^= x << 13; x ^= x >> 17; x ^= x << 5;
            u64 k = x % blocks;
            for (u32 i = 0; i < 4096; i++) blkbuf[i] = (u8)(i * 7 + k * 13 + 1);
            r = vblk_request(&b, VBLK_T_OUT, k * 8, blkbuf, 4096, 0, &used);
            CHECK(r == 0, "storm write %lu: status %d", w, r);
            if (r) break;
            if (flush && w % 64 == 63) {
                r = vblk_request(&b, VBLK_T_FLUSH, 0, 0, 0, 0, &used);
                CHECK(r == 0, "storm flush: status %d", r);
            }
            if (w == 63) printf_serial("blk: storm running\n");
        }
        if (flush) {
            r = vblk_request(&b, VBLK_T_FLUSH, 0, 0, 0, 0, &used);
            CHECK(r == 0, "storm flush: status %d", r);
        }
        printf_serial("blk: storm done\n");
    }
    if (cmdline_get(cmdline, "blk_oob", v, sizeof v)) {
        r = vblk_request(&b, VBLK_T_IN, b.capacity, blkbuf, 512, 1, &used);
        CHECK(r == 1, "read past the end: status %d, expected IOERR", r);
        r = vblk_request(&b, VBLK_T_IN, b.capacity - 1, blkbuf, 1024, 1, &used);
        CHECK(r == 1, "read across the end: status %d, expected IOERR", r);
        r = vblk_request(&b, VBLK_T_IN, 0, blkbuf, 100, 1, &used);
        CHECK(r == 1, "partial-sector read: status %d, expected IOERR", r);
        r = vblk_request(&b, 0x7777, 0, blkbuf, 512, 1, &used);
        CHECK(r == 2, "unknown request: status %d, expected UNSUPP", r);
    }
    if (cmdline_get(cmdline, "blk_ro", v, sizeof v) && n > 1) {
        struct vblk ro;
        CHECK(vblk_init(&ro, bases[1], 16, rings[1]) == 0, "read-only disk init failed");
        CHECK(ro.features & (1 << 5), "read-only disk lacks VIRTIO_BLK_F_RO");
        r = vblk_request(&ro, VBLK_T_OUT, 0, blkbuf, 512, 0, &used);
        CHECK(r == 1, "write to a read-only disk: status %d, expected IOERR", r);
    }
}

static u32 fnv1a(const u8 *p, u64 n) {
    u32 h = 2166136261u;
    for (u64 i = 0; i < n; i++) { h ^= p[i]; h *= 16777619u; }
    return h;
}

void guest_main(u64 info, u32 kind) {
    struct bootinfo bi;
    char v[128];
    parse_bootinfo(info, kind, &bi);
    printf_serial("boot: %s\n", kind == KIND_PVH ? "pvh" : "linux");
    printf_serial("cmdline: %s\n", bi.cmdline);

    if (cmdline_get(bi.cmdline, "mem", v, sizeof v)) {
        u64 want = parse_num(v), above = 0, below = 0;
        for (int i = 0; i < bi.n_e820; i++) {
            if (bi.e820[i].type != 1) continue;
            if (bi.e820[i].addr >= 0x100000) above += bi.e820[i].size;
            else below += bi.e820[i].size;
        }
        CHECK(above + 0x100000 == want, "e820 RAM above 1 MiB is %lx, expected %lx", above, want - 0x100000);
        CHECK(below >= 0x9f000 && below <= 0xa0000, "e820 low RAM is %lx", below);
        printf_serial("e820: %d entries, %lu KiB RAM\n", bi.n_e820, (above + below) >> 10);
    }

    u64 rsdp = find_rsdp(&bi);
    const u8 *madt = rsdp ? acpi_table(rsdp, "APIC") : 0;
    if (cmdline_get(bi.cmdline, "acpi", v, sizeof v)) {
        if (v[0] == '1') CHECK(madt && acpi_table(rsdp, "FACP") && acpi_table(rsdp, "DSDT"), "ACPI tables missing or invalid");
        else CHECK(!madt, "ACPI tables present with acpi=off");
    }
    u32 ids[64];
    int ncpu = madt ? madt_cpus(madt, ids, 64) : mptable_cpus(ids, 64);
    printf_serial("cpus: %d (%s)\n", ncpu, madt ? "madt" : "mptable");
    if (cmdline_get(bi.cmdline, "cpus", v, sizeof v))
        CHECK(ncpu == (int)parse_num(v), "%d CPUs described, expected %s", ncpu, v);
    {
        u32 a, b, c, d;
        cpuid(1, 0, &a, &b, &c, &d);
        CHECK(c & (1u << 31), "CPUID.1:ECX hypervisor bit clear");
        cpuid(0x40000000, 0, &a, &b, &c, &d);
        CHECK(b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d, "KVM CPUID signature missing");
    }
    if (cmdline_get(bi.cmdline, "smp", v, sizeof v) && ncpu > 1) start_aps(ids, ncpu);

    if (cmdline_get(bi.cmdline, "initrd_len", v, sizeof v)) {
        CHECK(bi.initrd_size == parse_num(v), "initrd size %lu, expected %s", bi.initrd_size, v);
        CHECK(bi.initrd_addr >= 0x100000 && (bi.initrd_addr & 0xfff) == 0, "initrd at %lx", bi.initrd_addr);
        if (cmdline_get(bi.cmdline, "initrd_sum", v, sizeof v)) {
            u32 h = fnv1a((const u8 *)bi.initrd_addr, bi.initrd_size);
            CHECK(h == (u32)parse_num(v), "initrd checksum %x, expected %s", h, v);
        }
        printf_serial("initrd: %lu bytes at %lx\n", bi.initrd_size, bi.initrd_addr);
    }

    if (cmdline_get(bi.cmdline, "rtc", v, sizeof v)) {
        int y, m, d;
        rtc_date(&y, &m, &d);
        u64 got = (u64)y * 10000 + m * 100 + d;
        u64 want1 = parse_num(v), want2 = want1;
        for (char *p = v; *p; p++) if (*p == ',') want2 = parse_num(p + 1);
        CHECK(got == want1 || got == want2, "RTC date %lu, expected %s", got, v);
        printf_serial("rtc: %lu\n", got);
    }

    blk_checks(bi.cmdline);
    net_checks(bi.cmdline);
    failures += net_failures();
    rng_checks(bi.cmdline);
    failures += rng_failures();
    vsock_checks(bi.cmdline);
    failures += vsock_failures();

    if (cmdline_get(bi.cmdline, "pio_loop", v, sizeof v))   /* N port writes: N exits */
        for (u64 i = 0, n = parse_num(v); i < n; i++) outb(0x80, 0);

    if (cmdline_get(bi.cmdline, "spam", v, sizeof v))
        for (u64 i = 0, n = parse_num(v); i < n; i++)
            printf_serial("spam %lu: the quick brown fox jumps over the lazy dog\n", i);

    puts_serial(failures ? "RESULT: FAIL\n" : "RESULT: PASS\n");

    if (!cmdline_get(bi.cmdline, "action", v, sizeof v)) halt_forever();
    if (!memcmp(v, "poweroff", 9)) { acpi_poweroff(rsdp); halt_forever(); }
    if (!memcmp(v, "reset", 6)) i8042_reset();
    if (!memcmp(v, "triple", 7)) triple_fault();
    if (!memcmp(v, "count", 6))          /* count forever: shows pauses */
        for (u64 i = 0;; i++) {
            printf_serial("count %lu\n", i);
            for (int k = 0; k < 2000; k++) cpu_relax();
        }
    if (!memcmp(v, "wait-powerdown", 15)) {   /* poll the GED for the power button */
        puts_serial("waiting for the power button\n");
        while (!(mmio_read32(0xfea00000UL) & 1)) cpu_relax();
        puts_serial("power button pressed\n");
        acpi_poweroff(rsdp);
    }
    if (!memcmp(v, "wait-cad", 9)) {          /* poll the i8042 for CTRL+ALT+DEL */
        static const u8 want[] = { 0x1d, 0x38, 0xe0, 0x53 };
        unsigned got = 0;
        puts_serial("waiting for ctrl-alt-del\n");
        while (got < sizeof want) {
            if (!(inb(0x64) & 1)) { cpu_relax(); continue; }
            u8 b = inb(0x60);
            got = (b == want[got]) ? got + 1 : (b == want[0]);
        }
        puts_serial("ctrl-alt-del received\n");
        i8042_reset();
    }
    if (!memcmp(v, "mmio-exec", 10)) ((void (*)(void))0xe0000000UL)();   /* no RAM there */
    if (!memcmp(v, "reboot-once", 12)) {
        u8 boots = cmos_read(0x40);
        printf_serial("boot count: %u\n", boots);
        if (boots == 0) {
            cmos_write(0x40, 1);
            if (!cmdline_get(bi.cmdline, "how", v, sizeof v) || !memcmp(v, "kbd", 4)) i8042_reset();
            if (!memcmp(v, "triple", 7)) triple_fault();
            if (!memcmp(v, "acpi", 5)) acpi_reset(rsdp);
            puts_serial("FAIL: unknown reset method\n");
            halt_forever();
        }
        cmos_write(0x40, 0);
        acpi_poweroff(rsdp);
    }
    halt_forever();
}
