//! Builds the freestanding guests in `c/` with the host gcc and packs the
//! test guest into three boot formats: PVH ELF, plain 64-bit ELF, bzImage.

use std::path::{Path, PathBuf};
use std::process::Command;

const FLAGS: &[&str] = &[
    "-m64",
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-no-pie",
    "-static",
    "-nostdlib",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-mcmodel=small",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-n",
    "-Wl,--no-warn-rwx-segments",
];

fn run(cmd: &mut Command) {
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed");
}

fn link(src: &Path, out: &Path, files: &[&str]) {
    let mut c = Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()));
    c.args(FLAGS)
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg("-o")
        .arg(out);
    for f in files {
        c.arg(src.join(f));
    }
    run(&mut c);
}

fn le(b: &[u8], off: usize, n: usize) -> u64 {
    b[off..off + n]
        .iter()
        .rev()
        .fold(0, |a, &x| (a << 8) | u64::from(x))
}

/// End of the highest PT_LOAD (for the bzImage's init_size).
fn elf_mem_end(elf: &[u8]) -> u64 {
    let phoff = le(elf, 32, 8) as usize;
    let phnum = le(elf, 56, 2) as usize;
    (0..phnum)
        .map(|i| &elf[phoff + i * 56..])
        .filter(|ph| le(ph, 0, 4) == 1)
        .map(|ph| le(ph, 24, 8) + le(ph, 40, 8))
        .max()
        .unwrap()
}

/// A bzImage (boot protocol 2.15, not relocatable, loaded at 1 MiB).
fn bzimage(payload: &[u8], init_size: u64, kernel64: bool) -> Vec<u8> {
    let mut s = vec![0u8; 1024];
    let mut put = |off: usize, v: &[u8]| s[off..off + v.len()].copy_from_slice(v);
    put(0x1f1, &[1]); // setup_sects
    put(0x1f4, &((payload.len() as u32).div_ceil(16)).to_le_bytes()); // syssize
    put(0x1fe, &0xaa55u16.to_le_bytes());
    put(0x200, &[0xeb, 0x66]); // jump past the header (ends at 0x268)
    put(0x202, b"HdrS");
    put(0x206, &0x020fu16.to_le_bytes());
    put(0x211, &[0x01]); // LOADED_HIGH
    put(0x214, &0x0010_0000u32.to_le_bytes()); // code32_start
    put(0x22c, &0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &0x0020_0000u32.to_le_bytes()); // kernel_alignment
    put(0x234, &[0]); // relocatable_kernel
    put(0x236, &(u16::from(kernel64)).to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(0x258, &0x0010_0000u64.to_le_bytes()); // pref_address
    put(0x260, &(init_size as u32).to_le_bytes());
    s.extend_from_slice(payload);
    s
}

fn main() {
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("c");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for f in [
        "entry.S", "lib.c", "lib.h", "demo.c", "test.c", "net.c", "rng.c", "vsock.c", "virtio.c",
        "virtio.h", "bench.S", "link.ld",
    ] {
        println!("cargo:rerun-if-changed=c/{f}");
    }
    link(&src, &out.join("demo.elf"), &["entry.S", "lib.c", "demo.c"]);
    link(&src, &out.join("bench-pvh.elf"), &["bench.S"]);
    let pvh = out.join("test-pvh.elf");
    link(
        &src,
        &pvh,
        &[
            "entry.S", "lib.c", "virtio.c", "net.c", "rng.c", "vsock.c", "test.c",
        ],
    );
    run(Command::new("objcopy")
        .args(["--remove-section=.note.Xen"])
        .arg(&pvh)
        .arg(out.join("test-elf64.elf")));
    let bin = out.join("test.bin");
    run(Command::new("objcopy")
        .args(["-O", "binary", "--remove-section=.note.Xen"])
        .arg(&pvh)
        .arg(&bin));
    let elf = std::fs::read(&pvh).unwrap();
    let payload = std::fs::read(&bin).unwrap();
    let init_size = elf_mem_end(&elf) - 0x10_0000;
    std::fs::write(out.join("test-bzimage"), bzimage(&payload, init_size, true)).unwrap();
    std::fs::write(
        out.join("test-bzimage32"),
        bzimage(&payload, init_size, false),
    )
    .unwrap();
}
