//! QEMU's stream netdev (`-netdev stream`, QEMU 7.2): a connected stream
//! socket on which each frame travels behind its length, 4 bytes big-endian.
//! passt speaks it (`passt` on the host, QEMU's `-netdev stream` on the
//! VM), which gives an unprivileged user networking with no tap at all.
//!
//! The peer is untrusted: a length of 0 is skipped, one larger than
//! [`FRAME_MAX`] ends the connection (an error the device reports as the
//! link going down), and nothing is allocated by a length the peer sends:
//! a frame is read into one buffer of [`FRAME_MAX`] bytes the stream owns
//! (so a frame half read when the guest resets is finished, not lost in
//! mid-stream) and copied to the caller whole. Sending never blocks: a frame
//! the socket cannot take whole waits in one bounded buffer, and no further
//! frame is taken until it has gone (flow control, as QEMU's stream netdev).

use crate::FRAME_MAX;
use std::io::{self, IoSlice, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

/// A stream netdev's connection.
#[derive(Debug)]
pub struct Stream {
    sock: UnixStream,
    /// The length prefix being read, and how much of it has come.
    len: [u8; 4],
    len_have: usize,
    /// The frame being read: its length (once known) and how much has come.
    frame_len: Option<usize>,
    frame_have: usize,
    frame: Vec<u8>,
    /// Output the socket has not taken yet (at most one frame and its
    /// length), and how much of it has gone.
    out: Vec<u8>,
    out_pos: usize,
}

impl Stream {
    /// Use `sock`, a connected stream socket (made non-blocking).
    pub fn new(sock: UnixStream) -> io::Result<Stream> {
        sock.set_nonblocking(true)?;
        Ok(Stream {
            sock,
            len: [0; 4],
            len_have: 0,
            frame_len: None,
            frame_have: 0,
            frame: vec![0; FRAME_MAX],
            out: Vec::with_capacity(FRAME_MAX + 4),
            out_pos: 0,
        })
    }

    fn read_some(&mut self, into: &mut [u8]) -> io::Result<Option<usize>> {
        match self.sock.read(into) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream peer closed the connection",
            )),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some(0)),
            Err(e) => Err(e),
        }
    }

    /// Read toward one frame; `Ok(Some(len))` once `buf[..len]` holds it.
    /// A frame longer than `buf` ends the connection.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let Some(want) = self.frame_len else {
                let mut len = self.len;
                let Some(n) = self.read_some(&mut len[self.len_have..])? else {
                    return Ok(None);
                };
                self.len = len;
                self.len_have += n;
                if self.len_have < 4 {
                    continue;
                }
                self.len_have = 0;
                let want = u32::from_be_bytes(self.len) as usize;
                if want > FRAME_MAX.min(buf.len()) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the stream peer sent a {want}-byte frame (at most {FRAME_MAX})"),
                    ));
                }
                if want == 0 {
                    continue; // nothing to deliver
                }
                self.frame_len = Some(want);
                self.frame_have = 0;
                continue;
            };
            let mut frame = std::mem::take(&mut self.frame);
            let got = self.read_some(&mut frame[self.frame_have..want]);
            self.frame = frame;
            let Some(n) = got? else {
                return Ok(None);
            };
            self.frame_have += n;
            if self.frame_have == want {
                self.frame_len = None;
                buf[..want].copy_from_slice(&self.frame[..want]);
                return Ok(Some(want));
            }
        }
    }

    /// Send a frame behind its length. `Ok(false)`: earlier output still
    /// waits; nothing was taken.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if self.wants_write() {
            return Ok(false);
        }
        if frame.len() > FRAME_MAX {
            return Ok(true); // dropped: no peer could take it
        }
        let len = (frame.len() as u32).to_be_bytes();
        let total = 4 + frame.len();
        // (MSG_NOSIGNAL: a peer that went away is an error here, never a
        // SIGPIPE, whatever the process does with that signal.)
        let sent = match rustix::net::sendmsg(
            &self.sock,
            &[IoSlice::new(&len), IoSlice::new(frame)],
            &mut rustix::net::SendAncillaryBuffer::default(),
            rustix::net::SendFlags::NOSIGNAL,
        ) {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => 0,
            Err(e) => return Err(e.into()),
        };
        if sent < total {
            self.out.clear();
            self.out.extend_from_slice(&len);
            self.out.extend_from_slice(frame);
            self.out_pos = sent;
        }
        Ok(true)
    }

    pub fn wants_write(&self) -> bool {
        self.out_pos < self.out.len()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        while self.wants_write() {
            let rest = &self.out[self.out_pos..];
            match rustix::net::send(&self.sock, rest, rustix::net::SendFlags::NOSIGNAL) {
                Ok(n) => self.out_pos += n,
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A peer that went away is an error (EPIPE), not a SIGPIPE, even in
    /// a process that does not ignore that signal (libFuzzer's main does
    /// not; Rust's, which this harness uses, does, so the test puts the
    /// default action back while it runs).
    #[test]
    fn a_gone_peer_is_an_error_not_a_signal() {
        let (mut s, peer) = pair();
        drop(peer);
        // SAFETY: setting a signal's disposition to a constant action.
        let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        let frame = [0u8; 60];
        let mut r = Ok(true);
        for _ in 0..4 {
            r = s.send(&frame);
            if r.is_err() {
                break;
            }
        }
        // SAFETY: as above, putting back what was there.
        unsafe { libc::signal(libc::SIGPIPE, old) };
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EPIPE));
    }

    fn pair() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::new(a).unwrap(), b)
    }

    #[test]
    fn frames_come_whole_however_the_bytes_arrive() {
        let (mut s, mut peer) = pair();
        let mut buf = vec![0u8; FRAME_MAX];
        let frame: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&frame);
        wire.extend_from_slice(&0u32.to_be_bytes()); // an empty frame: skipped
        wire.extend_from_slice(&2u32.to_be_bytes());
        wire.extend_from_slice(b"hi");
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for chunk in wire.chunks(7) {
            peer.write_all(chunk).unwrap();
            while let Some(n) = s.recv(&mut buf).unwrap() {
                frames.push(buf[..n].to_vec());
            }
        }
        assert_eq!(frames.len(), 2);
        assert!(frames[0] == frame, "the first frame differs");
        assert_eq!(frames[1], b"hi");
        assert_eq!(s.recv(&mut buf).unwrap(), None);
    }

    #[test]
    fn an_oversized_length_ends_the_connection() {
        let (mut s, mut peer) = pair();
        let mut buf = vec![0u8; FRAME_MAX];
        peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let e = s.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        drop(peer);
        let (mut s, peer) = pair();
        drop(peer);
        assert!(s.recv(&mut buf).is_err(), "EOF is an error");
    }

    #[test]
    fn a_stalled_peer_holds_one_frame_and_nothing_more() {
        let (mut s, mut peer) = pair();
        let frame = vec![7u8; 60000];
        let mut sent = 0;
        // Fill the socket buffer: sends keep succeeding until one is parked.
        while !s.wants_write() {
            assert!(s.send(&frame).unwrap());
            sent += 1;
            assert!(sent < 10_000, "never filled");
        }
        assert!(!s.send(&frame).unwrap(), "a second frame was taken");
        // The peer reads everything: the parked frame goes out whole.
        peer.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut b = vec![0u8; 1 << 16];
        loop {
            s.flush().unwrap();
            match peer.read(&mut b) {
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(_) if !s.wants_write() => break,
                Err(_) => {}
            }
        }
        assert_eq!(got.len(), sent * (4 + frame.len()));
    }
}
