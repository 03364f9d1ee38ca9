//! ELF/PVH kernel parsing and loading: hostile vmlinux files.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Always look like ELF so the fuzzer explores the ELF parser.
    let mut k = b"\x7fELF".to_vec();
    k.extend_from_slice(data);
    let _ = moat_boot::elf::parse(&k[..], &moat_boot::layout::MemLayout::new(common::MEM));
    common::load(&k);
});
