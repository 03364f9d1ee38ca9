//! QMP message framing, parsing and dispatch, and HMP lines, with a VM
//! stand-in that answers every command.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_monitor::qmp::{FdStore, Frame, Framer, MonitorContext, Session};
use moat_monitor::{hmp, QmpError, VmCommand, VmControl, VmInfo};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

struct Vm;
impl VmControl for Vm {
    fn execute(&self, cmd: VmCommand) -> Result<Value, QmpError> {
        match cmd {
            VmCommand::QueryStatus => Ok(json!({"running": true, "singlestep": false, "status": "running"})),
            VmCommand::QueryCpusFast => Ok(json!([{"cpu-index": 0, "thread-id": 1}])),
            VmCommand::Registers(_) => Ok(json!("RAX=0")),
            _ => Ok(json!({})),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let ctx = Arc::new(MonitorContext {
        info: VmInfo { name: Some("f".into()), uuid: None },
        vm: Arc::new(Vm),
        fds: Mutex::new(FdStore::default()),
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
