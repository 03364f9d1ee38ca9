//! ELF64 `vmlinux` parsing: loadable segments, entry point and the PVH note.
//!
//! Hand-written rather than `linux-loader`'s ELF loader because moat must
//! validate every header field against the guest's memory map *before*
//! writing anything, and name the offending field in its error; the parse
//! is split from the load so it can be fuzzed without a VM.

use crate::layout::{MemLayout, HIMEM_START};
use crate::{rd_u16, rd_u32, rd_u64, BootError, Image};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const MAX_PHDRS: usize = 128;
/// The largest PT_NOTE segment read (Linux's is a few hundred bytes).
const MAX_NOTES: u64 = 1 << 20;

/// A segment to copy: `filesz` bytes from `offset` in the file to `paddr`,
/// then zeroes up to `memsz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// What a valid ELF kernel asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfKernel {
    pub segments: Vec<Segment>,
    /// `e_entry`: the 64-bit Linux boot protocol entry.
    pub entry: u64,
    /// The PVH 32-bit entry, when the kernel has the Xen PVH note.
    pub pvh_entry: Option<u32>,
}

impl ElfKernel {
    /// Highest guest-physical address the segments occupy.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(0)
    }
}

pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

fn field(f: &'static str, why: String) -> BootError {
    BootError::Elf { field: f, why }
}

/// Parse and validate `img` against the guest memory layout. Only the
/// headers and notes are read, not the segments.
pub fn parse<I: Image + ?Sized>(img: &I, layout: &MemLayout) -> Result<ElfKernel, BootError> {
    let size = img.size();
    if size < 64 {
        return Err(field(
            "e_ident",
            format!("file is {size} bytes, shorter than an ELF64 header"),
        ));
    }
    let mut header = [0u8; 64];
    img.read_at(0, &mut header)?;
    let data = &header[..];
    if data[4] != 2 {
        return Err(field(
            "EI_CLASS",
            "only 64-bit ELF kernels are supported".into(),
        ));
    }
    if data[5] != 1 {
        return Err(field("EI_DATA", "not little-endian".into()));
    }
    if data[6] != 1 {
        return Err(field("EI_VERSION", format!("unknown version {}", data[6])));
    }
    let e_type = rd_u16(data, 16);
    if e_type != 2 {
        return Err(field("e_type", format!("{e_type} is not ET_EXEC")));
    }
    let machine = rd_u16(data, 18);
    if machine != 62 {
        return Err(field("e_machine", format!("{machine} is not x86-64")));
    }
    let entry = rd_u64(data, 24);
    let phoff = rd_u64(data, 32);
    let phentsize = rd_u16(data, 54);
    let phnum = usize::from(rd_u16(data, 56));
    if phentsize != 56 {
        return Err(field("e_phentsize", format!("{phentsize}, expected 56")));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(field(
            "e_phnum",
            format!("{phnum} program headers (1..={MAX_PHDRS} allowed)"),
        ));
    }
    phoff
        .checked_add(56 * phnum as u64)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            field(
                "e_phoff",
                format!("program headers at {phoff:#x} run past the end of the file"),
            )
        })?;
    let mut phdrs = vec![0u8; 56 * phnum]; // at most MAX_PHDRS
    img.read_at(phoff, &mut phdrs)?;

    let mut segments: Vec<Segment> = Vec::new();
    let mut pvh_entry = None;
    for i in 0..phnum {
        let ph = &phdrs[i * 56..(i + 1) * 56];
        let p_type = rd_u32(ph, 0);
        let offset = rd_u64(ph, 8);
        let paddr = rd_u64(ph, 24);
        let filesz = rd_u64(ph, 32);
        let memsz = rd_u64(ph, 40);
        let align = rd_u64(ph, 48);
        let in_file = offset.checked_add(filesz).is_some_and(|e| e <= size);
        match p_type {
            PT_LOAD => {
                if !in_file {
                    return Err(field("p_offset", format!("segment {i}: {filesz:#x} bytes at {offset:#x} run past the end of the file")));
                }
                if filesz > memsz {
                    return Err(field(
                        "p_filesz",
                        format!("segment {i}: p_filesz {filesz:#x} > p_memsz {memsz:#x}"),
                    ));
                }
                if memsz == 0 {
                    continue;
                }
                if paddr < HIMEM_START || !layout.in_ram(paddr, memsz) {
                    return Err(field("p_paddr", format!(
                        "segment {i}: [{paddr:#x}, +{memsz:#x}) is not inside guest RAM above 1 MiB (RAM is {} MiB)",
                        layout.mem_size >> 20
                    )));
                }
                let s = Segment {
                    paddr,
                    offset,
                    filesz,
                    memsz,
                };
                if let Some(o) = segments
                    .iter()
                    .find(|o| paddr < o.paddr + o.memsz && o.paddr < paddr + memsz)
                {
                    return Err(field(
                        "p_paddr",
                        format!(
                            "segment {i} at {paddr:#x} overlaps the segment at {:#x}",
                            o.paddr
                        ),
                    ));
                }
                segments.push(s);
            }
            PT_NOTE => {
                if !in_file {
                    return Err(field(
                        "p_offset",
                        format!("note segment {i} runs past the end of the file"),
                    ));
                }
                if filesz > MAX_NOTES {
                    return Err(field(
                        "p_filesz",
                        format!("note segment {i} of {filesz:#x} bytes is over {MAX_NOTES:#x}"),
                    ));
                }
                let mut notes = vec![0u8; filesz as usize];
                img.read_at(offset, &mut notes)?;
                if let Some(e) = find_pvh_note(&notes, align)? {
                    pvh_entry = Some(e);
                }
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err(field("e_phnum", "no loadable segment".into()));
    }
    let inside = |a: u64| {
        segments
            .iter()
            .any(|s| a >= s.paddr && a < s.paddr + s.filesz)
    };
    if let Some(p) = pvh_entry {
        if !inside(u64::from(p)) {
            return Err(field(
                "XEN_ELFNOTE_PHYS32_ENTRY",
                format!("entry {p:#x} is outside every loaded segment"),
            ));
        }
    } else if !inside(entry) {
        return Err(field(
            "e_entry",
            format!("entry {entry:#x} is outside every loaded segment"),
        ));
    }
    Ok(ElfKernel {
        segments,
        entry,
        pvh_entry,
    })
}

/// Walk the notes of one PT_NOTE segment looking for the PVH entry.
fn find_pvh_note(mut notes: &[u8], align: u64) -> Result<Option<u32>, BootError> {
    let pad = if align == 8 { 8 } else { 4 };
    let up = |n: usize| n.div_ceil(pad) * pad;
    while notes.len() >= 12 {
        let namesz = rd_u32(notes, 0) as usize;
        let descsz = rd_u32(notes, 4) as usize;
        let ntype = rd_u32(notes, 8);
        let name_end = 12usize.checked_add(up(namesz));
        let desc_raw_end = name_end.and_then(|n| n.checked_add(descsz));
        let (Some(name_end), Some(desc_raw_end)) = (name_end, desc_raw_end) else {
            return Err(field("PT_NOTE", "note sizes overflow".into()));
        };
        if desc_raw_end > notes.len() {
            return Err(field(
                "PT_NOTE",
                "note runs past the end of its segment".into(),
            ));
        }
        let desc_end = name_end.saturating_add(up(descsz));
        let name = &notes[12..12 + namesz];
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
            let desc = &notes[name_end..name_end + descsz];
            let entry = match descsz {
                4 => u64::from(rd_u32(desc, 0)),
                8 => rd_u64(desc, 0),
                _ => {
                    return Err(field(
                        "XEN_ELFNOTE_PHYS32_ENTRY",
                        format!("descriptor of {descsz} bytes, expected 4 or 8"),
                    ))
                }
            };
            let entry = u32::try_from(entry).map_err(|_| {
                field(
                    "XEN_ELFNOTE_PHYS32_ENTRY",
                    format!("entry {entry:#x} is above 4 GiB"),
                )
            })?;
            return Ok(Some(entry));
        }
        notes = &notes[desc_end.min(notes.len())..];
    }
    Ok(None)
}
