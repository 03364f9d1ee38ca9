#include "lib.h"
#include <stdarg.h>

void *memcpy(void *d, const void *s, size_t n) {
    u8 *dd = d; const u8 *ss = s;
    while (n--) *dd++ = *ss++;
    return d;
}
void *memset(void *d, int c, size_t n) {
    u8 *dd = d;
    while (n--) *dd++ = (u8)c;
    return d;
}
int memcmp(const void *a, const void *b, size_t n) {
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y) return *x - *y;
    return 0;
}
size_t strlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }

#define COM1 0x3f8
void putc_serial(char c) {
    int spins = 100000;
    while (!(inb(COM1 + 5) & 0x20) && --spins) cpu_relax();
    outb(COM1, (u8)c);
}
void puts_serial(const char *s) { while (*s) { if (*s == '\n') putc_serial('\r'); putc_serial(*s++); } }

static void put_num(u64 v, int base, int width, char pad) {
    char buf[32]; int n = 0;
    do { int d = (int)(v % base); buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10); v /= base; } while (v);
    while (n < width) buf[n++] = pad;
    while (n) putc_serial(buf[--n]);
}

void printf_serial(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') { if (*fmt == '\n') putc_serial('\r'); putc_serial(*fmt); continue; }
        fmt++;
        char pad = ' '; int width = 0, lng = 0;
        if (*fmt == '0') { pad = '0'; fmt++; }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') { lng = 1; fmt++; }
        switch (*fmt) {
        case 'd': { long v = lng ? va_arg(ap, long) : va_arg(ap, int);
                    if (v < 0) { putc_serial('-'); v = -v; } put_num((u64)v, 10, width, pad); break; }
        case 'u': put_num(lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad); break;
        case 'x': put_num(lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad); break;
        case 's': puts_serial(va_arg(ap, const char *)); break;
        case 'c': putc_serial((char)va_arg(ap, int)); break;
        default: putc_serial('%'); putc_serial(*fmt); break;
        }
    }
    va_end(ap);
}

static u16 rd16(const u8 *p) { return (u16)(p[0] | p[1] << 8); }
static u32 rd32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static u64 rd64(const u8 *p) { return rd32(p) | (u64)rd32(p + 4) << 32; }

void parse_bootinfo(u64 info, u32 kind, struct bootinfo *bi) {
    const u8 *p = (const u8 *)info;
    memset(bi, 0, sizeof(*bi));
    bi->kind = (int)kind;
    if (kind == KIND_PVH) {
        if (rd32(p) != 0x336ec578) { puts_serial("FAIL: bad hvm_start_info magic\n"); halt_forever(); }
        bi->cmdline = (const char *)rd64(p + 24);
        bi->rsdp = rd64(p + 32);
        if (rd32(p + 12) >= 1) {
            const u8 *m = (const u8 *)rd64(p + 16);
            bi->initrd_addr = rd64(m);
            bi->initrd_size = rd64(m + 8);
        }
        const u8 *map = (const u8 *)rd64(p + 40);
        u32 n = rd32(p + 48);
        for (u32 i = 0; i < n && i < 64; i++) {
            bi->e820[i].addr = rd64(map + i * 24);
            bi->e820[i].size = rd64(map + i * 24 + 8);
            bi->e820[i].type = rd32(map + i * 24 + 16);
            bi->n_e820++;
        }
    } else {
        bi->cmdline = (const char *)(rd32(p + 0x228) | (u64)rd32(p + 0xc8) << 32);
        bi->initrd_addr = rd32(p + 0x218) | (u64)rd32(p + 0xc0) << 32;
        bi->initrd_size = rd32(p + 0x21c) | (u64)rd32(p + 0xc4) << 32;
        bi->rsdp = rd64(p + 0x70);
        u32 n = p[0x1e8];
        for (u32 i = 0; i < n && i < 64; i++) {
            const u8 *e = p + 0x2d0 + i * 20;
            bi->e820[i].addr = rd64(e);
            bi->e820[i].size = rd64(e + 8);
            bi->e820[i].type = rd32(e + 16);
            bi->n_e820++;
        }
    }
    if (!bi->cmdline) bi->cmdline = "";
}

int cmdline_get(const char *c, const char *key, char *out, int outlen) {
    size_t kl = strlen(key);
    for (const char *p = c; *p; p++) {
        if ((p == c || p[-1] == ' ') && !memcmp(p, key, kl) && p[kl] == '=') {
            p += kl + 1;
            int n = 0;
            while (*p && *p != ' ' && n < outlen - 1) out[n++] = *p++;
            out[n] = 0;
            return 1;
        }
    }
    return 0;
}

u64 parse_num(const char *s) {
    u64 v = 0; int base = 10;
    if (s[0] == '0' && s[1] == 'x') { base = 16; s += 2; }
    for (; *s; s++) {
        int d;
        if (*s >= '0' && *s <= '9') d = *s - '0';
        else if (*s >= 'a' && *s <= 'f') d = *s - 'a' + 10;
        else break;
        if (d >= base) break;
        v = v * base + d;
    }
    return v;
}

static int sum_ok(const u8 *p, u32 len) { u8 s = 0; for (u32 i = 0; i < len; i++) s += p[i]; return s == 0; }

u64 find_rsdp(const struct bootinfo *bi) {
    if (bi->rsdp) return bi->rsdp;
    for (u64 a = 0xe0000; a < 0x100000; a += 16)
        if (!memcmp((const void *)a, "RSD PTR ", 8) && sum_ok((const u8 *)a, 20)) return a;
    return 0;
}

const u8 *acpi_table(u64 rsdp, const char sig[4]) {
    const u8 *r = (const u8 *)rsdp;
    if (!r || memcmp(r, "RSD PTR ", 8) || !sum_ok(r, 20) || r[15] < 2 || !sum_ok(r, rd32(r + 20))) return 0;
    const u8 *x = (const u8 *)rd64(r + 24);
    if (memcmp(x, "XSDT", 4) || !sum_ok(x, rd32(x + 4))) return 0;
    u32 n = (rd32(x + 4) - 36) / 8;
    for (u32 i = 0; i < n; i++) {
        const u8 *t = (const u8 *)rd64(x + 36 + i * 8);
        if (!memcmp(t, sig, 4) && sum_ok(t, rd32(t + 4))) return t;
    }
    if (!memcmp(sig, "DSDT", 4)) {
        const u8 *f = acpi_table(rsdp, "FACP");
        if (!f) return 0;
        const u8 *d = (const u8 *)(rd64(f + 140) ? rd64(f + 140) : rd32(f + 40));
        if (!memcmp(d, "DSDT", 4) && sum_ok(d, rd32(d + 4))) return d;
    }
    return 0;
}

int madt_cpus(const u8 *m, u32 *ids, int max) {
    int n = 0;
    u32 len = rd32(m + 4);
    for (u32 off = 44; off + 2 <= len && m[off + 1] >= 2; off += m[off + 1]) {
        if (m[off] == 0 && (rd32(m + off + 4) & 1)) { if (n < max) ids[n] = m[off + 3]; n++; }
        if (m[off] == 9 && (rd32(m + off + 8) & 1)) { if (n < max) ids[n] = rd32(m + off + 4); n++; }
    }
    return n;
}

int mptable_cpus(u32 *ids, int max) {
    for (u64 a = 0xf0000; a < 0x100000; a += 16) {
        const u8 *fp = (const u8 *)a;
        if (memcmp(fp, "_MP_", 4) || !sum_ok(fp, 16)) continue;
        const u8 *t = (const u8 *)(u64)rd32(fp + 4);
        if (memcmp(t, "PCMP", 4) || !sum_ok(t, rd16(t + 4))) return -1;
        int n = 0; u16 count = rd16(t + 34);
        const u8 *e = t + 44;
        for (u16 i = 0; i < count; i++) {
            if (e[0] == 0) { if (e[3] & 1) { if (n < max) ids[n] = e[1]; n++; } e += 20; }
            else e += 8;
        }
        return n;
    }
    return -1;
}

/* Parse SLP_TYPa from \_S5_ in the DSDT (Name, Package, first element). */
static int s5_slp_typ(const u8 *dsdt) {
    u32 len = rd32(dsdt + 4);
    for (u32 i = 36; i + 8 < len; i++) {
        if (memcmp(dsdt + i, "_S5_", 4)) continue;
        const u8 *p = dsdt + i + 4;
        if (*p++ != 0x12) return -1;   /* PackageOp */
        p += (*p >> 6) + 1;            /* PkgLength */
        p++;                           /* NumElements */
        if (*p == 0x0a) return p[1];   /* BytePrefix */
        if (*p == 0x00 || *p == 0x01) return *p;
        return -1;
    }
    return -1;
}

void acpi_poweroff(u64 rsdp) {
    const u8 *f = acpi_table(rsdp, "FACP");
    const u8 *d = acpi_table(rsdp, "DSDT");
    if (!f || !d) { puts_serial("poweroff: no FADT/DSDT\n"); return; }
    const u8 *gas = f + 244;           /* SLEEP_CONTROL_REG */
    int typ = s5_slp_typ(d);
    if (gas[0] > 1 || typ < 0) { puts_serial("poweroff: no usable sleep control register or _S5_\n"); return; }
    u8 v = (u8)((typ & 7) << 2 | 1 << 5);
    if (gas[0] == 1) outb((u16)rd64(gas + 4), v);        /* SystemIO */
    else *(volatile u8 *)rd64(gas + 4) = v;               /* SystemMemory */
    for (int i = 0; i < 1000000; i++) cpu_relax();
    puts_serial("poweroff: still running\n");
}

void acpi_reset(u64 rsdp) {
    const u8 *f = acpi_table(rsdp, "FACP");
    if (!f || !(rd32(f + 112) & (1 << 10)) || f[116] != 1) { puts_serial("reset: no FADT reset register\n"); return; }
    outb((u16)rd64(f + 116 + 4), f[128]);
    for (int i = 0; i < 1000000; i++) cpu_relax();
}

void i8042_reset(void) { outb(0x64, 0xfe); for (;;) cpu_relax(); }

void triple_fault(void) {
    struct __attribute__((packed)) { u16 limit; u64 base; } idt = { 0, 0 };
    __asm__ volatile("lidt %0" :: "m"(idt));
    __asm__ volatile("ud2");
    for (;;) cpu_relax();
}

void halt_forever(void) { for (;;) __asm__ volatile("cli; hlt"); }

u8 cmos_read(u8 reg) { outb(0x70, reg); return inb(0x71); }
void cmos_write(u8 reg, u8 v) { outb(0x70, reg); outb(0x71, v); }

static int bcd(u8 v, int binary) { return binary ? v : (v >> 4) * 10 + (v & 15); }

void rtc_date(int *year, int *month, int *day) {
    while (cmos_read(0x0a) & 0x80) cpu_relax();
    int bin = cmos_read(0x0b) & 4;
    *year = bcd(cmos_read(0x32), bin) * 100 + bcd(cmos_read(0x09), bin);
    *month = bcd(cmos_read(0x08), bin);
    *day = bcd(cmos_read(0x07), bin);
}
