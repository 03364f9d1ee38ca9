//! Tier 1: malformed kernels, initrds and command lines are refused with an
//! error naming what is wrong, exit status 1, and no VM is started.

mod common;
use common::*;
use moat_guests::{TEST_BZIMAGE, TEST_PVH};

/// A minimal ELF64 x86-64 executable with the given program headers
/// (type, offset, paddr, filesz, memsz), entry at `entry`, 4 KiB of payload.
fn elf(entry: u64, phdrs: &[(u32, u64, u64, u64, u64)]) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    for &(t, off, paddr, filesz, memsz) in phdrs {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&t.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&paddr.to_le_bytes());
        p[24..32].copy_from_slice(&paddr.to_le_bytes());
        p[32..40].copy_from_slice(&filesz.to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        f.extend_from_slice(&p);
    }
    f.resize(0x2000, 0xf4);
    f
}

fn refused(name: &str, kernel: &[u8], extra: &[&str], expect: &[&str]) {
    let dir = scratch(name);
    let k = dir.join("kernel");
    std::fs::write(&k, kernel).unwrap();
    let mut args = vec!["-kernel", k.to_str().unwrap(), "-no-reboot"];
    args.extend_from_slice(extra);
    let r = moat(&args);
    assert_eq!(r.status, Some(1), "{name}: {r:#?}");
    assert!(r.stdout.is_empty(), "{name}: guest ran: {r:#?}");
    let line = r.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{name}: not one line: {r:#?}");
    for e in expect {
        assert!(line.contains(e), "{name}: expected '{e}' in: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const LOAD: u32 = 1;
const NOTE: u32 = 4;
const MB: u64 = 1 << 20;

#[test]
fn malformed_elf_kernels() {
    refused("empty", b"", &[], &["unrecognised kernel format"]);
    refused("short", &elf(MB, &[])[..40], &[], &["e_ident", "40 bytes"]);
    let mut e = elf(MB, &[(LOAD, 0x1000, MB, 0x1000, 0x1000)]);
    e[4] = 1;
    refused("elf32", &e, &[], &["EI_CLASS"]);
    let mut e = elf(MB, &[(LOAD, 0x1000, MB, 0x1000, 0x1000)]);
    e[32..40].copy_from_slice(&0xffff_ffff_ffff_fff0u64.to_le_bytes());
    refused("phoff", &e, &[], &["e_phoff"]);
    refused("no-phdrs", &elf(MB, &[]), &[], &["e_phnum"]);
    let mut e = elf(MB, &[(LOAD, 0x1000, MB, 0x1000, 0x1000)]);
    e[56..58].copy_from_slice(&5000u16.to_le_bytes());
    refused("many-phdrs", &e, &[], &["e_phnum"]);
    refused(
        "past-eof",
        &elf(MB, &[(LOAD, 0x1000, MB, 0x10_0000, 0x10_0000)]),
        &[],
        &["p_offset", "past the end"],
    );
    refused(
        "offset-overflow",
        &elf(MB, &[(LOAD, u64::MAX - 4, MB, 0x100, 0x100)]),
        &[],
        &["p_offset"],
    );
    refused(
        "filesz>memsz",
        &elf(MB, &[(LOAD, 0x1000, MB, 0x1000, 0x10)]),
        &[],
        &["p_filesz"],
    );
    refused(
        "below-1M",
        &elf(0x8000, &[(LOAD, 0x1000, 0x8000, 0x1000, 0x1000)]),
        &[],
        &["p_paddr"],
    );
    refused(
        "beyond-ram",
        &elf(MB, &[(LOAD, 0x1000, MB, 0x1000, 0x4000_0000)]),
        &["-m", "64M"],
        &["p_paddr", "64 MiB"],
    );
    refused(
        "huge-memsz",
        &elf(MB, &[(LOAD, 0x1000, MB, 0x1000, u64::MAX)]),
        &[],
        &["p_paddr"],
    );
    refused(
        "in-mmio-hole",
        &elf(0xd000_0000, &[(LOAD, 0x1000, 0xd000_0000, 0x1000, 0x1000)]),
        &["-m", "8G"],
        &["p_paddr"],
    );
    refused(
        "overlap",
        &elf(
            MB,
            &[
                (LOAD, 0x1000, MB, 0x1000, 0x2000),
                (LOAD, 0x1000, MB + 0x1000, 0x1000, 0x1000),
            ],
        ),
        &[],
        &["overlaps"],
    );
    refused(
        "entry-outside",
        &elf(0x40_0000, &[(LOAD, 0x1000, MB, 0x1000, 0x1000)]),
        &[],
        &["e_entry"],
    );
    // A PVH note whose descriptor is two bytes.
    let mut e = elf(
        MB,
        &[(LOAD, 0x1000, MB, 0x1000, 0x1000), (NOTE, 0x200, 0, 20, 20)],
    );
    e[0x200..0x214].copy_from_slice(&[
        4, 0, 0, 0, 2, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0, 0, 0x10, 0, 0,
    ]);
    refused("pvh-desc", &e, &[], &["XEN_ELFNOTE_PHYS32_ENTRY"]);
    // A note that claims more bytes than its segment holds.
    let mut e = elf(
        MB,
        &[(LOAD, 0x1000, MB, 0x1000, 0x1000), (NOTE, 0x200, 0, 16, 16)],
    );
    e[0x200..0x210].copy_from_slice(&[
        4, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 18, 0, 0, 0, b'X', b'e', b'n', 0,
    ]);
    refused("note-overrun", &e, &[], &["PT_NOTE"]);
    // A note segment over 1 MiB (moat reads notes, and only notes, into
    // its heap: that read is bounded).
    let mut e = elf(
        MB,
        &[
            (LOAD, 0x1000, MB, 0x1000, 0x1000),
            (NOTE, 0x2000, 0, 2 * MB, 2 * MB),
        ],
    );
    e.resize(0x2000 + 2 * MB as usize, 0);
    refused("note-huge", &e, &[], &["p_filesz", "note segment 1"]);
}

fn bz() -> Vec<u8> {
    std::fs::read(TEST_BZIMAGE).unwrap()
}

fn set(mut b: Vec<u8>, off: usize, v: &[u8]) -> Vec<u8> {
    b[off..off + v.len()].copy_from_slice(v);
    b
}

#[test]
fn malformed_bzimages() {
    refused(
        "bz-truncated",
        &bz()[..0x300],
        &[],
        &["bzImage", "setup_sects"],
    );
    refused(
        "bz-header-only",
        &bz()[..0x220],
        &[],
        &["setup header", "too short"],
    );
    refused(
        "bz-old",
        &set(bz(), 0x206, &0x0205u16.to_le_bytes()),
        &[],
        &["version", "2.05"],
    );
    refused(
        "bz-setup-sects",
        &set(bz(), 0x1f1, &[200]),
        &[],
        &["setup_sects"],
    );
    refused("bz-zimage", &set(bz(), 0x211, &[0]), &[], &["loadflags"]);
    refused(
        "bz-syssize",
        &set(bz(), 0x1f4, &0x0fff_ffffu32.to_le_bytes()),
        &[],
        &["syssize"],
    );
    refused(
        "bz-init-size",
        &set(bz(), 0x260, &0xffff_f000u32.to_le_bytes()),
        &[],
        &["init_size"],
    );
    refused(
        "bz-pref-address",
        &set(bz(), 0x258, &0xffff_ffff_0000_0000u64.to_le_bytes()),
        &[],
        &["bzImage"],
    );
    let reloc = set(bz(), 0x234, &[1]);
    refused(
        "bz-alignment",
        &set(reloc, 0x230, &0x3000u32.to_le_bytes()),
        &[],
        &["kernel_alignment"],
    );
    refused("bz-jump", &set(bz(), 0x201, &[0xff]), &[], &["jump"]);
    refused(
        "bz-cmdline-size",
        &set(bz(), 0x238, &0u32.to_le_bytes()),
        &[],
        &["cmdline_size"],
    );
    let long = "x".repeat(3000);
    refused(
        "bz-cmdline-long",
        &bz(),
        &["-append", &long],
        &["command line", "3000 bytes", "2047"],
    );
}

#[test]
fn bad_initrds_and_files() {
    let pvh = std::fs::read(TEST_PVH).unwrap();
    let dir = scratch("initrd");
    let big = dir.join("big");
    std::fs::write(&big, vec![0u8; 5 << 20]).unwrap();
    refused(
        "initrd-larger-than-ram",
        &pvh,
        &["-m", "4M", "-initrd", big.to_str().unwrap()],
        &["-initrd", "cannot fit"],
    );
    let mid = dir.join("mid");
    std::fs::write(&mid, vec![0u8; (3 << 20) + (512 << 10)]).unwrap();
    refused(
        "initrd-no-room",
        &pvh,
        &["-m", "4M", "-initrd", mid.to_str().unwrap()],
        &["initrd", "do not fit"],
    );
    refused(
        "initrd-missing",
        &pvh,
        &["-initrd", "/nonexistent/initrd"],
        &["-initrd /nonexistent/initrd", "No such file"],
    );
    let r = moat(&["-kernel", "/nonexistent/kernel"]);
    assert_eq!(r.status, Some(1));
    assert!(
        r.stderr
            .contains("-kernel /nonexistent/kernel: No such file"),
        "{r:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_command_lines_exit_1_naming_the_option() {
    for (args, want) in [
        (&["-accel", "tcg"][..], "-accel tcg"),
        (&["-smp", "65"], "-smp 65"),
        (&["-m", "banana"], "-m banana"),
        (&["-M", "q35"], "-M q35"),
        (&["-M", "microvm,x-foo=1"], "'x-foo'"),
        (&["-serial", "pty"], "-serial pty"),
        (&["-frobnicate"], "-frobnicate"),
        (&["-kernel"], "-kernel"),
        (&["-append", "x"], "-append"),
    ] {
        let r = moat(args);
        assert_eq!(r.status, Some(1), "{args:?}: {r:#?}");
        assert!(r.stderr.starts_with("moat: "), "{args:?}: {r:#?}");
        assert!(r.stderr.contains(want), "{args:?}: {r:#?}");
        assert!(r.stdout.is_empty(), "{args:?}: {r:#?}");
    }
    let r = moat(&["-version"]);
    assert_eq!(r.status, Some(0));
    assert!(
        r.stdout.starts_with("QEMU emulator version 7.2.0 (moat "),
        "{r:#?}"
    );
    let r = moat(&["--help"]);
    assert_eq!(r.status, Some(0));
    assert!(r.stdout.contains("-no-reboot"));
}
