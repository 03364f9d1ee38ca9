//! Repair of a qcow2 image whose dirty bit is set: what QEMU does when it
//! opens such an image writable (`qcow2_do_open` runs its check with
//! `BDRV_FIX_ERRORS | BDRV_FIX_LEAKS`, then clears the bit).
//!
//! With `lazy_refcounts=on`, QEMU writes L2 entries without waiting for the
//! refcount blocks that count their clusters, and sets the dirty bit while
//! the image is open; after a crash the refcounts on disk are too low
//! (clusters in use that count 0) or too high (clusters freed). imago has no
//! repair of its own, so moat does it here, before imago opens the file:
//!
//! 1. count every reference the image's metadata makes: the header cluster,
//!    the L1 table, the refcount table, each refcount block, each L2 table,
//!    each data cluster and each cluster a compressed cluster's bytes touch
//!    (none for data in an external data file);
//! 2. compare with the refcount blocks and set every entry that differs
//!    (too low: an error QEMU fixes; too high: a leak it also fixes);
//! 3. write the changed blocks, sync, then clear the dirty bit and sync.
//!
//! Images this cannot repair are refused, untouched, with the `qemu-img`
//! command that can: internal snapshots or persistent bitmaps (their tables
//! add references this module does not walk), a reference past the end of
//! the file, a cluster in use whose refcount block does not exist, a count
//! the refcount width cannot hold. Memory is one `u16` per cluster of the
//! file, bounded by [`MAX_CLUSTERS`], and one cluster buffer at a time.
//! A repair killed halfway leaves the bit set, and the next open repairs again.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::qcow2::{be64, read_exact, read_into, INCOMPAT_DIRTY, OFFSET_MASK};

/// The most host clusters a repair counts (256 MiB of counters; a 2 TiB
/// file of 64 KiB clusters is 32 Mi clusters).
pub const MAX_CLUSTERS: u64 = 1 << 27;
const L2_COMPRESSED: u64 = 1 << 62;

/// Where the image's tables are, from a header `qcow2::check` accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub l1_offset: u64,
    pub l1_entries: u64,
    pub rt_offset: u64,
    pub rt_clusters: u64,
    pub refcount_order: u32,
    pub snapshots: u64,
    pub bitmaps: bool,
    pub external_data_file: bool,
    /// L2 entries are 16 bytes: the descriptor, then the subcluster bitmap.
    pub extended_l2: bool,
}

/// What a repair changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Refcounts that were too low (clusters in use counted short).
    pub errors: u64,
    /// Refcounts that were too high (clusters no longer used).
    pub leaks: u64,
}

fn refuse(why: impl std::fmt::Display) -> String {
    format!(
        "the dirty bit is set (lazy refcounts not written back after a crash) and moat cannot repair it: {why}; \
         repair it with `qemu-img check -r all`"
    )
}

/// Entry `i` of a refcount block of `2^order`-bit entries (QEMU's layout:
/// sub-byte entries from the low bits up, wider ones big-endian).
fn get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            u64::from((block[i / per] >> (bits * (i % per))) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]),
        )),
        _ => be64(block, 8 * i),
    }
}

fn set(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = bits * (i % per);
            let mask = ((1u8 << bits) - 1) << shift;
            block[i / per] = (block[i / per] & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[i] = v as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Repair the refcounts of the dirty image in `file` (`file_len` bytes)
/// and clear its dirty bit.
pub fn repair(file: &File, file_len: u64, g: &Geometry) -> Result<Repaired, String> {
    if g.snapshots != 0 {
        return Err(refuse("the image has internal snapshots"));
    }
    if g.bitmaps {
        return Err(refuse("the image has persistent dirty bitmaps"));
    }
    let bits = g.cluster_bits;
    let cluster = 1u64 << bits;
    let nclusters = file_len.div_ceil(cluster);
    if nclusters > MAX_CLUSTERS {
        return Err(refuse(format!("the file has {nclusters} clusters")));
    }
    let mut refs = vec![0u16; nclusters as usize];
    let mut add = |off: u64, len: u64, what: &str| -> Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        let last = off
            .checked_add(len - 1)
            .map(|e| e >> bits)
            .filter(|&l| l < nclusters)
            .ok_or_else(|| {
                refuse(format!(
                    "the {what} at {off:#x} lies past the end of the file"
                ))
            })?;
        for r in &mut refs[(off >> bits) as usize..=last as usize] {
            *r = r.saturating_add(1);
        }
        Ok(())
    };

    // 1. Every reference the metadata makes.
    add(0, cluster, "header")?;
    add(g.l1_offset, g.l1_entries * 8, "L1 table")?;
    add(g.rt_offset, g.rt_clusters * cluster, "refcount table")?;
    let rt = read_exact(file, g.rt_offset, g.rt_clusters * cluster)?;
    let rt_entries = rt.len() / 8;
    for i in 0..rt_entries {
        let off = be64(&rt, 8 * i) & OFFSET_MASK;
        if off != 0 {
            if !off.is_multiple_of(cluster) {
                return Err(refuse(format!("refcount block {i} is not cluster aligned")));
            }
            add(off, cluster, "refcount block")?;
        }
    }
    let l1 = read_exact(file, g.l1_offset, g.l1_entries * 8)?;
    let mut l2 = vec![0u8; cluster as usize];
    let csize_shift = 62 - (bits - 8);
    let csize_mask = (1u64 << (bits - 8)) - 1;
    for i in 0..g.l1_entries as usize {
        let l2_off = be64(&l1, 8 * i) & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        if !l2_off.is_multiple_of(cluster) {
            return Err(refuse(format!("L2 table {i} is not cluster aligned")));
        }
        add(l2_off, cluster, "L2 table")?;
        read_into(file, &mut l2, l2_off)?;
        let entry_bytes = if g.extended_l2 { 16 } else { 8 };
        for j in 0..(cluster / entry_bytes) as usize {
            let e = be64(&l2, entry_bytes as usize * j);
            if e & L2_COMPRESSED != 0 {
                if g.external_data_file {
                    return Err(refuse("a compressed cluster in an image with a data file"));
                }
                // QEMU's qcow2_parse_compressed_l2_entry().
                let off = e & ((1u64 << csize_shift) - 1);
                let sectors = ((e >> csize_shift) & csize_mask) + 1;
                let len = sectors * 512 - (off & 511);
                add(off, len, "compressed cluster")?;
            } else {
                let off = e & OFFSET_MASK;
                if off == 0 || g.external_data_file {
                    continue;
                }
                if !off.is_multiple_of(cluster) {
                    return Err(refuse(format!("a data cluster at {off:#x} is not aligned")));
                }
                add(off, cluster, "data cluster")?;
            }
        }
    }

    // 2. Every cluster in use needs a refcount block to count it; checked
    // before anything is written.
    let per_block = (cluster * 8) >> g.refcount_order;
    let max = if g.refcount_order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << g.refcount_order)) - 1
    };
    for (i, &n) in refs.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let b = i as u64 / per_block;
        if b >= rt_entries as u64 || be64(&rt, 8 * b as usize) & OFFSET_MASK == 0 {
            return Err(refuse(format!(
                "cluster {i} is in use but has no refcount block"
            )));
        }
        if u64::from(n) > max || n == u16::MAX {
            return Err(refuse(format!("cluster {i} has too many references")));
        }
    }

    // 3. Set what differs, block by block.
    let mut done = Repaired::default();
    let mut block = vec![0u8; cluster as usize];
    for b in 0..rt_entries {
        let off = be64(&rt, 8 * b) & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        read_into(file, &mut block, off)?;
        let mut changed = false;
        for j in 0..per_block as usize {
            let i = b as u64 * per_block + j as u64;
            let want = refs.get(i as usize).map_or(0, |&n| u64::from(n));
            let have = get(&block, g.refcount_order, j);
            if have != want {
                if have < want {
                    done.errors += 1;
                } else {
                    done.leaks += 1;
                }
                set(&mut block, g.refcount_order, j, want);
                changed = true;
            }
        }
        if changed {
            file.write_all_at(&block, off)
                .map_err(|e| format!("writing refcount block at {off:#x}: {e}"))?;
        }
    }
    file.sync_data()
        .map_err(|e| format!("syncing the repaired refcounts: {e}"))?;
    let mut incompat = [0u8; 8];
    read_into(file, &mut incompat, 72)?;
    let clean = u64::from_be_bytes(incompat) & !INCOMPAT_DIRTY;
    file.write_all_at(&clean.to_be_bytes(), 72)
        .and_then(|()| file.sync_data())
        .map_err(|e| format!("clearing the dirty bit: {e}"))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let n = (64 * 8) >> order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..n {
                set(&mut block, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // QEMU's layout: 1-bit entries from the low bit of each byte up.
        let mut b = [0u8; 1];
        set(&mut b, 0, 1, 1);
        assert_eq!(b[0], 0b10);
    }
}
