//! HMP's block reports (`info block`, `info blockstats`), printed from the
//! QMP answers as QEMU 7.2 prints them (block/monitor/block-hmp-cmds.c,
//! block/qapi.c): the same lines, the same number formats, and the same
//! order of a format's specific fields (QEMU walks them in its QDict's
//! hash order, which [`qdict_order`] recomputes).

use serde_json::Value;
use std::fmt::Write;

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// `info block [-n] [-v] [device]`: `blocks` is query-block's answer,
/// `nodes` query-named-block-nodes' (asked for only when needed).
pub fn info_block(
    blocks: &[Value],
    nodes: impl FnOnce() -> Vec<Value>,
    device: Option<&str>,
    verbose: bool,
    named_nodes: bool,
) -> String {
    let mut out = String::new();
    let mut printed = false;
    if !named_nodes {
        for (i, b) in blocks.iter().enumerate() {
            if device.is_some_and(|d| d != text(&b["device"])) {
                continue;
            }
            // (QEMU separates by the place in the whole list, so a
            // single device asked for comes after an empty line too.)
            if i > 0 {
                out.push('\n');
            }
            print_block_info(&mut out, Some(b), b.get("inserted"), verbose);
            printed = true;
        }
    }
    if (device.is_none() && !named_nodes) || printed {
        return out;
    }
    for (i, n) in nodes().iter().enumerate() {
        if device.is_some_and(|d| d != text(&n["node-name"])) {
            continue;
        }
        if i > 0 {
            out.push('\n');
        }
        print_block_info(&mut out, None, Some(n), verbose);
    }
    out
}

fn print_block_info(
    out: &mut String,
    info: Option<&Value>,
    inserted: Option<&Value>,
    verbose: bool,
) {
    let device = info.map(|i| text(&i["device"])).unwrap_or_default();
    let node = inserted.and_then(|n| n["node-name"].as_str());
    if !device.is_empty() {
        out.push_str(device);
        if let Some(n) = node {
            let _ = write!(out, " ({n})");
        }
    } else {
        let qdev = info.and_then(|i| i["qdev"].as_str());
        out.push_str(node.or(qdev).unwrap_or("<anonymous>"));
    }
    match inserted {
        Some(n) => {
            let _ = writeln!(
                out,
                ": {} ({}{}{})",
                text(&n["file"]),
                text(&n["drv"]),
                if n["ro"] == true { ", read-only" } else { "" },
                if n["encrypted"] == true {
                    ", encrypted"
                } else {
                    ""
                }
            );
        }
        None => out.push_str(": [not inserted]\n"),
    }
    if let Some(i) = info {
        if let Some(q) = i["qdev"].as_str() {
            let _ = writeln!(out, "    Attached to:      {q}");
        }
        if let Some(s) = i["io-status"].as_str().filter(|&s| s != "ok") {
            let _ = writeln!(out, "    I/O status:       {s}");
        }
        if i["removable"] == true {
            let _ = writeln!(
                out,
                "    Removable device: {}locked, tray {}",
                if i["locked"] == true { "" } else { "not " },
                if i["tray_open"] == true {
                    "open"
                } else {
                    "closed"
                }
            );
        }
    }
    let Some(n) = inserted else {
        return;
    };
    let c = &n["cache"];
    let _ = writeln!(
        out,
        "    Cache mode:       {}{}{}",
        if c["writeback"] == true {
            "writeback"
        } else {
            "writethrough"
        },
        if c["direct"] == true { ", direct" } else { "" },
        if c["no-flush"] == true {
            ", ignore flushes"
        } else {
            ""
        }
    );
    if let Some(b) = n["backing_file"].as_str() {
        let depth = int(&n["backing_file_depth"]);
        let _ = writeln!(out, "    Backing file:     {b} (chain depth: {depth})");
    }
    if let Some(z) = n["detect_zeroes"].as_str().filter(|&z| z != "off") {
        let _ = writeln!(out, "    Detect zeroes:    {z}");
    }
    let throttled = ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"]
        .iter()
        .any(|k| int(&n[*k]) != 0);
    if throttled {
        out.push_str("    I/O throttling:  ");
        for k in [
            "bps",
            "bps_rd",
            "bps_wr",
            "bps_max",
            "bps_rd_max",
            "bps_wr_max",
            "iops",
            "iops_rd",
            "iops_wr",
            "iops_max",
            "iops_rd_max",
            "iops_wr_max",
            "iops_size",
        ] {
            let _ = write!(out, " {k}={}", int(&n[k]));
        }
        let _ = writeln!(out, " group={}", text(&n["group"]));
    }
    if verbose {
        out.push_str("\nImages:\n");
        let mut image = Some(&n["image"]).filter(|i| i.is_object());
        while let Some(i) = image {
            image_dump(out, i);
            image = i.get("backing-image");
        }
    }
}

/// QEMU's bdrv_image_info_dump(): one image of a chain.
fn image_dump(out: &mut String, i: &Value) {
    let disk = match i["actual-size"].as_u64() {
        Some(s) => size_to_str(s),
        None => "unavailable".into(),
    };
    let virtual_size = i["virtual-size"].as_u64().unwrap_or(0);
    let _ = write!(
        out,
        "image: {}\nfile format: {}\nvirtual size: {} ({virtual_size} bytes)\ndisk size: {disk}\n",
        text(&i["filename"]),
        text(&i["format"]),
        size_to_str(virtual_size),
    );
    if i["encrypted"] == true {
        out.push_str("encrypted: yes\n");
    }
    if let Some(c) = i["cluster-size"].as_i64() {
        let _ = writeln!(out, "cluster_size: {c}");
    }
    if i["dirty-flag"] == true {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = i["backing-filename"].as_str() {
        let _ = write!(out, "backing file: {b}");
        match i["full-backing-filename"].as_str() {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => {
                let _ = write!(out, " (actual path: {full})");
            }
            Some(_) => {}
        }
        out.push('\n');
        if let Some(f) = i["backing-filename-format"].as_str() {
            let _ = writeln!(out, "backing file format: {f}");
        }
    }
    if let Some(data) = i["format-specific"].get("data") {
        out.push_str("Format specific information:\n");
        dump(out, 1, data);
    }
}

/// QEMU's dump_qobject() of a composite value, at `indent` (4 spaces each).
fn dump(out: &mut String, indent: usize, v: &Value) {
    let entries: Vec<(String, &Value)> = match v {
        Value::Object(m) => qdict_order(m.keys().map(String::as_str).collect())
            .into_iter()
            .map(|k| (k.replace('-', " "), &m[k]))
            .collect(),
        Value::Array(a) => a.iter().map(|e| ("[]".to_string(), e)).collect(),
        _ => return,
    };
    for (k, e) in entries {
        let _ = write!(out, "{:w$}{k}:", "", w = indent * 4);
        match e {
            Value::Object(_) | Value::Array(_) => {
                out.push('\n');
                dump(out, indent + 1, e);
            }
            Value::String(s) => {
                let _ = writeln!(out, " {s}");
            }
            other => {
                let _ = writeln!(out, " {other}");
            }
        }
    }
}

/// The order in which QEMU's QDict yields `keys` (given in the order they
/// were put in, which is QAPI's field order): by bucket of its hash, and
/// within a bucket the last put first.
pub fn qdict_order(keys: Vec<&str>) -> Vec<&str> {
    // util/qdict.c: tdb_hash() % QDICT_BUCKET_MAX.
    fn bucket(name: &str) -> u32 {
        let mut value = 0x238F_13AF_u32.wrapping_mul(name.len() as u32);
        for (i, b) in name.bytes().enumerate() {
            value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
        }
        1_103_515_243_u32.wrapping_mul(value).wrapping_add(12345) % 512
    }
    let mut indexed: Vec<(u32, usize, &str)> = keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (bucket(k), usize::MAX - i, k))
        .collect();
    indexed.sort_unstable();
    indexed.into_iter().map(|(_, _, k)| k).collect()
}

/// QEMU's size_to_str(): three significant digits in the largest binary
/// unit that keeps the number under 1000 ("196 KiB", "64 MiB", "0 B").
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000.0 / 1024.0)) gives the exponent e with
    // 2^(e-1) <= x < 2^e; QEMU takes (e - 1) / 10.
    // (x is 0 or at least 1, a normal double: its exponent bits are frexp's.)
    let x = val as f64 / (1000.0 / 1024.0);
    let e = if x == 0.0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i64 - 1022
    };
    let i = usize::try_from((e - 1) / 10).unwrap_or(0).min(6);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g`.
fn g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    // The exponent after rounding to three significant digits.
    let sci = format!("{x:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", trim(mantissa.to_string()), exp.abs());
    }
    let precision = usize::try_from(2 - exp).unwrap_or(0);
    trim(format!("{x:.precision$}"))
}

/// `info blockstats`.
pub fn info_blockstats(stats: &[Value]) -> String {
    let mut out = String::new();
    for s in stats {
        let Some(device) = s["device"].as_str() else {
            continue;
        };
        let _ = write!(out, "{device}:");
        for k in [
            "rd_bytes",
            "wr_bytes",
            "rd_operations",
            "wr_operations",
            "flush_operations",
            "wr_total_time_ns",
            "rd_total_time_ns",
            "flush_total_time_ns",
            "rd_merged",
            "wr_merged",
            "idle_time_ns",
        ] {
            let _ = write!(out, " {k}={}", int(&s["stats"][k]));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_as_qemu_prints_them() {
        for (v, s) in [
            (0, "0 B"),
            (1, "1 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (200_704, "196 KiB"),
            (67_108_864, "64 MiB"),
            (10_485_760, "10 MiB"),
            (1_610_612_736, "1.5 GiB"),
            // (QEMU rounds after choosing the unit.)
            (1_023_999, "1e+03 KiB"),
            (u64::MAX, "16 EiB"),
        ] {
            assert_eq!(size_to_str(v), s, "{v}");
        }
    }

    #[test]
    fn qcow2_fields_in_qemus_order() {
        // As QEMU 7.2 printed a qcow2 v3 image's specific information.
        let keys = vec![
            "compat",
            "extended-l2",
            "lazy-refcounts",
            "corrupt",
            "refcount-bits",
            "compression-type",
        ];
        assert_eq!(
            qdict_order(keys),
            [
                "compat",
                "compression-type",
                "lazy-refcounts",
                "refcount-bits",
                "corrupt",
                "extended-l2"
            ]
        );
    }

    #[test]
    fn an_empty_drive_and_a_throttled_one() {
        let blocks = [
            json!({"device": "d2", "locked": false, "removable": true, "type": "unknown"}),
            json!({"device": "d1", "qdev": "vd1", "io-status": "failed", "removable": false,
                   "inserted": {"file": "b.raw", "drv": "raw", "ro": true, "node-name": "#block1",
                                "cache": {"writeback": true, "direct": true, "no-flush": false},
                                "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                                "iops": 10, "iops_rd": 0, "iops_wr": 0, "group": "vd1"}}),
        ];
        let out = info_block(&blocks, Vec::new, None, false, false);
        assert_eq!(
            out,
            "d2: [not inserted]\n    Removable device: not locked, tray closed\n\n\
             d1 (#block1): b.raw (raw, read-only)\n    Attached to:      vd1\n    \
             I/O status:       failed\n    Cache mode:       writeback, direct\n    \
             I/O throttling:   bps=0 bps_rd=0 bps_wr=0 bps_max=0 bps_rd_max=0 bps_wr_max=0 \
             iops=10 iops_rd=0 iops_wr=0 iops_max=0 iops_rd_max=0 iops_wr_max=0 iops_size=0 group=vd1\n"
        );
        // A device that is not there prints nothing, as in QEMU.
        assert_eq!(
            info_block(&blocks, Vec::new, Some("nope"), false, false),
            ""
        );
    }
}
