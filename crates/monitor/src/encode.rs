//! QEMU's JSON shapes for the VM's typed replies and events: what
//! query-status, query-cpus-fast, query-block, query-blockstats and
//! query-named-block-nodes return in QEMU 7.2, field by field, and the QMP
//! events with their data.

use moat_api::{
    BlockDevice, BlockNode, BlockStats, CpuInfo, Event, ImageInfo, NetRateInfo, Reply, RunState,
    RxFilterInfo,
};
use moat_config::CacheMode;
use serde_json::{json, Value};

/// A reply as QMP's `return` value.
pub fn reply(r: &Reply) -> Value {
    match r {
        Reply::Done => json!({}),
        Reply::Status(s) => status(*s),
        Reply::Cpus(c) => Value::Array(c.iter().map(cpu).collect()),
        Reply::Text(t) => Value::String(t.clone()),
        // (HMP's; no QMP command asks for it.)
        Reply::Network(n) => Value::Array(
            n.iter()
                .map(|n| json!({"netdev": n.netdev, "type": n.kind, "mac": mac(&n.mac), "queues": n.queues}))
                .collect(),
        ),
        Reply::Block(b) => Value::Array(b.iter().map(block_device).collect()),
        Reply::BlockStats(b) => Value::Array(b.iter().map(block_stats).collect()),
        Reply::NodeStats(n) => Value::Array(
            n.iter()
                .map(|n| match n {
                    moat_api::NodeStats::Protocol(f) => file_stats(f),
                    moat_api::NodeStats::Format {
                        node_name,
                        wr_highest_offset,
                        parent,
                    } => json!({
                        "node-name": node_name,
                        "stats": node_stats(*wr_highest_offset),
                        "parent": file_stats(parent),
                    }),
                })
                .collect(),
        ),
        Reply::Nodes(n) => Value::Array(
            n.iter()
                .map(|n| {
                    let mut v = node(n);
                    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
                        v[k] = json!(0);
                    }
                    v
                })
                .collect(),
        ),
        Reply::RxFilters(f) => Value::Array(f.iter().map(rx_filter).collect()),
        Reply::NetRates(r) => Value::Array(r.iter().map(net_rate).collect()),
    }
}

pub fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// QEMU's RxFilterInfo.
fn rx_filter(f: &RxFilterInfo) -> Value {
    json!({
        "name": f.name,
        "promiscuous": f.promiscuous,
        "multicast": f.multicast,
        "unicast": f.unicast,
        "vlan": f.vlan,
        "broadcast-allowed": f.broadcast_allowed,
        "multicast-overflow": f.multicast_overflow,
        "unicast-overflow": f.unicast_overflow,
        "main-mac": mac(&f.main_mac),
        "vlan-table": f.vlan_table,
        "unicast-table": f.unicast_table.iter().map(mac).collect::<Vec<_>>(),
        "multicast-table": f.multicast_table.iter().map(mac).collect::<Vec<_>>(),
    })
}

/// moat's query-net-rate-limits entry: limits by the keys that set them.
fn net_rate(r: &NetRateInfo) -> Value {
    let limits = |l: &moat_config::RateLimit| {
        let keys = moat_config::RateLimit::KEYS.into_iter();
        Value::Object(
            keys.map(String::from)
                .zip(l.fields().map(Value::from))
                .collect(),
        )
    };
    json!({
        "name": r.name,
        "rx": limits(&r.rx),
        "tx": limits(&r.tx),
        "rx-bytes": r.rx_bytes, "rx-frames": r.rx_frames, "rx-dropped": r.rx_dropped,
        "tx-bytes": r.tx_bytes, "tx-frames": r.tx_frames, "tx-dropped": r.tx_dropped,
        "queues": r.queues.iter().map(|(rx, tx)| json!({"rx-frames": rx, "tx-frames": tx})).collect::<Vec<_>>(),
    })
}

fn status(s: RunState) -> Value {
    json!({"running": s == RunState::Running, "singlestep": false, "status": s.name()})
}

fn cpu(c: &CpuInfo) -> Value {
    let mut props = json!({"core-id": c.core, "thread-id": c.thread, "socket-id": c.socket});
    if let Some(d) = c.die {
        props["die-id"] = json!(d);
    }
    json!({
        "cpu-index": c.index,
        "qom-path": format!("/machine/unattached/device[{}]", c.index),
        "thread-id": c.thread_id,
        "props": props,
        "target": "x86_64"
    })
}

/// QEMU's ImageInfo for one layer and, nested, the layers below it.
fn image(i: &ImageInfo) -> Value {
    let mut v = json!({
        "filename": i.filename.display().to_string(),
        "format": i.format,
        "virtual-size": i.virtual_size,
        "actual-size": i.actual_size,
    });
    if let Some(q) = &i.qcow2 {
        v["cluster-size"] = json!(q.cluster_size);
        let mut data = json!({
            "compat": if q.version == 2 { "0.10" } else { "1.1" },
            "compression-type": if q.zstd { "zstd" } else { "zlib" },
            "refcount-bits": q.refcount_bits,
        });
        if q.version == 3 {
            data["lazy-refcounts"] = json!(q.lazy_refcounts);
            data["corrupt"] = json!(q.corrupt);
            data["extended-l2"] = json!(q.extended_l2);
            if let Some((name, raw)) = &q.data_file {
                data["data-file"] = json!(name);
                data["data-file-raw"] = json!(raw);
            }
        }
        v["format-specific"] = json!({"type": "qcow2", "data": data});
    }
    // The backing file as the header names it (QEMU's backing-filename),
    // the one in use or else that name made absolute (full-), and the
    // header's format for it, else the format in use.
    let named = i.qcow2.as_ref().and_then(|q| q.backing.as_ref());
    let used = i.backing.as_deref();
    let full = used.map(|b| b.filename.clone()).or_else(|| {
        let (name, _) = named?;
        Some(
            i.filename
                .parent()
                .unwrap_or(std::path::Path::new(""))
                .join(name),
        )
    });
    if let Some(full) = full {
        let full = full.display().to_string();
        let name = named.map_or(full.clone(), |(n, _)| n.clone());
        v["backing-filename"] = json!(name);
        v["full-backing-filename"] = json!(full);
        let format = named
            .and_then(|(_, f)| f.clone())
            .or(used.map(|b| b.format.clone()));
        if let Some(f) = format {
            v["backing-filename-format"] = json!(f);
        }
    }
    if let Some(b) = used {
        v["backing-image"] = image(b);
    }
    v
}

/// QEMU's BlockDeviceInfo for a node, without the throttling fields.
fn node(n: &BlockNode) -> Value {
    let depth = std::iter::successors(n.image.backing.as_deref(), |b| b.backing.as_deref()).count();
    let mut info = json!({
        "file": n.image.filename.display().to_string(), "node-name": n.node_name,
        "ro": n.read_only, "drv": n.driver, "encrypted": false, "detect_zeroes": "off",
        "backing_file_depth": depth, "write_threshold": n.write_threshold as i64,
        // (Mandatory in QEMU's schema; a node's own are 0, a drive's
        // throttling shows in query-block.)
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "cache": {
            "writeback": !matches!(n.cache, CacheMode::Writethrough | CacheMode::Directsync),
            "direct": matches!(n.cache, CacheMode::None | CacheMode::Directsync),
            "no-flush": matches!(n.cache, CacheMode::Unsafe),
        },
    });
    if let Some(b) = &n.image.backing {
        info["backing_file"] = json!(b.filename.display().to_string());
    }
    let mut img = image(&n.image);
    img["dirty-flag"] = json!(false);
    info["image"] = img;
    info
}

fn block_device(d: &BlockDevice) -> Value {
    let mut v = json!({
        "device": d.device,
        "locked": false,
        "removable": d.qdev.is_none(),
        "type": "unknown",
    });
    // (An if=none drive no device uses: no qdev, removable, and no I/O
    // status, which a device turns on; as QEMU shows it.)
    if let Some(q) = &d.qdev {
        v["qdev"] = json!(q);
        v["io-status"] = json!(d.io_status);
    }
    let Some(n) = &d.node else {
        return v; // no medium
    };
    let mut inserted = node(n);
    // QEMU's fields: the averages always, bursts and the group only while
    // throttling is on, each burst field only when set.
    let t = &d.throttle;
    for (k, v) in [
        ("bps", t.bps),
        ("bps_rd", t.bps_rd),
        ("bps_wr", t.bps_wr),
        ("iops", t.iops),
        ("iops_rd", t.iops_rd),
        ("iops_wr", t.iops_wr),
    ] {
        inserted[k] = json!(v);
    }
    if t.enabled() {
        let bursts = [
            ("bps_max", t.bps_max, t.bps_max_length),
            ("bps_rd_max", t.bps_rd_max, t.bps_rd_max_length),
            ("bps_wr_max", t.bps_wr_max, t.bps_wr_max_length),
            ("iops_max", t.iops_max, t.iops_max_length),
            ("iops_rd_max", t.iops_rd_max, t.iops_rd_max_length),
            ("iops_wr_max", t.iops_wr_max, t.iops_wr_max_length),
        ];
        for (k, max, len) in bursts {
            if max != 0 {
                inserted[k] = json!(max);
                inserted[format!("{k}_length")] = json!(len);
            }
        }
        if t.iops_size != 0 {
            inserted["iops_size"] = json!(t.iops_size);
        }
        inserted["group"] = json!(d.throttle_group.as_deref().unwrap_or(&d.device));
    }
    v["inserted"] = inserted;
    v
}

/// QEMU's BlockDeviceStats: every mandatory field, each counted (merges,
/// unmaps and timed stats are 0 and empty: moat merges no requests, and
/// QEMU's virtio-blk does not account discards).
fn device_stats(s: &BlockStats) -> Value {
    let mut v = json!({
        "rd_bytes": s.rd_bytes, "wr_bytes": s.wr_bytes, "unmap_bytes": 0,
        "rd_operations": s.rd_operations, "wr_operations": s.wr_operations,
        "flush_operations": s.flush_operations, "unmap_operations": 0,
        "failed_rd_operations": s.failed_rd_operations, "failed_wr_operations": s.failed_wr_operations,
        "failed_flush_operations": s.failed_flush_operations, "failed_unmap_operations": 0,
        "invalid_rd_operations": s.invalid_rd_operations, "invalid_wr_operations": s.invalid_wr_operations,
        "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
        "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
        "rd_total_time_ns": s.rd_total_time_ns, "wr_total_time_ns": s.wr_total_time_ns,
        "flush_total_time_ns": s.flush_total_time_ns, "unmap_total_time_ns": 0,
        "wr_highest_offset": s.wr_highest_offset, "account_invalid": true, "account_failed": true,
        "timed_stats": []
    });
    if let Some(idle) = s.idle_time_ns {
        v["idle_time_ns"] = json!(idle);
    }
    v
}

/// A node's own stats below a device (QEMU's bdrv_query_bds_stats): zero
/// but for the highest offset written.
fn node_stats(wr_highest_offset: u64) -> Value {
    let mut v = device_stats(&BlockStats {
        wr_highest_offset,
        ..BlockStats::default()
    });
    v["account_invalid"] = json!(false);
    v["account_failed"] = json!(false);
    v
}

fn block_stats(s: &BlockStats) -> Value {
    let mut v = json!({
        "device": s.device,
        "stats": device_stats(s),
    });
    if let Some(n) = &s.node_name {
        v["node-name"] = json!(n);
    }
    if let Some(q) = &s.qdev {
        v["qdev"] = json!(q);
    }
    if let Some(f) = &s.file {
        v["parent"] = file_stats(f);
    }
    // (Nested as QEMU nests them: each layer's entry holds the next's.)
    let mut below = Value::Null;
    for (node, file) in s.backing.iter().rev() {
        let mut b = json!({"node-name": node, "stats": node_stats(0), "parent": file_stats(file)});
        if !below.is_null() {
            b["backing"] = below;
        }
        below = b;
    }
    if !below.is_null() {
        v["backing"] = below;
    }
    v
}

fn file_stats(f: &moat_api::FileStats) -> Value {
    json!({
        "node-name": f.node_name,
        "stats": node_stats(f.wr_highest_offset),
        "driver-specific": {
            "driver": f.driver,
            "discard-nb-ok": f.discard_ok,
            "discard-nb-failed": f.discard_failed,
            "discard-bytes-ok": f.discard_bytes_ok,
        },
    })
}

/// An event's QMP name and data.
pub fn event(e: &Event) -> (&'static str, Option<Value>) {
    match e {
        Event::Stop => ("STOP", None),
        Event::Resume => ("RESUME", None),
        Event::Powerdown => ("POWERDOWN", None),
        Event::Reset { guest, reason } => {
            ("RESET", Some(json!({"guest": guest, "reason": reason})))
        }
        Event::Shutdown { guest, reason } => {
            ("SHUTDOWN", Some(json!({"guest": guest, "reason": reason})))
        }
        Event::BlockIoError {
            device,
            node_name,
            write,
            nospace,
            reason,
            action,
        } => (
            "BLOCK_IO_ERROR",
            Some(json!({
                "device": device, "node-name": node_name,
                "operation": if *write { "write" } else { "read" },
                "action": action, "nospace": nospace, "reason": reason,
            })),
        ),
        Event::BlockWriteThreshold {
            node_name,
            amount_exceeded,
            write_threshold,
        } => (
            "BLOCK_WRITE_THRESHOLD",
            Some(json!({
                "node-name": node_name, "amount-exceeded": amount_exceeded,
                "write-threshold": write_threshold,
            })),
        ),
        Event::NicRxFilterChanged { name, path } => {
            let mut data = json!({"path": path});
            if let Some(n) = name {
                data["name"] = json!(n);
            }
            ("NIC_RX_FILTER_CHANGED", Some(data))
        }
    }
}
