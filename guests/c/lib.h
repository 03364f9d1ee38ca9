/* Freestanding support for moat's test guests: serial output, port and
 * MMIO access, boot information (PVH start_info or Linux boot_params),
 * ACPI / MP table parsing, CMOS RTC, power-off and reset. */
#ifndef MOAT_GUEST_LIB_H
#define MOAT_GUEST_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

#define KIND_LINUX 1
#define KIND_PVH 2

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(p)); }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

void putc_serial(char c);
void puts_serial(const char *s);
void printf_serial(const char *fmt, ...);

/* What the boot protocol handed us. */
struct e820 { u64 addr, size; u32 type; };
struct bootinfo {
    int kind;
    const char *cmdline;
    u64 initrd_addr, initrd_size;
    u64 rsdp;               /* 0 when the protocol did not say */
    int n_e820;
    struct e820 e820[64];
};
void parse_bootinfo(u64 info, u32 kind, struct bootinfo *bi);

/* Find "key=" in the command line; copies the value (up to a space). */
int cmdline_get(const char *cmdline, const char *key, char *out, int outlen);
u64 parse_num(const char *s);

/* ACPI and MP tables. */
u64 find_rsdp(const struct bootinfo *bi);
const u8 *acpi_table(u64 rsdp, const char sig[4]);
int madt_cpus(const u8 *madt, u32 *ids, int max);
int mptable_cpus(u32 *ids, int max);
void acpi_poweroff(u64 rsdp);   /* returns only on failure */

void acpi_reset(u64 rsdp);    /* FADT RESET_REG; returns only on failure */
void i8042_reset(void);
void triple_fault(void);
void halt_forever(void);

/* CMOS RTC. */
u8 cmos_read(u8 reg);
void cmos_write(u8 reg, u8 v);
void rtc_date(int *year, int *month, int *day);

#endif
