//! Linux x86 boot protocol (Documentation/arch/x86/boot.rst) for bzImage
//! files: setup header validation and load placement.
//!
//! Hand-written for the same reason as the ELF loader: every header field is
//! checked against the memory map with an error naming it, and placement
//! honours `kernel_alignment`, `relocatable_kernel`, `pref_address`,
//! `init_size` and `initrd_addr_max`, which `linux-loader` does not.

use crate::layout::{MemLayout, HIMEM_START};
use crate::{rd_u16, rd_u32, rd_u64, BootError};

pub const LOADED_HIGH: u8 = 0x01;
pub const XLF_KERNEL_64: u16 = 0x01;
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 0x02;
/// Offset of the 64-bit entry from the protected-mode kernel's start.
pub const ENTRY64_OFFSET: u64 = 0x200;

/// A validated bzImage and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BzImage {
    pub version: u16,
    /// Offset of the protected-mode kernel in the file.
    pub payload_offset: usize,
    /// Guest-physical load address of the protected-mode kernel.
    pub load_addr: u64,
    /// Memory the kernel needs from `load_addr` (`init_size` or its size).
    pub footprint: u64,
    /// Use the 64-bit entry (load_addr + 0x200); else the 32-bit one.
    pub entry64: bool,
    /// Longest command line the kernel accepts, without the NUL.
    pub cmdline_max: usize,
    /// Highest address the initrd may occupy (inclusive).
    pub initrd_addr_max: u64,
    /// The setup header (file offsets 0x1f1 to its end), for the zero page.
    pub setup_header: Vec<u8>,
}

pub fn is_bzimage(data: &[u8]) -> bool {
    data.len() >= 0x206 && rd_u16(data, 0x1fe) == 0xaa55 && &data[0x202..0x206] == b"HdrS"
}

fn field(f: &'static str, why: String) -> BootError {
    BootError::BzImage { field: f, why }
}

/// How much of the file [`parse`] looks at: the boot sector and the setup
/// header (which ends by 0x290).
pub const HEAD: usize = 0x290;

/// Parse and place a bzImage of `file_len` bytes for a guest with `layout`;
/// `data` is the file's first [`HEAD`] bytes (or all of a shorter file).
pub fn parse(data: &[u8], file_len: u64, layout: &MemLayout) -> Result<BzImage, BootError> {
    if file_len < 0x268 || (data.len() as u64) < file_len.min(HEAD as u64) {
        return Err(field(
            "setup header",
            format!("file is {file_len} bytes, too short for a setup header"),
        ));
    }
    if rd_u16(data, 0x1fe) != 0xaa55 {
        return Err(field("boot_flag", "missing 0xAA55".into()));
    }
    if &data[0x202..0x206] != b"HdrS" {
        return Err(field("header", "missing \"HdrS\" magic".into()));
    }
    let version = rd_u16(data, 0x206);
    if version < 0x0206 {
        return Err(field(
            "version",
            format!(
                "boot protocol {}.{:02} is older than 2.06",
                version >> 8,
                version & 0xff
            ),
        ));
    }
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let payload_offset = (setup_sects + 1) * 512;
    if payload_offset as u64 >= file_len {
        return Err(field(
            "setup_sects",
            format!("{setup_sects} setup sectors leave no kernel in a {file_len}-byte file"),
        ));
    }
    let hdr_end = 0x202 + usize::from(data[0x201]);
    if hdr_end > payload_offset || !(0x238..=0x290).contains(&hdr_end) {
        return Err(field(
            "jump",
            format!("setup header end {hdr_end:#x} is out of range"),
        ));
    }
    let loadflags = data[0x211];
    if loadflags & LOADED_HIGH == 0 {
        return Err(field(
            "loadflags",
            "not a bzImage (LOADED_HIGH clear: zImage is unsupported)".into(),
        ));
    }
    let payload_len = file_len - payload_offset as u64;
    let syssize = u64::from(rd_u32(data, 0x1f4)) * 16;
    // syssize is rounded up to 16-byte paragraphs.
    if syssize > payload_len.div_ceil(16) * 16 {
        return Err(field(
            "syssize",
            format!("{syssize:#x} bytes claimed, file holds {payload_len:#x}"),
        ));
    }
    let initrd_addr_max = u64::from(rd_u32(data, 0x22c));
    let cmdline_size = rd_u32(data, 0x238) as usize;
    let kernel_alignment = u64::from(rd_u32(data, 0x230));
    let relocatable = data[0x234] != 0;
    let (pref_address, init_size) = if version >= 0x020a {
        (rd_u64(data, 0x258), u64::from(rd_u32(data, 0x260)))
    } else {
        (HIMEM_START, 0)
    };
    let xloadflags = if version >= 0x020c {
        rd_u16(data, 0x236)
    } else {
        0
    };
    let footprint = payload_len.max(init_size);
    let low_end = layout.low_end();
    let fits = |addr: u64| {
        addr >= HIMEM_START && addr.checked_add(footprint).is_some_and(|e| e <= low_end)
    };

    let load_addr = if relocatable && version >= 0x0205 {
        if !kernel_alignment.is_power_of_two() || !(0x1000..=(1 << 30)).contains(&kernel_alignment)
        {
            return Err(field(
                "kernel_alignment",
                format!("{kernel_alignment:#x} is not a power of two between 4 KiB and 1 GiB"),
            ));
        }
        if pref_address % kernel_alignment == 0 && fits(pref_address) {
            pref_address
        } else {
            HIMEM_START.div_ceil(kernel_alignment) * kernel_alignment
        }
    } else {
        pref_address
    };
    if !fits(load_addr) {
        return Err(field(if init_size > payload_len { "init_size" } else { "syssize" }, format!(
            "the kernel needs {footprint:#x} bytes at {load_addr:#x}, beyond the guest's {} MiB of low RAM",
            low_end >> 20
        )));
    }
    if cmdline_size == 0 {
        return Err(field(
            "cmdline_size",
            "kernel accepts no command line".into(),
        ));
    }
    let mut initrd_addr_max = initrd_addr_max;
    if xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0 {
        initrd_addr_max = u64::MAX;
    }
    Ok(BzImage {
        version,
        payload_offset,
        load_addr,
        footprint,
        entry64: xloadflags & XLF_KERNEL_64 != 0,
        cmdline_max: cmdline_size,
        initrd_addr_max,
        // (hdr_end <= 0x290 and < payload_offset < file_len: inside `data`.)
        setup_header: data[0x1f1..hdr_end].to_vec(),
    })
}
