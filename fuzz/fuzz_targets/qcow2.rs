//! qcow2 open + read + write + flush on arbitrary image bytes: moat's header
//! checks, then imago, on a memfd-backed file; and the header as reports
//! read it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_block::qcow2::{open_layer, Below};
use moat_block::{DiskImage, Qcow2Image};
use std::io::Write;
use std::os::fd::FromRawFd;

fn memfd(data: &[u8]) -> std::fs::File {
    // SAFETY: memfd_create with a static NUL-terminated name; the returned
    // descriptor is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"qcow2".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(data).unwrap();
    f
}

fuzz_target!(|data: &[u8]| {
    // The header as query-block reports it, whatever the image.
    let _ = moat_block::qcow2::info(&memfd(data));
    for writable in [false, true] {
        let f = memfd(data);
        let Ok(layer) = open_layer("fuzz", f, writable, Below::Unnamed, None, None) else {
            continue;
        };
        let img = Qcow2Image::new(layer, !writable);
        let size = img.size();
        let mut buf = vec![0u8; 8192];
        for off in [0, size / 2, size.saturating_sub(8192)] {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            // The vectored path virtio-blk reads guest memory with.
            let (a, b) = buf[..n].split_at_mut(n / 3);
            let slices = [
                vm_memory::VolatileSlice::from(a),
                vm_memory::VolatileSlice::from(b),
            ];
            let _ = img.read_slices(&slices, off);
        }
        if writable && size >= 4096 {
            let pat = [0x5au8; 4096];
            // A hostile image may map data onto its own metadata, so what
            // reads back is not checked: only that nothing panics, hangs or
            // allocates without bound (the damage stays inside the image).
            if img.write_at(&pat, size / 3 & !511).is_ok() {
                let mut back = [0u8; 4096];
                let _ = img.read_at(&mut back, size / 3 & !511);
            }
            let _ = img.write_zeroes(0, 4096.min(size));
            let _ = img.discard(0, 4096.min(size));
            let _ = img.flush();
        }
    }
});
