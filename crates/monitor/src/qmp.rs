//! QMP (docs/interop/qmp-spec.txt): framing of a JSON byte stream, capability
//! negotiation, argument checking against each command's schema, dispatch,
//! and replies with QEMU's error classes and texts.

use crate::{encode, hmp, QmpError, VmInfo, QEMU_VERSION};
use moat_api::{DriveRef, Request};
use moat_sys::lock;
use serde_json::{json, Map, Value};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// Largest accepted QMP message; a client that sends more is disconnected.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Argument types of the QAPI schema subset moat uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    Str,
    Int,
    Bool,
    StrList,
    /// Any JSON value (nested options such as blockdev-add's `file`).
    Any,
}

impl ArgType {
    fn name(self) -> &'static str {
        match self {
            ArgType::Str => "str",
            ArgType::Int => "int",
            ArgType::Bool => "bool",
            ArgType::StrList => "[str]",
            ArgType::Any => "any",
        }
    }
    fn json_name(self) -> &'static str {
        match self {
            ArgType::Str => "string",
            ArgType::Int => "integer",
            ArgType::Bool => "boolean",
            ArgType::StrList => "array",
            ArgType::Any => "value",
        }
    }
    fn matches(self, v: &Value) -> bool {
        match self {
            ArgType::Str => v.is_string(),
            ArgType::Int => v.is_i64() || v.is_u64(),
            ArgType::Bool => v.is_boolean(),
            ArgType::StrList => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            ArgType::Any => true,
        }
    }
}

/// The arguments of one command, checked against its schema.
pub type Args = Map<String, Value>;

/// One command: its schema (argument, type, required) and what it does,
/// which is to decode its arguments once and either answer here (the
/// monitor's own commands) or ask the VM with a typed [`Request`].
pub struct CommandSpec {
    pub name: &'static str,
    pub args: &'static [(&'static str, ArgType, bool)],
    pub run: fn(&mut Session, &Args) -> Result<Value, QmpError>,
}

impl std::fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

use ArgType::*;

fn s<'a>(args: &'a Args, k: &str) -> Option<&'a str> {
    args.get(k).and_then(Value::as_str)
}

fn i(args: &Args, k: &str) -> Option<i64> {
    args.get(k).and_then(Value::as_i64)
}

/// Ask the VM; its reply in QEMU's shape.
fn vm(session: &Session, r: Request) -> Result<Value, QmpError> {
    Ok(encode::reply(&session.ctx.vm.call(r)?))
}

/// `device` or `id`, exactly one.
fn device_or_id(args: &Args) -> Result<DriveRef, QmpError> {
    match (s(args, "device"), s(args, "id")) {
        (Some(d), None) => Ok(DriveRef::Device(d.to_string())),
        (None, Some(id)) => Ok(DriveRef::Id(id.to_string())),
        _ => Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
    }
}

/// Every QMP command moat implements. Adding one: an entry here, and (if
/// it asks the VM) a `Request` and its arm in the VM's handler.
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "qmp_capabilities",
        args: &[("enable", StrList, false)],
        run: |session, args| {
            if let Some(caps) = args.get("enable").and_then(Value::as_array) {
                if let Some(c) = caps.first().and_then(Value::as_str) {
                    return Err(QmpError::generic(format!("Capability '{c}' not available")));
                }
            }
            session.negotiated = true;
            Ok(json!({}))
        },
    },
    CommandSpec {
        name: "query-version",
        args: &[],
        run: |_, _| {
            let (major, minor, micro) = QEMU_VERSION;
            Ok(
                json!({"qemu": {"major": major, "minor": minor, "micro": micro},
                      "package": format!("moat {}", env!("CARGO_PKG_VERSION"))}),
            )
        },
    },
    CommandSpec {
        name: "query-commands",
        args: &[],
        run: |_, _| {
            Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({"name": c.name})).collect(),
            ))
        },
    },
    CommandSpec {
        name: "query-status",
        args: &[],
        run: |session, _| vm(session, Request::QueryStatus),
    },
    CommandSpec {
        name: "query-name",
        args: &[],
        run: |session, _| {
            Ok(match &session.ctx.info.name {
                Some(n) => json!({"name": n}),
                None => json!({}),
            })
        },
    },
    CommandSpec {
        name: "query-uuid",
        args: &[],
        run: |session, _| {
            let uuid = session.ctx.info.uuid.as_deref();
            Ok(json!({"UUID": uuid.unwrap_or("00000000-0000-0000-0000-000000000000")}))
        },
    },
    CommandSpec {
        name: "query-kvm",
        args: &[],
        run: |_, _| Ok(json!({"enabled": true, "present": true})),
    },
    CommandSpec {
        name: "query-cpus-fast",
        args: &[],
        run: |session, _| vm(session, Request::QueryCpus),
    },
    CommandSpec {
        name: "query-qmp-schema",
        args: &[],
        run: |_, _| Ok(schema()),
    },
    CommandSpec {
        name: "stop",
        args: &[],
        run: |session, _| vm(session, Request::Stop),
    },
    CommandSpec {
        name: "cont",
        args: &[],
        run: |session, _| vm(session, Request::Cont),
    },
    CommandSpec {
        name: "system_reset",
        args: &[],
        run: |session, _| vm(session, Request::SystemReset),
    },
    CommandSpec {
        name: "system_powerdown",
        args: &[],
        run: |session, _| vm(session, Request::SystemPowerdown),
    },
    CommandSpec {
        name: "quit",
        args: &[],
        // The VM ends once this client's reply is on its way.
        run: |session, _| {
            session.after_reply = Some(Request::Quit);
            Ok(json!({}))
        },
    },
    CommandSpec {
        name: "human-monitor-command",
        args: &[("command-line", Str, true), ("cpu-index", Int, false)],
        run: |session, args| {
            let line = s(args, "command-line").unwrap_or_default().to_string();
            let cpu = i(args, "cpu-index").map(|c| c as u32);
            Ok(Value::String(hmp::execute(session, &line, cpu)))
        },
    },
    CommandSpec {
        name: "getfd",
        args: &[("fdname", Str, true)],
        run: |session, args| {
            let name = s(args, "fdname").unwrap_or_default().to_string();
            if name.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(QmpError::generic(
                    "Parameter 'fdname' must not start with a digit",
                ));
            }
            let fd = session.received_fd()?;
            // Replacing a name closes the old descriptor, as QEMU does.
            session
                .fds()
                .put_named(name, fd)
                .map_err(QmpError::generic)?;
            Ok(json!({}))
        },
    },
    CommandSpec {
        name: "closefd",
        args: &[("fdname", Str, true)],
        run: |session, args| {
            let name = s(args, "fdname").unwrap_or_default();
            let mut store = session.fds();
            store.take_named(name).map(|_| json!({})).ok_or_else(|| {
                QmpError::generic(format!("File descriptor named '{name}' not found"))
            })
        },
    },
    CommandSpec {
        name: "add-fd",
        args: &[("fdset-id", Int, false), ("opaque", Str, false)],
        run: |session, args| {
            let id = i(args, "fdset-id");
            if id.is_some_and(|id| id < 0) {
                return Err(QmpError::generic(
                    "Parameter 'fdset-id' expects a non-negative value",
                ));
            }
            let fd = session.received_fd()?;
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let opaque = s(args, "opaque").map(str::to_string);
            let id = session
                .fds()
                .add(id, fd, opaque)
                .map_err(QmpError::generic)?;
            Ok(json!({"fdset-id": id, "fd": raw}))
        },
    },
    CommandSpec {
        name: "remove-fd",
        args: &[("fdset-id", Int, true), ("fd", Int, false)],
        run: |session, args| {
            let id = i(args, "fdset-id").unwrap_or(-1);
            let fd = i(args, "fd");
            if session.fds().remove(id, fd) {
                return Ok(json!({}));
            }
            Err(QmpError::generic(match fd {
                Some(fd) => format!("File descriptor named 'fdset-id:{id}, fd:{fd}' not found"),
                None => format!("File descriptor named 'fdset-id:{id}' not found"),
            }))
        },
    },
    CommandSpec {
        name: "query-fdsets",
        args: &[],
        run: |session, _| {
            let store = session.fds();
            let sets = store.sets().iter().map(|s| {
                let fds: Vec<Value> = s
                    .fds
                    .iter()
                    .map(|(f, o)| {
                        let mut e = json!({"fd": std::os::fd::AsRawFd::as_raw_fd(f)});
                        if let Some(o) = o {
                            e["opaque"] = json!(o);
                        }
                        e
                    })
                    .collect();
                json!({"fdset-id": s.id, "fds": fds})
            });
            Ok(Value::Array(sets.collect()))
        },
    },
    CommandSpec {
        name: "query-block",
        args: &[],
        run: |session, _| vm(session, Request::QueryBlock),
    },
    CommandSpec {
        name: "query-blockstats",
        args: &[("query-nodes", Bool, false)],
        run: |session, args| {
            let nodes = args.get("query-nodes").and_then(Value::as_bool) == Some(true);
            vm(
                session,
                match nodes {
                    true => Request::QueryNodeStats,
                    false => Request::QueryBlockstats,
                },
            )
        },
    },
    CommandSpec {
        name: "eject",
        args: &[
            ("device", Str, false),
            ("id", Str, false),
            ("force", Bool, false),
        ],
        run: |session, args| {
            let drive = device_or_id(args)?;
            vm(session, Request::Eject { drive })
        },
    },
    CommandSpec {
        name: "block-set-write-threshold",
        args: &[("node-name", Str, true), ("write-threshold", Int, true)],
        run: |session, args| {
            let node = s(args, "node-name").unwrap_or_default().to_string();
            // (QEMU's uint64 input takes a negative number as its two's
            // complement.)
            let v = &args["write-threshold"];
            let threshold = v.as_u64().or(v.as_i64().map(|n| n as u64)).unwrap_or(0);
            vm(session, Request::BlockSetWriteThreshold { node, threshold })
        },
    },
    CommandSpec {
        name: "block_set_io_throttle",
        args: &[
            ("device", Str, false),
            ("id", Str, false),
            ("bps", Int, true),
            ("bps_rd", Int, true),
            ("bps_wr", Int, true),
            ("iops", Int, true),
            ("iops_rd", Int, true),
            ("iops_wr", Int, true),
            ("bps_max", Int, false),
            ("bps_rd_max", Int, false),
            ("bps_wr_max", Int, false),
            ("iops_max", Int, false),
            ("iops_rd_max", Int, false),
            ("iops_wr_max", Int, false),
            ("bps_max_length", Int, false),
            ("bps_rd_max_length", Int, false),
            ("bps_wr_max_length", Int, false),
            ("iops_max_length", Int, false),
            ("iops_rd_max_length", Int, false),
            ("iops_wr_max_length", Int, false),
            ("iops_size", Int, false),
            ("group", Str, false),
        ],
        run: |session, args| {
            let drive = device_or_id(args)?;
            let limits = throttle_args(args)?;
            let group = s(args, "group").map(str::to_string);
            vm(
                session,
                Request::BlockSetIoThrottle {
                    drive,
                    limits,
                    group,
                },
            )
        },
    },
    CommandSpec {
        name: "blockdev-add",
        args: &[
            ("driver", Str, true),
            ("node-name", Str, false),
            ("read-only", Bool, false),
            ("auto-read-only", Bool, false),
            ("force-share", Bool, false),
            ("discard", Str, false),
            ("cache", Any, false),
            ("detect-zeroes", Str, false),
            ("filename", Str, false),
            ("aio", Str, false),
            ("locking", Str, false),
            ("file", Any, false),
            ("backing", Any, false),
            ("data-file", Any, false),
        ],
        run: |session, args| {
            let (node, drive) = blockdev_args(args)?;
            let driver = s(args, "driver").unwrap_or_default().to_string();
            let drive = Box::new(drive);
            vm(
                session,
                Request::BlockdevAdd {
                    node,
                    driver,
                    drive,
                },
            )
        },
    },
    CommandSpec {
        name: "blockdev-del",
        args: &[("node-name", Str, true)],
        run: |session, args| {
            let node = s(args, "node-name").unwrap_or_default().to_string();
            vm(session, Request::BlockdevDel { node })
        },
    },
    CommandSpec {
        name: "query-named-block-nodes",
        args: &[("flat", Bool, false)],
        run: |session, _| vm(session, Request::QueryNamedBlockNodes),
    },
    CommandSpec {
        name: "set_link",
        args: &[("name", Str, true), ("up", Bool, true)],
        run: |session, args| {
            let name = s(args, "name").unwrap_or_default().to_string();
            let up = args.get("up").and_then(Value::as_bool).unwrap_or(true);
            vm(session, Request::SetLink { name, up })
        },
    },
    CommandSpec {
        name: "query-rx-filter",
        args: &[("name", Str, false)],
        run: |session, args| {
            let name = s(args, "name").map(str::to_string);
            vm(session, Request::QueryRxFilter { name })
        },
    },
    // moat's own commands, under a vendor prefix as QEMU's convention asks
    // for commands outside its schema.
    CommandSpec {
        name: NET_RATE_LIMIT_COMMAND,
        args: &[
            ("name", Str, true),
            ("rx-bps", Int, false),
            ("rx-bps-burst", Int, false),
            ("rx-pps", Int, false),
            ("rx-pps-burst", Int, false),
            ("tx-bps", Int, false),
            ("tx-bps-burst", Int, false),
            ("tx-pps", Int, false),
            ("tx-pps-burst", Int, false),
        ],
        run: |session, args| {
            let name = s(args, "name").unwrap_or_default().to_string();
            let rx = rate_limit_args(args, "rx")?;
            let tx = rate_limit_args(args, "tx")?;
            vm(session, Request::SetNetRateLimit { name, rx, tx })
        },
    },
    CommandSpec {
        name: "__dev.moat_query-net-rate-limits",
        args: &[],
        run: |session, _| vm(session, Request::QueryNetRateLimits),
    },
    CommandSpec {
        name: "migrate",
        args: &[
            ("uri", Str, true),
            ("blk", Bool, false),
            ("inc", Bool, false),
            ("detach", Bool, false),
            ("resume", Bool, false),
        ],
        run: |_, args| {
            let uri = s(args, "uri").unwrap_or_default();
            Err(QmpError::generic(if uri.starts_with("exec:") {
                "moat refuses 'exec:' migration: a monitor command must never spawn a host process"
                    .to_string()
            } else {
                format!("migration to '{uri}' is not supported by moat")
            }))
        },
    },
];

/// moat's command that sets a NIC's rate limits.
pub const NET_RATE_LIMIT_COMMAND: &str = "__dev.moat_set-net-rate-limit";

/// One direction's limits from `set-net-rate-limit`'s `DIR-bps`,
/// `DIR-bps-burst`, `DIR-pps`, `DIR-pps-burst`: `None` when none is given
/// (that direction keeps its limits); keys not given are 0 (no limit).
fn rate_limit_args(args: &Args, dir: &str) -> Result<Option<moat_config::RateLimit>, QmpError> {
    let mut l = moat_config::RateLimit::default();
    let mut any = false;
    for (key, field) in moat_config::RateLimit::KEYS.into_iter().zip(l.fields_mut()) {
        let k = format!("{dir}-{key}");
        if let Some(v) = i(args, &k) {
            *field = u64::try_from(v)
                .map_err(|_| QmpError::generic(format!("'{k}' must not be negative")))?;
            any = true;
        }
    }
    Ok(any.then_some(l))
}

/// Events moat emits.
pub const EVENTS: &[&str] = &[
    "STOP",
    "RESUME",
    "RESET",
    "POWERDOWN",
    "SHUTDOWN",
    "BLOCK_IO_ERROR",
    "BLOCK_WRITE_THRESHOLD",
    "NIC_RX_FILTER_CHANGED",
];

pub use moat_sys::fdset::{FdStore, MAX_STORED_FDS};

/// Shared by every session of one monitor process.
pub struct MonitorContext {
    pub info: VmInfo,
    pub vm: moat_api::Client,
    /// The fd sets (-add-fd, QMP add-fd, getfd), shared with the VM.
    pub fds: Arc<Mutex<FdStore>>,
}

impl std::fmt::Debug for MonitorContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorContext")
            .field("info", &self.info)
            .finish()
    }
}

/// The greeting sent when a client connects.
pub fn greeting() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"QMP": {
        "version": {"qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": format!("moat {}", env!("CARGO_PKG_VERSION"))},
        "capabilities": []
    }})
}

/// A QMP event with the current time.
pub fn event(name: &str, data: Option<Value>) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut ev = json!({
        "event": name,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}
    });
    if let Some(d) = data {
        ev["data"] = d;
    }
    ev
}

/// Splits a byte stream into JSON values, as QEMU's JSON streamer does: it
/// tracks nesting and strings byte by byte, so each byte is looked at once
/// however the stream is chunked (re-parsing the buffer on every chunk made
/// a 1 MiB message sent a byte at a time cost ~10^12 steps), and hands
/// serde_json one complete value at a time.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// How far `buf` has been scanned.
    scanned: usize,
    /// Where the value being scanned starts (None: between values).
    start: Option<usize>,
    /// Open braces and brackets of that value.
    depth: usize,
    /// Inside a string, and just after a backslash in it.
    in_string: bool,
    escaped: bool,
    /// The value is a bare scalar (number, literal): it ends at the next
    /// delimiter.
    scalar: bool,
    /// After an error: skip to the next newline.
    resync: bool,
}

/// One item out of the framer.
#[derive(Debug)]
pub enum Frame {
    Value(Value),
    /// Bad JSON: answer with this error and carry on.
    Error(QmpError),
}

/// Deepest nesting accepted (QEMU's JSON parser stops at 1024 too).
const MAX_NESTING: usize = 1024;

impl Framer {
    /// Add bytes; returns complete frames. `Err` means the client exceeded
    /// [`MAX_MESSAGE`] and must be disconnected.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Frame>, QmpError> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        // Everything before `done` has been turned into frames or skipped.
        let mut done = self.start.unwrap_or(self.scanned);
        let mut i = self.scanned;
        while i < self.buf.len() {
            let b = self.buf[i];
            i += 1;
            if self.resync {
                if b == b'\n' {
                    self.resync = false;
                    done = i;
                }
                continue;
            }
            let Some(start) = self.start else {
                if b.is_ascii_whitespace() {
                    done = i;
                    continue;
                }
                self.start = Some(i - 1);
                match b {
                    b'{' | b'[' => self.depth = 1,
                    b'"' => self.in_string = true,
                    _ => self.scalar = true,
                }
                if self.scalar && is_delimiter(b) {
                    // A stray '}' or ',': a value of its own, and an error.
                    self.scalar = false;
                    out.push(self.frame(i - 1, i));
                    done = i;
                }
                continue;
            };
            if self.scalar {
                if is_delimiter(b) || b.is_ascii_whitespace() || b == b'"' {
                    self.scalar = false;
                    i -= 1; // the delimiter starts what follows
                    out.push(self.frame(start, i));
                    done = i;
                }
                continue;
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        out.push(self.frame(start, i));
                        done = i;
                    }
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > MAX_NESTING {
                        out.push(Frame::Error(QmpError::generic(format!(
                            "JSON parse error, nesting deeper than {MAX_NESTING}"
                        ))));
                        self.reset();
                        self.resync = true;
                        done = i;
                    }
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        out.push(self.frame(start, i));
                        done = i;
                    }
                }
                _ => {}
            }
        }
        self.buf.drain(..done);
        self.scanned = i - done;
        self.start = self.start.map(|s| s - done);
        if self.buf.len() > MAX_MESSAGE {
            self.buf.clear();
            self.reset();
            self.scanned = 0;
            return Err(QmpError::generic(format!(
                "QMP message larger than {MAX_MESSAGE} bytes"
            )));
        }
        Ok(out)
    }

    /// The value in `buf[start..end]`, parsed; the framer is between values after.
    fn frame(&mut self, start: usize, end: usize) -> Frame {
        self.reset();
        match serde_json::from_slice::<Value>(&self.buf[start..end]) {
            Ok(v) => Frame::Value(v),
            Err(e) => Frame::Error(QmpError::generic(format!("JSON parse error, {e}"))),
        }
    }

    fn reset(&mut self) {
        self.start = None;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.scalar = false;
    }
}

/// Characters that end a bare scalar.
fn is_delimiter(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b',' | b':')
}

/// One client connection's protocol state.
#[derive(Debug)]
pub struct Session {
    ctx: Arc<MonitorContext>,
    negotiated: bool,
    /// Descriptors received with the latest message (SCM_RIGHTS).
    pub received_fds: Vec<OwnedFd>,
    /// Sent to the VM once the current reply is on its way (`quit`).
    after_reply: Option<Request>,
}

impl Session {
    pub fn new(ctx: Arc<MonitorContext>) -> Self {
        Session {
            ctx,
            negotiated: false,
            received_fds: Vec::new(),
            after_reply: None,
        }
    }

    /// Has the client completed `qmp_capabilities` (and so receives events)?
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handle one input value; returns the reply.
    pub fn handle(&mut self, input: Value) -> Value {
        let id = input.get("id").cloned();
        let reply = match self.dispatch(input) {
            Ok(v) => json!({ "return": v }),
            Err(e) => json!({ "error": e.to_json() }),
        };
        match (reply, id) {
            (Value::Object(mut m), Some(id)) => {
                m.insert("id".into(), id);
                Value::Object(m)
            }
            (r, _) => r,
        }
    }

    fn dispatch(&mut self, input: Value) -> Result<Value, QmpError> {
        let Value::Object(mut obj) = input else {
            return Err(QmpError::generic("QMP input must be a JSON object"));
        };
        let (name, oob) = match (obj.remove("execute"), obj.remove("exec-oob")) {
            (Some(Value::String(s)), None) => (s, false),
            (None, Some(Value::String(s))) => (s, true),
            (Some(_), None) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            (None, Some(_)) => {
                return Err(QmpError::generic(
                    "QMP input member 'exec-oob' must be a string",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "QMP input must not contain both 'execute' and 'exec-oob'",
                ))
            }
            (None, None) => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        let args = match obj.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        obj.remove("id");
        if let Some(k) = obj.keys().next() {
            return Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
        if oob {
            return Err(QmpError::generic(
                "Please enable out-of-band first for the session during capabilities negotiation",
            ));
        }
        if !self.negotiated {
            if name != "qmp_capabilities" {
                return Err(QmpError::not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
        } else if name == "qmp_capabilities" {
            return Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let spec = COMMANDS
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| QmpError::not_found(format!("The command {name} has not been found")))?;
        check_args(spec, &args)?;
        (spec.run)(self, &args)
    }

    /// The descriptor the client passed with its message (SCM_RIGHTS).
    fn received_fd(&mut self) -> Result<OwnedFd, QmpError> {
        self.received_fds
            .pop()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))
    }

    fn fds(&self) -> std::sync::MutexGuard<'_, FdStore> {
        lock(&self.ctx.fds)
    }

    /// The reply to the last command has been queued for the client.
    pub fn replied(&mut self) {
        if let Some(r) = self.after_reply.take() {
            self.ctx.vm.send(r);
        }
    }

    /// Ask the VM on behalf of HMP.
    pub(crate) fn ask(&self, r: Request) -> Result<moat_api::Reply, QmpError> {
        Ok(self.ctx.vm.call(r)?)
    }

    /// Run a QMP command by name on behalf of HMP (same layer, same checks).
    pub(crate) fn call(&mut self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        let spec = COMMANDS
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| QmpError::not_found(format!("The command {name} has not been found")))?;
        check_args(spec, &args)?;
        (spec.run)(self, &args)
    }
}

/// `block_set_io_throttle`'s arguments as limits, checked as QEMU checks them.
fn throttle_args(args: &Map<String, Value>) -> Result<moat_config::ThrottleLimits, QmpError> {
    // Absent optional arguments keep the defaults (no limit, 1 s bursts).
    let mut t = moat_config::ThrottleLimits::default();
    for (_, name, field) in t.fields_mut() {
        if let Some(v) = args.get(name).and_then(Value::as_i64) {
            *field = u64::try_from(v).map_err(|_| {
                QmpError::generic(format!(
                    "bps/iops/max values must be within [0, {}]",
                    moat_config::THROTTLE_VALUE_MAX
                ))
            })?;
        }
    }
    t.validate().map_err(QmpError::generic)?;
    Ok(t)
}

/// QEMU's rule for node names (id_wellformed, shorter than 32 bytes).
fn check_node_name(n: &str) -> Result<(), QmpError> {
    let mut b = n.bytes();
    let wellformed = b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'));
    if !wellformed {
        return Err(QmpError::generic(format!("Invalid node-name: '{n}'")));
    }
    if n.len() >= 32 {
        return Err(QmpError::generic("Node name too long"));
    }
    Ok(())
}

/// `blockdev-add`'s arguments as a drive moat can open (the schema check
/// has run): a raw or qcow2 node over a file node, or a file node alone.
pub fn blockdev_args(
    args: &Map<String, Value>,
) -> Result<(String, moat_config::DriveConfig), QmpError> {
    use moat_config::CacheMode;
    let node = args
        .get("node-name")
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::generic("'node-name' must be specified for the root node"))?;
    check_node_name(node)?;
    let layer = moat_block::node::layer("", args, 0).map_err(QmpError::generic)?;
    let cache = match args.get("cache") {
        None => CacheMode::Writeback,
        Some(v) => {
            let c = match v {
                Value::Object(c) => c,
                _ => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'cache', expected: object",
                    ))
                }
            };
            if let Some(k) = c
                .keys()
                .find(|k| !["direct", "no-flush"].contains(&k.as_str()))
            {
                return Err(QmpError::generic(format!(
                    "Parameter 'cache.{k}' is unexpected"
                )));
            }
            let flag = |k: &str| -> Result<bool, QmpError> {
                match c.get(k) {
                    None => Ok(false),
                    Some(Value::Bool(b)) => Ok(*b),
                    Some(_) => Err(QmpError::generic(format!(
                        "Invalid parameter type for 'cache.{k}', expected: boolean"
                    ))),
                }
            };
            match (flag("direct")?, flag("no-flush")?) {
                (false, false) => CacheMode::Writeback,
                (false, true) => CacheMode::Unsafe,
                (true, _) => CacheMode::None,
            }
        }
    };
    let discard_unmap = match args.get("discard").and_then(Value::as_str) {
        None | Some("ignore" | "off") => false,
        Some("unmap" | "on") => true,
        Some(d) => {
            return Err(QmpError::generic(format!(
                "Parameter 'discard' does not accept value '{d}'"
            )))
        }
    };
    let drive = moat_config::DriveConfig {
        id: None,
        qdev: None,
        index: 0,
        file: layer.file,
        format: layer.format,
        backing: layer.backing,
        data_file: layer.data_file,
        throttle: Default::default(),
        read_only: args
            .get("read-only")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        cache,
        discard_unmap,
        serial: None,
        werror: moat_config::WERROR_DEFAULT,
        rerror: moat_config::RERROR_DEFAULT,
        num_queues: 1,
    };
    Ok((node.to_string(), drive))
}

fn check_args(spec: &CommandSpec, args: &Map<String, Value>) -> Result<(), QmpError> {
    for (k, v) in args {
        let Some((_, t, _)) = spec.args.iter().find(|(n, _, _)| n == k) else {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        };
        if !t.matches(v) {
            return Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: {}",
                t.json_name()
            )));
        }
    }
    for (n, _, required) in spec.args {
        if *required && !args.contains_key(*n) {
            return Err(QmpError::generic(format!("Parameter '{n}' is missing")));
        }
    }
    Ok(())
}

/// A `query-qmp-schema` answer describing every command and event moat has.
fn schema() -> Value {
    let mut out = vec![
        json!({"name": "str", "meta-type": "builtin", "json-type": "string"}),
        json!({"name": "int", "meta-type": "builtin", "json-type": "int"}),
        json!({"name": "bool", "meta-type": "builtin", "json-type": "boolean"}),
        json!({"name": "any", "meta-type": "builtin", "json-type": "value"}),
        json!({"name": "[str]", "meta-type": "array", "element-type": "str"}),
        json!({"name": "0", "meta-type": "object", "members": []}),
    ];
    for c in COMMANDS {
        let arg_type = if c.args.is_empty() {
            "0".to_string()
        } else {
            let members: Vec<Value> = c
                .args
                .iter()
                .map(|(n, t, req)| {
                    let mut m = json!({"name": n, "type": t.name()});
                    if !req {
                        m["default"] = Value::Null;
                    }
                    m
                })
                .collect();
            let tn = format!("q_obj_{}-arg", c.name);
            out.push(json!({"name": tn, "meta-type": "object", "members": members}));
            tn
        };
        out.push(json!({"name": c.name, "meta-type": "command", "arg-type": arg_type, "ret-type": "any"}));
    }
    for e in EVENTS {
        out.push(json!({"name": e, "meta-type": "event", "arg-type": "0"}));
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM that answers every request with its own description.
    fn fake_vm() -> moat_api::Client {
        moat_api::Client::new(|call| {
            let _ = call
                .reply
                .send(Ok(moat_api::Reply::Text(format!("{:?}", call.request))));
            true
        })
    }

    fn session() -> Session {
        Session::new(Arc::new(MonitorContext {
            info: VmInfo {
                name: Some("vm1".into()),
                uuid: None,
            },
            vm: fake_vm(),
            fds: Arc::default(),
        }))
    }

    fn err_class(v: &Value) -> &str {
        v["error"]["class"].as_str().unwrap()
    }

    #[test]
    fn negotiation() {
        let mut s = session();
        let r = s.handle(json!({"execute": "query-status"}));
        assert_eq!(err_class(&r), "CommandNotFound");
        let r = s.handle(json!({"execute": "qmp_capabilities", "id": [1, "x"]}));
        assert_eq!(r, json!({"return": {}, "id": [1, "x"]}));
        let r = s.handle(json!({"execute": "qmp_capabilities"}));
        assert_eq!(err_class(&r), "CommandNotFound");
        let r = s.handle(json!({"execute": "query-name"}));
        assert_eq!(r, json!({"return": {"name": "vm1"}}));
    }

    #[test]
    fn malformed_requests() {
        let mut s = session();
        s.handle(json!({"execute": "qmp_capabilities"}));
        for (input, want) in [
            (json!([1]), "must be a JSON object"),
            (json!({"arguments": {}}), "lacks member 'execute'"),
            (json!({"execute": 1}), "must be a string"),
            (
                json!({"execute": "stop", "bogus": 1}),
                "'bogus' is unexpected",
            ),
            (
                json!({"execute": "stop", "arguments": []}),
                "'arguments' must be an object",
            ),
            (
                json!({"execute": "stop", "arguments": {"x": 1}}),
                "Parameter 'x' is unexpected",
            ),
            (
                json!({"execute": "getfd", "arguments": {}}),
                "Parameter 'fdname' is missing",
            ),
            (
                json!({"execute": "getfd", "arguments": {"fdname": 3}}),
                "expected: string",
            ),
            (
                json!({"execute": "getfd", "arguments": {"fdname": "a"}}),
                "No file descriptor supplied",
            ),
            (
                json!({"execute": "migrate", "arguments": {"uri": "exec:cat"}}),
                "never spawn",
            ),
        ] {
            let r = s.handle(input.clone());
            assert_eq!(err_class(&r), "GenericError", "{input}: {r}");
            assert!(
                r["error"]["desc"].as_str().unwrap().contains(want),
                "{input}: {r}"
            );
        }
        let r = s.handle(json!({"execute": "no-such"}));
        assert_eq!(err_class(&r), "CommandNotFound");
    }

    #[test]
    fn framer_handles_partial_garbage_and_limits() {
        let mut f = Framer::default();
        assert!(f.push(b"{\"execute\": ").unwrap().is_empty());
        let v = f.push(b"\"stop\"}{\"a\":1}\n  ").unwrap();
        assert_eq!(v.len(), 2);
        let v = f.push(b"{bad json}\n{\"ok\":true}").unwrap();
        assert!(matches!(v[0], Frame::Error(_)));
        assert!(matches!(&v[1], Frame::Value(x) if x["ok"] == true));
        // Deep nesting is a parse error, never a stack overflow or a value.
        let mut f = Framer::default();
        let r = f.push(&vec![b'['; 100_000]);
        assert!(r.is_err() || r.unwrap().iter().all(|x| matches!(x, Frame::Error(_))));
        let mut f = Framer::default();
        let big = format!("{{\"x\": \"{}", "a".repeat(MAX_MESSAGE));
        assert!(f.push(big.as_bytes()).is_err());
        // Strings with braces and escaped quotes, bare scalars, a stray brace.
        let mut f = Framer::default();
        let v = f.push(b"{\"a\": \"}{\\\"\"} 12 \"s\" } [1]").unwrap();
        assert!(matches!(&v[0], Frame::Value(x) if x["a"] == "}{\""));
        assert!(matches!(&v[1], Frame::Value(x) if x == 12));
        assert!(matches!(&v[2], Frame::Value(x) if x == "s"));
        assert!(matches!(v[3], Frame::Error(_)));
        assert!(matches!(&v[4], Frame::Value(x) if x[0] == 1));
        // Too deep: an error, then the next line parses.
        let mut f = Framer::default();
        let mut deep = vec![b'['; 2000];
        deep.extend_from_slice(b"\n{\"ok\":1}");
        let v = f.push(&deep).unwrap();
        assert!(matches!(v[0], Frame::Error(_)));
        assert!(matches!(&v[1], Frame::Value(x) if x["ok"] == 1));
    }

    /// A message at the size limit, sent a byte at a time: every byte is
    /// scanned once (it was re-parsed from the start on every byte).
    #[test]
    fn a_large_message_in_one_byte_chunks_is_framed_in_linear_time() {
        let mut f = Framer::default();
        let msg = format!(
            "{{\"execute\": \"x\", \"arguments\": {{\"s\": \"{}\"}}}}",
            "a".repeat(MAX_MESSAGE - 100)
        );
        let mut frames = Vec::new();
        let t = std::time::Instant::now();
        for b in msg.as_bytes() {
            frames.extend(f.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(frames.len(), 1);
        assert!(matches!(&frames[0], Frame::Value(x) if x["execute"] == "x"));
        // A hang guard, not a speed test: quadratic framing took hours.
        assert!(t.elapsed() < std::time::Duration::from_secs(60));
    }
}
