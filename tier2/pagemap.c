/* Where a mapping's resident pages are: `pagemap PID START LEN [MIB]`
 * reads /proc/PID/pagemap for the LEN bytes at address START (hex, as in
 * /proc/PID/maps) and prints the resident KiB of each MIB-MiB bucket
 * (default 8) from the mapping's start. For guest RAM that is the guest's
 * physical layout (bench/linux.sh, scenario rss). */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/pagemap", argv[1]);
    uint64_t start = strtoull(argv[2], 0, 16), len = strtoull(argv[3], 0, 0);
    uint64_t bucket = (argc > 4 ? strtoull(argv[4], 0, 0) : 8) << 20;
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    uint64_t total = 0;
    for (uint64_t b = 0; b < len; b += bucket) {
        uint64_t n = 0;
        for (uint64_t off = b; off < b + bucket && off < len; off += 4096) {
            uint64_t e;
            if (pread(fd, &e, 8, ((start + off) / 4096) * 8) != 8)
                return 1;
            n += (e >> 63) & 1;
        }
        total += n * 4;
        if (n)
            printf("TIER2 pagemap %4llu MiB: %6llu KiB\n", (unsigned long long)(b >> 20),
                   (unsigned long long)n * 4);
    }
    printf("TIER2 pagemap total %llu KiB\n", (unsigned long long)total);
    return 0;
}
