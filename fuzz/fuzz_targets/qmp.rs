//! QMP message framing, parsing and dispatch, and HMP lines, with a VM
//! stand-in that answers every request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_api::{Client, CpuInfo, Reply, Request, RunState};
use moat_monitor::qmp::{Frame, Framer, MonitorContext, Session};
use moat_monitor::{hmp, VmInfo};
use serde_json::json;
use std::sync::Arc;

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
