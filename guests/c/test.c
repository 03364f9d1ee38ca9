/* moat's Tier 1 test guest. The command line says what to check:
 *   mem=BYTES        e820: RAM above 1 MiB + 1 MiB == BYTES
 *   cpus=N           CPUs listed by the ACPI MADT (or MP table)
 *   acpi=0|1         whether ACPI tables must be present
 *   smp=1            start every AP (INIT-SIPI-SIPI); each checks its APIC ID
 *   initrd_len=N initrd_sum=X   the initrd's size and FNV-1a 32 checksum
 *   rtc=YYYYMMDD[,YYYYMMDD]     the CMOS date (either)
 *   spam=N           print N filler lines (serial back-pressure tests)
 *   action=poweroff|reset|triple|reboot-once|mmio-exec|count|wait-powerdown|wait-cad|halt
 *                    what to do at the end (count: print a counter forever;
 *                    wait-powerdown: poll the ACPI GED for the power button;
 *                    wait-cad: poll the i8042 for CTRL+ALT+DEL scancodes);
 *                    (mmio-exec jumps into the MMIO hole: KVM cannot run it);
 *                    reboot-once resets (how=kbd|triple|acpi) on the first
 *                    boot, counted in CMOS RAM, and powers off on the second
 * It prints "cmdline: ..." and then PASS or FAIL lines. */
#include "lib.h"

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
    if (!memcmp(v, "mmio-exec", 10)) ((void (*)(void))0xd0000000UL)();   /* no RAM there */
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
