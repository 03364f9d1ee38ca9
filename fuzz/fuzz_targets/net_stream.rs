//! The stream netdev's framing (QEMU's `-netdev stream`, passt's protocol):
//! a peer that sends arbitrary bytes, in arbitrary pieces, while frames of
//! arbitrary lengths go the other way. Every frame received must be the
//! next one the byte stream describes (4-byte big-endian length, zero
//! skipped, over FRAME_MAX an error), and nothing may panic or grow
//! without bound.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_net::{Stream, FRAME_MAX};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// The frames `bytes` holds, in order, and whether a bad length ends them.
fn model(bytes: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        if len > FRAME_MAX {
            return (frames, true);
        }
        if rest.len() < 4 + len {
            break;
        }
        if len > 0 {
            frames.push(&rest[4..4 + len]);
        }
        rest = &rest[4 + len..];
    }
    (frames, false)
}

fuzz_target!(|data: &[u8]| {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    peer.set_nonblocking(true).unwrap();
    let mut s = Stream::new(ours).unwrap();
    let mut buf = vec![0u8; FRAME_MAX];
    let mut sink = vec![0u8; 1 << 16];
    let mut sent = Vec::new();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut failed = false;
    // The input, in pieces: a byte gives a piece's length, then the piece.
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let (piece, tail) = tail.split_at(usize::from(n).min(tail.len()));
        rest = tail;
        let n = peer.write(piece).unwrap_or(0);
        sent.extend_from_slice(&piece[..n]);
        // Our side sends a frame of four times the piece, if it can.
        let _ = s.send(&piece.repeat(4));
        let _ = s.flush();
        let _ = peer.read(&mut sink);
        loop {
            match s.recv(&mut buf) {
                Ok(Some(len)) => got.push(buf[..len].to_vec()),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            break;
        }
    }
    let (want, bad) = model(&sent);
    assert_eq!(got.len(), want.len(), "frames received");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.as_slice(), *w);
    }
    assert_eq!(
        failed, bad,
        "a bad length ends the connection, and only that"
    );
});
