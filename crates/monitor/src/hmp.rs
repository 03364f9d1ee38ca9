//! HMP, the human monitor: a line-oriented front end over the QMP command
//! layer, with QEMU's command names and output formats.

use crate::qmp::Session;
use crate::QEMU_VERSION;
use serde_json::{Map, Value};

/// The banner printed when an HMP client connects.
pub fn banner() -> String {
    let (a, b, c) = QEMU_VERSION;
    format!("QEMU {a}.{b}.{c} monitor - type 'help' for more information\r\n")
}

pub const PROMPT: &str = "(qemu) ";

const HELP: &str = "\
block_set_io_throttle device bps bps_rd bps_wr iops iops_rd iops_wr -- change I/O throttle limits for a block drive
cont|c  -- resume emulation
eject [-f] device -- eject a removable medium (use -f to force it)
help|? [cmd] -- show the help
info [subcommand] -- show various information about the system state
quit|q  -- quit the emulator
set_link name on|off -- change the link status of a network adapter
stop|s  -- stop emulation
system_powerdown  -- send system power down event
system_reset  -- reset the system
";

const INFO_HELP: &str = "\
info block [-n] [-v] [device] -- show info of one block device or all block devices (-n: show named nodes; -v: show details)
info blockstats  -- show block device statistics
info cpus  -- show infos for each CPU
info kvm  -- show KVM information
info name  -- show the current VM name
info network  -- show the network state
info registers [-a|vcpu] -- show the cpu registers (-a: all - show register info for all cpus; vcpu: specific vCPU to query)
info status  -- show the current VM status (running|paused)
info uuid  -- show the current VM UUID
info version  -- show the version of QEMU
";

fn crlf(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// Run one HMP command line; returns its output (lines end in "\r\n").
pub fn execute(session: &mut Session, line: &str, cpu: Option<u32>) -> String {
    crlf(&run(session, line.trim(), cpu))
}

fn call(session: &mut Session, name: &str) -> Result<Value, String> {
    session
        .call(name, Map::new())
        .map_err(|e| format!("Error: {}\n", e.desc))
}

/// A command's arguments, taken as QEMU's monitor takes them, with its
/// messages (each followed by where to find the command's help).
struct Args<'a> {
    /// The command's name, and what to ask `help` for.
    name: &'a str,
    help: String,
    words: std::iter::Peekable<std::str::SplitWhitespace<'a>>,
}

impl<'a> Args<'a> {
    fn new(name: &'a str, help: String, words: std::str::SplitWhitespace<'a>) -> Self {
        Args {
            name,
            help,
            words: words.peekable(),
        }
    }

    fn fail(&self, why: &str) -> String {
        format!("{why}\nTry \"help {}\" for more information\n", self.help)
    }

    /// Leading `-x` options, each one of `flags` (in order, as QEMU's
    /// parser takes them); which were given.
    fn flags<const N: usize>(&mut self, flags: [char; N]) -> Result<[bool; N], String> {
        let mut given = [false; N];
        for (i, f) in flags.iter().enumerate() {
            let Some(w) = self.words.peek().and_then(|w| w.strip_prefix('-')) else {
                break;
            };
            let c = w.chars().next().unwrap_or(' ');
            if c == *f {
                given[i] = true;
                self.words.next();
            } else if !flags[i..].contains(&c) {
                return Err(self.fail(&format!("{}: unsupported option -{c}", self.name)));
            }
        }
        Ok(given)
    }

    /// A word QEMU calls `what` ("block device name", "string").
    fn word(&mut self, what: &str) -> Result<&'a str, String> {
        self.words
            .next()
            .ok_or_else(|| self.fail(&format!("{}: {what} expected", self.name)))
    }

    /// An integer (QEMU takes an expression; moat a number as C writes
    /// one, decimal, 0x hex or 0 octal, with an optional minus).
    fn int(&mut self) -> Result<i64, String> {
        let w = self
            .words
            .next()
            .ok_or_else(|| self.fail("unexpected end of expression"))?;
        let (neg, body) = match w.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, w),
        };
        let (radix, digits) = match body.strip_prefix("0x").or(body.strip_prefix("0X")) {
            Some(h) if h.starts_with(|c: char| c.is_ascii_hexdigit()) => (16, h),
            _ if body.len() > 1 && body.starts_with('0') => (8, &body[1..]),
            _ => (10, body),
        };
        let end = digits
            .find(|c: char| !c.is_digit(radix))
            .unwrap_or(digits.len());
        if end == 0 || end < digits.len() {
            let bad = digits[end..].chars().next().unwrap_or(' ');
            return Err(self.fail(&format!("invalid char '{bad}' in expression")));
        }
        // (QEMU's arithmetic wraps; moat's numbers stay within i64.)
        let n = u64::from_str_radix(digits, radix).unwrap_or(u64::MAX) as i64;
        Ok(if neg { n.wrapping_neg() } else { n })
    }

    fn end(&mut self) -> Result<(), String> {
        match self.words.next() {
            None => Ok(()),
            Some(_) => Err(self.fail(&format!(
                "{}: extraneous characters at the end of line",
                self.name
            ))),
        }
    }
}

/// A QMP command's outcome as HMP prints it: nothing, or the error.
fn done(session: &mut Session, name: &str, args: Map<String, Value>) -> String {
    session
        .call(name, args)
        .err()
        .map(|e| format!("Error: {}\n", e.desc))
        .unwrap_or_default()
}

fn eject(session: &mut Session, mut a: Args) -> Result<String, String> {
    let [force] = a.flags(['f'])?;
    let device = a.word("block device name")?;
    a.end()?;
    let mut args = Map::new();
    args.insert("device".into(), device.into());
    args.insert("force".into(), force.into());
    Ok(done(session, "eject", args))
}

fn block_set_io_throttle(session: &mut Session, mut a: Args) -> Result<String, String> {
    let device = a.word("block device name")?;
    let mut args = Map::new();
    args.insert("device".into(), device.into());
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        args.insert(k.into(), a.int()?.into());
    }
    a.end()?;
    Ok(done(session, "block_set_io_throttle", args))
}

fn run(session: &mut Session, line: &str, cpu: Option<u32>) -> String {
    let mut words = line.split_whitespace();
    let Some(cmd) = words.next() else {
        return String::new();
    };
    let args = |words| Args::new(cmd, cmd.to_string(), words);
    let ok = |r: Result<Value, String>| r.err().unwrap_or_default();
    match cmd {
        "help" | "?" | "h" => match words.next() {
            Some("info") => INFO_HELP.into(),
            Some(c) => HELP
                .lines()
                .filter(|l| l.split(['|', ' ']).next() == Some(c))
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            None => HELP.into(),
        },
        "stop" | "s" => ok(call(session, "stop")),
        "cont" | "c" => ok(call(session, "cont")),
        "system_reset" => ok(call(session, "system_reset")),
        "system_powerdown" => ok(call(session, "system_powerdown")),
        "quit" | "q" => ok(call(session, "quit")),
        "set_link" => {
            let (Some(name), Some(state)) = (words.next(), words.next()) else {
                return "Parameter 'name' is missing\n".into();
            };
            let up = match state {
                "on" => true,
                "off" => false,
                _ => return "Parameter 'up' expects 'on' or 'off'\n".into(),
            };
            let mut args = Map::new();
            args.insert("name".into(), Value::String(name.into()));
            args.insert("up".into(), Value::Bool(up));
            session
                .call("set_link", args)
                .err()
                .map(|e| format!("Error: {}\n", e.desc))
                .unwrap_or_default()
        }
        "eject" => eject(session, args(words)).unwrap_or_else(|e| e),
        "block_set_io_throttle" => {
            block_set_io_throttle(session, args(words)).unwrap_or_else(|e| e)
        }
        "info" => info(session, words, cpu),
        other => format!("unknown command: '{other}'\n"),
    }
}

fn info(session: &mut Session, mut words: std::str::SplitWhitespace, cpu: Option<u32>) -> String {
    let r = |session: &mut Session, name: &str| call(session, name);
    let what = words.next();
    let sub = |name| Args::new(name, format!("info {name}"), words.clone());
    match what {
        Some("block") => info_block(session, sub("block")).unwrap_or_else(|e| e),
        Some("blockstats") => {
            let mut a = sub("blockstats");
            if let Err(e) = a.end() {
                return e;
            }
            match r(session, "query-blockstats") {
                Ok(Value::Array(s)) => crate::hmp_block::info_blockstats(&s),
                Ok(_) => String::new(),
                Err(e) => e,
            }
        }
        None => INFO_HELP.into(),
        Some("status") => match r(session, "query-status") {
            Ok(v) => {
                let status = v["status"].as_str().unwrap_or("unknown");
                match status {
                    "running" => "VM status: running\n".into(),
                    "paused" => "VM status: paused\n".into(),
                    other => format!("VM status: paused ({other})\n"),
                }
            }
            Err(e) => e,
        },
        Some("version") => match r(session, "query-version") {
            // QEMU prints the package right after the version.
            Ok(v) => format!(
                "{}.{}.{}{}\n",
                v["qemu"]["major"],
                v["qemu"]["minor"],
                v["qemu"]["micro"],
                v["package"].as_str().unwrap_or_default()
            ),
            Err(e) => e,
        },
        Some("name") => match r(session, "query-name") {
            Ok(v) => v["name"]
                .as_str()
                .map(|n| format!("{n}\n"))
                .unwrap_or_default(),
            Err(e) => e,
        },
        Some("uuid") => match r(session, "query-uuid") {
            Ok(v) => format!("{}\n", v["UUID"].as_str().unwrap_or_default()),
            Err(e) => e,
        },
        Some("kvm") => match r(session, "query-kvm") {
            Ok(v) => format!(
                "kvm support: {}\n",
                if v["enabled"] == true {
                    "enabled"
                } else {
                    "disabled"
                }
            ),
            Err(e) => e,
        },
        Some("cpus") => match r(session, "query-cpus-fast") {
            Ok(Value::Array(cpus)) => {
                let current = cpu.unwrap_or(0);
                cpus.iter()
                    .map(|c| {
                        let idx = c["cpu-index"].as_u64().unwrap_or(0);
                        format!(
                            "{}CPU #{idx}: thread_id={}\n",
                            if idx == u64::from(current) {
                                "* "
                            } else {
                                "  "
                            },
                            c["thread-id"]
                        )
                    })
                    .collect()
            }
            Ok(_) => String::new(),
            Err(e) => e,
        },
        Some("network") => {
            if let Err(e) = sub("network").end() {
                return e;
            }
            match session.ask(moat_api::Request::QueryNetwork) {
                Ok(moat_api::Reply::Network(n)) => info_network(&n),
                Ok(_) => String::new(),
                Err(e) => format!("Error: {}\n", e.desc),
            }
        }
        Some("registers") => {
            let which = match words.next() {
                Some("-a") => None,
                Some(n) => match n.parse::<u32>() {
                    Ok(n) => Some(n),
                    Err(_) => return format!("invalid vcpu '{n}'\n"),
                },
                None => Some(cpu.unwrap_or(0)),
            };
            match session.ask(moat_api::Request::Registers(which)) {
                Ok(moat_api::Reply::Text(s)) => s,
                Ok(_) => String::new(),
                Err(e) => format!("Error: {}\n", e.desc),
            }
        }
        Some(other) => format!("info: unknown subcommand '{other}'\n"),
    }
}

/// QEMU's `info network`: each NIC queue, and below it its netdev's.
/// (QEMU shows a netdev no device uses first; moat opens none.)
fn info_network(nics: &[moat_api::NetInfo]) -> String {
    let mut out = String::new();
    for n in nics {
        for (q, (name, peer)) in n.queues.iter().enumerate() {
            let nic = match q {
                0 => format!(
                    "model=virtio-net-device,macaddr={}",
                    crate::encode::mac(&n.mac)
                ),
                _ => String::new(),
            };
            out += &format!("{name}: index={q},type=nic,{nic}\n");
            out += &format!(" \\ {}: index={q},type={},{peer}\n", n.netdev, n.kind);
        }
    }
    out
}

fn info_block(session: &mut Session, mut a: Args) -> Result<String, String> {
    let [nodes, verbose] = a.flags(['n', 'v'])?;
    let device = a.words.next();
    a.end()?;
    let blocks = match nodes {
        true => Vec::new(),
        false => match call(session, "query-block")? {
            Value::Array(b) => b,
            _ => Vec::new(),
        },
    };
    let named = || match call(session, "query-named-block-nodes") {
        Ok(Value::Array(n)) => n,
        _ => Vec::new(),
    };
    Ok(crate::hmp_block::info_block(
        &blocks, named, device, verbose, nodes,
    ))
}

/// QEMU's readline as seen from the wire: every keystroke is echoed by
/// redrawing the line (cursor back, the whole line, clear to end of line),
/// Enter (CR or LF) echoes CRLF and yields the line, backspace edits, and
/// escape sequences (arrow keys) are consumed.
#[derive(Debug, Default)]
pub struct LineEditor {
    line: Vec<u8>,
    /// Bytes of the escape sequence being skipped (0: none).
    escape: u8,
}

/// Longest HMP command line.
pub const MAX_LINE: usize = 4096;

impl LineEditor {
    fn redraw(&self, shown: usize, out: &mut Vec<u8>) {
        for _ in 0..shown {
            out.extend_from_slice(b"\x1b[D");
        }
        out.extend_from_slice(&self.line);
        out.extend_from_slice(b"\x1b[K");
    }

    /// Feed one byte; echo goes to `out`; a completed line is returned.
    pub fn feed(&mut self, b: u8, out: &mut Vec<u8>) -> Option<String> {
        match (self.escape, b) {
            (0, 0x1b) => self.escape = 1,
            (1, b'[') | (1, b'O') => self.escape = 2,
            (1, _) => self.escape = 0,
            (2, 0x40..=0x7e) => self.escape = 0,
            (2, _) => {}
            (_, b'\r') | (_, b'\n') => {
                out.extend_from_slice(b"\r\n");
                let line = String::from_utf8_lossy(&self.line).into_owned();
                self.line.clear();
                return Some(line);
            }
            (_, 0x7f) | (_, 0x08) if !self.line.is_empty() => {
                let shown = self.line.len();
                self.line.pop();
                self.redraw(shown, out);
            }
            (_, 0x7f) | (_, 0x08) => {} // nothing to erase
            (_, c) if c >= 0x20 && self.line.len() < MAX_LINE => {
                let shown = self.line.len();
                self.line.push(c);
                self.redraw(shown, out);
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_matches_qemu_readline() {
        let mut e = LineEditor::default();
        let mut out = Vec::new();
        let mut done = None;
        for &b in b"stop\n" {
            done = done.or(e.feed(b, &mut out));
        }
        assert_eq!(done.as_deref(), Some("stop"));
        // Byte for byte what QEMU 7.2 sends back for "stop\n".
        assert_eq!(
            out,
            b"s\x1b[K\x1b[Dst\x1b[K\x1b[D\x1b[Dsto\x1b[K\x1b[D\x1b[D\x1b[Dstop\x1b[K\r\n".to_vec()
        );
        let mut out = Vec::new();
        for &b in b"\x7fab\x7fc\x1b[Ad\r" {
            if let Some(l) = e.feed(b, &mut out) {
                assert_eq!(l, "acd");
            }
        }
    }
}
