#include "virtio.h"

u32 vmmio_read(u64 base, u32 off) { return mmio_read32(base + off); }
void vmmio_write(u64 base, u32 off, u32 v) { mmio_write32(base + off, v); }

#define barrier() __asm__ volatile("" ::: "memory")

u64 virtio_mmio_base = VIRTIO_MMIO_BASE, virtio_mmio_stride = VIRTIO_MMIO_STRIDE;

int virtio_scan(u32 id, u64 *bases, int max) {
    int n = 0;
    for (int i = 0; i < 32 && n < max; i++) {
        u64 b = virtio_mmio_base + i * virtio_mmio_stride;
        if (vmmio_read(b, 0) == 0x74726976 && vmmio_read(b, 4) == 2 && vmmio_read(b, 8) == id) bases[n++] = b;
    }
    return n;
}

int vblk_scan(u64 *bases, int max) { return virtio_scan(2, bases, max); }

u16 vblk_queue;

int vblk_init(struct vblk *b, u64 base, u16 qsize, u8 *ring) {
    b->base = base;
    b->qindex = vblk_queue;
    vmmio_write(base, 0x70, 0);
    if (vmmio_read(base, 0x70) != 0) return -1;
    vmmio_write(base, 0x70, 1);
    vmmio_write(base, 0x70, 1 | 2);
    vmmio_write(base, 0x14, 0);
    u64 f = vmmio_read(base, 0x10);
    vmmio_write(base, 0x14, 1);
    f |= (u64)vmmio_read(base, 0x10) << 32;
    b->features = f;
    if (!(f >> 32 & 1)) return -2;                 /* VERSION_1 */
    vmmio_write(base, 0x24, 0);
    vmmio_write(base, 0x20, b->qindex ? 1u << 12 : 0);   /* MQ, or nothing optional */
    vmmio_write(base, 0x24, 1);
    vmmio_write(base, 0x20, 1);                    /* VERSION_1 */
    vmmio_write(base, 0x70, 1 | 2 | 8);
    if (!(vmmio_read(base, 0x70) & 8)) return -3;
    vmmio_write(base, 0x30, b->qindex);
    if (vmmio_read(base, 0x44) != 0) return -4;
    u32 max = vmmio_read(base, 0x34);
    if (max == 0) return -5;
    if (qsize > max) qsize = (u16)max;
    b->qsize = qsize;
    memset(ring, 0, 16384);
    b->desc = (volatile struct vdesc *)ring;
    b->avail = (volatile u16 *)(ring + 16 * qsize);
    b->used = (volatile u16 *)(ring + 8192);
    b->last_used = 0;
    vmmio_write(base, 0x38, qsize);
    vmmio_write(base, 0x80, (u32)(u64)b->desc);
    vmmio_write(base, 0x84, (u32)((u64)b->desc >> 32));
    vmmio_write(base, 0x90, (u32)(u64)b->avail);
    vmmio_write(base, 0x94, (u32)((u64)b->avail >> 32));
    vmmio_write(base, 0xa0, (u32)(u64)b->used);
    vmmio_write(base, 0xa4, (u32)((u64)b->used >> 32));
    vmmio_write(base, 0x44, 1);
    vmmio_write(base, 0x70, 1 | 2 | 8 | 4);
    b->capacity = vmmio_read(base, 0x100) | (u64)vmmio_read(base, 0x104) << 32;
    return 0;
}

int vblk_submit(struct vblk *b, u16 head, u32 *used_len) {
    u16 idx = b->avail[1];
    b->avail[2 + idx % b->qsize] = head;
    barrier();
    b->avail[1] = (u16)(idx + 1);
    barrier();
    vmmio_write(b->base, 0x50, b->qindex);
    for (u64 spins = 0; b->used[1] == b->last_used; spins++) {
        if (spins > 50000000UL) return -1;
        if (spins % 1024 == 0 && (vmmio_read(b->base, 0x70) & 0x40)) return -2;   /* DEVICE_NEEDS_RESET */
        cpu_relax();
    }
    barrier();
    volatile u32 *elem = (volatile u32 *)(b->used + 2) + 2 * (b->last_used % b->qsize);
    if (used_len) *used_len = elem[1];
    b->last_used++;
    vmmio_write(b->base, 0x64, vmmio_read(b->base, 0x60));   /* ack any interrupt */
    return 0;
}

static struct { u32 type, reserved; u64 sector; } hdr __attribute__((aligned(16)));
static volatile u8 status_byte;

int vblk_request(struct vblk *b, u32 type, u64 sector, void *data, u32 len, int in, u32 *used_len) {
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    status_byte = 0xff;
    int n = 0;
    b->desc[n] = (struct vdesc){ (u64)&hdr, 16, VDESC_NEXT, 1 };
    n++;
    if (len) {
        b->desc[n] = (struct vdesc){ (u64)data, len, VDESC_NEXT | (in ? VDESC_WRITE : 0), (u16)(n + 1) };
        n++;
    }
    b->desc[n] = (struct vdesc){ (u64)&status_byte, 1, VDESC_WRITE, 0 };
    int r = vblk_submit(b, 0, used_len);
    if (r < 0) return r;
    return status_byte;
}

int virtio_negotiate(u64 base, u64 want, u64 *features) {
    vmmio_write(base, 0x70, 0);
    if (vmmio_read(base, 0x70) != 0) return -1;
    vmmio_write(base, 0x70, 1 | 2);
    vmmio_write(base, 0x14, 0);
    u64 f = vmmio_read(base, 0x10);
    vmmio_write(base, 0x14, 1);
    f |= (u64)vmmio_read(base, 0x10) << 32;
    if (!(f >> 32 & 1)) return -2;                 /* VERSION_1 */
    f &= want | 1UL << 32;
    *features = f;
    vmmio_write(base, 0x24, 0);
    vmmio_write(base, 0x20, (u32)f);
    vmmio_write(base, 0x24, 1);
    vmmio_write(base, 0x20, (u32)(f >> 32));
    vmmio_write(base, 0x70, 1 | 2 | 8);
    if (!(vmmio_read(base, 0x70) & 8)) return -3;
    return 0;
}

int vq_init(u64 base, u16 index, struct vq *q, u8 *ring, u16 qsize, int event_idx) {
    vmmio_write(base, 0x30, index);
    if (vmmio_read(base, 0x44) != 0) return -1;
    u32 max = vmmio_read(base, 0x34);
    if (max == 0) return -2;
    if (qsize > max) qsize = (u16)max;
    q->base = base;
    q->event_idx = event_idx;
    q->qsize = qsize;
    q->index = index;
    q->last_used = 0;
    q->avail_idx = 0;
    q->kicked_idx = 0;
    memset(ring, 0, 16384);
    q->desc = (volatile struct vdesc *)ring;
    q->avail = (volatile u16 *)(ring + 16 * qsize);
    q->used = (volatile u16 *)(ring + 8192);
    vmmio_write(base, 0x38, qsize);
    vmmio_write(base, 0x80, (u32)(u64)q->desc);
    vmmio_write(base, 0x84, (u32)((u64)q->desc >> 32));
    vmmio_write(base, 0x90, (u32)(u64)q->avail);
    vmmio_write(base, 0x94, (u32)((u64)q->avail >> 32));
    vmmio_write(base, 0xa0, (u32)(u64)q->used);
    vmmio_write(base, 0xa4, (u32)((u64)q->used >> 32));
    vmmio_write(base, 0x44, 1);
    return 0;
}

void vq_push(struct vq *q, u16 head) {
    q->avail[2 + q->avail_idx % q->qsize] = head;
    barrier();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    barrier();
}

void vq_notify(struct vq *q) {
    q->kicked_idx = q->avail_idx;
    vmmio_write(q->base, 0x50, q->index);
}

/* With EVENT_IDX only when the device's avail_event (after the used ring)
 * asks for it (virtio 1.2, 2.7.10), so a device that forgets to update
 * avail_event is not woken again. */
void vq_kick(struct vq *q) {
    if (q->event_idx) {
        __asm__ volatile("mfence" ::: "memory");
        u16 event = q->used[2 + 4 * q->qsize];
        u16 old = q->kicked_idx, new = q->avail_idx;
        q->kicked_idx = new;
        if ((u16)(new - event - 1) >= (u16)(new - old)) return;
    }
    vmmio_write(q->base, 0x50, q->index);
}

int vq_pop(struct vq *q, u32 *id, u32 *len) {
    if (q->used[1] == q->last_used) return 0;
    barrier();
    volatile u32 *e = (volatile u32 *)(q->used + 2) + 2 * (q->last_used % q->qsize);
    *id = e[0];
    *len = e[1];
    q->last_used++;
    return 1;
}

int vq_wait(struct vq *q, u32 *id, u32 *len) {
    for (u64 spins = 0;; spins++) {
        if (vq_pop(q, id, len)) return 1;
        if (spins > 20000000UL) return 0;
        if (spins % 1024 == 0 && (vmmio_read(q->base, 0x70) & 0x40)) return -2;
        cpu_relax();
    }
}
