/* moat's built-in demo guest: reports what it was handed, then powers off. */
#include "lib.h"

void ap_main(u32 index) { (void)index; halt_forever(); }

void guest_main(u64 info, u32 kind) {
    struct bootinfo bi;
    parse_bootinfo(info, kind, &bi);
    u64 ram = 0;
    for (int i = 0; i < bi.n_e820; i++)
        if (bi.e820[i].type == 1) ram += bi.e820[i].size;
    u64 rsdp = find_rsdp(&bi);
    u32 ids[64];
    const u8 *madt = acpi_table(rsdp, "APIC");
    int cpus = madt ? madt_cpus(madt, ids, 64) : mptable_cpus(ids, 64);
    u32 a, b, c, d;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    char sig[13];
    memcpy(sig, &b, 4); memcpy(sig + 4, &c, 4); memcpy(sig + 8, &d, 4); sig[12] = 0;

    puts_serial("\n"
                "  moat demo guest\n"
                "  ---------------\n");
    printf_serial("  boot protocol : %s\n", kind == KIND_PVH ? "PVH" : "Linux boot protocol");
    printf_serial("  memory        : %lu KiB usable RAM in %d e820 entries\n", ram >> 10, bi.n_e820);
    printf_serial("  CPUs          : %d (from the %s)\n", cpus, madt ? "ACPI MADT" : "MP table");
    printf_serial("  hypervisor    : %s\n", sig);
    printf_serial("  command line  : %s\n", bi.cmdline);
    puts_serial("  powering off through ACPI\n");
    if (rsdp) acpi_poweroff(rsdp);
    i8042_reset();
}
