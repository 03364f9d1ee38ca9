//! Disk images as `qemu-img` makes and reads them, opened through moat's own
//! `-drive` path (CLI -> Disk::open -> moat-block/imago): every image must
//! read exactly as `qemu-img convert -O raw` reads it, hostile headers are
//! refused with a message naming the problem, and after moat writes,
//! `qemu-img check` finds no errors and `qemu-img compare` agrees.

use std::path::{Path, PathBuf};
use std::process::Command;

use moat_cli::{parse_args, Action};
use moat_vmm::Disk;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moat-qimg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (apt install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(image: &str, fmt: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", fmt, "-c", cmd, image])
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
}

fn open(drive: &str) -> Result<Disk, String> {
    match parse_args(&["-drive", drive]) {
        Ok(Action::Run(cfg)) => {
            Disk::open(&cfg.drives[0], &Default::default()).map_err(|e| e.to_string())
        }
        Ok(_) => unreachable!(),
        Err(e) => Err(e.to_string()),
    }
}

fn read_all(disk: &Disk) -> Vec<u8> {
    let size = disk.image.size();
    let mut out = vec![0u8; size as usize];
    // Odd-sized, unaligned pieces, as a guest's requests may be.
    let mut off = 0usize;
    let mut step = 3 * 4096 + 512;
    while off < out.len() {
        let n = step.min(out.len() - off);
        disk.image
            .read_at(&mut out[off..off + n], off as u64)
            .unwrap();
        off += n;
        step = if step > 300_000 { 512 } else { step * 3 };
    }
    out
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A raw source with data, zero runs and holes: what every image is made from.
fn source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = noise(6 << 20, 7);
    data[(1 << 20)..(2 << 20)].fill(0);
    // Compressible stretch, so -c really makes compressed clusters.
    for (i, b) in data[(3 << 20)..(4 << 20)].iter_mut().enumerate() {
        *b = (i / 100) as u8;
    }
    let p = dir.join("src.raw");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

#[test]
fn images_made_by_qemu_img_read_as_qemu_img_reads_them() {
    let dir = scratch("read");
    let (src, data) = source(&dir);
    let src = src.to_str().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("default", &[]),
        ("c512", &["-o", "cluster_size=512"]),
        ("c4k", &["-o", "cluster_size=4096"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("v2", &["-o", "compat=0.10"]),
        ("rc1", &["-o", "refcount_bits=1"]),
        ("rc2", &["-o", "refcount_bits=2"]),
        ("rc8", &["-o", "refcount_bits=8"]),
        ("rc64", &["-o", "refcount_bits=64"]),
        ("zlib", &["-c"]),
        ("zlib512", &["-c", "-o", "cluster_size=512"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        (
            "zstd2m",
            &["-c", "-o", "compression_type=zstd,cluster_size=2M"],
        ),
        (
            "zstd512",
            &["-c", "-o", "compression_type=zstd,cluster_size=512"],
        ),
        ("prealloc_meta", &["-o", "preallocation=metadata"]),
        ("prealloc_falloc", &["-o", "preallocation=falloc"]),
        ("prealloc_full", &["-o", "preallocation=full"]),
        ("lazy", &["-o", "lazy_refcounts=on"]),
        ("extl2", &["-o", "extended_l2=on"]),
        ("extl2_16k", &["-o", "extended_l2=on,cluster_size=16k"]),
        ("extl2_2m", &["-o", "extended_l2=on,cluster_size=2M"]),
        (
            "extl2_zstd",
            &["-c", "-o", "extended_l2=on,compression_type=zstd"],
        ),
        (
            "extl2_prealloc",
            &["-o", "extended_l2=on,preallocation=metadata"],
        ),
    ];
    for (name, opts) in cases {
        let img = dir.join(format!("{name}.qcow2"));
        let img = img.to_str().unwrap();
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[src, img]);
        qemu_img(&args);
        let disk = open(&format!("file={img},format=qcow2,readonly=on"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = read_all(&disk);
        assert_eq!(got.len(), data.len(), "{name}: size");
        assert!(got == data, "{name}: moat read other bytes than the source");
        // And the oracle agrees on what the image holds.
        let reference = dir.join(format!("{name}.ref"));
        qemu_img(&["convert", "-O", "raw", img, reference.to_str().unwrap()]);
        assert!(
            std::fs::read(&reference).unwrap() == got,
            "{name}: differs from qemu-img's reading"
        );
        // Overwrite part of a (possibly compressed) cluster: moat must copy
        // the rest of the cluster, and qemu-img must agree afterwards.
        drop(disk);
        let disk = open(&format!("file={img},format=qcow2")).unwrap();
        let patch = noise(5000, 11);
        let at = (3 << 20) + 1536;
        disk.image.write_at(&patch, at).unwrap();
        disk.image.flush().unwrap();
        drop(disk);
        let mut want = data.clone();
        want[at as usize..at as usize + patch.len()].copy_from_slice(&patch);
        std::fs::write(&reference, &want).unwrap();
        qemu_img(&["check", img]);
        qemu_img(&["compare", "-F", "raw", img, reference.to_str().unwrap()]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn backing_chains_are_opened_only_as_named_on_the_command_line() {
    let dir = scratch("chain");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let base_data = noise(4 << 20, 3);
    std::fs::write(p("base.raw"), &base_data).unwrap();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &p("base.raw"),
        "-F",
        "raw",
        &p("mid.qcow2"),
    ]);
    qemu_io(&p("mid.qcow2"), "qcow2", "write -P 0x11 1M 64k");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        &p("mid.qcow2"),
        "-F",
        "qcow2",
        &p("top.qcow2"),
    ]);
    qemu_io(&p("top.qcow2"), "qcow2", "write -P 0x22 1056k 8k");
    qemu_io(&p("top.qcow2"), "qcow2", "write -z 0 4k");

    // The image names mid.qcow2, but nobody named it here: refused, and the
    // message says how to name it.
    let e = open(&format!("file={},format=qcow2", p("top.qcow2"))).unwrap_err();
    assert!(
        e.contains("mid.qcow2") && e.contains("backing.driver=qcow2,backing.file.filename="),
        "{e}"
    );
    // Naming only the middle layer: the middle image names base.raw in turn.
    let e = open(&format!(
        "file={},format=qcow2,backing.driver=qcow2,backing.file.filename={}",
        p("top.qcow2"),
        p("mid.qcow2")
    ))
    .unwrap_err();
    assert!(e.contains("base.raw"), "{e}");

    let chain = format!(
        "file={},format=qcow2,backing.driver=qcow2,backing.file.filename={},backing.backing.driver=raw,backing.backing.file.filename={}",
        p("top.qcow2"), p("mid.qcow2"), p("base.raw")
    );
    let got = read_all(&open(&format!("{chain},readonly=on")).unwrap());
    qemu_img(&["convert", "-O", "raw", &p("top.qcow2"), &p("top.ref")]);
    assert!(
        got == std::fs::read(p("top.ref")).unwrap(),
        "chain reads differ from qemu-img's"
    );
    assert_eq!(got[1 << 20], 0x11);
    assert_eq!(got[1056 << 10], 0x22);
    assert_eq!(&got[..4096], &[0u8; 4096][..]);
    assert_eq!(got[4096], base_data[4096]);

    // backing= cuts the chain: unallocated clusters read as zeroes.
    let alone = read_all(
        &open(&format!(
            "file={},format=qcow2,backing=,readonly=on",
            p("top.qcow2")
        ))
        .unwrap(),
    );
    assert_eq!(alone[1056 << 10], 0x22);
    assert_eq!(alone[1 << 20], 0);

    // One file twice in a chain is refused (a writable top would write into its own backing).
    let e = open(&format!(
        "file={},format=qcow2,backing.driver=qcow2,backing.file.filename={}",
        p("top.qcow2"),
        p("top.qcow2")
    ))
    .unwrap_err();
    assert!(e.contains("twice"), "{e}");

    // Writes go to the top only; qemu-img agrees with what moat wrote.
    let disk = open(&chain).unwrap();
    let block = noise(64 << 10, 9);
    disk.image.write_at(&block, (2 << 20) + 512).unwrap();
    disk.image.write_zeroes(3 << 20, 128 << 10).unwrap();
    disk.image.flush().unwrap();
    drop(disk);
    let mut want = got.clone();
    want[(2 << 20) + 512..(2 << 20) + 512 + block.len()].copy_from_slice(&block);
    want[(3 << 20)..(3 << 20) + (128 << 10)].fill(0);
    std::fs::write(p("want.raw"), &want).unwrap();
    qemu_img(&["check", &p("top.qcow2")]);
    qemu_img(&["check", &p("mid.qcow2")]);
    qemu_img(&["compare", "-F", "raw", &p("top.qcow2"), &p("want.raw")]);
    assert_eq!(
        std::fs::read(p("base.raw")).unwrap(),
        base_data,
        "the base changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn external_data_files_must_be_named() {
    let dir = scratch("datafile");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p("d.data")),
        &p("d.qcow2"),
        "2M",
    ]);
    qemu_io(&p("d.qcow2"), "qcow2", "write -P 0x33 0 64k");
    let e = open(&format!("file={},format=qcow2", p("d.qcow2"))).unwrap_err();
    assert!(
        e.contains("d.data") && e.contains("data-file.filename="),
        "{e}"
    );
    let disk = open(&format!(
        "file={},format=qcow2,data-file.filename={}",
        p("d.qcow2"),
        p("d.data")
    ))
    .unwrap();
    let got = read_all(&disk);
    assert!(got[..65536].iter().all(|&b| b == 0x33) && got[65536] == 0);
    disk.image.write_at(&[0x44; 4096], 1 << 20).unwrap();
    disk.image.flush().unwrap();
    drop(disk);
    qemu_img(&["check", &p("d.qcow2")]);
    let mut want = got;
    want[1 << 20..(1 << 20) + 4096].fill(0x44);
    std::fs::write(p("want.raw"), &want).unwrap();
    qemu_img(&["compare", "-F", "raw", &p("d.qcow2"), &p("want.raw")]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn many_writes_leave_an_image_qemu_img_check_accepts() {
    let dir = scratch("writes");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    for (name, opts) in [
        ("c512", "cluster_size=512,refcount_bits=1"),
        ("c64k", "refcount_bits=16"),
        ("c2m", "cluster_size=2M,refcount_bits=64"),
        ("extl2", "extended_l2=on"),
        (
            "extl2_16k",
            "extended_l2=on,cluster_size=16k,refcount_bits=1",
        ),
    ] {
        let img = p(&format!("{name}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, &img, "16M"]);
        let disk = open(&format!("file={img},format=qcow2,discard=unmap")).unwrap();
        let mut want = vec![0u8; 16 << 20];
        let mut x: u64 = 12345;
        for i in 0..400u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % ((16 << 20) - 70_000);
            let len = 512 + (x >> 50) as usize % 65536;
            let buf = noise(len, i);
            disk.image.write_at(&buf, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&buf);
            if i % 50 == 49 {
                let (o, l) = ((x >> 24) % (15 << 20), 256 << 10);
                disk.image.discard(o, l).unwrap();
                disk.image.write_zeroes(o, l).unwrap();
                want[o as usize..(o + l) as usize].fill(0);
            }
        }
        assert!(read_all(&disk) == want, "{name}: read back differs");
        disk.image.flush().unwrap();
        drop(disk);
        qemu_img(&["check", &img]);
        std::fs::write(p("want.raw"), &want).unwrap();
        qemu_img(&["compare", "-F", "raw", &img, &p("want.raw")]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Extended L2 entries (subclusters, `-o extended_l2=on`), as QEMU itself
/// leaves them: qemu-io writes single subclusters, parts of subclusters, zero
/// subclusters, whole zero clusters, discards and compressed clusters over a
/// backing file. moat reads the chain as qemu-img does; moat's own writes
/// into every kind of (sub)cluster leave an image `qemu-img check` accepts
/// and that holds what moat wrote; the same without a backing file.
#[test]
fn extended_l2_subclusters_read_and_write_as_qemu_does() {
    let dir = scratch("extl2");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let size = 4usize << 20;
    std::fs::write(p("base.raw"), noise(size, 21)).unwrap();
    for (name, cluster, backing) in [
        ("c64k", 65536usize, true),
        ("c16k", 16384, true),
        ("c64k_alone", 65536, false),
    ] {
        let img = p(&format!("{name}.qcow2"));
        let opts = format!("extended_l2=on,cluster_size={cluster}");
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
        let base = p("base.raw");
        if backing {
            args.extend(["-b", &base, "-F", "raw"]);
        }
        args.extend([img.as_str(), "4M"]);
        qemu_img(&args);
        let sc = cluster / 32;
        let c = |n: usize| n * cluster;
        // QEMU's own subcluster writes, cluster by cluster.
        let mut cmds = vec![
            format!("write -P 0x11 {} {sc}", c(0) + 2 * sc),
            format!("write -P 0x12 {} {}", c(0) + 5 * sc + 100, 3 * sc),
            format!("write -z {} {}", c(1) + 4 * sc, 4 * sc),
            format!("write -P 0x13 {} {}", c(1) + 20 * sc, sc),
            format!("write -z {} {}", c(2), cluster),
            format!("write -P 0x14 {} {}", c(3), cluster),
            format!("discard {} {}", c(3) + 8 * sc, 8 * sc),
            format!("write -c -P 0x15 {} {}", c(4), cluster),
            format!("write -P 0x16 {} {}", c(6) - 3 * sc, 6 * sc),
        ];
        cmds.push(format!("write -P 0x17 {} {sc}", c(40) + 31 * sc));
        // Zero subclusters over old data, which the host cluster still holds.
        cmds.push(format!("write -P 0x18 {} {cluster}", c(16)));
        cmds.push(format!("write -z {} {}", c(16) + 4 * sc, 4 * sc));
        for cmd in &cmds {
            qemu_io(&img, "qcow2", cmd);
        }
        let drive = if backing {
            format!("file={img},format=qcow2,backing.driver=raw,backing.file.filename={base}")
        } else {
            format!("file={img},format=qcow2")
        };
        let got = read_all(&open(&format!("{drive},readonly=on")).unwrap());
        qemu_img(&["convert", "-O", "raw", &img, &p("ref.raw")]);
        let want = std::fs::read(p("ref.raw")).unwrap();
        assert_eq!(got.len(), want.len(), "{name}: size");
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "{name}: moat reads {:#x} at {i}, qemu-img {:#x}",
                got[i], want[i]
            );
        }

        // moat writes into each kind: unallocated subclusters of an allocated
        // cluster (partly), zero subclusters, a zero cluster, a partly
        // discarded cluster, a compressed one, a cluster QEMU never touched,
        // across a cluster boundary; then write-zeroes and discard.
        let disk = open(&drive).unwrap();
        let mut want = got;
        let mut put = |at: usize, len: usize, seed: u64, disk: &Disk| {
            let buf = noise(len, seed);
            disk.image.write_at(&buf, at as u64).unwrap();
            want[at..at + len].copy_from_slice(&buf);
        };
        put(c(0) + 10 * sc + 7, sc, 1, &disk);
        put(c(0) + 3 * sc - 1, 2, 2, &disk);
        put(c(1) + 5 * sc + 3, 2 * sc, 3, &disk);
        put(c(2) + 100, 1000, 4, &disk);
        put(c(3) + 9 * sc, sc / 2, 5, &disk);
        put(c(4) + 1, 1, 6, &disk);
        put(c(8) + sc + 17, 3 * sc, 7, &disk);
        put(c(10) - 700, 1400, 8, &disk);
        put(c(40) + 30 * sc, 2 * sc, 9, &disk);
        put(c(16) + 5 * sc + 9, 10, 10, &disk);
        disk.image
            .write_zeroes(c(12) as u64, 2 * cluster as u64)
            .unwrap();
        disk.image.discard(c(14) as u64, cluster as u64).unwrap();
        want[c(12)..c(14)].fill(0);
        // A discarded range may read as before, as the backing file or as
        // zeroes (as with QEMU): compare outside it.
        let back = read_all(&disk);
        let discarded = c(14)..c(15);
        if let Some(i) = (0..want.len()).find(|&i| back[i] != want[i] && !discarded.contains(&i)) {
            panic!(
                "{name}: moat reads back {:#x} at {i}, wrote {:#x}",
                back[i], want[i]
            );
        }
        disk.image.flush().unwrap();
        drop(disk);
        qemu_img(&["check", &img]);
        qemu_img(&["convert", "-O", "raw", &img, &p("after.raw")]);
        let after = std::fs::read(p("after.raw")).unwrap();
        if let Some(i) = (0..want.len()).find(|&i| after[i] != back[i]) {
            panic!(
                "{name}: qemu-img reads {:#x} at {i}, moat {:#x}",
                after[i], back[i]
            );
        }
        // As QEMU, moat allocated only the subclusters it wrote (1 to 4 of
        // cluster 8): the rest of that cluster still comes from the backing
        // file (or reads as unallocated without one).
        let map: serde_json::Value =
            serde_json::from_str(&qemu_img(&["map", "--output=json", &img])).unwrap();
        let at = |off: usize| {
            map.as_array()
                .unwrap()
                .iter()
                .find(|e| {
                    let s = e["start"].as_u64().unwrap() as usize;
                    (s..s + e["length"].as_u64().unwrap() as usize).contains(&off)
                })
                .cloned()
                .unwrap_or_else(|| panic!("{name}: no map entry at {off}"))
        };
        for (off, data_here) in [
            (c(8), false),
            (c(8) + sc, true),
            (c(8) + 4 * sc, true),
            (c(8) + 5 * sc, false),
            (c(9) - 1, false),
        ] {
            let e = at(off);
            let top = e["depth"] == 0 && e["data"] == true;
            assert_eq!(top, data_here, "{name}: at {off}: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `qemu-img check IMG`: its exit status and report.
fn qemu_img_check(img: &str) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", img])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn dirty_bit(img: &str) -> bool {
    let b = std::fs::read(img).unwrap();
    u64::from_be_bytes(b[72..80].try_into().unwrap()) & 1 != 0
}

/// Reads into several buffers at once (virtio-blk's path into guest
/// memory) give what single reads give, on raw and qcow2; empty buffers and
/// empty reads are fine (an empty buffer trips a debug assertion in imago,
/// which fuzz/qcow2 found: moat leaves them out).
#[test]
fn vectored_reads_match_plain_reads() {
    use vm_memory::VolatileSlice;
    let dir = scratch("readv");
    let (src, data) = source(&dir);
    let qcow = dir.join("d.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        qcow.to_str().unwrap(),
    ]);
    for drive in [
        format!("file={},format=raw,readonly=on", src.display()),
        format!("file={},format=qcow2,readonly=on", qcow.display()),
    ] {
        let disk = open(&drive).unwrap();
        for (off, sizes) in [
            (0u64, vec![512usize, 0, 4096, 70_000]),
            ((1 << 20) - 4096, vec![8192, 1, 511, 0, 65536 * 3]),
            (5 << 20, vec![0]),
        ] {
            let mut buf = vec![0xeeu8; sizes.iter().sum()];
            let mut slices = Vec::new();
            let mut rest = &mut buf[..];
            for &n in &sizes {
                let (a, b) = rest.split_at_mut(n);
                slices.push(VolatileSlice::from(a));
                rest = b;
            }
            disk.image.read_slices(&slices, off).unwrap();
            drop(slices);
            let want = &data[off as usize..off as usize + buf.len()];
            assert!(buf == want, "{drive} at {off}: differs");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A qcow2 image with lazy_refcounts=on (and `more` options).
fn create_lazy(img: &str, size: &str, more: &str) {
    let opts = format!("lazy_refcounts=on{more}");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, img, size]);
}

/// QEMU with lazy_refcounts=on killed (qemu-io's `sigraise 9`) right after
/// `cmds`: the image is left with its dirty bit set and refcounts that
/// qemu-img check finds wrong.
fn crashed_lazy_image(img: &str, more: &str, cmds: &[&str]) {
    create_lazy(img, "64M", more);
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.extend(["-c", "sigraise 9", img]);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    assert_eq!(out.status.code(), None, "qemu-io was not killed: {out:?}");
    assert!(dirty_bit(img), "no dirty bit after the crash");
    let (rc, report) = qemu_img_check(img);
    assert_ne!(rc, 0, "qemu-img check found nothing to repair: {report}");
}

#[test]
fn a_dirty_image_is_repaired_by_a_writable_open_and_read_as_is_read_only() {
    let dir = scratch("dirty");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    // Missing refcounts (clusters and L2 tables in use that count 0).
    let img = p("errors.qcow2");
    crashed_lazy_image(&img, "", &["write -P 0x5a 0 3M", "write -P 0x33 40M 64k"]);
    let mut want = vec![0u8; 64 << 20];
    want[..3 << 20].fill(0x5a);
    want[40 << 20..(40 << 20) + 65536].fill(0x33);
    // Read-only: the data as it is, and not a byte of the file changed.
    let before = std::fs::read(&img).unwrap();
    let disk = open(&format!("file={img},format=qcow2,readonly=on")).unwrap();
    assert!(read_all(&disk) == want, "read-only: the data differs");
    drop(disk);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open wrote to the image"
    );
    // Writable: repaired before use, then qemu-img finds nothing wrong.
    let disk = open(&format!("file={img},format=qcow2")).unwrap();
    assert!(!dirty_bit(&img), "the dirty bit is still set");
    let (rc, report) = qemu_img_check(&img);
    assert_eq!(rc, 0, "after the repair: {report}");
    assert!(
        read_all(&disk) == want,
        "after the repair: the data differs"
    );
    // Writes through moat afterwards keep it valid (moat never writes lazily).
    let buf = noise(200_000, 3);
    disk.image.write_at(&buf, 20 << 20).unwrap();
    want[20 << 20..(20 << 20) + buf.len()].copy_from_slice(&buf);
    disk.image.flush().unwrap();
    drop(disk);
    let (rc, report) = qemu_img_check(&img);
    assert_eq!(rc, 0, "after moat's writes: {report}");
    std::fs::write(p("want.raw"), &want).unwrap();
    qemu_img(&["compare", "-F", "raw", &img, &p("want.raw")]);

    // The same with extended L2 entries (16-byte entries the repair must
    // step over) and QEMU's subcluster writes.
    let img = p("errors-extl2.qcow2");
    crashed_lazy_image(
        &img,
        ",extended_l2=on",
        &[
            "write -P 0x5a 2k 2k",
            "write -P 0x33 40M 64k",
            "write -z 40M 4k",
        ],
    );
    let mut want = vec![0u8; 64 << 20];
    want[2048..4096].fill(0x5a);
    want[(40 << 20) + 4096..(40 << 20) + 65536].fill(0x33);
    let disk = open(&format!("file={img},format=qcow2")).unwrap();
    let (rc, report) = qemu_img_check(&img);
    assert_eq!(rc, 0, "extended L2, after the repair: {report}");
    assert!(read_all(&disk) == want, "extended L2: the data differs");
    drop(disk);

    // Leaks: refcounts above the references (a cluster whose refcount was
    // not lowered), made by hand on a clean image: one data cluster counts 2.
    let img = p("leaks.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "64M"]);
    qemu_io(&img, "qcow2", "write -P 0x11 0 1M");
    let mut b = std::fs::read(&img).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let (l1, rt) = (be(&b, 40) as usize, be(&b, 48) as usize);
    let l2 = (be(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be(&b, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    let block = (be(&b, rt) & 0x00ff_ffff_ffff_fe00) as usize;
    let at = block + 2 * (data >> 16); // 64 KiB clusters, 16-bit refcounts
    b[at..at + 2].copy_from_slice(&2u16.to_be_bytes());
    b[72..80].copy_from_slice(&1u64.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let (rc, report) = qemu_img_check(&img);
    assert!(rc != 0 && report.contains("Leaked cluster"), "{report}");
    let disk = open(&format!("file={img},format=qcow2")).unwrap();
    let mut want = vec![0u8; 64 << 20];
    want[..1 << 20].fill(0x11);
    assert!(read_all(&disk) == want, "leaks: the data differs");
    drop(disk);
    let (rc, report) = qemu_img_check(&img);
    assert!(rc == 0 && !report.contains("leaked"), "leaks: {report}");

    // An image this repair cannot walk is refused untouched, with the way out.
    let img = p("past-end.qcow2");
    crashed_lazy_image(&img, "", &["write -P 0x5a 0 64k"]);
    let mut b = std::fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2..l2 + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | (1 << 40)).to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let e = open(&format!("file={img},format=qcow2")).unwrap_err();
    assert!(
        e.contains("past the end") && e.contains("qemu-img check -r all"),
        "{e}"
    );
    assert!(
        std::fs::read(&img).unwrap() == b,
        "a refused repair wrote to the image"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A qcow2 image created with lazy_refcounts=on and written by moat stays
/// clean: moat writes its refcounts eagerly and never sets the dirty bit.
#[test]
fn moat_writes_to_a_lazy_refcounts_image_leave_it_clean() {
    let dir = scratch("lazy");
    let img = dir.join("lazy.qcow2").to_str().unwrap().to_string();
    create_lazy(&img, "16M", "");
    let disk = open(&format!("file={img},format=qcow2")).unwrap();
    for i in 0..50u64 {
        disk.image.write_at(&noise(70_000, i), i * 300_000).unwrap();
    }
    disk.image.flush().unwrap();
    assert!(!dirty_bit(&img));
    drop(disk);
    let (rc, report) = qemu_img_check(&img);
    assert_eq!(rc, 0, "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Patch bytes of a valid image and expect a refusal naming the problem.
#[test]
fn hostile_headers_are_refused_with_a_reason() {
    let dir = scratch("hostile");
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    qemu_io(base.to_str().unwrap(), "qcow2", "write -P 1 0 64k");
    let good = std::fs::read(&base).unwrap();
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    let be64 = |v: u64| v.to_be_bytes().to_vec();
    let l1 = u64::from_be_bytes(good[40..48].try_into().unwrap());
    let cases: Vec<(&str, usize, Vec<u8>, &str)> = vec![
        ("magic", 0, be32(0x1234_5678), "magic"),
        ("version", 4, be32(4), "version 4"),
        ("cluster_bits_big", 20, be32(31), "cluster_bits 31"),
        ("cluster_bits_small", 20, be32(8), "cluster_bits 8"),
        ("encrypted", 32, be32(1), "encrypted"),
        ("l1_huge", 36, be32(0x7fff_ffff), "too large"),
        ("l1_small", 36, be32(0), "too small"),
        ("size_huge", 24, be64(1 << 62), "too small"),
        ("l1_outside", 40, be64(1 << 40), "outside"),
        ("l1_unaligned", 40, be64(l1 + 8), "aligned"),
        ("l1_on_header", 40, be64(0), "overlaps"),
        ("reftable_on_header", 48, be64(0), "overlaps"),
        ("reftable_outside", 48, be64(1 << 40), "outside"),
        ("reftable_huge", 56, be32(0x7fff_ffff), "too large"),
        ("snapshots", 60, be32(0xffff_ffff), "snapshots"),
        ("refcount_order", 96, be32(7), "refcount_order"),
        ("header_length", 100, be32(0xffff_fff8), "header_length"),
        ("corrupt", 72, be64(2), "corrupt"),
        ("zstd_bit_but_zlib", 72, be64(8), "compression type is zlib"),
        (
            "zstd_without_bit",
            104,
            vec![1],
            "without the compression type bit",
        ),
        (
            "compression_type_7",
            104,
            vec![7],
            "unknown compression type 7",
        ),
        (
            "extended_l2_8k",
            72,
            be64(16),
            "extended L2 entries need clusters",
        ),
        ("unknown_feature", 72, be64(1 << 40), "unknown incompatible"),
        (
            "backing_name_outside",
            8,
            be64(65530),
            "outside the first cluster",
        ),
        (
            "l2_outside",
            l1 as usize,
            be64(0x8000_0000_0000_0000 | (1 << 40)),
            "L2 table 0",
        ),
        (
            "l2_on_l1",
            l1 as usize,
            be64(0x8000_0000_0000_0000 | l1),
            "overlaps the L1 table",
        ),
        ("truncated", usize::MAX, vec![], "shorter"),
    ];
    for (name, at, bytes, want) in cases {
        let mut img = good.clone();
        if at == usize::MAX {
            img.truncate(40);
        } else {
            img[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        if name == "backing_name_outside" {
            img[16..20].copy_from_slice(&be32(100));
        }
        if name == "extended_l2_8k" {
            img[20..24].copy_from_slice(&be32(13));
        }
        let path = dir.join(format!("{name}.qcow2"));
        std::fs::write(&path, &img).unwrap();
        for ro in ["on", "off"] {
            let e = open(&format!(
                "file={},format=qcow2,readonly={ro}",
                path.display()
            ))
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
            assert!(e.contains(want), "{name}: {e}");
        }
    }
    // A feature name table whose length is not a multiple of its 48-byte
    // entries (imago read past the short last one: fuzz/seeds/qcow2).
    let mut img = good.clone();
    let mut at = u32::from_be_bytes(good[100..104].try_into().unwrap()) as usize;
    loop {
        let kind = u32::from_be_bytes(img[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(img[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no feature name table in qemu-img's image");
        if kind == 0x6803_f857 {
            img[at + 4..at + 8].copy_from_slice(&be32(len as u32 + 1));
            break;
        }
        at += 8 + len.next_multiple_of(8);
    }
    let path = dir.join("feature-table.qcow2");
    std::fs::write(&path, &img).unwrap();
    let disk = open(&format!("file={},format=qcow2,readonly=on", path.display())).unwrap();
    assert!(read_all(&disk)[..65536].iter().all(|&b| b == 1));
    drop(disk);

    // A backing file name pointing at a host file is never opened.
    let mut img = good.clone();
    let name = b"/etc/shadow";
    img[8..16].copy_from_slice(&be64(0x1000));
    img[16..20].copy_from_slice(&be32(name.len() as u32));
    img[0x1000..0x1000 + name.len()].copy_from_slice(name);
    let path = dir.join("backing.qcow2");
    std::fs::write(&path, &img).unwrap();
    let e = open(&format!("file={},format=qcow2", path.display())).unwrap_err();
    assert!(
        e.contains("/etc/shadow") && e.contains("never opens"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A zstd frame of one compressed block holding `n` sequences, each one
/// literal and a maximum-length match (131,074 bytes) at offset 1: ~2 bytes
/// of input per sequence, ~128 KiB of output each (RFC 8878: literals in RLE
/// mode, the three sequence codes in RLE mode, only the match lengths' 16
/// extra bits in the bitstream). The frame names a 64 KiB window and no
/// content size, so only the per-block output limit can stop it.
fn zstd_bomb(n: usize) -> Vec<u8> {
    assert!((0x7f00..0x17eff).contains(&n));
    // Literals section: RLE, 20-bit regenerated size n (one literal per sequence).
    let mut block = vec![
        1 | (3 << 2) | (((n & 0xf) as u8) << 4),
        (n >> 4) as u8,
        (n >> 12) as u8,
        b'A',
    ];
    // Sequences section header: count (3-byte form), modes (all RLE), codes.
    let extra = n - 0x7f00;
    block.extend_from_slice(&[255, extra as u8, (extra >> 8) as u8]);
    block.push((1 << 6) | (1 << 4) | (1 << 2));
    block.extend_from_slice(&[1, 0, 52]); // LL code 1, OF code 0 (repeat offset 1), ML code 52
                                          // Bitstream: 16 one-bits (match length extra bits) per sequence, then
                                          // the end marker.
    block.extend(std::iter::repeat_n(0xff, 2 * n));
    block.push(0x01);
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 6 << 3]; // window 2^16
    let hdr = 1 | (2 << 1) | ((block.len() as u32) << 3); // last, compressed
    frame.extend_from_slice(&hdr.to_le_bytes()[..3]);
    frame.extend_from_slice(&block);
    frame
}

/// A 64 KiB-cluster zstd qcow2 image made by qemu-img whose first cluster's
/// L2 entry is pointed at `frame`, appended to the file.
fn image_with_compressed_cluster(dir: &Path, name: &str, frame: &[u8]) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let img = dir.join(name);
    let p = img.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        p,
        "1M",
    ]);
    qemu_io(p, "qcow2", "write -c -P 0x41 0 64k");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let be = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    };
    let l2 = be(be(40)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(
        be(l2) & (1 << 62),
        0,
        "qemu-io did not write a compressed cluster"
    );
    let at = f.metadata().unwrap().len().next_multiple_of(512);
    f.write_all_at(frame, at).unwrap();
    let sectors = (frame.len() as u64).div_ceil(512) - 1;
    assert!(
        sectors < 256,
        "the frame does not fit a 64 KiB cluster's descriptor"
    );
    f.write_all_at(&((1u64 << 62) | (sectors << 54) | at).to_be_bytes(), l2)
        .unwrap();
    img
}

#[test]
fn a_zstd_bomb_fails_the_read_instead_of_filling_memory() {
    let dir = scratch("zbomb");
    // 60,000 sequences: ~120 KB that would decode to ~7.9 GB.
    let img = image_with_compressed_cluster(&dir, "bomb.qcow2", &zstd_bomb(60_000));
    for ro in ["on", "off"] {
        let disk = open(&format!(
            "file={},format=qcow2,readonly={ro}",
            img.display()
        ))
        .unwrap();
        let before = peak_rss_kib();
        let mut buf = vec![0u8; 512];
        let e = disk.image.read_at(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("decompress"), "readonly={ro}: {e}");
        // Nothing like the frame's gigabytes: at most a window and a block.
        let grew = peak_rss_kib().saturating_sub(before);
        assert!(
            grew < 64 << 10,
            "readonly={ro}: peak RSS grew by {grew} KiB"
        );
        // The rest of the disk still reads.
        disk.image.read_at(&mut buf, 65536).unwrap();
    }
    // And a well-formed zstd cluster next to it still reads as written.
    let good = dir.join("good.qcow2");
    let g = good.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        g,
        "1M",
    ]);
    qemu_io(g, "qcow2", "write -c -P 0x41 0 64k");
    let disk = open(&format!("file={g},format=qcow2,readonly=on")).unwrap();
    let mut buf = vec![0u8; 65536];
    disk.image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x41));
}

/// The process's peak resident set (VmHWM), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A qemu-img image with its first cluster written (so L2 entry 0 maps a
/// data cluster, "copied"), and that L2 entry rewritten to `entry`.
fn image_with_l2_entry(dir: &Path, name: &str, entry: impl Fn(&std::fs::File) -> u64) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let img = dir.join(name);
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "4M"]);
    qemu_io(p, "qcow2", "write -P 0x11 0 64k");
    let (f, l2) = first_l2_table(&img);
    f.write_all_at(&entry(&f).to_be_bytes(), l2).unwrap();
    img
}

/// `img` opened read-write, and where the L2 table of L1 entry 0 is.
fn first_l2_table(img: &Path) -> (std::fs::File, u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    (f, u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00)
}

fn qemu_img_info(img: &Path) -> String {
    qemu_img(&["info", "--output=json", img.to_str().unwrap()])
}

/// QEMU's iotest 060 ("L2 reference into L1"): a data cluster mapped onto
/// the L1 table. The guest's write would have overwritten L1 on disk; QEMU
/// refuses it with EIO and marks the image corrupt, and so does moat.
#[test]
fn a_write_onto_metadata_is_refused_and_marks_the_image_corrupt() {
    use std::os::unix::fs::FileExt;
    const COPIED: u64 = 1 << 63;
    let dir = scratch("overlap");
    let img = image_with_l2_entry(&dir, "onto-l1.qcow2", |f| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 40).unwrap();
        u64::from_be_bytes(b) | COPIED
    });
    let l1_before = {
        let f = std::fs::File::open(&img).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 40).unwrap();
        let mut l1 = vec![0u8; 512];
        f.read_exact_at(&mut l1, u64::from_be_bytes(b)).unwrap();
        l1
    };
    let disk = open(&format!("file={},format=qcow2", img.display())).unwrap();
    let e = disk.image.write_at(&[0x5a; 4096], 0).unwrap_err();
    assert!(
        e.to_string().contains("overlaps with active L1 table"),
        "{e}"
    );
    // Every later request fails too, as with QEMU (the node is unusable).
    assert!(disk.image.write_at(&[0x5a; 4096], 1 << 20).is_err());
    drop(disk);
    let f = std::fs::File::open(&img).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let mut l1_after = vec![0u8; 512];
    f.read_exact_at(&mut l1_after, u64::from_be_bytes(b))
        .unwrap();
    assert!(l1_after == l1_before, "the L1 table was overwritten");
    let info = qemu_img_info(&img);
    assert!(info.contains("\"corrupt\": true"), "{info}");
}

/// An L2 entry 1 TiB past the end of the file: one guest write used to
/// grow the file to 1 TiB (sparse).
#[test]
fn a_write_to_a_cluster_past_the_end_of_the_file_is_refused() {
    const COPIED: u64 = 1 << 63;
    let dir = scratch("pastend");
    let img = image_with_l2_entry(&dir, "far.qcow2", |_| (1u64 << 40) | COPIED);
    let len = std::fs::metadata(&img).unwrap().len();
    let disk = open(&format!("file={},format=qcow2", img.display())).unwrap();
    let e = disk.image.write_at(&[0x5a; 4096], 0).unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    drop(disk);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len, "the file grew");
    let info = qemu_img_info(&img);
    assert!(info.contains("\"corrupt\": true"), "{info}");
}

/// Subcluster bitmaps QEMU calls invalid (`QCOW2_SUBCLUSTER_INVALID`): a
/// subcluster both allocated and zero, or allocated subclusters without a
/// host cluster. Reading or writing such a cluster fails with an error; the
/// clusters next to it still read; nothing panics.
#[test]
fn invalid_subcluster_bitmaps_fail_the_request() {
    use std::os::unix::fs::FileExt;
    let dir = scratch("badbitmap");
    let img = dir.join("bad.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        p,
        "4M",
    ]);
    qemu_io(p, "qcow2", "write -P 0x11 0 128k");
    qemu_io(p, "qcow2", "write -P 0x22 192k 2k");
    let (f, l2) = first_l2_table(&img);
    // Entry 0: subcluster 3 both allocated and zero.
    f.write_all_at(&(0xffff_ffffu64 | (1 << 35)).to_be_bytes(), l2 + 8)
        .unwrap();
    // Entry 2 (unallocated): subcluster 0 allocated.
    f.write_all_at(&1u64.to_be_bytes(), l2 + 2 * 16 + 8)
        .unwrap();
    // Entry 4: copied, 1 TiB past the end, subcluster 0 allocated: a write
    // into its unallocated subclusters would fill the rest of that cluster.
    f.write_all_at(&((1u64 << 63) | (1 << 40)).to_be_bytes(), l2 + 4 * 16)
        .unwrap();
    f.write_all_at(&1u64.to_be_bytes(), l2 + 4 * 16 + 8)
        .unwrap();
    drop(f);
    let len = std::fs::metadata(&img).unwrap().len();
    let disk = open(&format!("file={p},format=qcow2")).unwrap();
    let mut buf = vec![0u8; 4096];
    for at in [0u64, 128 << 10] {
        let e = disk.image.read_at(&mut buf, at).unwrap_err();
        assert!(e.to_string().contains("subcluster bitmap"), "{at}: {e}");
        disk.image.write_at(&buf, at + 512).unwrap_err();
    }
    disk.image.read_at(&mut buf, 64 << 10).unwrap();
    assert!(buf.iter().all(|&x| x == 0x11));
    disk.image.read_at(&mut buf, 192 << 10).unwrap();
    assert!(buf[..2048].iter().all(|&x| x == 0x22) && buf[2048..].iter().all(|&x| x == 0));
    let e = disk.image.write_at(&buf, (256 << 10) + 8192).unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    drop(disk);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len, "the file grew");
    assert!(qemu_img_info(&img).contains("\"corrupt\": true"));
    let _ = std::fs::remove_dir_all(&dir);
}
