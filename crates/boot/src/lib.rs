//! Booting a guest: the memory layout, kernel loaders (bzImage and ELF with
//! or without the PVH note), the zero page / `hvm_start_info`, boot page
//! tables and GDT, and the ACPI or MP tables that describe the machine.
//!
//! Kernels and initrds are untrusted: everything is validated before a byte
//! is written to guest memory, and every guest access goes through
//! `vm-memory`'s checked accessors.

pub mod acpi;
pub mod bzimage;
pub mod elf;
pub mod layout;
pub mod mptable;

use layout::*;
use linux_loader::bootparam;
use linux_loader::loader::elf::start_info;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// A boot error: names the file format field or structure at fault.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("invalid ELF kernel: {field}: {why}")]
    Elf { field: &'static str, why: String },
    #[error("invalid bzImage kernel: {field}: {why}")]
    BzImage { field: &'static str, why: String },
    #[error("unrecognised kernel format (neither a bzImage nor an ELF file)")]
    UnknownFormat,
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("initrd: {0}")]
    Initrd(String),
    #[error("machine tables: {0}")]
    Tables(String),
    #[error("writing guest memory at {addr:#x}: {why}")]
    Memory { addr: u64, why: String },
    #[error("reading the image: {0}")]
    Read(String),
}

/// A kernel or initrd to load: where its bytes come from. moat's files are
/// read piece by piece, the segments straight into guest memory, so no
/// copy of a whole image is ever in moat's heap (a 53 MB vmlinux made the
/// peak RSS of a boot half again as large); a byte slice serves the
/// built-in demo guest, tests and fuzzing.
pub trait Image {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the caller keeps the range within `size()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BootError>;
    /// Copy `len` bytes from `offset` to guest memory at `addr`; the caller
    /// keeps the range within `size()`.
    fn copy_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), BootError>;
}

impl Image for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BootError> {
        buf.copy_from_slice(bytes_at(self, offset, buf.len() as u64)?);
        Ok(())
    }

    fn copy_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), BootError> {
        write(mem, addr, bytes_at(self, offset, len)?)
    }
}

/// `len` bytes of `data` from `offset`, if it has them.
fn bytes_at(data: &[u8], offset: u64, len: u64) -> Result<&[u8], BootError> {
    usize::try_from(offset)
        .ok()
        .zip(usize::try_from(len).ok())
        .and_then(|(o, l)| data.get(o..o.checked_add(l)?))
        .ok_or_else(|| BootError::Read(format!("{len} bytes at {offset:#x}: past the end")))
}

pub(crate) fn rd_u16(d: &[u8], off: usize) -> u16 {
    d.get(off..off + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}
pub(crate) fn rd_u32(d: &[u8], off: usize) -> u32 {
    d.get(off..off + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}
pub(crate) fn rd_u64(d: &[u8], off: usize) -> u64 {
    d.get(off..off + 8).map_or(0, |b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    })
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { entry: u32, start_info: u32 },
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 { entry: u64, zero_page: u64 },
    /// Linux 32-bit boot protocol: protected mode, ESI = zero page.
    Linux32 { entry: u32, zero_page: u32 },
}

/// What describes the machine to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDesc {
    /// APIC ID of each vCPU, BSP first.
    pub apic_ids: Vec<u32>,
    pub acpi: bool,
    /// virtio-mmio devices: (MMIO base, IRQ).
    pub virtio: Vec<(u64, u32)>,
}

/// A kernel file recognised and validated for a layout (not yet written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    Elf(elf::ElfKernel),
    BzImage(bzimage::BzImage),
}

/// Recognise and validate `img` as a kernel for `layout` (reading only its
/// headers).
pub fn parse_kernel<I: Image + ?Sized>(img: &I, layout: &MemLayout) -> Result<Kernel, BootError> {
    let mut head = vec![0u8; img.size().min(bzimage::HEAD as u64) as usize];
    img.read_at(0, &mut head)?;
    if elf::is_elf(&head) {
        Ok(Kernel::Elf(elf::parse(img, layout)?))
    } else if bzimage::is_bzimage(&head) {
        Ok(Kernel::BzImage(bzimage::parse(&head, img.size(), layout)?))
    } else {
        Err(BootError::UnknownFormat)
    }
}

fn write(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) -> Result<(), BootError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| BootError::Memory {
            addr,
            why: e.to_string(),
        })
}

/// Choose the initrd's address: page aligned, as high as allowed, above the kernel.
pub fn place_initrd(
    layout: &MemLayout,
    size: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<u64, BootError> {
    let limit = layout.low_end().min(addr_max.saturating_add(1));
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
        .ok_or_else(|| {
            BootError::Initrd(format!(
                "{size} bytes do not fit between the kernel (ends at {kernel_end:#x}) and {limit:#x}; give the guest more memory"
            ))
        })?;
    Ok(addr)
}

/// Write everything the guest needs to boot and return how to enter it.
/// `mem` must be fresh, all zero (moat maps new memory for every boot):
/// nothing is written where the guest expects zeros.
pub fn load<K: Image + ?Sized, R: Image + ?Sized>(
    mem: &GuestMemoryMmap,
    layout: &MemLayout,
    kernel_image: &K,
    initrd: Option<&R>,
    cmdline: &str,
    machine: &MachineDesc,
) -> Result<EntryPoint, BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    // Without ACPI, Linux learns of virtio-mmio devices from its command line.
    let mut full = cmdline.to_string();
    if !machine.acpi {
        for (base, irq) in &machine.virtio {
            full += &format!(" virtio_mmio.device=4K@{base:#x}:{irq}");
        }
    }
    let cmdline = full.trim_start();
    let kernel = parse_kernel(kernel_image, layout)?;
    let cmdline_max = match &kernel {
        Kernel::BzImage(b) => b.cmdline_max.min(CMDLINE_MAX),
        Kernel::Elf(_) => CMDLINE_MAX,
    };
    if cmdline.len() > cmdline_max {
        return Err(BootError::Cmdline(format!(
            "{} bytes, the kernel accepts at most {cmdline_max}",
            cmdline.len()
        )));
    }

    // Kernel image.
    let (kernel_end, initrd_max) = match &kernel {
        Kernel::Elf(k) => {
            for s in &k.segments {
                // (The rest up to memsz stays as it is: zero, since `mem` is
                // fresh. Writing zeros would only fault those pages in.)
                kernel_image.copy_to_guest(mem, s.paddr, s.offset, s.filesz)?;
            }
            (k.end(), u64::from(u32::MAX))
        }
        Kernel::BzImage(b) => {
            let from = b.payload_offset as u64;
            kernel_image.copy_to_guest(mem, b.load_addr, from, kernel_image.size() - from)?;
            (b.load_addr + b.footprint, b.initrd_addr_max)
        }
    };

    // Initrd.
    let initrd_at = match initrd {
        Some(img) => {
            let addr = place_initrd(layout, img.size(), kernel_end, initrd_max)?;
            img.copy_to_guest(mem, addr, 0, img.size())?;
            Some((addr, img.size()))
        }
        None => None,
    };

    // Command line.
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    write(mem, CMDLINE_ADDR, &c)?;

    // Machine description.
    let rsdp = if machine.acpi {
        let tables = acpi::build(&machine.apic_ids, &machine.virtio)?;
        for t in &tables {
            write(mem, t.addr, &t.bytes)?;
        }
        Some(ACPI_START)
    } else {
        write(mem, MPTABLE_START, &mptable::build(&machine.apic_ids))?;
        None
    };

    write_page_tables(mem)?;

    let entry = match kernel {
        Kernel::Elf(k) => match k.pvh_entry {
            Some(entry) => {
                write_pvh_info(mem, layout, initrd_at, rsdp)?;
                EntryPoint::Pvh {
                    entry,
                    start_info: PVH_INFO_ADDR as u32,
                }
            }
            None => {
                let zp = zero_page(None, layout, initrd_at, rsdp)?;
                write_obj(mem, ZERO_PAGE_ADDR, zp)?;
                EntryPoint::Linux64 {
                    entry: k.entry,
                    zero_page: ZERO_PAGE_ADDR,
                }
            }
        },
        Kernel::BzImage(b) => {
            let zp = zero_page(Some(&b), layout, initrd_at, rsdp)?;
            write_obj(mem, ZERO_PAGE_ADDR, zp)?;
            if b.entry64 {
                EntryPoint::Linux64 {
                    entry: b.load_addr + bzimage::ENTRY64_OFFSET,
                    zero_page: ZERO_PAGE_ADDR,
                }
            } else {
                EntryPoint::Linux32 {
                    entry: b.load_addr as u32,
                    zero_page: ZERO_PAGE_ADDR as u32,
                }
            }
        }
    };
    write_gdt(mem, matches!(entry, EntryPoint::Linux64 { .. }))?;
    Ok(entry)
}

/// `struct boot_params` (the zero page), as linux-loader defines it.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct ZeroPage(bootparam::boot_params);

// SAFETY: boot_params is #[repr(C, packed)] and made only of integers and
// arrays of integers: it has no padding, and every bit pattern is a value.
unsafe impl ByteValued for ZeroPage {}

/// PVH's `hvm_start_info` and its tables (xen/include/public/arch-x86/hvm/start_info.h).
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct StartInfo(start_info::hvm_start_info);
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct ModlistEntry(start_info::hvm_modlist_entry);
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct MemmapEntry(start_info::hvm_memmap_table_entry);

// SAFETY: #[repr(C)] structs of u32/u64 fields laid out without padding
// (linux-loader asserts their sizes: 56, 32 and 24 bytes); every bit
// pattern is a value.
unsafe impl ByteValued for StartInfo {}
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}

fn write_obj<T: ByteValued>(mem: &GuestMemoryMmap, addr: u64, v: T) -> Result<(), BootError> {
    write(mem, addr, v.as_slice())
}

/// Build `struct boot_params` (the zero page).
fn zero_page(
    bz: Option<&bzimage::BzImage>,
    layout: &MemLayout,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<ZeroPage, BootError> {
    let blank = [0u8; std::mem::size_of::<ZeroPage>()];
    let mut zp = ZeroPage::from_slice(&blank)
        .copied()
        .ok_or_else(|| BootError::Tables("zero page layout".into()))?;
    match bz {
        Some(b) => {
            // Copy the kernel's setup header verbatim, then fill in our fields.
            let hdr = zp.as_mut_slice();
            hdr[0x1f1..0x1f1 + b.setup_header.len()].copy_from_slice(&b.setup_header);
        }
        None => {
            zp.0.hdr.boot_flag = 0xaa55;
            zp.0.hdr.header = u32::from_le_bytes(*b"HdrS");
            zp.0.hdr.version = 0x020f;
            zp.0.hdr.kernel_alignment = 0x0100_0000;
        }
    }
    zp.0.hdr.vid_mode = 0xffff; // normal
    zp.0.hdr.type_of_loader = 0xff; // undefined
    zp.0.hdr.loadflags |= bzimage::LOADED_HIGH;
    zp.0.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    if let Some((addr, size)) = initrd {
        zp.0.hdr.ramdisk_image = addr as u32;
        zp.0.hdr.ramdisk_size = size as u32;
        zp.0.ext_ramdisk_image = (addr >> 32) as u32;
        zp.0.ext_ramdisk_size = (size >> 32) as u32;
    }
    if let Some(r) = rsdp {
        zp.0.acpi_rsdp_addr = r;
    }
    let e820 = layout.e820();
    let table = zp.0.e820_table;
    if e820.len() > table.len() {
        return Err(BootError::Tables("too many e820 entries".into()));
    }
    zp.0.e820_entries = e820.len() as u8;
    let mut table = table;
    for (slot, e) in table.iter_mut().zip(&e820) {
        *slot = bootparam::boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    zp.0.e820_table = table;
    Ok(zp)
}

/// PVH `hvm_start_info`, its module list (the initrd) and memory map.
fn write_pvh_info(
    mem: &GuestMemoryMmap,
    layout: &MemLayout,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let e820 = layout.e820();
    if e820.len() > PVH_MEMMAP_MAX {
        return Err(BootError::Tables("too many memory map entries".into()));
    }
    let mut info = start_info::hvm_start_info {
        magic: start_info::XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        let module = start_info::hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        write_obj(mem, PVH_MODLIST_ADDR, ModlistEntry(module))?;
    }
    let entry_size = std::mem::size_of::<MemmapEntry>() as u64;
    for (i, e) in e820.iter().enumerate() {
        let entry = start_info::hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        write_obj(
            mem,
            PVH_MEMMAP_ADDR + i as u64 * entry_size,
            MemmapEntry(entry),
        )?;
    }
    write_obj(mem, PVH_INFO_ADDR, StartInfo(info))
}

/// The boot GDT (Linux boot protocol: __BOOT_CS 0x10, __BOOT_DS 0x18).
pub mod gdt {
    pub const CODE_SEL: u16 = 0x10;
    pub const DATA_SEL: u16 = 0x18;
    pub const TSS_SEL: u16 = 0x20;
    pub const CODE64: u64 = 0x00af_9b00_0000_ffff;
    pub const CODE32: u64 = 0x00cf_9b00_0000_ffff;
    pub const DATA: u64 = 0x00cf_9300_0000_ffff;
    /// A 32-bit busy TSS at base 0, limit 0x67.
    pub const TSS: u64 = 0x0000_8b00_0000_0067;

    /// The table: `CODE_SEL` is a 64-bit code segment when `long`.
    pub fn table(long: bool) -> [u64; 5] {
        [0, 0, if long { CODE64 } else { CODE32 }, DATA, TSS]
    }
}

fn write_gdt(mem: &GuestMemoryMmap, long: bool) -> Result<(), BootError> {
    let bytes: Vec<u8> = gdt::table(long)
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    write(mem, GDT_ADDR, &bytes)
}

/// Identity-map the first 4 GiB with 2 MiB pages (the 64-bit boot protocol
/// needs the kernel, zero page, command line and initrd mapped).
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let entries = |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|e| e.to_le_bytes()).collect() };
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_ADDR | PRESENT_WRITABLE;
    write(mem, PML4_ADDR, &entries(&pml4))?;
    let mut pdpt = [0u64; 512];
    for (i, e) in pdpt.iter_mut().take(4).enumerate() {
        *e = (PD_ADDR + i as u64 * 0x1000) | PRESENT_WRITABLE;
    }
    write(mem, PDPT_ADDR, &entries(&pdpt))?;
    let pd: Vec<u64> = (0..2048u64)
        .map(|i| (i << 21) | HUGE | PRESENT_WRITABLE)
        .collect();
    write(mem, PD_ADDR, &entries(&pd))
}
