//! Makes the Workload API socket usable by gRPC C-core clients (Python, C++, Ruby, PHP).
//!
//! Those clients derive the HTTP/2 `:authority` of a `unix:` target from the socket path
//! (`tmp%2Fagent.sock`), which is not a valid URI authority; the `h2` crate under tonic rejects
//! such requests with `RST_STREAM(PROTOCOL_ERROR)` and offers no setting to accept them. The
//! SPIFFE Workload API must work with standard clients unchanged, so each accepted connection
//! passes through this small relay: client-to-server HEADERS blocks are decoded with HPACK,
//! `:authority` is replaced by `localhost`, and the block is re-encoded with the relay's own
//! encoder (so both HPACK tables stay consistent). Every other frame, and the whole
//! server-to-client direction, is copied unchanged. No library does this rewriting, hence the
//! hand-written frame loop; HPACK itself is `loona-hpack`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE, which tonic's server keeps.
const MAX_FRAME: usize = 16_384;
/// Refuse header blocks beyond this (tonic's default header list limit is 16 KiB).
const MAX_BLOCK: usize = 64 * 1024;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// Copies the client-to-server direction from `from` to `to`, rewriting `:authority`.
pub(crate) async fn relay_client_frames<R, W>(mut from: R, mut to: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(bad("not an HTTP/2 connection"));
    }
    to.write_all(PREFACE).await?;
    let mut decoder = loona_hpack::Decoder::new();
    let mut encoder = loona_hpack::Encoder::new();
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return to.shutdown().await,
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_FRAME {
            return Err(bad("frame larger than the advertised maximum"));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        if kind != HEADERS {
            to.write_all(&head).await?;
            to.write_all(&payload).await?;
            continue;
        }

        // HEADERS: strip padding, keep priority, gather CONTINUATIONs.
        let mut body: &[u8] = &payload;
        if flags & PADDED != 0 {
            let (&pad, rest) = body
                .split_first()
                .ok_or_else(|| bad("empty padded frame"))?;
            body = rest
                .get(..rest.len().saturating_sub(pad as usize))
                .unwrap_or_default();
            if rest.len() < pad as usize {
                return Err(bad("padding longer than the frame"));
            }
        }
        let priority = if flags & PRIORITY != 0 {
            let (p, rest) = body
                .split_at_checked(5)
                .ok_or_else(|| bad("short priority"))?;
            body = rest;
            Some(p.to_vec())
        } else {
            None
        };
        let mut block = body.to_vec();
        let mut end_headers = flags & END_HEADERS != 0;
        while !end_headers {
            let mut h = [0u8; 9];
            from.read_exact(&mut h).await?;
            let clen = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            if h[3] != CONTINUATION || clen > MAX_FRAME || block.len() + clen > MAX_BLOCK {
                return Err(bad("bad CONTINUATION frame"));
            }
            let mut c = vec![0u8; clen];
            from.read_exact(&mut c).await?;
            block.extend_from_slice(&c);
            end_headers = h[4] & END_HEADERS != 0;
        }

        let headers = decoder
            .decode(&block)
            .map_err(|e| bad(&format!("HPACK: {e:?}")))?;
        let rewritten: Vec<(&[u8], &[u8])> = headers
            .iter()
            .map(|(n, v)| {
                if n.as_slice() == b":authority" {
                    (n.as_slice(), b"localhost".as_slice())
                } else {
                    (n.as_slice(), v.as_slice())
                }
            })
            .collect();
        let encoded = encoder.encode(rewritten);

        // Re-emit as HEADERS (+ CONTINUATION when needed), same stream and END_STREAM.
        let mut first = priority.unwrap_or_default();
        let room = MAX_FRAME - first.len();
        let (now, mut rest) = encoded.split_at(encoded.len().min(room));
        first.extend_from_slice(now);
        let mut out_flags = (flags & END_STREAM) | if priority_flag(flags) { PRIORITY } else { 0 };
        if rest.is_empty() {
            out_flags |= END_HEADERS;
        }
        to.write_all(&frame_header(first.len(), HEADERS, out_flags, stream))
            .await?;
        to.write_all(&first).await?;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
            let f = if tail.is_empty() { END_HEADERS } else { 0 };
            to.write_all(&frame_header(chunk.len(), CONTINUATION, f, stream))
                .await?;
            to.write_all(chunk).await?;
            rest = tail;
        }
    }
}

fn priority_flag(flags: u8) -> bool {
    flags & PRIORITY != 0
}

/// Buffer between the relay and tonic, per connection.
const PIPE: usize = 64 * 1024;

/// What the Workload API learns about a caller: the kernel's credentials for the socket peer.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadPeer(pub Option<crate::attestor::PeerCred>);

/// One relayed Workload API connection, as tonic sees it.
#[derive(Debug)]
pub struct RelayedConnection {
    io: tokio::io::DuplexStream,
    peer: WorkloadPeer,
}

impl tonic::transport::server::Connected for RelayedConnection {
    type ConnectInfo = WorkloadPeer;

    fn connect_info(&self) -> WorkloadPeer {
        self.peer
    }
}

impl AsyncRead for RelayedConnection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for RelayedConnection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Accepts Workload API connections, records each caller's credentials at accept time, and
/// relays them to tonic through [`relay_client_frames`]. The stream ends when the listener fails.
pub fn accept_relayed(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = io::Result<RelayedConnection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "workload socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let peer = WorkloadPeer(stream.peer_cred().ok().map(|c| crate::attestor::PeerCred {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            }));
            let (ours, theirs) = tokio::io::duplex(PIPE);
            let (client_r, mut client_w) = stream.into_split();
            let (mut server_r, server_w) = tokio::io::split(ours);
            tokio::spawn(async move {
                if let Err(e) = relay_client_frames(client_r, server_w).await {
                    tracing::debug!(error = %e, "workload API connection closed");
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
                let _ = client_w.shutdown().await;
            });
            if tx
                .send(Ok(RelayedConnection { io: theirs, peer }))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(enc: &mut loona_hpack::Encoder<'_>, authority: &[u8], stream: u32) -> Vec<u8> {
        let block = enc.encode([
            (b":method".as_slice(), b"POST".as_slice()),
            (
                b":path".as_slice(),
                b"/SpiffeWorkloadAPI/FetchX509SVID".as_slice(),
            ),
            (b":authority".as_slice(), authority),
            (b"workload.spiffe.io".as_slice(), b"true".as_slice()),
        ]);
        let mut f = frame_header(block.len(), HEADERS, END_HEADERS, stream).to_vec();
        f.extend_from_slice(&block);
        f
    }

    #[tokio::test]
    async fn authority_is_rewritten_and_other_frames_pass() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        // A SETTINGS frame, two requests (the second reuses the dynamic table), a DATA frame.
        input.extend_from_slice(&frame_header(6, 0x4, 0, 0));
        input.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        input.extend(headers_frame(&mut enc, b"tmp%2Fagent.sock", 1));
        input.extend(headers_frame(&mut enc, b"tmp%2Fagent.sock", 3));
        input.extend_from_slice(&frame_header(3, 0x0, END_STREAM, 3));
        input.extend_from_slice(b"abc");

        let mut out = Vec::new();
        relay_client_frames(&input[..], &mut out).await.unwrap();

        assert_eq!(&out[..24], PREFACE);
        let mut dec = loona_hpack::Decoder::new();
        let mut rest = &out[24..];
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, payload) = (rest[3], &rest[9..9 + len]);
            if kind == HEADERS {
                let h = dec.decode(payload).unwrap();
                let auth = h.iter().find(|(n, _)| n == b":authority").unwrap();
                assert_eq!(auth.1, b"localhost");
                assert!(
                    h.iter()
                        .any(|(n, v)| n == b"workload.spiffe.io" && v == b"true")
                );
            }
            seen.push((kind, payload.to_vec()));
            rest = &rest[9 + len..];
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0], (0x4, vec![0, 3, 0, 0, 0, 100]));
        assert_eq!(seen[3], (0x0, b"abc".to_vec()));
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let mut out = Vec::new();
        assert!(
            relay_client_frames(&b"GET / HTTP/1.1\r\n\r\n........"[..], &mut out)
                .await
                .is_err()
        );
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame_header(4, HEADERS, END_HEADERS, 1));
        input.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(relay_client_frames(&input[..], &mut out).await.is_err());
    }
}
