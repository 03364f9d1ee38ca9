//! TLS for TCP monitors (rustls): the server certificate and key and the CA
//! that client certificates must chain to, named as QEMU's tls-creds-x509
//! names them (`ca-cert.pem`, `server-cert.pem`, `server-key.pem` in `dir`).
//! A client without a valid certificate never completes the handshake; one
//! whose distinguished name the authorization policy rejects is dropped
//! before it sees the greeting.

use crate::authz::Authz;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long a client may take to complete the handshake, in all.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A loaded TLS server identity with mandatory client certificates.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl TlsServer {
    pub fn load(dir: &Path) -> Result<TlsServer, String> {
        let file = |n: &str| dir.join(n);
        let certs = |n: &str| -> Result<Vec<CertificateDer<'static>>, String> {
            let v: Result<Vec<_>, _> = CertificateDer::pem_file_iter(file(n))
                .map_err(|e| format!("{}: {e}", file(n).display()))?
                .collect();
            let v = v.map_err(|e| format!("{}: {e}", file(n).display()))?;
            if v.is_empty() {
                return Err(format!("{}: no certificate", file(n).display()));
            }
            Ok(v)
        };
        let ca = certs("ca-cert.pem")?;
        let chain = certs("server-cert.pem")?;
        let key = PrivateKeyDer::from_pem_file(file("server-key.pem"))
            .map_err(|e| format!("{}: {e}", file("server-key.pem").display()))?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", file("ca-cert.pem").display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("client verifier: {e}"))?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| format!("server certificate: {e}"))?;
        Ok(TlsServer {
            config: Arc::new(config),
        })
    }

    /// Handshake, authorize, then relay the plaintext through a local socket
    /// pair; returns our end of it for the monitor to serve.
    /// The handshake must be complete within [`HANDSHAKE_TIMEOUT`] in all
    /// (not per read: a client trickling a byte at a time gets no longer).
    pub fn accept(&self, mut tcp: TcpStream, authz: &Authz) -> Result<UnixStream, String> {
        let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let mut conn = ServerConnection::new(self.config.clone()).map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "TLS handshake not complete within {HANDSHAKE_TIMEOUT:?}"
                ));
            }
            tcp.set_read_timeout(Some(left))
                .and_then(|()| tcp.set_write_timeout(Some(left)))
                .map_err(|e| e.to_string())?;
            conn.complete_io(&mut tcp)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        let dn = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| distinguished_name(c.as_ref()))
            .ok_or("no client certificate")??;
        if !authz.allows(&dn) {
            conn.send_close_notify();
            let _ = conn.complete_io(&mut tcp);
            return Err(format!("client '{dn}' is not authorized"));
        }
        log::info!("monitor: TLS client '{dn}' authorized");
        tcp.set_read_timeout(None).map_err(|e| e.to_string())?;
        tcp.set_write_timeout(None).map_err(|e| e.to_string())?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
        let h = moat_sys::thread("monitor-tls")
            .spawn(move || relay(conn, tcp, theirs))
            .map_err(|e| e.to_string())?;
        let mut relays = moat_sys::lock(&RELAYS);
        relays.retain(|h| !h.is_finished());
        relays.push(h);
        Ok(ours)
    }
}

/// The subject of a DER certificate as an RFC 4514 string ("CN=alice,O=Example,C=GB"),
/// the form QEMU's authorization identities use.
pub fn distinguished_name(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("client certificate: {e}"))?;
    let registry = x509_parser::objects::oid_registry();
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let name = x509_parser::objects::oid2abbrev(atv.attr_type(), registry)
                .map(str::to_string)
                .unwrap_or_else(|_| atv.attr_type().to_id_string());
            let value = atv
                .as_str()
                .map_err(|_| "client certificate: a subject attribute is not text".to_string())?;
            parts.push(format!("{name}={}", escape(value)));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

fn escape(v: &str) -> String {
    let mut out = String::new();
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The relay threads of TLS clients, so that moat's exit can wait for them.
static RELAYS: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Wait (until `deadline`) for every TLS relay to have forwarded what its
/// client was sent and closed the connection.
pub fn wait_relays(deadline: std::time::Instant) {
    while std::time::Instant::now() < deadline {
        if moat_sys::lock(&RELAYS).iter().all(|h| h.is_finished()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Move bytes between the TLS connection and the local socket until either closes.
fn relay(mut conn: ServerConnection, mut tcp: TcpStream, mut local: UnixStream) {
    let mut buf = vec![0u8; 16 * 1024];
    let flush = |conn: &mut ServerConnection, tcp: &mut TcpStream| -> bool {
        while conn.wants_write() {
            if conn.write_tls(tcp).is_err() {
                return false;
            }
        }
        true
    };
    'outer: loop {
        // Plaintext that arrived with the handshake, or with the last record.
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => break 'outer,
                Ok(n) => {
                    if local.write_all(&buf[..n]).is_err() {
                        break 'outer;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => break 'outer,
            }
        }
        if !flush(&mut conn, &mut tcp) {
            break;
        }
        let mut fds = [
            libc::pollfd {
                fd: tcp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: local.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[0].revents != 0 {
            match conn.read_tls(&mut tcp) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if conn.process_new_packets().is_err() {
                        let _ = flush(&mut conn, &mut tcp);
                        break;
                    }
                }
            }
        }
        if fds[1].revents != 0 {
            match local.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.writer().write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    }
    conn.send_close_notify();
    let _ = flush(&mut conn, &mut tcp);
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    let _ = local.shutdown(std::net::Shutdown::Both);
}
