//! QMP message framing, parsing and dispatch, and HMP lines, with a VM
//! stand-in that answers every request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_api::{
    BlockDevice, BlockNode, BlockStats, Client, CpuInfo, ImageInfo, Qcow2Info, Reply, Request,
    RunState,
};
use moat_config::{CacheMode, ThrottleLimits};
use moat_monitor::qmp::{Frame, Framer, MonitorContext, Session};
use moat_monitor::{hmp, VmInfo};
use serde_json::json;
use std::sync::Arc;

/// A qcow2 drive over a backing image, for the block reports.
fn node() -> BlockNode {
    let image = |name: &str, backing| ImageInfo {
        filename: name.into(),
        format: "qcow2".into(),
        virtual_size: 1 << 30,
        actual_size: 196 << 10,
        qcow2: Some(Qcow2Info {
            cluster_size: 65536,
            version: 3,
            zstd: false,
            lazy_refcounts: false,
            refcount_bits: 16,
            corrupt: false,
            extended_l2: false,
            data_file: Some(("d".into(), true)),
            backing: Some(("base".into(), None)),
        }),
        backing,
    };
    BlockNode {
        node_name: "#block001".into(),
        driver: "qcow2".into(),
        read_only: false,
        cache: CacheMode::Writeback,
        image: image("top", Some(Box::new(image("base", None)))),
        write_threshold: 0,
    }
}

fn vm() -> Client {
    Client::new(|call| {
        let reply = match call.request {
            Request::QueryStatus => Reply::Status(RunState::Running),
            Request::QueryCpus => Reply::Cpus(vec![CpuInfo {
                index: 0,
                thread_id: 1,
                socket: 0,
                die: None,
                core: 0,
                thread: 0,
            }]),
            Request::Registers(_) => Reply::Text("RAX=0".into()),
            Request::QueryBlock => Reply::Block(vec![BlockDevice {
                device: "d0".into(),
                qdev: Some("vd0".into()),
                node: Some(node()),
                throttle: ThrottleLimits {
                    bps: 1,
                    ..ThrottleLimits::default()
                },
                throttle_group: None,
                io_status: "ok",
            }]),
            Request::QueryNamedBlockNodes => Reply::Nodes(vec![node()]),
            Request::QueryBlockstats => Reply::BlockStats(vec![BlockStats {
                device: "d0".into(),
                ..BlockStats::default()
            }]),
            _ => Reply::Done,
        };
        let _ = call.reply.send(Ok(reply));
        true
    })
}

fuzz_target!(|data: &[u8]| {
    let ctx = Arc::new(MonitorContext {
        info: VmInfo { name: Some("f".into()), uuid: None },
        vm: vm(),
        fds: Arc::default(),
    });
    let mut s = Session::new(ctx);
    // Negotiate first half the time, so dispatch past negotiation is reached.
    if data.first().is_some_and(|b| b & 1 == 1) {
        s.handle(json!({"execute": "qmp_capabilities"}));
    }
    let mut f = Framer::default();
    for chunk in data.chunks(97) {
        let Ok(frames) = f.push(chunk) else { return };
        for fr in frames {
            if let Frame::Value(v) = fr {
                let _ = s.handle(v);
            }
        }
    }
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = hmp::execute(&mut s, line, None);
    }
});
