//! Monitor transports: listening UNIX sockets (mode 0600), one thread per
//! client, bounded input and output, bounded clients, event broadcast.
//!
//! A hostile client cannot hurt the VM or other clients: messages larger
//! than [`qmp::MAX_MESSAGE`] disconnect it, a client that does not read its
//! replies is dropped once [`MAX_QUEUED_OUTPUT`] bytes wait for it, at most
//! [`MAX_CLIENTS`] are served per socket (later ones wait in the backlog),
//! and nothing a client does blocks a vCPU.
//!
//! On a TCP (TLS) monitor, connections that have not yet completed the
//! handshake and passed authorization hold no client slot: they wait in a
//! pool of their own ([`MAX_HANDSHAKES`], at most [`MAX_HANDSHAKES_PER_PEER`]
//! from one address, each with [`crate::tls::HANDSHAKE_TIMEOUT`] in all);
//! when it is full the oldest is dropped. Strangers holding connections
//! open therefore cannot keep an authorized client out.

use crate::authz::Authz;
use crate::hmp;
use crate::qmp::{self, Frame, MonitorContext, Session};
use crate::tls::TlsServer;
use moat_sys::lock;
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Output allowed to wait for a slow client before it is dropped.
pub const MAX_QUEUED_OUTPUT: usize = 4 << 20;
/// Clients served at once on one socket.
pub const MAX_CLIENTS: usize = 8;
/// Descriptors accepted with one message.
const MAX_FDS_PER_MESSAGE: usize = 8;
/// TLS connections still in their handshake, per socket.
pub const MAX_HANDSHAKES: usize = 16;
/// ... and from one peer address.
pub const MAX_HANDSHAKES_PER_PEER: usize = 4;

/// The protocol a monitor socket speaks: QMP (`Control`) or HMP (`Readline`).
pub use moat_config::MonitorMode as Mode;

/// Where a monitor listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    /// A listening UNIX socket handed in by descriptor (its number, for messages).
    UnixFd(i32, Arc<std::os::unix::net::UnixListener>),
    /// TCP, always with TLS and client authorization.
    Tcp {
        host: String,
        port: u16,
        tls: TlsServer,
        authz: Arc<Authz>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::UnixFd(n, _) => write!(f, "fd={n}"),
            Endpoint::Tcp { host, port, .. } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// One configured monitor socket.
#[derive(Debug, Clone)]
pub struct MonitorSpec {
    pub endpoint: Endpoint,
    pub mode: Mode,
    /// Do not start the guest until a client is connected (`wait=on`; on
    /// TCP: until a client completed TLS and passed authorization).
    pub wait: bool,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener, TlsServer, Arc<Authz>),
}

/// A count of busy slots, waited on when all are taken.
#[derive(Debug, Default)]
struct Slots {
    busy: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    fn acquire(&self, max: usize) {
        let mut n = lock(&self.busy);
        while *n >= max {
            n = self.cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
    }

    fn release(&self) {
        *lock(&self.busy) -= 1;
        self.cv.notify_all();
    }
}

/// Set once a `wait=on` socket has its first client.
#[derive(Debug, Default)]
struct Latch {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Latch {
    fn set(&self) {
        *lock(&self.set) = true;
        self.cv.notify_all();
    }

    /// Wait up to `timeout`; whether it is set.
    fn wait(&self, timeout: std::time::Duration) -> bool {
        let g = lock(&self.set);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |set| !*set)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// A TLS connection in its handshake (its clone, to drop it if evicted).
struct Handshake {
    id: u64,
    peer: std::net::IpAddr,
    stream: TcpStream,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("monitor socket {path}: {why}")]
    Socket { path: String, why: String },
}

/// The bounded outbound queue of one client, drained by its writer thread.
#[derive(Debug, Default)]
struct Outbox {
    q: Mutex<(VecDeque<Vec<u8>>, usize, bool)>, // messages, bytes, closed
    cv: Condvar,
    /// The writer holds a message it has not finished writing.
    writing: AtomicBool,
}

impl Outbox {
    /// Queue bytes; false (and the client is closed) if it is too far behind.
    fn push(&self, bytes: Vec<u8>) -> bool {
        let mut g = lock(&self.q);
        if g.2 {
            return false;
        }
        if g.1 + bytes.len() > MAX_QUEUED_OUTPUT {
            g.2 = true;
            self.cv.notify_all();
            return false;
        }
        g.1 += bytes.len();
        g.0.push_back(bytes);
        self.cv.notify_all();
        true
    }

    /// Everything queued so far has been written (or the client is gone).
    fn drained(&self) -> bool {
        let g = lock(&self.q);
        g.2 || (g.0.is_empty() && !self.writing.load(Ordering::SeqCst))
    }

    fn close(&self) {
        lock(&self.q).2 = true;
        self.cv.notify_all();
    }

    /// Next message, or None once closed and drained.
    fn pop(&self) -> Option<Vec<u8>> {
        let mut g = lock(&self.q);
        loop {
            if let Some(m) = g.0.pop_front() {
                g.1 -= m.len();
                self.writing.store(true, Ordering::SeqCst);
                return Some(m);
            }
            if g.2 {
                return None;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[derive(Debug)]
struct Client {
    outbox: Arc<Outbox>,
    /// QMP clients receive events once negotiated.
    negotiated: Arc<AtomicBool>,
}

/// All monitor sockets of this VM.
#[derive(Debug, Clone)]
pub struct Monitors {
    clients: Arc<Mutex<Vec<Client>>>,
    /// One per `wait=on` socket.
    waiting: Vec<Arc<Latch>>,
}

fn json_line(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.extend_from_slice(b"\r\n");
    b
}

impl Monitors {
    /// Bind every socket and start serving (once the sandbox lets the
    /// gated threads run). For `wait=on` sockets, see [`Monitors::wait_for_clients`].
    pub fn start(specs: &[MonitorSpec], ctx: Arc<MonitorContext>) -> Result<Monitors, ServerError> {
        let mut mon = Monitors {
            clients: Arc::new(Mutex::new(Vec::new())),
            waiting: Vec::new(),
        };
        let mut loops = Vec::new();
        for spec in specs {
            let err = |why: String| ServerError::Socket {
                path: spec.endpoint.to_string(),
                why,
            };
            let listener = match &spec.endpoint {
                Endpoint::Unix(path) => {
                    Listener::Unix(moat_sys::bind_unix_private(path).map_err(err)?)
                }
                Endpoint::UnixFd(_, l) => {
                    Listener::Unix(l.try_clone().map_err(|e| err(e.to_string()))?)
                }
                Endpoint::Tcp {
                    host,
                    port,
                    tls,
                    authz,
                } => Listener::Tcp(
                    TcpListener::bind((host.as_str(), *port)).map_err(|e| err(e.to_string()))?,
                    tls.clone(),
                    authz.clone(),
                ),
            };
            let ready = spec.wait.then(|| {
                eprintln!(
                    "moat: waiting for a connection on monitor socket {}",
                    spec.endpoint
                );
                let l = Arc::new(Latch::default());
                mon.waiting.push(l.clone());
                l
            });
            loops.push((spec.endpoint.to_string(), listener, spec.mode, ready));
        }
        for (name, listener, mode, ready) in loops {
            let mon2 = mon.clone();
            let ctx = ctx.clone();
            moat_sys::gate::spawn_gated(
                "monitor-accept",
                moat_sys::role::Role::Monitor,
                move || mon2.accept_loop(listener, mode, ctx, ready),
            )
            .map_err(|e| ServerError::Socket {
                path: name,
                why: e.to_string(),
            })?;
        }
        Ok(mon)
    }

    /// Wait up to `timeout` for every `wait=on` socket's first client (on
    /// TCP: one that completed TLS and passed authorization; a stranger's
    /// connection does not start the guest). True once all have one.
    pub fn wait_for_clients(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        self.waiting
            .iter()
            .all(|l| l.wait(deadline.saturating_duration_since(std::time::Instant::now())))
    }

    fn accept_loop(
        &self,
        listener: Listener,
        mode: Mode,
        ctx: Arc<MonitorContext>,
        ready: Option<Arc<Latch>>,
    ) {
        let slots = Arc::new(Slots::default());
        match listener {
            Listener::Unix(l) => loop {
                // Wait for a free slot before accepting: extra clients queue in the backlog.
                slots.acquire(MAX_CLIENTS);
                let stream = match l.accept() {
                    Ok((s, _)) => s,
                    Err(e) => {
                        log::warn!("monitor: accept: {e}");
                        slots.release();
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        continue;
                    }
                };
                if let Some(r) = &ready {
                    r.set();
                }
                let (me, ctx, slots2) = (self.clone(), ctx.clone(), slots.clone());
                let spawned = moat_sys::thread("monitor-client").spawn(move || {
                    me.serve(stream, mode, ctx);
                    slots2.release();
                });
                if spawned.is_err() {
                    slots.release();
                }
            },
            Listener::Tcp(l, tls, authz) => {
                let pending = Arc::new(Mutex::new(VecDeque::<Handshake>::new()));
                let mut next_id = 0u64;
                loop {
                    let (tcp, addr) = match l.accept() {
                        Ok(c) => c,
                        Err(e) => {
                            log::warn!("monitor: accept: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            continue;
                        }
                    };
                    next_id += 1;
                    let id = next_id;
                    if !admit_handshake(&pending, id, addr.ip(), &tcp) {
                        continue;
                    }
                    let (me, ctx, slots2) = (self.clone(), ctx.clone(), slots.clone());
                    let (tls, authz, pending2, ready) =
                        (tls.clone(), authz.clone(), pending.clone(), ready.clone());
                    let spawned = moat_sys::thread("monitor-client").spawn(move || {
                        let established = tls.accept(tcp, &authz);
                        lock(&pending2).retain(|h| h.id != id);
                        match established {
                            Ok(stream) => {
                                if let Some(r) = &ready {
                                    r.set();
                                }
                                slots2.acquire(MAX_CLIENTS);
                                me.serve(stream, mode, ctx);
                                slots2.release();
                            }
                            Err(e) => log::warn!("monitor: TLS client {addr} refused: {e}"),
                        }
                    });
                    if spawned.is_err() {
                        lock(&pending).retain(|h| h.id != id);
                    }
                }
            }
        }
    }

    /// Send an event to every negotiated QMP client.
    fn broadcast(&self, name: &str, data: Option<Value>) {
        let line = json_line(&qmp::event(name, data));
        let mut clients = lock(&self.clients);
        clients.retain(|c| {
            if c.negotiated.load(Ordering::SeqCst) {
                c.outbox.push(line.clone())
            } else {
                true
            }
        });
    }

    /// Wait (at most `timeout`) until every client has been sent what is queued for it.
    /// At exit: then the clients' sockets are closed, and TLS clients get
    /// what their relay threads still hold, before moat exits.
    pub fn flush(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if lock(&self.clients).iter().all(|c| c.outbox.drained()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // Closing an outbox ends its writer thread, which shuts the socket
        // down; a TLS relay then forwards the rest, says close_notify and ends.
        for c in lock(&self.clients).iter() {
            c.outbox.close();
        }
        crate::tls::wait_relays(deadline);
    }

    fn serve(&self, stream: UnixStream, mode: Mode, ctx: Arc<MonitorContext>) {
        let outbox = Arc::new(Outbox::default());
        let negotiated = Arc::new(AtomicBool::new(false));
        let Ok(mut wstream) = stream.try_clone() else {
            return;
        };
        let wbox = outbox.clone();
        let writer = moat_sys::thread("monitor-out").spawn(move || {
            while let Some(m) = wbox.pop() {
                let ok = wstream.write_all(&m).is_ok();
                wbox.writing.store(false, Ordering::SeqCst);
                if !ok {
                    wbox.close();
                    break;
                }
            }
            let _ = wstream.shutdown(std::net::Shutdown::Both);
        });
        if writer.is_err() {
            return;
        }
        if mode == Mode::Control {
            lock(&self.clients).push(Client {
                outbox: outbox.clone(),
                negotiated: negotiated.clone(),
            });
        }
        let mut session = Session::new(ctx);
        match mode {
            Mode::Control => serve_qmp(&stream, &mut session, &outbox, &negotiated),
            Mode::Readline => serve_hmp(&stream, &mut session, &outbox),
        }
        outbox.close();
        let _ = stream.shutdown(std::net::Shutdown::Read);
        lock(&self.clients).retain(|c| !Arc::ptr_eq(&c.outbox, &outbox));
    }
}

/// Enter a new TLS connection in the handshake pool, making room by
/// dropping the oldest handshake of the same peer (when it has
/// [`MAX_HANDSHAKES_PER_PEER`] there) or else the oldest of all (when the
/// pool is full): a stranger holding slow handshakes open gets them cut,
/// and a client that completes its handshake promptly gets through.
fn admit_handshake(
    pending: &Mutex<VecDeque<Handshake>>,
    id: u64,
    peer: std::net::IpAddr,
    tcp: &TcpStream,
) -> bool {
    let Ok(stream) = tcp.try_clone() else {
        return false;
    };
    let mut p = lock(pending);
    let evict = if p.iter().filter(|h| h.peer == peer).count() >= MAX_HANDSHAKES_PER_PEER {
        p.iter().position(|h| h.peer == peer)
    } else if p.len() >= MAX_HANDSHAKES {
        Some(0)
    } else {
        None
    };
    if let Some(old) = evict.and_then(|i| p.remove(i)) {
        let _ = old.stream.shutdown(std::net::Shutdown::Both);
    }
    p.push_back(Handshake { id, peer, stream });
    true
}

/// Read bytes and any descriptors passed with them.
fn recv(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut raw: [RawFd; MAX_FDS_PER_MESSAGE] = [-1; MAX_FDS_PER_MESSAGE];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points to `buf`, which is valid and writable for its length.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let fds = raw[..nfds.min(MAX_FDS_PER_MESSAGE)]
        .iter()
        .map(|&fd| {
            // SAFETY: recvmsg just installed `fd` in our table; we are its only owner.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            owned
        })
        .collect();
    Ok((n, fds))
}

fn serve_qmp(stream: &UnixStream, session: &mut Session, outbox: &Outbox, negotiated: &AtomicBool) {
    if !outbox.push(json_line(&qmp::greeting())) {
        return;
    }
    let mut framer = qmp::Framer::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, fds) = match recv(stream, &mut buf) {
            Ok((0, _)) | Err(_) => return,
            Ok(x) => x,
        };
        if !fds.is_empty() {
            session.received_fds = fds;
        }
        let frames = match framer.push(&buf[..n]) {
            Ok(f) => f,
            Err(e) => {
                outbox.push(json_line(&serde_json::json!({"error": e.to_json()})));
                return;
            }
        };
        for f in frames {
            let reply = match f {
                Frame::Value(v) => session.handle(v),
                Frame::Error(e) => serde_json::json!({"error": e.to_json()}),
            };
            negotiated.store(session.negotiated(), Ordering::SeqCst);
            if !outbox.push(json_line(&reply)) {
                return;
            }
            session.replied();
        }
    }
}

fn serve_hmp(stream: &UnixStream, session: &mut Session, outbox: &Outbox) {
    // HMP goes through the QMP layer: negotiate on the client's behalf.
    let _ = session.handle(serde_json::json!({"execute": "qmp_capabilities"}));
    if !outbox.push(format!("{}{}", hmp::banner(), hmp::PROMPT).into_bytes()) {
        return;
    }
    let mut editor = hmp::LineEditor::default();
    let mut buf = [0u8; 4096];
    let mut reader = stream;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut echo = Vec::new();
        for &b in &buf[..n] {
            if let Some(line) = editor.feed(b, &mut echo) {
                let out = hmp::execute(session, &line, None);
                echo.extend_from_slice(out.as_bytes());
                echo.extend_from_slice(hmp::PROMPT.as_bytes());
                if !outbox.push(std::mem::take(&mut echo)) {
                    return;
                }
                session.replied();
            }
        }
        if !echo.is_empty() && !outbox.push(echo) {
            return;
        }
    }
}

/// The VM's events go to every negotiated QMP client, in QEMU's shape.
impl moat_api::EventSink for Monitors {
    fn emit(&self, event: moat_api::Event) {
        let (name, data) = crate::encode::event(&event);
        self.broadcast(name, data);
    }
}

/// The listening sockets handed in by descriptor (`-chardev socket,fd=N`, as
/// libvirt passes them), each checked to be a listening UNIX socket; taken
/// before moat closes the descriptors it was not told about.
pub fn take_inherited_sockets(
    cfg: &moat_config::VmConfig,
) -> Result<std::collections::HashMap<i32, UnixListener>, String> {
    let mut out = std::collections::HashMap::new();
    for m in &cfg.monitors {
        if let moat_config::SocketAddr::Fd(n) = m.socket.addr {
            if out.contains_key(&n) {
                continue;
            }
            let l = moat_sys::fdset::take_inherited(n.into())
                .and_then(moat_sys::listening_unix)
                .map_err(|e| format!("-chardev socket,fd={n}: {e}"))?;
            out.insert(n, l);
        }
    }
    Ok(out)
}

impl MonitorSpec {
    /// Every monitor of `cfg`, with its TLS credentials and authorization
    /// policy loaded; `fds` holds the inherited listening sockets.
    pub fn from_config(
        cfg: &moat_config::VmConfig,
        fds: &mut std::collections::HashMap<i32, UnixListener>,
    ) -> Result<Vec<MonitorSpec>, String> {
        use moat_config::{Object, SocketAddr};
        let object = |id: &str| cfg.objects.iter().find(|o| o.id() == id);
        cfg.monitors
            .iter()
            .map(|m| {
                let endpoint = match &m.socket.addr {
                    SocketAddr::Unix(path) => Endpoint::Unix(path.clone()),
                    SocketAddr::Fd(n) => match fds.remove(n) {
                        Some(l) => Endpoint::UnixFd(*n, Arc::new(l)),
                        None => {
                            return Err(format!("-chardev socket,fd={n}: used by two monitors"))
                        }
                    },
                    SocketAddr::Tcp { host, port } => {
                        let creds = m.socket.tls_creds.as_deref().unwrap_or_default();
                        let Some(Object::TlsCredsX509 { dir, .. }) = object(creds) else {
                            return Err(format!("no tls-creds-x509 object '{creds}'"));
                        };
                        let tls = TlsServer::load(dir)
                            .map_err(|e| format!("-object tls-creds-x509,id={creds}: {e}"))?;
                        let authz_id = m.socket.tls_authz.as_deref().unwrap_or_default();
                        let authz = match object(authz_id) {
                            Some(Object::AuthzSimple { identity, .. }) => {
                                Authz::Simple(identity.clone())
                            }
                            Some(Object::AuthzList {
                                default_allow,
                                rules,
                                ..
                            }) => Authz::List {
                                default_allow: *default_allow,
                                rules: rules.clone(),
                            },
                            _ => return Err(format!("no authz object '{authz_id}'")),
                        };
                        Endpoint::Tcp {
                            host: host.clone(),
                            port: *port,
                            tls,
                            authz: Arc::new(authz),
                        }
                    }
                };
                Ok(MonitorSpec {
                    endpoint,
                    mode: m.mode,
                    wait: m.socket.wait,
                })
            })
            .collect()
    }
}
