//! moat's purpose-built guests, compiled from `c/` during the build.
//!
//! * [`DEMO`]: the built-in demo guest (PVH ELF) that `moat` boots with no `-kernel`.
//! * The Tier 1 test guest in four boot formats, as file paths for `-kernel`.

/// The demo guest: prints what it sees, then powers off through ACPI.
pub const DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));

/// Test guest, ELF with the PVH note.
pub const TEST_PVH: &str = concat!(env!("OUT_DIR"), "/test-pvh.elf");
/// Test guest, ELF without the PVH note (64-bit Linux boot protocol).
pub const TEST_ELF64: &str = concat!(env!("OUT_DIR"), "/test-elf64.elf");
/// Test guest as a bzImage with the 64-bit entry.
pub const TEST_BZIMAGE: &str = concat!(env!("OUT_DIR"), "/test-bzimage");
/// Test guest as a bzImage without XLF_KERNEL_64 (32-bit entry).
pub const TEST_BZIMAGE32: &str = concat!(env!("OUT_DIR"), "/test-bzimage32");
/// Minimal benchmark guest (PVH): one line on COM1, then a triple fault.
pub const BENCH_PVH: &str = concat!(env!("OUT_DIR"), "/bench-pvh.elf");
