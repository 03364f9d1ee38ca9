/* A minimal polling virtio-mmio (version 2) block driver for Tier 1 tests. */
#ifndef MOAT_GUEST_VIRTIO_H
#define MOAT_GUEST_VIRTIO_H
#include "lib.h"

#define VIRTIO_MMIO_BASE 0xd0000000UL
#define VIRTIO_MMIO_STRIDE 0x1000UL
/* Where vblk_scan looks (QEMU microvm: 0xfeb00000, stride 0x200). */
extern u64 virtio_mmio_base, virtio_mmio_stride;
#define VBLK_T_IN 0
#define VBLK_T_OUT 1
#define VBLK_T_FLUSH 4
#define VBLK_T_GET_ID 8
#define VBLK_T_DISCARD 11
#define VBLK_T_WRITE_ZEROES 13

struct vdesc { u64 addr; u32 len; u16 flags; u16 next; } __attribute__((packed));
#define VDESC_NEXT 1
#define VDESC_WRITE 2

struct vblk {
    u64 base;
    u16 qsize;
    u16 last_used;
    volatile struct vdesc *desc;
    volatile u16 *avail;   /* flags, idx, ring[] */
    volatile u16 *used;    /* flags, idx, then {u32 id, u32 len}[] */
    u64 features;
    u64 capacity;          /* sectors */
    u16 qindex;            /* the queue used */
};
/* The queue vblk_init sets up (0 unless a test asks for another: then it
 * negotiates VIRTIO_BLK_F_MQ and leaves queue 0 unused). */
extern u16 vblk_queue;

/* A split virtqueue of a polling driver (net.c, vsock.c). */
struct vq {
    u64 base;
    int event_idx;  /* EVENT_IDX negotiated: notify only as avail_event asks */
    u16 qsize, last_used, avail_idx, index;
    u16 kicked_idx; /* avail_idx at the last notify */
    volatile struct vdesc *desc;
    volatile u16 *avail;
    volatile u16 *used;
};
/* Reset the device at `base` and agree on VERSION_1 and those of `want` it
 * offers (in `features`), up to FEATURES_OK: 0, or a negative step. */
int virtio_negotiate(u64 base, u64 want, u64 *features);
/* Set up queue `index` of the device at `base` in `ring` (16 KiB, 4 KiB
 * aligned): 0, or a negative step. */
int vq_init(u64 base, u16 index, struct vq *q, u8 *ring, u16 qsize, int event_idx);
/* Make descriptor `head` available (no notify). */
void vq_push(struct vq *q, u16 head);
/* Notify the device, always (the notify storm's way). */
void vq_notify(struct vq *q);
/* Notify of what was pushed since the last notify, as Linux does. */
void vq_kick(struct vq *q);
/* The next used element, if any: its id and length. */
int vq_pop(struct vq *q, u32 *id, u32 *len);
/* Wait for the next used element; 0 on timeout, -2 on DEVICE_NEEDS_RESET. */
int vq_wait(struct vq *q, u32 *id, u32 *len);

u32 vmmio_read(u64 base, u32 off);
void vmmio_write(u64 base, u32 off, u32 v);
/* Find virtio devices of type `id`; returns how many (bases in `bases`). */
int virtio_scan(u32 id, u64 *bases, int max);
/* Find virtio-blk devices; returns how many (bases in `bases`). */
int vblk_scan(u64 *bases, int max);
/* The virtio-net tests (net.c). */
void net_checks(const char *cmdline);
int net_failures(void);
/* The virtio-vsock tests (vsock.c). */
void vsock_checks(const char *cmdline);
int vsock_failures(void);
/* The virtio-rng tests (rng.c). */
void rng_checks(const char *cmdline);
int rng_failures(void);
/* Initialise with `qsize` queue entries using ring memory `ring` (16 KiB, 4 KiB aligned).
 * Returns 0, or a negative step number on failure. */
int vblk_init(struct vblk *b, u64 base, u16 qsize, u8 *ring);
/* One request: header, optional data (device-writable when `in`), status.
 * Returns the status byte, or -1 if the device never answered. `used_len` gets the used length. */
int vblk_request(struct vblk *b, u32 type, u64 sector, void *data, u32 len, int in, u32 *used_len);
/* Submit a raw descriptor chain starting at `head` (caller filled b->desc);
 * -1 on timeout, -2 when the device reports DEVICE_NEEDS_RESET. */
int vblk_submit(struct vblk *b, u16 head, u32 *used_len);
#endif
