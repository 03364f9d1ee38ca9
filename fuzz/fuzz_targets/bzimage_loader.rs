//! bzImage setup header parsing and loading: hostile bzImage files.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Keep the magic in place so the fuzzer explores the header fields.
    let mut k = data.to_vec();
    if k.len() < 0x268 {
        k.resize(0x268, 0);
    }
    k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    k[0x202..0x206].copy_from_slice(b"HdrS");
    let _ = moat_boot::parse_kernel(&k[..], &moat_boot::layout::MemLayout::new(common::MEM));
    common::load(&k);
});
