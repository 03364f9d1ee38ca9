//! Support for compressed clusters.

use super::*;
use crate::io_buffers::IoBuffer;
use crate::sync_primitives::RwLockEitherGuard;
use miniz_oxide::inflate::core::{decompress as inflate, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use std::num::NonZero;

/// Read guard for a compressed cluster.
///
/// Readers generally do not need to lock L2 tables: Modifications replace mappings atomically, and
/// allocations referenced by a (data) mapping are not freed while the image can be accessed
/// concurrently.  However, allocations referenced by compressed mappings may be freed when they
/// are replaced (by concurrent writes), so the L2 table must not be modified from looking up the
/// compressed mapping until its data has been read.  This guard ensures that.
#[derive(Debug)]
pub(super) struct CompressedClusterReadGuard<'a> {
    /// Offset of the compressed data.
    host_offset: HostOffset,

    /// Upper limit on the number of bytes that comprise the compressed data.
    length: NonZero<u64>,

    /// log2 of the cluster size.
    cluster_bits: u32,

    /// Held lock on the L2 table, preventing modifications.
    _lock: RwLockEitherGuard<'a, ()>,
}

#[maybe_async]
impl<'a> CompressedClusterReadGuard<'a> {
    /// Create a new guard for reading compressed data from the given cluster, under `lock`, which
    /// prevents concurrent modifications of that cluster.
    ///
    /// `lock` must be a read or write lock on `L2Table.writer_lock`.
    ///
    /// Return `None` if `cluster` is not compressed (checked under the guard).
    pub fn new(
        l2_table: &L2Table,
        cluster: GuestCluster,
        lock: RwLockEitherGuard<'a, ()>,
    ) -> io::Result<Option<Self>> {
        let L2Mapping::Compressed {
            host_offset,
            length,
        } = l2_table.get_mapping(cluster)?
        else {
            return Ok(None);
        };

        Ok(Some(CompressedClusterReadGuard {
            host_offset,
            length,
            cluster_bits: l2_table.cluster_bits(),
            _lock: lock,
        }))
    }

    /// Read the compressed cluster.
    ///
    /// Read the compressed data from `storage` (which must be the image’s data file) and
    /// decompress it into `buf` (which must have a length of exactly one cluster).
    ///
    /// moat patch: `zstd` selects zstd instead of zlib (deflate) decompression, as the
    /// header's compression_type field says.
    pub async fn read_compressed<S: Storage>(
        &self,
        storage: &S,
        buf: &mut [u8],
        zstd: bool,
    ) -> io::Result<()> {
        debug_assert!(buf.len() == 1 << self.cluster_bits);

        // Must fit (really shouldn’t be compressed if this exceeds the cluster size anyway)
        let length = self.length.get().try_into().map_err(io::Error::other)?;
        let mut compressed_buf = IoBuffer::new(length, storage.mem_align())?;
        storage
            .read(&mut compressed_buf, self.host_offset.0)
            .await?;

        if zstd {
            // One zstd frame; `length` may include padding past its end,
            // and the frame must produce at least one cluster.
            let mut input = compressed_buf.as_ref().into_slice();
            // moat patch: a frame that claims a window or content larger than
            // a cluster is refused before anything is allocated for it.
            zstd_frame_fits(input, buf.len() as u64).map_err(|e| {
                io::Error::other(format!(
                    "Failed to decompress cluster (host offset {}+{length}): {e}",
                    self.host_offset.0
                ))
            })?;
            let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut input).map_err(|e| {
                io::Error::other(format!(
                    "Failed to decompress cluster (host offset {}+{length}): {e}",
                    self.host_offset.0
                ))
            })?;
            return std::io::Read::read_exact(&mut dec, buf).map_err(|e| {
                io::Error::other(format!(
                    "Failed to decompress cluster (host offset {}+{length}): {e}",
                    self.host_offset.0
                ))
            });
        }

        let mut dec_ox = DecompressorOxide::new();
        let (status, _read, written) =
            inflate(&mut dec_ox, compressed_buf.as_ref().into_slice(), buf, 0, 0);

        // Because `length` will generally exceed the actual length, `HasMoreOutput` is expected
        // and can be ignored
        if status != TINFLStatus::Done && status != TINFLStatus::HasMoreOutput {
            return Err(io::Error::other(format!(
                "Failed to decompress cluster (host offset {}+{length}): {status:?}",
                self.host_offset.0,
            )));
        }
        if written < buf.len() {
            return Err(io::Error::other(format!(
                "Failed to decompress cluster (host offset {}+{length}): Decompressed {written} bytes, expected {}",
                self.host_offset.0,
                buf.len(),
            )));
        }

        Ok(())
    }
}

/// moat patch: the window and content sizes a zstd frame header declares
/// (RFC 8878, 3.1.1.1), checked against `cluster` bytes. QEMU writes each
/// compressed cluster as one single-segment frame whose content size is
/// the cluster; the smallest window a frame can name is 1 KiB.
fn zstd_frame_fits(frame: &[u8], cluster: u64) -> Result<(), String> {
    const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let byte = |i: usize| {
        frame
            .get(i)
            .copied()
            .ok_or_else(|| "truncated zstd frame header".to_string())
    };
    if frame.get(..4) != Some(&MAGIC[..]) {
        return Err("not a zstd frame".into());
    }
    let desc = byte(4)?;
    let fcs_flag = desc >> 6;
    let single_segment = desc & 0x20 != 0;
    if desc & 0x08 != 0 {
        return Err("reserved bit set in the zstd frame header".into());
    }
    let mut at = 5;
    let mut window = None;
    if !single_segment {
        let w = byte(at)?;
        at += 1;
        let log = 10 + u64::from(w >> 3);
        let base = 1u64 << log;
        window = Some(base + (base / 8) * u64::from(w & 7));
    }
    at += match desc & 3 {
        0 => 0,
        1 => 1,
        2 => 2,
        _ => 4,
    };
    let fcs_len = match (fcs_flag, single_segment) {
        (0, false) => 0,
        (0, true) => 1,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    let mut fcs = None;
    if fcs_len > 0 {
        let mut v = 0u64;
        for i in 0..fcs_len {
            v |= u64::from(byte(at + i)?) << (8 * i);
        }
        if fcs_len == 2 {
            v += 256;
        }
        fcs = Some(v);
    }
    let limit = cluster.max(1024);
    if let Some(w) = window.filter(|&w| w > limit) {
        return Err(format!(
            "zstd window of {w} bytes is larger than a cluster ({cluster} bytes)"
        ));
    }
    if let Some(c) = fcs.filter(|&c| c > cluster) {
        return Err(format!(
            "zstd frame content of {c} bytes is larger than a cluster ({cluster} bytes)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod moat_tests {
    use super::zstd_frame_fits;

    #[test]
    fn frame_headers_larger_than_a_cluster_are_refused() {
        // Single segment, 2-byte content size 65536 - 256: one 64 KiB cluster.
        let fits = [0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0xff];
        assert!(zstd_frame_fits(&fits, 65536).is_ok());
        assert!(zstd_frame_fits(&fits, 4096).is_err());
        // Window descriptor 2^27 (128 MiB).
        let big_window = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 17 << 3];
        assert!(zstd_frame_fits(&big_window, 65536).is_err());
        assert!(zstd_frame_fits(&[0x28, 0xb5], 65536).is_err());
        assert!(zstd_frame_fits(&[1, 2, 3, 4, 5, 6], 65536).is_err());
    }
}
