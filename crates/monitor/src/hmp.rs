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
cont|c  -- resume emulation
help|? [cmd] -- show the help
info [subcommand] -- show various information about the system state
quit|q  -- quit the emulator
set_link name on|off -- change the link status of a network adapter
stop|s  -- stop emulation
system_powerdown  -- send system power down event
system_reset  -- reset the system
";

const INFO_HELP: &str = "\
info cpus  -- show infos for each CPU
info kvm  -- show KVM information
info name  -- show the current VM name
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

fn run(session: &mut Session, line: &str, cpu: Option<u32>) -> String {
    let mut words = line.split_whitespace();
    let Some(cmd) = words.next() else {
        return String::new();
    };
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
        "info" => info(session, words.next(), words.next(), cpu),
        other => format!("unknown command: '{other}'\n"),
    }
}

fn info(session: &mut Session, what: Option<&str>, arg: Option<&str>, cpu: Option<u32>) -> String {
    let r = |session: &mut Session, name: &str| call(session, name);
    match what {
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
        Some("registers") => {
            let which = match arg {
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
