//! moat's end of the guest's vsock connections: each one a UNIX socket on
//! the host, with virtio-vsock's credit flow control in both directions.
//!
//! Host-initiated: a program connects to the device's listening socket
//! (`uds-path`, `SOCK_STREAM`; `uds-path.seqpacket`, `SOCK_SEQPACKET`) and
//! sends `CONNECT <port>\n`; moat asks the guest (REQUEST from a local port
//! it picks) and, once the guest accepts, answers `OK <local port>\n` and
//! relays. Guest-initiated: a REQUEST to port P connects to
//! `<uds-path>_<P>` with the packet's socket type, and is answered RST when
//! nothing listens there. On SEQPACKET the guest's message boundaries (EOM)
//! map to the host socket's messages and back.
//!
//! What a guest can make moat hold is bounded: [`MAX_CONNS`] connections,
//! each buffering at most the [`BUF_ALLOC`] it advertised (a guest sending
//! past its credit is reset), and at most [`CONTROL_MAX`] replies waiting
//! for receive buffers (past that the transmit queue waits for the guest).

use super::packet::*;
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// The receive buffer moat advertises on each connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Connections at once; past it the guest's REQUESTs are answered RST
/// and host connections are closed.
pub const MAX_CONNS: usize = 256;
/// Host connections accepted but still before their `CONNECT` line.
pub const MAX_PENDING: usize = 32;
/// Replies waiting for the guest's receive buffers before the transmit
/// queue stops being served.
pub const CONTROL_MAX: usize = 256;
/// How long a host connection may take to send `CONNECT`, and the guest
/// to answer the REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest SEQPACKET message relayed either way.
pub const MAX_SEQ_MSG: usize = BUF_ALLOC as usize;
/// moat's local ports for host-initiated connections start here.
const LOCAL_PORT_FIRST: u32 = 1 << 30;
/// The longest `CONNECT <port>\n` line.
const CONNECT_LINE_MAX: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stream,
    Seqpacket,
}

impl Kind {
    fn type_(self) -> u16 {
        match self {
            Kind::Stream => TYPE_STREAM,
            Kind::Seqpacket => TYPE_SEQPACKET,
        }
    }
    fn socket_type(self) -> SocketType {
        match self {
            Kind::Stream => SocketType::STREAM,
            Kind::Seqpacket => SocketType::SEQPACKET,
        }
    }
}

/// A host socket accepted on a listener, before its `CONNECT` line.
struct Pending {
    sock: OwnedFd,
    kind: Kind,
    deadline: Instant,
}

enum State {
    /// Host-initiated: the REQUEST went to the guest, no answer yet.
    Connecting {
        deadline: Instant,
    },
    Established,
}

struct Conn {
    sock: OwnedFd,
    kind: Kind,
    state: State,
    /// The guest's receive window: its buffer and what it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Guest bytes taken in, and those of them written to the host socket.
    rx_cnt: u32,
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard.
    told_fwd_cnt: u32,
    /// The guest asked for (or is owed) a CREDIT_UPDATE.
    credit_update: bool,
    /// Guest bytes not yet written to the host socket: for SEQPACKET,
    /// whole messages (lengths in `msgs`) then the one being assembled.
    to_host: VecDeque<u8>,
    msgs: VecDeque<usize>,
    partial: usize,
    /// SEQPACKET: a host message being sent to the guest, and how far.
    from_host: Vec<u8>,
    from_host_sent: usize,
    /// The host socket may have bytes (or EOF) to read.
    readable: bool,
    /// Read EOF from the host socket (SHUTDOWN SEND went to the guest).
    host_eof: bool,
    /// The host socket's write side is shut (after the guest's SEND shutdown).
    host_wr_shut: bool,
    guest_shut_rcv: bool,
    guest_shut_send: bool,
}

impl Conn {
    fn new(sock: OwnedFd, kind: Kind, state: State, h: Option<&Header>) -> Conn {
        Conn {
            sock,
            kind,
            state,
            peer_buf_alloc: h.map_or(0, Header::buf_alloc),
            peer_fwd_cnt: h.map_or(0, Header::fwd_cnt),
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            told_fwd_cnt: 0,
            credit_update: false,
            to_host: VecDeque::new(),
            msgs: VecDeque::new(),
            partial: 0,
            from_host: Vec::new(),
            from_host_sent: 0,
            readable: true,
            host_eof: false,
            host_wr_shut: false,
            guest_shut_rcv: false,
            guest_shut_send: false,
        }
    }

    fn established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// Bytes the guest can take now. (A guest whose `fwd_cnt` runs ahead
    /// of what it was sent only stalls its own connection.)
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn seq_pending(&self) -> bool {
        self.from_host_sent < self.from_host.len()
    }

    /// Something for the guest's receive queue.
    fn has_rx(&self) -> bool {
        self.established()
            && (self.credit_update
                || (!self.guest_shut_rcv
                    && self.peer_credit() > 0
                    && (self.seq_pending() || (self.readable && !self.host_eof))))
    }

    /// Worth polling the host socket for input.
    fn wants_read(&self) -> bool {
        self.established()
            && !self.readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && !self.seq_pending()
            && self.peer_credit() > 0
    }

    fn wants_write(&self) -> bool {
        !self.msgs.is_empty() || (self.kind == Kind::Stream && !self.to_host.is_empty())
    }

    /// The guest shut both ways and everything it sent is delivered: time
    /// for the RST that completes its close.
    fn finished(&self) -> bool {
        self.guest_shut_rcv && self.guest_shut_send && self.to_host.is_empty()
    }

    /// Take a RW packet's data (Err: the guest broke the protocol).
    fn take(&mut self, h: &Header, data: &[u8]) -> Result<(), ()> {
        let buffered = self.rx_cnt.wrapping_sub(self.fwd_cnt) as usize;
        if !self.established() || self.guest_shut_send || buffered + data.len() > BUF_ALLOC as usize
        {
            return Err(());
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        match self.kind {
            Kind::Stream => {
                let mut rest = data;
                if self.to_host.is_empty() {
                    let n = send_now(self.sock.as_fd(), rest)?;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    rest = &rest[n..];
                }
                self.to_host.extend(rest);
            }
            Kind::Seqpacket => {
                self.to_host.extend(data);
                self.partial += data.len();
                if h.flags() & SEQ_EOM != 0 {
                    self.msgs.push_back(self.partial);
                    self.partial = 0;
                }
            }
        }
        self.flush()
    }

    /// Write what the host socket takes now (Err: it is gone).
    fn flush(&mut self) -> Result<(), ()> {
        loop {
            let n = match self.kind {
                Kind::Stream => {
                    let (a, _) = self.to_host.as_slices();
                    if a.is_empty() {
                        break;
                    }
                    send_now(self.sock.as_fd(), a)?
                }
                Kind::Seqpacket => {
                    let Some(&len) = self.msgs.front() else { break };
                    let buf = self.to_host.make_contiguous();
                    if send_now(self.sock.as_fd(), &buf[..len])? == 0 && len > 0 {
                        0
                    } else {
                        self.msgs.pop_front();
                        len
                    }
                }
            };
            if n == 0 {
                break;
            }
            self.to_host.drain(..n);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        }
        if self.fwd_cnt.wrapping_sub(self.told_fwd_cnt) >= BUF_ALLOC / 4 {
            self.credit_update = true;
        }
        if self.guest_shut_send && self.to_host.is_empty() && !self.host_wr_shut {
            self.host_wr_shut = true;
            let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// Send what the socket takes now: the count (0: it is full), Err when
/// the peer is gone.
fn send_now(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, ()> {
    loop {
        match rustix::net::send(fd, buf, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => return Ok(0),
            Err(_) => return Err(()),
        }
    }
}

/// What a poll set entry stands for.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Listener(Kind),
    Pending(usize),
    Conn((u32, u32)),
}

/// One activation's connections.
pub struct Muxer {
    /// The guest's CID and the paths its connections go to.
    cfg: moat_config::VsockConfig,
    seqpacket: bool,
    /// Keyed (moat's port, the guest's port).
    conns: HashMap<(u32, u32), Conn>,
    pending: Vec<Pending>,
    /// Headers waiting for a receive buffer (RESPONSE, RST, REQUEST).
    control: VecDeque<Header>,
    next_port: u32,
    /// Where the next receive pass starts among the connections.
    turn: usize,
    /// The connections' keys for one receive pass (kept, so a pass does
    /// not allocate; at most as many as connections).
    pass: Vec<(u32, u32)>,
}

impl Muxer {
    pub fn new(cfg: &moat_config::VsockConfig, seqpacket: bool) -> Muxer {
        Muxer {
            cfg: cfg.clone(),
            seqpacket,
            conns: HashMap::new(),
            pending: Vec::new(),
            control: VecDeque::new(),
            next_port: LOCAL_PORT_FIRST,
            turn: 0,
            pass: Vec::new(),
        }
    }

    /// Room for the replies a transmitted packet may cause.
    pub fn control_room(&self) -> bool {
        self.control.len() < CONTROL_MAX
    }

    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || self.conns.values().any(Conn::has_rx)
    }

    fn header(&self, key: (u32, u32), kind: Kind, op: u16) -> Header {
        Header::default()
            .with_src_cid(moat_config::VSOCK_HOST_CID)
            .with_dst_cid(self.cfg.guest_cid)
            .with_src_port(key.0)
            .with_dst_port(key.1)
            .with_type(kind.type_())
            .with_op(op)
            .with_buf_alloc(BUF_ALLOC)
    }

    /// Drop a connection (closing its host socket) and tell the guest.
    fn reset(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.remove(&key) {
            let h = self.header(key, c.kind, OP_RST);
            self.control.push_back(h);
        }
    }

    /// A packet from the guest's transmit queue.
    pub fn from_guest(&mut self, h: &Header, data: &[u8]) {
        if h.src_cid() != self.cfg.guest_cid {
            log::debug!("virtio-vsock: dropped a packet from another CID ({h:?})");
            return;
        }
        let key = (h.dst_port(), h.src_port());
        if h.op() == OP_RST {
            if h.dst_cid() == moat_config::VSOCK_HOST_CID {
                self.conns.remove(&key);
            }
            return;
        }
        let kind = match h.type_() {
            TYPE_STREAM => Some(Kind::Stream),
            TYPE_SEQPACKET if self.seqpacket => Some(Kind::Seqpacket),
            _ => None,
        };
        let (Some(kind), true) = (kind, h.dst_cid() == moat_config::VSOCK_HOST_CID) else {
            self.control.push_back(h.reply(OP_RST));
            return;
        };
        if h.op() == OP_REQUEST {
            return self.guest_connect(h, kind);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.control.push_back(h.reply(OP_RST));
            return;
        };
        if c.kind != kind {
            return self.reset(key);
        }
        c.peer_buf_alloc = h.buf_alloc();
        c.peer_fwd_cnt = h.fwd_cnt();
        let ok = match h.op() {
            OP_RESPONSE => match c.state {
                State::Connecting { .. } => {
                    c.state = State::Established;
                    let ok = format!("OK {}\n", key.0);
                    send_now(c.sock.as_fd(), ok.as_bytes()) == Ok(ok.len())
                }
                State::Established => false,
            },
            OP_RW => c.take(h, data).is_ok(),
            OP_SHUTDOWN => {
                c.guest_shut_rcv |= h.flags() & SHUTDOWN_RCV != 0;
                c.guest_shut_send |= h.flags() & SHUTDOWN_SEND != 0;
                c.flush().is_ok() && !c.finished()
            }
            OP_CREDIT_UPDATE => true,
            OP_CREDIT_REQUEST => {
                c.credit_update = true;
                true
            }
            _ => false,
        };
        if !ok {
            self.reset(key);
        }
    }

    /// A packet whose data did not fit its chain or the size limit: its
    /// connection is reset, or the sender answered RST.
    pub fn malformed(&mut self, h: &Header) {
        if h.src_cid() != self.cfg.guest_cid {
            return;
        }
        let key = (h.dst_port(), h.src_port());
        if self.conns.contains_key(&key) {
            self.reset(key);
        } else if h.op() != OP_RST {
            self.control.push_back(h.reply(OP_RST));
        }
    }

    /// The guest connects to host port `h.dst_port()`: `<base>_<port>`.
    fn guest_connect(&mut self, h: &Header, kind: Kind) {
        let key = (h.dst_port(), h.src_port());
        if self.conns.contains_key(&key) {
            return self.reset(key);
        }
        if self.conns.len() >= MAX_CONNS {
            log::debug!("virtio-vsock: {MAX_CONNS} connections already; refusing {h:?}");
            self.control.push_back(h.reply(OP_RST));
            return;
        }
        let path = self.cfg.port_path(key.0);
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            kind.socket_type(),
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .and_then(|s| {
            let addr = SocketAddrUnix::new(&path)?;
            rustix::net::connect(&s, &addr)?;
            Ok(s)
        });
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                log::debug!("virtio-vsock: {}: {e}", path.display());
                self.control.push_back(h.reply(OP_RST));
                return;
            }
        };
        if kind == Kind::Seqpacket {
            // A whole message must fit the socket's send buffer.
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(&sock, MAX_SEQ_MSG);
        }
        self.conns
            .insert(key, Conn::new(sock, kind, State::Established, Some(h)));
        let r = self.header(key, kind, OP_RESPONSE);
        self.control.push_back(r);
    }

    /// A host connection accepted on the `kind` listener.
    pub fn accepted(&mut self, sock: OwnedFd, kind: Kind, now: Instant) {
        if self.pending.len() < MAX_PENDING {
            self.pending.push(Pending {
                sock,
                kind,
                deadline: now + CONNECT_TIMEOUT,
            });
        }
    }

    pub fn pending_full(&self) -> bool {
        self.pending.len() >= MAX_PENDING
    }

    /// A pending host connection has input: its `CONNECT <port>\n`.
    pub fn pending_ready(&mut self, i: usize, now: Instant) {
        let Some(p) = self.pending.get(i) else { return };
        let mut line = [0u8; CONNECT_LINE_MAX];
        let fd = p.sock.as_fd();
        let got = match p.kind {
            // Peek for the newline, then take exactly the line: what
            // follows it is the connection's first data.
            Kind::Stream => match rustix::net::recv(fd, &mut line[..], RecvFlags::PEEK) {
                Ok((n, _)) => match line[..n].iter().position(|&b| b == b'\n') {
                    Some(end) => rustix::net::recv(fd, &mut line[..=end], RecvFlags::empty())
                        .ok()
                        .map(|(n, _)| n),
                    None if n < CONNECT_LINE_MAX && n > 0 => return,
                    None => None,
                },
                Err(Errno::AGAIN | Errno::INTR) => return,
                Err(_) => None,
            },
            Kind::Seqpacket => match rustix::net::recv(fd, &mut line[..], RecvFlags::TRUNC) {
                Ok((n, len)) if n == len => Some(n),
                Err(Errno::AGAIN | Errno::INTR) => return,
                _ => None,
            },
        };
        let p = self.pending.swap_remove(i);
        let port = got.and_then(|n| parse_connect(&line[..n]));
        let Some(port) = port else {
            log::debug!("virtio-vsock: a host connection sent no CONNECT line");
            return;
        };
        if self.conns.len() >= MAX_CONNS {
            log::warn!("virtio-vsock: {MAX_CONNS} connections already; closing a host connection");
            return;
        }
        let local = self.free_port(port);
        let key = (local, port);
        let state = State::Connecting {
            deadline: now + CONNECT_TIMEOUT,
        };
        self.conns
            .insert(key, Conn::new(p.sock, p.kind, state, None));
        let h = self.header(key, p.kind, OP_REQUEST);
        self.control.push_back(h);
    }

    /// A local port not in use with `peer`.
    fn free_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = p.checked_add(1).unwrap_or(LOCAL_PORT_FIRST);
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    /// Host connections that took too long, and guest answers that never came.
    pub fn expire(&mut self, now: Instant) {
        self.pending.retain(|p| p.deadline > now);
        let late: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Connecting { deadline } if deadline <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            self.reset(k);
        }
    }

    /// The nearest deadline.
    pub fn deadline(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| match c.state {
            State::Connecting { deadline } => Some(deadline),
            State::Established => None,
        });
        self.pending.iter().map(|p| p.deadline).chain(conns).min()
    }

    /// The host sockets to poll, with what for (none is listed with no
    /// events: poll reports a hang-up regardless, which would spin).
    pub fn poll_set<'a>(&'a self, rx_starved: bool, out: &mut Vec<(BorrowedFd<'a>, i16, Target)>) {
        if self.control_room() {
            for (i, p) in self.pending.iter().enumerate() {
                out.push((p.sock.as_fd(), libc::POLLIN, Target::Pending(i)));
            }
        }
        for (k, c) in &self.conns {
            let mut ev = 0;
            if c.wants_read() && !rx_starved {
                ev |= libc::POLLIN;
            }
            if c.wants_write() {
                ev |= libc::POLLOUT;
            }
            if ev != 0 {
                out.push((c.sock.as_fd(), ev, Target::Conn(*k)));
            }
        }
    }

    /// A connection's host socket had an event.
    pub fn conn_ready(&mut self, key: (u32, u32)) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.readable = true;
        if c.flush().is_err() || c.finished() {
            self.reset(key);
        }
    }

    /// Fill one receive buffer: a waiting reply, else data or a credit
    /// update from the next connection that has some. The bytes written,
    /// or None when there is nothing to send.
    pub fn to_guest(&mut self, w: &mut virtio_queue::Writer<'_>, bounce: &mut [u8]) -> Option<u32> {
        if w.available_bytes() < HEADER_SIZE {
            // Not a buffer a packet fits: returned empty.
            return Some(0);
        }
        if let Some(h) = self.control.pop_front() {
            let _ = w.write_all(&h.0);
            return Some(HEADER_SIZE as u32);
        }
        let room = (w.available_bytes() - HEADER_SIZE)
            .min(MAX_PKT_DATA)
            .min(bounce.len());
        let mut keys = std::mem::take(&mut self.pass);
        keys.clear();
        keys.extend(self.conns.keys().copied());
        let got = self.one_packet(&keys, w, &mut bounce[..room]);
        self.pass = keys;
        got
    }

    /// The next packet of the connections `keys` (round robin from
    /// `turn`) into `w`; a control header instead when a connection failed.
    fn one_packet(
        &mut self,
        keys: &[(u32, u32)],
        w: &mut virtio_queue::Writer<'_>,
        bounce: &mut [u8],
    ) -> Option<u32> {
        let n = keys.len();
        for i in 0..n {
            let key = keys[(self.turn + i) % n];
            match self.conn_to_guest(key, w, bounce) {
                Ok(Some(len)) => {
                    self.turn = (self.turn + i + 1) % n;
                    return Some(len);
                }
                Ok(None) => {}
                Err(()) => {
                    self.reset(key);
                    if let Some(h) = self.control.pop_front() {
                        let _ = w.write_all(&h.0);
                        return Some(HEADER_SIZE as u32);
                    }
                }
            }
        }
        None
    }

    /// One packet of connection `key` into `w`, if it has one (Err: its
    /// host socket failed).
    fn conn_to_guest(
        &mut self,
        key: (u32, u32),
        w: &mut virtio_queue::Writer<'_>,
        bounce: &mut [u8],
    ) -> Result<Option<u32>, ()> {
        let base = match self.conns.get(&key) {
            Some(c) if c.has_rx() => self.header(key, c.kind, OP_RW),
            _ => return Ok(None),
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return Ok(None);
        };
        let mut h = base.with_fwd_cnt(c.fwd_cnt);
        let credit = c.peer_credit() as usize;
        let mut len = 0;
        let can_send = !c.guest_shut_rcv && credit > 0 && !bounce.is_empty();
        if can_send && c.kind == Kind::Seqpacket && !c.seq_pending() && c.readable && !c.host_eof {
            // The next host message, whole (its size peeked first).
            match rustix::net::recv(
                &c.sock,
                &mut [0u8; 0][..],
                RecvFlags::PEEK | RecvFlags::TRUNC,
            ) {
                Ok((_, 0)) => c.host_eof = true,
                Ok((_, size)) if size > MAX_SEQ_MSG => {
                    log::warn!("virtio-vsock: a {size}-byte host message is more than {MAX_SEQ_MSG}; resetting");
                    return Err(());
                }
                Ok((_, size)) => {
                    c.from_host.resize(size, 0);
                    c.from_host_sent = 0;
                    match rustix::net::recv(&c.sock, &mut c.from_host[..], RecvFlags::empty()) {
                        Ok((n, _)) if n == size => {}
                        _ => return Err(()),
                    }
                }
                Err(Errno::AGAIN | Errno::INTR) => c.readable = false,
                Err(_) => return Err(()),
            }
        }
        if can_send && c.seq_pending() {
            let rest = &c.from_host[c.from_host_sent..];
            len = rest.len().min(credit).min(bounce.len());
            bounce[..len].copy_from_slice(&rest[..len]);
            c.from_host_sent += len;
            if !c.seq_pending() {
                h = h.with_flags(SEQ_EOM);
                c.from_host.clear();
                c.from_host_sent = 0;
            }
        } else if can_send && c.kind == Kind::Stream && c.readable && !c.host_eof {
            let cap = credit.min(bounce.len());
            match rustix::net::recv(&c.sock, &mut bounce[..cap], RecvFlags::DONTWAIT) {
                Ok((0, _)) => c.host_eof = true,
                Ok((n, _)) => len = n,
                Err(Errno::AGAIN | Errno::INTR) => c.readable = false,
                Err(_) => return Err(()),
            }
        }
        if len > 0 {
            h = h.with_len(len as u32);
            c.tx_cnt = c.tx_cnt.wrapping_add(len as u32);
        } else if c.host_eof && c.readable {
            // EOF just read: the host will send no more.
            c.readable = false;
            h = h.with_op(OP_SHUTDOWN).with_flags(SHUTDOWN_SEND);
        } else if c.credit_update {
            h = h.with_op(OP_CREDIT_UPDATE);
        } else {
            return Ok(None);
        }
        c.told_fwd_cnt = c.fwd_cnt;
        c.credit_update = false;
        // (The guest moving its buffer meanwhile only spoils its own copy.)
        let _ = w.write_all(&h.0).and_then(|_| w.write_all(&bounce[..len]));
        Ok(Some((HEADER_SIZE + len) as u32))
    }
}

/// `CONNECT <port>\n` (Firecracker's and Cloud Hypervisor's line).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?.strip_suffix('\n')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT 52",
            b"CONNECT +52\n",
            b"CONNECT \n",
            b"connect 52\n",
            b"CONNECT 5 2\n",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn credit_never_underflows() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut c = Conn::new(a.into(), Kind::Stream, State::Established, None);
        c.peer_buf_alloc = 100;
        c.tx_cnt = 50;
        c.peer_fwd_cnt = 60; // ahead of what was sent: a lying guest
        assert_eq!(c.peer_credit(), 0);
        c.peer_fwd_cnt = 0;
        assert_eq!(c.peer_credit(), 50);
    }

    #[test]
    fn a_guest_past_its_credit_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut c = Conn::new(a.into(), Kind::Stream, State::Established, None);
        let h = Header::default();
        let chunk = vec![0u8; MAX_PKT_DATA];
        // The peer never reads: the socket fills, then moat's buffer.
        let mut taken = 0usize;
        while c.take(&h, &chunk).is_ok() {
            taken += chunk.len();
            assert!(taken < 16 << 20, "no limit");
        }
        assert!(c.to_host.len() <= BUF_ALLOC as usize);
    }
}
