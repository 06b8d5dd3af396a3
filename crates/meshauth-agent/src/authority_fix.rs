//! Makes the Workload API socket usable by gRPC C-core clients (Python, C++, Ruby, PHP), and
//! bounds what any local process can make the agent hold.
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
//!
//! # Limits
//!
//! The socket is mode 0777, so everything here is bounded ([`RelayLimits`]); each violation
//! closes the connection and is counted in `meshauth_agent_workload_connections_closed_total`
//! by reason, and logged (at most one warning per [`WARN_EVERY`] per kind, the rest at debug):
//!
//! - at most [`RelayLimits::max_connections`] connections at once; one more is closed as soon
//!   as it is accepted;
//! - the HTTP/2 preface within [`RelayLimits::preface_timeout`]; each request (HEADERS up to
//!   the client's END_STREAM) within [`RelayLimits::request_timeout`]; a connection without
//!   an open stream is closed after [`RelayLimits::idle_timeout`] (gRPC clients reconnect as
//!   needed; streams such as `FetchX509SVID` keep their connection for as long as they last);
//! - HPACK: the dynamic table may not grow beyond [`RelayLimits::max_table_size`], and a header
//!   block may not decode to more than [`RelayLimits::max_header_list_size`] (counted as
//!   HTTP/2 does, name + value + 32 per field, while decoding: a block of 1-byte references to
//!   a large table entry is refused without being expanded);
//! - one task per connection, which ends when either side closes, when a limit is hit, or when
//!   the agent stops (the token given to [`accept_relayed`]); no task outlives its connection.
//!
//! The caller is pinned when its connection is accepted ([`crate::attestor::pin`]).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::attestor::{AttestError, PinnedCaller};
use crate::metrics::{Metrics, WorkloadCloseReason};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE, which tonic's server keeps.
const MAX_FRAME: usize = 16_384;
/// Refuse encoded header blocks (HEADERS plus CONTINUATIONs) beyond this.
const MAX_BLOCK: usize = 64 * 1024;
/// Buffer between the relay and tonic, per connection and direction.
const PIPE: usize = 64 * 1024;
/// After the client's EOF, how long answers already under way may still reach it.
const DRAIN: Duration = Duration::from_secs(2);
/// At most one warning per this long for each kind of event a local process can trigger.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Bounds of the Workload API socket (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Connections at once.
    pub max_connections: usize,
    /// Time for the client to send the HTTP/2 preface.
    pub preface_timeout: Duration,
    /// Time for a request to be complete (the client's END_STREAM) once its HEADERS came.
    pub request_timeout: Duration,
    /// Time a connection may stay without an open stream.
    pub idle_timeout: Duration,
    /// Largest decoded header block (HTTP/2's header list size: name + value + 32 per field).
    pub max_header_list_size: usize,
    /// Largest HPACK dynamic table a client may ask for (SETTINGS_HEADER_TABLE_SIZE default).
    pub max_table_size: usize,
    /// Open streams tracked per connection (tonic refuses more than 200 concurrent ones).
    pub max_streams: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_connections: 128,
            preface_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            // tonic's (hyper's) default header list limit.
            max_header_list_size: 16 * 1024,
            max_table_size: 4096,
            max_streams: 1024,
        }
    }
}

/// Why the relay closed a connection.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The client did not send the HTTP/2 preface.
    #[error("not an HTTP/2 connection")]
    NotHttp2,
    /// The preface did not come in time.
    #[error("no HTTP/2 preface within {0:?}")]
    PrefaceTimeout(Duration),
    /// A malformed or oversized frame.
    #[error("malformed frame: {0}")]
    Protocol(&'static str),
    /// A header block that does not decode.
    #[error("HPACK: {0}")]
    Hpack(loona_hpack::decoder::DecoderError),
    /// A dynamic table size update beyond the limit.
    #[error("HPACK dynamic table size update beyond {max} bytes")]
    TableTooLarge {
        /// The limit.
        max: usize,
    },
    /// A header block that decodes to more than the limit.
    #[error("header block decodes to more than {max} bytes")]
    HeaderListTooLarge {
        /// The limit.
        max: usize,
    },
    /// Too many open streams.
    #[error("more than {max} open streams")]
    TooManyStreams {
        /// The limit.
        max: usize,
    },
    /// A request did not complete in time.
    #[error("a request was not complete within {0:?}")]
    RequestTimeout(Duration),
    /// No open stream for too long.
    #[error("no open stream for {0:?}")]
    Idle(Duration),
    /// Reading or writing failed, or the client went away mid-frame.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl RelayError {
    /// The counted reason; `None` for I/O errors (the client went away).
    pub fn reason(&self) -> Option<WorkloadCloseReason> {
        Some(match self {
            RelayError::NotHttp2 => WorkloadCloseReason::NotHttp2,
            RelayError::PrefaceTimeout(_) => WorkloadCloseReason::PrefaceTimeout,
            RelayError::Protocol(_) => WorkloadCloseReason::ProtocolError,
            RelayError::Hpack(_) => WorkloadCloseReason::HpackError,
            RelayError::TableTooLarge { .. } => WorkloadCloseReason::HpackTableTooLarge,
            RelayError::HeaderListTooLarge { .. } => WorkloadCloseReason::HeaderListTooLarge,
            RelayError::TooManyStreams { .. } => WorkloadCloseReason::TooManyStreams,
            RelayError::RequestTimeout(_) => WorkloadCloseReason::RequestTimeout,
            RelayError::Idle(_) => WorkloadCloseReason::IdleTimeout,
            RelayError::Io(_) => return None,
        })
    }
}

/// Rate limit of a warning that local processes or the network can trigger: one per
/// [`WARN_EVERY`]; the others go to debug and are counted into the next warning's
/// `suppressed` field. `const`, so each call site can have its own `static`.
#[derive(Debug)]
pub(crate) struct WarnLimit(Mutex<(Option<std::time::Instant>, u64)>);

impl WarnLimit {
    /// Nothing logged yet.
    pub(crate) const fn new() -> Self {
        WarnLimit(Mutex::new((None, 0)))
    }

    /// `Some(held back since the last warning)` if this event may be a warning.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if state
            .0
            .is_some_and(|t| now.saturating_duration_since(t) < WARN_EVERY)
        {
            state.1 = state.1.saturating_add(1);
            return None;
        }
        let suppressed = state.1;
        *state = (Some(now), 0);
        Some(suppressed)
    }
}

fn bad(msg: &'static str) -> RelayError {
    RelayError::Protocol(msg)
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// The streams of one connection, as far as the relay needs them for its timeouts: which are
/// open, and since when each request has been incomplete.
#[derive(Debug)]
pub(crate) struct StreamTable(Mutex<Streams>);

#[derive(Debug)]
struct Streams {
    /// Open streams; `Some(since)` while the client has not finished its request.
    open: HashMap<u32, Option<Instant>>,
    /// The highest stream the client opened (new streams have higher ids).
    last_opened: u32,
    /// Since when no stream is open.
    idle_since: Option<Instant>,
    max: usize,
}

impl StreamTable {
    pub(crate) fn new(max: usize) -> Self {
        StreamTable(Mutex::new(Streams {
            open: HashMap::new(),
            last_opened: 0,
            idle_since: Some(Instant::now()),
            max,
        }))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Streams) -> T) -> T {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut s);
        s.idle_since = match (s.open.is_empty(), s.idle_since) {
            (true, None) => Some(Instant::now()),
            (true, since) => since,
            (false, _) => None,
        };
        out
    }

    /// A HEADERS frame from the client.
    fn client_headers(&self, stream: u32, end_stream: bool) -> Result<(), RelayError> {
        if stream == 0 {
            return Ok(());
        }
        self.with(|s| {
            if stream > s.last_opened {
                if s.open.len() >= s.max {
                    return Err(RelayError::TooManyStreams { max: s.max });
                }
                s.last_opened = stream;
                s.open.insert(stream, (!end_stream).then(Instant::now));
            } else if end_stream && let Some(pending) = s.open.get_mut(&stream) {
                // Trailers.
                *pending = None;
            }
            Ok(())
        })
    }

    /// A frame from the client other than HEADERS.
    fn client_frame(&self, kind: u8, flags: u8, stream: u32) {
        match kind {
            DATA if flags & END_STREAM != 0 => self.with(|s| {
                if let Some(pending) = s.open.get_mut(&stream) {
                    *pending = None;
                }
            }),
            RST_STREAM => self.with(|s| {
                s.open.remove(&stream);
            }),
            _ => {}
        }
    }

    /// A frame from the server: the stream is over at its END_STREAM or RST_STREAM.
    fn server_frame(&self, kind: u8, flags: u8, stream: u32) {
        let ends = match kind {
            DATA | HEADERS => flags & END_STREAM != 0,
            RST_STREAM => true,
            _ => false,
        };
        if ends {
            self.with(|s| {
                s.open.remove(&stream);
            });
        }
    }

    /// Whether a timeout has passed at `now`.
    fn check(&self, now: Instant, limits: &RelayLimits) -> Result<(), RelayError> {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = s.idle_since
            && now.saturating_duration_since(since) >= limits.idle_timeout
        {
            return Err(RelayError::Idle(limits.idle_timeout));
        }
        let late = s
            .open
            .values()
            .flatten()
            .any(|since| now.saturating_duration_since(*since) >= limits.request_timeout);
        if late {
            return Err(RelayError::RequestTimeout(limits.request_timeout));
        }
        Ok(())
    }
}

/// Frame boundaries in a byte stream that arrives in arbitrary pieces.
#[derive(Debug, Default)]
struct FrameScanner {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
}

impl FrameScanner {
    /// Calls `on_frame(kind, flags, stream)` for every frame header completed by `data`.
    fn feed(&mut self, mut data: &[u8], mut on_frame: impl FnMut(u8, u8, u32)) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = data.get(n..).unwrap_or_default();
                continue;
            }
            let n = (9 - self.have).min(data.len());
            if let (Some(dst), Some(src)) =
                (self.head.get_mut(self.have..self.have + n), data.get(..n))
            {
                dst.copy_from_slice(src);
            }
            self.have += n;
            data = data.get(n..).unwrap_or_default();
            if self.have == 9 {
                let h = self.head;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                on_frame(h[3], h[4], stream);
                self.have = 0;
            }
        }
    }
}

/// A decoded header field: name and value.
type Header = (Vec<u8>, Vec<u8>);

/// Decodes an HPACK block within `limits`, counting the decoded size as it goes: past the
/// limit nothing more is kept, and the block is refused.
fn decode_block(
    decoder: &mut loona_hpack::Decoder<'_>,
    block: &[u8],
    limits: &RelayLimits,
) -> Result<Vec<Header>, RelayError> {
    let mut headers = Vec::new();
    let mut size = 0usize;
    let mut over = false;
    decoder
        .decode_with_cb(block, |name, value| {
            if over {
                return;
            }
            size = size.saturating_add(name.len() + value.len() + 32);
            if size > limits.max_header_list_size {
                over = true;
                headers = Vec::new();
                return;
            }
            headers.push((name.into_owned(), value.into_owned()));
        })
        .map_err(|e| match e {
            loona_hpack::decoder::DecoderError::InvalidMaxDynamicSize => {
                RelayError::TableTooLarge {
                    max: limits.max_table_size,
                }
            }
            e => RelayError::Hpack(e),
        })?;
    if over {
        return Err(RelayError::HeaderListTooLarge {
            max: limits.max_header_list_size,
        });
    }
    Ok(headers)
}

/// A HEADERS frame whose header block continues in CONTINUATION frames.
#[derive(Debug)]
struct PendingHeaders {
    /// The HEADERS frame's flags (END_STREAM, PRIORITY) and stream.
    flags: u8,
    stream: u32,
    /// Its priority fields, kept as they came.
    priority: Option<Vec<u8>>,
    /// The encoded block so far (padding stripped).
    block: Vec<u8>,
}

/// The client-to-server direction of one connection, without I/O: the preface, the frame
/// checks, CONTINUATION reassembly, HPACK decoding within [`RelayLimits`], `:authority`
/// rewriting and re-encoding. The socket relay ([`relay_client_frames`]) feeds it what it
/// reads, [`relay_client_bytes`] a whole input at once; both forward what it writes.
struct ClientFrames<'a> {
    limits: &'a RelayLimits,
    streams: &'a StreamTable,
    /// Whether the preface has come.
    started: bool,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    pending: Option<PendingHeaders>,
}

impl<'a> ClientFrames<'a> {
    fn new(limits: &'a RelayLimits, streams: &'a StreamTable) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(limits.max_table_size);
        ClientFrames {
            limits,
            streams,
            started: false,
            decoder,
            encoder: loona_hpack::Encoder::new(),
            pending: None,
        }
    }

    /// Consumes the preface and every whole frame at the start of `data`, appending what is to
    /// be forwarded to `out`, and returns how many bytes it consumed: the rest is the start of
    /// a frame, to be fed again with what follows. A frame header is checked as soon as it is
    /// complete, before its payload is waited for. On error, `out` holds what was to be
    /// forwarded before the offending frame, and the connection is to be closed.
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, RelayError> {
        let mut used = 0;
        if !self.started {
            let Some((preface, _)) = data.split_first_chunk::<24>() else {
                return Ok(0);
            };
            if preface != PREFACE {
                return Err(RelayError::NotHttp2);
            }
            out.extend_from_slice(PREFACE);
            self.started = true;
            used = PREFACE.len();
        }
        loop {
            let rest = data.get(used..).unwrap_or_default();
            let Some((head, rest)) = rest.split_first_chunk::<9>() else {
                return Ok(used);
            };
            let len = self.payload_len(head)?;
            let Some(payload) = rest.get(..len) else {
                return Ok(used);
            };
            self.frame(head, payload, out)?;
            used += 9 + len;
        }
    }

    /// The client's EOF, with `rest` left unconsumed by [`ClientFrames::feed`]: `Ok` where the
    /// client may stop (between frames, or within a frame header, which ends the connection as
    /// cleanly), an I/O error (`UnexpectedEof`) within the preface, a payload or a header block.
    fn end(&self, rest: &[u8]) -> Result<(), RelayError> {
        if !self.started || self.pending.is_some() || rest.len() >= 9 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    }

    /// The payload length a frame header announces, if the frame may come here.
    fn payload_len(&self, head: &[u8; 9]) -> Result<usize, RelayError> {
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        match &self.pending {
            None if len > MAX_FRAME => Err(bad("frame larger than the advertised maximum")),
            Some(p)
                if head[3] != CONTINUATION
                    || len > MAX_FRAME
                    || p.block.len() + len > MAX_BLOCK =>
            {
                Err(bad("bad CONTINUATION frame"))
            }
            _ => Ok(len),
        }
    }

    /// One whole frame, whose header [`ClientFrames::payload_len`] accepted.
    fn frame(
        &mut self,
        head: &[u8; 9],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if let Some(mut p) = self.pending.take() {
            // A CONTINUATION (nothing else passes `payload_len` within a block).
            p.block.extend_from_slice(payload);
            if flags & END_HEADERS == 0 {
                self.pending = Some(p);
                return Ok(());
            }
            return self.headers(p, out);
        }
        if kind != HEADERS {
            self.streams.client_frame(kind, flags, stream);
            out.extend_from_slice(head);
            out.extend_from_slice(payload);
            return Ok(());
        }

        // HEADERS: strip padding, keep priority, gather CONTINUATIONs.
        let mut body: &[u8] = payload;
        if flags & PADDED != 0 {
            let (&pad, rest) = body
                .split_first()
                .ok_or_else(|| bad("empty padded frame"))?;
            if rest.len() < pad as usize {
                return Err(bad("padding longer than the frame"));
            }
            body = rest.get(..rest.len() - pad as usize).unwrap_or_default();
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
        let p = PendingHeaders {
            flags,
            stream,
            priority,
            block: body.to_vec(),
        };
        if flags & END_HEADERS == 0 {
            self.pending = Some(p);
            return Ok(());
        }
        self.headers(p, out)
    }

    /// A complete header block: decoded, `:authority` rewritten, re-encoded with the relay's
    /// encoder.
    fn headers(&mut self, p: PendingHeaders, out: &mut Vec<u8>) -> Result<(), RelayError> {
        let headers = decode_block(&mut self.decoder, &p.block, self.limits)?;
        self.streams
            .client_headers(p.stream, p.flags & END_STREAM != 0)?;
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
        let encoded = self.encoder.encode(rewritten);

        // Re-emit as HEADERS (+ CONTINUATION when needed), same stream and END_STREAM.
        let mut first = p.priority.unwrap_or_default();
        let room = MAX_FRAME - first.len();
        let (now, mut rest) = encoded.split_at(encoded.len().min(room));
        first.extend_from_slice(now);
        let mut out_flags = (p.flags & END_STREAM) | (p.flags & PRIORITY);
        if rest.is_empty() {
            out_flags |= END_HEADERS;
        }
        out.extend_from_slice(&frame_header(first.len(), HEADERS, out_flags, p.stream));
        out.extend_from_slice(&first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
            let f = if tail.is_empty() { END_HEADERS } else { 0 };
            out.extend_from_slice(&frame_header(chunk.len(), CONTINUATION, f, p.stream));
            out.extend_from_slice(chunk);
            rest = tail;
        }
        Ok(())
    }
}

/// How [`relay_client_bytes`] ended.
#[derive(Debug)]
pub enum RelayedEnd {
    /// The input ran out where a client may stop: between frames, or within a frame header.
    /// On the socket, this is the client's EOF, after which the relay shuts down the server
    /// side.
    EndOfInput,
    /// The relay closes the connection, for this reason. Input that ends within the preface, a
    /// frame's payload or a header block is [`RelayError::Io`] (`UnexpectedEof`), as on the
    /// socket.
    Closed(RelayError),
}

/// The relay's core without I/O, used by the fuzzer and tests: what the socket relay would
/// forward to the server if a client sent `input` and then EOF, and how it would end. The same
/// code as the socket relay (preface, frame checks, CONTINUATION reassembly, HPACK decoding
/// within `limits`' table-size and decoded-size caps, `:authority` rewriting); only the
/// timeouts, which need a clock, are not applied.
pub fn relay_client_bytes(input: &[u8], limits: &RelayLimits) -> (Vec<u8>, RelayedEnd) {
    let streams = StreamTable::new(limits.max_streams);
    let mut core = ClientFrames::new(limits, &streams);
    let mut out = Vec::new();
    let end = core
        .feed(input, &mut out)
        .and_then(|used| core.end(input.get(used..).unwrap_or_default()));
    let end = match end {
        Ok(()) => RelayedEnd::EndOfInput,
        Err(e) => RelayedEnd::Closed(e),
    };
    (out, end)
}

/// How much the relay reads from a client at once.
const READ: usize = MAX_FRAME;

/// Copies the client-to-server direction from `from` to `to` through [`ClientFrames`],
/// rewriting `:authority`, within `limits`, and tells `streams` which streams open and which
/// requests are complete. Returns at the client's EOF, after shutting down `to`.
pub(crate) async fn relay_client_frames<R, W>(
    mut from: R,
    mut to: W,
    limits: &RelayLimits,
    streams: &StreamTable,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut core = ClientFrames::new(limits, streams);
    let preface_deadline = Instant::now() + limits.preface_timeout;
    // What the client sent that is not a whole frame yet: at most a frame (its header is
    // checked against MAX_FRAME as soon as it is complete) and one read.
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        buf.reserve(READ);
        let read = from.read_buf(&mut buf);
        let n = if core.started {
            read.await?
        } else {
            tokio::time::timeout_at(preface_deadline, read)
                .await
                .map_err(|_| RelayError::PrefaceTimeout(limits.preface_timeout))??
        };
        if n == 0 {
            core.end(&buf)?;
            to.shutdown().await?;
            return Ok(());
        }
        let fed = core.feed(&buf, &mut out);
        // What came before an offending frame is forwarded, then the connection closes.
        to.write_all(&out).await?;
        out.clear();
        buf.drain(..fed?);
    }
}

/// Copies the server-to-client direction unchanged, telling `streams` which streams end.
/// Returns when the server closes (after shutting down `to`) or the client cannot be written.
async fn relay_server_frames<R, W>(mut from: R, mut to: W, streams: &StreamTable) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut scanner = FrameScanner::default();
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let n = from.read(&mut buf).await?;
        let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
            return to.shutdown().await;
        };
        scanner.feed(chunk, |kind, flags, stream| {
            streams.server_frame(kind, flags, stream);
        });
        to.write_all(chunk).await?;
    }
}

/// Ends with the first timeout of `streams`.
async fn watchdog(streams: &StreamTable, limits: &RelayLimits) -> RelayError {
    let tick = (limits.request_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(e) = streams.check(Instant::now(), limits) {
            return e;
        }
    }
}

/// How a relayed connection ended.
#[derive(Debug)]
enum End {
    /// The client sent EOF.
    ClientDone,
    /// The server closed, or the client cannot be written to.
    ServerDone,
    /// The relay closed the connection.
    Closed(RelayError),
    /// The agent is stopping.
    Shutdown,
}

/// Relays one connection between `client` and tonic's end of `server` until either side
/// closes, a limit is hit or `stop` is cancelled; everything is dropped on return.
async fn relay_connection<C>(
    client: C,
    server: tokio::io::DuplexStream,
    limits: RelayLimits,
    stop: CancellationToken,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let streams = StreamTable::new(limits.max_streams);
    let (client_r, client_w) = tokio::io::split(client);
    let (server_r, server_w) = tokio::io::split(server);
    let c2s = relay_client_frames(client_r, server_w, &limits, &streams);
    let s2c = relay_server_frames(server_r, client_w, &streams);
    tokio::pin!(c2s, s2c);
    let end = tokio::select! {
        r = &mut c2s => match r {
            Ok(()) => End::ClientDone,
            Err(e) => End::Closed(e),
        },
        _ = &mut s2c => End::ServerDone,
        e = watchdog(&streams, &limits) => End::Closed(e),
        () = stop.cancelled() => End::Shutdown,
    };
    if let End::ClientDone = end {
        // tonic saw the EOF too; let what it already answered reach the client, briefly.
        tokio::select! {
            _ = tokio::time::timeout(DRAIN, &mut s2c) => {}
            () = stop.cancelled() => return End::Shutdown,
        }
    }
    end
}

/// What the Workload API learns about a caller: the caller pinned at accept, or why it could
/// not be.
#[derive(Debug, Clone)]
pub struct WorkloadPeer(pub Result<PinnedCaller, AttestError>);

/// One relayed Workload API connection, as tonic sees it.
#[derive(Debug)]
pub struct RelayedConnection {
    io: tokio::io::DuplexStream,
    peer: WorkloadPeer,
}

impl tonic::transport::server::Connected for RelayedConnection {
    type ConnectInfo = WorkloadPeer;

    fn connect_info(&self) -> WorkloadPeer {
        self.peer.clone()
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

/// One connection's place under the limit, held by its relay task.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, metrics: Metrics) -> Slot {
        metrics.workload_connection_opened();
        Slot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.workload_connection_ended();
    }
}

static OVER_LIMIT_LOG: WarnLimit = WarnLimit::new();
static CLOSED_LOG: WarnLimit = WarnLimit::new();
static ACCEPT_LOG: WarnLimit = WarnLimit::new();

/// Records how a connection ended: counted and (rate-limited) logged if the relay closed it.
fn report(end: &End, caller: Option<&PinnedCaller>, metrics: &Metrics) {
    let End::Closed(e) = end else {
        if let End::Shutdown = end {
            metrics.workload_connection_closed(WorkloadCloseReason::Shutdown);
        }
        return;
    };
    let Some(reason) = e.reason() else {
        tracing::debug!(error = %e, "workload API connection closed");
        return;
    };
    metrics.workload_connection_closed(reason);
    let (uid, pid) = (caller.map(|c| c.uid), caller.map(|c| c.pid));
    match CLOSED_LOG.allow() {
        Some(suppressed) => tracing::warn!(
            reason = ?reason,
            error = %e,
            caller.uid = ?uid,
            caller.pid = ?pid,
            suppressed,
            "workload API connection closed by the agent"
        ),
        None => tracing::debug!(
            reason = ?reason,
            error = %e,
            caller.uid = ?uid,
            caller.pid = ?pid,
            "workload API connection closed by the agent"
        ),
    }
}

/// Accepts Workload API connections within the default [`RelayLimits`], pins each caller at
/// accept, and relays them to tonic through [`relay_client_frames`]. The stream ends when
/// `stop` is cancelled; then, or when tonic drops the stream, every relayed connection is
/// closed.
pub fn accept_relayed(
    listener: tokio::net::UnixListener,
    metrics: Metrics,
    stop: CancellationToken,
) -> impl tokio_stream::Stream<Item = io::Result<RelayedConnection>> {
    accept_relayed_with(listener, RelayLimits::default(), metrics, stop)
}

/// [`accept_relayed`] within `limits`.
pub fn accept_relayed_with(
    listener: tokio::net::UnixListener,
    limits: RelayLimits,
    metrics: Metrics,
    stop: CancellationToken,
) -> impl tokio_stream::Stream<Item = io::Result<RelayedConnection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        // Every relay task; dropping the set when this loop ends aborts those still running.
        let mut relays = tokio::task::JoinSet::new();
        let mut pause = Duration::from_millis(10);
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => break,
                () = tx.closed() => break,
                Some(_) = relays.join_next(), if !relays.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => {
                        pause = Duration::from_millis(10);
                        s
                    }
                    Err(e) => {
                        // E.g. EMFILE: every accept fails at once; pause, do not spin.
                        if let Some(suppressed) = ACCEPT_LOG.allow() {
                            tracing::warn!(error = %e, suppressed, "workload socket accept failed");
                        }
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = stop.cancelled() => break,
                        }
                        pause = (pause * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                drop(stream);
                metrics.workload_connection_closed(WorkloadCloseReason::OverLimit);
                match OVER_LIMIT_LOG.allow() {
                    Some(suppressed) => tracing::warn!(
                        limit = limits.max_connections,
                        suppressed,
                        "workload API connection closed: at the connection limit"
                    ),
                    None => tracing::debug!(
                        limit = limits.max_connections,
                        "workload API connection closed: at the connection limit"
                    ),
                }
                continue;
            };
            let slot = Slot::new(permit, metrics.clone());
            let peer = WorkloadPeer(crate::attestor::pin(&stream));
            let caller = peer.0.as_ref().ok().copied();
            let (ours, theirs) = tokio::io::duplex(PIPE);
            let stop_relay = stop.clone();
            relays.spawn(async move {
                let end = relay_connection(stream, ours, limits, stop_relay).await;
                report(&end, caller.as_ref(), &slot.metrics);
                drop(slot);
            });
            tokio::select! {
                sent = tx.send(Ok(RelayedConnection { io: theirs, peer })) => {
                    if sent.is_err() {
                        break;
                    }
                }
                () = stop.cancelled() => break,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

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

    async fn relay(input: &[u8], out: &mut Vec<u8>) -> Result<(), RelayError> {
        let limits = RelayLimits::default();
        relay_client_frames(input, out, &limits, &StreamTable::new(limits.max_streams)).await
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
        relay(&input, &mut out).await.unwrap();

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
        let e = relay(b"GET / HTTP/1.1\r\n\r\n........", &mut out)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), Some(WorkloadCloseReason::NotHttp2));
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame_header(4, HEADERS, END_HEADERS, 1));
        input.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let e = relay(&input, &mut out).await.unwrap_err();
        assert_eq!(e.reason(), Some(WorkloadCloseReason::HpackError));
    }

    /// A HEADERS frame that adds one large entry to the dynamic table, then a HEADERS frame of
    /// `refs` 1-byte references to it (index 62, the newest dynamic entry).
    fn bomb(refs: usize) -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        let value = vec![b'x'; 3000];
        let mut input = PREFACE.to_vec();
        let block = enc.encode([(b"x-big".as_slice(), value.as_slice())]);
        input.extend_from_slice(&frame_header(block.len(), HEADERS, END_HEADERS, 1));
        input.extend_from_slice(&block);
        let refs = vec![0x80 | 62; refs];
        input.extend_from_slice(&frame_header(refs.len(), HEADERS, END_HEADERS, 3));
        input.extend_from_slice(&refs);
        input
    }

    #[tokio::test]
    async fn an_hpack_bomb_is_refused_before_it_expands() {
        // 16,000 references to a 3 KB entry would decode to about 48 MB.
        let mut out = Vec::new();
        let e = relay(&bomb(16_000), &mut out).await.unwrap_err();
        assert!(
            matches!(e, RelayError::HeaderListTooLarge { max: 16_384 }),
            "{e:?}"
        );
        assert_eq!(e.reason(), Some(WorkloadCloseReason::HeaderListTooLarge));
        assert!(
            out.len() < 8 * 1024,
            "nothing of the bomb was forwarded: {} bytes",
            out.len()
        );
        // Five references (about 15 KB decoded) are a normal, if large, header block.
        let mut out = Vec::new();
        relay(&bomb(5), &mut out).await.unwrap();
    }

    #[tokio::test]
    async fn the_dynamic_table_cannot_grow_beyond_the_limit() {
        let mut input = PREFACE.to_vec();
        // Dynamic table size update to 1 MiB (001xxxxx, 5-bit prefix), then :method GET.
        let mut block = vec![0x3f];
        let mut v = (1usize << 20) - 31;
        while v >= 128 {
            block.push((v % 128 + 128) as u8);
            v /= 128;
        }
        block.push(v as u8);
        block.push(0x82);
        input.extend_from_slice(&frame_header(block.len(), HEADERS, END_HEADERS, 1));
        input.extend_from_slice(&block);
        let mut out = Vec::new();
        let e = relay(&input, &mut out).await.unwrap_err();
        assert_eq!(
            e.reason(),
            Some(WorkloadCloseReason::HpackTableTooLarge),
            "{e:?}"
        );
    }

    #[test]
    fn frame_boundaries_survive_any_split() {
        let mut bytes = frame_header(3, HEADERS, END_HEADERS, 1).to_vec();
        bytes.extend_from_slice(b"abc");
        bytes.extend_from_slice(&frame_header(0, DATA, END_STREAM, 1));
        bytes.extend_from_slice(&frame_header(4, RST_STREAM, 0, 5));
        bytes.extend_from_slice(&[0, 0, 0, 8]);
        for piece in 1..=bytes.len() {
            let mut scanner = FrameScanner::default();
            let mut seen = Vec::new();
            for chunk in bytes.chunks(piece) {
                scanner.feed(chunk, |k, f, s| seen.push((k, f, s)));
            }
            assert_eq!(
                seen,
                vec![
                    (HEADERS, END_HEADERS, 1),
                    (DATA, END_STREAM, 1),
                    (RST_STREAM, 0, 5)
                ],
                "pieces of {piece}"
            );
        }
    }

    fn quick() -> RelayLimits {
        RelayLimits {
            max_connections: 2,
            preface_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            ..RelayLimits::default()
        }
    }

    #[tokio::test]
    async fn streams_keep_a_connection_and_timeouts_close_it() {
        let limits = quick();
        let t = StreamTable::new(limits.max_streams);
        let start = Instant::now();
        assert!(t.check(start, &limits).is_ok());
        // Idle from the start.
        assert!(matches!(
            t.check(start + Duration::from_millis(700), &limits),
            Err(RelayError::Idle(_))
        ));
        // A request that never completes.
        t.client_headers(1, false).unwrap();
        let later = Instant::now() + Duration::from_millis(400);
        assert!(matches!(
            t.check(later, &limits),
            Err(RelayError::RequestTimeout(_))
        ));
        // Complete, then answered for as long as it takes: neither idle nor late.
        t.client_frame(DATA, END_STREAM, 1);
        assert!(
            t.check(Instant::now() + Duration::from_secs(3600), &limits)
                .is_ok()
        );
        // The server ends it: idle again.
        t.server_frame(HEADERS, END_STREAM | END_HEADERS, 1);
        assert!(t.check(Instant::now(), &limits).is_ok());
        assert!(matches!(
            t.check(Instant::now() + Duration::from_millis(700), &limits),
            Err(RelayError::Idle(_))
        ));
        // Old stream ids do not reopen; too many streams are refused.
        t.client_headers(1, false).unwrap();
        assert!(
            t.check(Instant::now() + Duration::from_millis(700), &limits)
                .is_err()
        );
        let small = StreamTable::new(2);
        small.client_headers(1, true).unwrap();
        small.client_headers(3, true).unwrap();
        assert!(matches!(
            small.client_headers(5, true),
            Err(RelayError::TooManyStreams { max: 2 })
        ));
    }

    struct Socket {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        metrics: Metrics,
        stop: CancellationToken,
        incoming: std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = io::Result<RelayedConnection>> + Send>,
        >,
    }

    fn socket(limits: RelayLimits) -> Socket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workload.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let incoming = Box::pin(accept_relayed_with(
            listener,
            limits,
            metrics.clone(),
            stop.clone(),
        ));
        Socket {
            _dir: dir,
            path,
            metrics,
            stop,
            incoming,
        }
    }

    fn metric(m: &Metrics, name: &str) -> String {
        m.encode(None)
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
            .unwrap_or_else(|| "0".into())
    }

    async fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "{what} within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the agent closed `c` within `wait`.
    async fn closed_within(c: &mut tokio::net::UnixStream, wait: Duration) -> bool {
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                // The server's SETTINGS frame.
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn the_connection_over_the_limit_is_closed_and_counted() {
        use tokio_stream::StreamExt;
        let mut s = socket(RelayLimits {
            max_connections: 2,
            ..RelayLimits::default()
        });
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(tokio::net::UnixStream::connect(&s.path).await.unwrap());
        }
        let mut tonic_side = Vec::new();
        for _ in 0..2 {
            tonic_side.push(s.incoming.next().await.unwrap().unwrap());
        }
        let mut third = tokio::net::UnixStream::connect(&s.path).await.unwrap();
        assert!(closed_within(&mut third, Duration::from_secs(5)).await);
        let over = "meshauth_agent_workload_connections_closed_total{reason=\"OverLimit\"}";
        wait_for("the refusal is counted", || metric(&s.metrics, over) == "1").await;
        assert_eq!(
            metric(&s.metrics, "meshauth_agent_workload_connections "),
            "2"
        );
        for c in &mut held {
            assert!(!closed_within(c, Duration::from_millis(100)).await);
        }
        // Caller pinned at accept: this very process.
        let peer = tonic_side[0].peer.0.clone().unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);

        // A client that closes frees its place, and its relay, at once.
        drop(held.pop());
        wait_for("the slot is released", || {
            metric(&s.metrics, "meshauth_agent_workload_connections ") == "1"
        })
        .await;
        // ... and tonic's end sees EOF.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), tonic_side[1].read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "tonic's side of the closed connection ends");
        let mut next = tokio::net::UnixStream::connect(&s.path).await.unwrap();
        assert!(!closed_within(&mut next, Duration::from_millis(100)).await);

        // Stopping closes everything and ends the stream.
        s.stop.cancel();
        assert!(closed_within(&mut next, Duration::from_secs(5)).await);
        assert!(closed_within(&mut held[0], Duration::from_secs(5)).await);
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while s.incoming.next().await.is_some() {}
        })
        .await;
        assert!(end.is_ok(), "the stream ends");
        wait_for("every slot is released", || {
            metric(&s.metrics, "meshauth_agent_workload_connections ") == "0"
        })
        .await;
    }

    #[tokio::test]
    async fn silent_and_half_done_clients_are_closed_by_the_timeouts() {
        use tokio_stream::StreamExt;
        let mut s = socket(quick());
        // Half a preface, then silence.
        let mut partial = tokio::net::UnixStream::connect(&s.path).await.unwrap();
        partial.write_all(&PREFACE[..10]).await.unwrap();
        let _t1 = s.incoming.next().await.unwrap().unwrap();
        assert!(closed_within(&mut partial, Duration::from_secs(5)).await);
        // A request whose body never comes.
        let mut slow = tokio::net::UnixStream::connect(&s.path).await.unwrap();
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&mut enc, b"x", 1));
        slow.write_all(&input).await.unwrap();
        let _t2 = s.incoming.next().await.unwrap().unwrap();
        assert!(closed_within(&mut slow, Duration::from_secs(5)).await);
        // A preface and nothing else.
        let mut idle = tokio::net::UnixStream::connect(&s.path).await.unwrap();
        idle.write_all(PREFACE).await.unwrap();
        let _t3 = s.incoming.next().await.unwrap().unwrap();
        assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
        let m = &s.metrics;
        for reason in ["PrefaceTimeout", "RequestTimeout", "IdleTimeout"] {
            let name =
                format!("meshauth_agent_workload_connections_closed_total{{reason=\"{reason}\"}}");
            wait_for(&name, || metric(m, &name) == "1").await;
        }
        wait_for("every slot is released", || {
            metric(m, "meshauth_agent_workload_connections ") == "0"
        })
        .await;
    }

    #[tokio::test]
    async fn a_bomb_over_the_socket_closes_the_connection_with_its_reason() {
        use tokio_stream::StreamExt;
        let mut s = socket(quick());
        let mut c = tokio::net::UnixStream::connect(&s.path).await.unwrap();
        let _t = s.incoming.next().await.unwrap().unwrap();
        // One frame carries at most 16 KiB: 16,000 references.
        c.write_all(&bomb(16_000)).await.unwrap();
        assert!(closed_within(&mut c, Duration::from_secs(5)).await);
        let name =
            "meshauth_agent_workload_connections_closed_total{reason=\"HeaderListTooLarge\"}";
        wait_for("the bomb is counted", || metric(&s.metrics, name) == "1").await;
    }

    /// Two valid inputs (and a third, near the decoded-size limit) and a malformed one, for
    /// the tests that the socket relay and [`relay_client_bytes`] are the same relay.
    fn valid_inputs() -> Vec<Vec<u8>> {
        // SETTINGS, two requests (the second reuses the dynamic table), a DATA frame.
        let mut enc = loona_hpack::Encoder::new();
        let mut a = PREFACE.to_vec();
        a.extend_from_slice(&frame_header(6, 0x4, 0, 0));
        a.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        a.extend(headers_frame(&mut enc, b"tmp%2Fagent.sock", 1));
        a.extend(headers_frame(&mut enc, b"tmp%2Fagent.sock", 3));
        a.extend_from_slice(&frame_header(3, DATA, END_STREAM, 3));
        a.extend_from_slice(b"abc");
        // A padded HEADERS with priority whose block ends in a CONTINUATION, then the first
        // bytes of a frame header (where a client may stop).
        let block =
            headers_frame(&mut loona_hpack::Encoder::new(), b"tmp%2Fagent.sock", 5).split_off(9);
        let (x, y) = block.split_at(block.len() / 2);
        let mut body = vec![2u8, 0, 0, 0, 0, 16];
        body.extend_from_slice(x);
        body.extend_from_slice(&[0, 0]);
        let mut b = PREFACE.to_vec();
        b.extend_from_slice(&frame_header(body.len(), HEADERS, PADDED | PRIORITY, 5));
        b.extend_from_slice(&body);
        b.extend_from_slice(&frame_header(y.len(), CONTINUATION, END_HEADERS, 5));
        b.extend_from_slice(y);
        b.extend_from_slice(&frame_header(0, DATA, END_STREAM, 5)[..4]);
        vec![a, b, bomb(5)]
    }

    /// A request, then a header block that does not decode.
    fn malformed_input() -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(
            &mut loona_hpack::Encoder::new(),
            b"tmp%2Fagent.sock",
            1,
        ));
        input.extend_from_slice(&frame_header(4, HEADERS, END_HEADERS, 3));
        input.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        input
    }

    fn pure(input: &[u8]) -> (Vec<u8>, RelayedEnd) {
        relay_client_bytes(input, &RelayLimits::default())
    }

    fn is_eof(end: &RelayedEnd) -> bool {
        matches!(end, RelayedEnd::Closed(RelayError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
    }

    #[test]
    fn the_pure_core_rewrites_and_ends_as_the_relay_does() {
        for input in valid_inputs() {
            let (out, end) = pure(&input);
            assert!(matches!(end, RelayedEnd::EndOfInput), "{end:?}");
            assert!(out.starts_with(PREFACE) && out.len() > PREFACE.len());
            assert!(!out.windows(16).any(|w| w == b"tmp%2Fagent.sock"));
        }
        let (out, end) = pure(&malformed_input());
        let RelayedEnd::Closed(e) = end else {
            panic!("{end:?}")
        };
        assert_eq!(e.reason(), Some(WorkloadCloseReason::HpackError));
        // The request before the bad block was forwarded, rewritten.
        assert!(out.len() > PREFACE.len());
        assert!(!out.windows(16).any(|w| w == b"tmp%2Fagent.sock"));

        let (out, end) = pure(b"GET / HTTP/1.1\r\n\r\n........");
        assert!(out.is_empty());
        assert!(
            matches!(end, RelayedEnd::Closed(RelayError::NotHttp2)),
            "{end:?}"
        );
        // Ending within the preface, a payload or a header block is the client going away.
        let (out, end) = pure(&PREFACE[..10]);
        assert!(out.is_empty() && is_eof(&end), "{end:?}");
        let mut partial = PREFACE.to_vec();
        partial.extend_from_slice(&frame_header(3, DATA, 0, 1));
        partial.push(b'a');
        let (out, end) = pure(&partial);
        assert!(out == PREFACE && is_eof(&end), "{end:?}");
        let mut open_block = PREFACE.to_vec();
        open_block.extend_from_slice(&frame_header(1, HEADERS, 0, 1));
        open_block.push(0x82);
        let (out, end) = pure(&open_block);
        assert!(out == PREFACE && is_eof(&end), "{end:?}");
        // A frame larger than the maximum is refused on its header alone.
        let mut big = PREFACE.to_vec();
        big.extend_from_slice(&frame_header(MAX_FRAME + 1, DATA, 0, 1));
        let (_, end) = pure(&big);
        assert!(
            matches!(end, RelayedEnd::Closed(RelayError::Protocol(_))),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn reads_of_any_size_forward_what_the_pure_core_does() {
        let mut inputs = valid_inputs();
        inputs.push(malformed_input());
        for input in &inputs {
            let (expected, end) = pure(input);
            for piece in [1, 2, 5, 9, 24, 100, 4096, 64 * 1024] {
                // Each read of the relay gets at most `piece` bytes.
                let (mut client, server) = tokio::io::duplex(piece);
                let data = input.clone();
                let writer = tokio::spawn(async move {
                    let _ = client.write_all(&data).await;
                });
                let mut out = Vec::new();
                let limits = RelayLimits::default();
                let r = relay_client_frames(
                    server,
                    &mut out,
                    &limits,
                    &StreamTable::new(limits.max_streams),
                )
                .await;
                writer.await.unwrap();
                assert_eq!(out, expected, "reads of {piece}");
                match (&r, &end) {
                    (Ok(()), RelayedEnd::EndOfInput) => {}
                    (Err(a), RelayedEnd::Closed(b)) => assert_eq!(a.reason(), b.reason()),
                    _ => panic!("reads of {piece}: {r:?}, pure: {end:?}"),
                }
            }
        }
    }

    /// The end-to-end check the `relay` fuzz target made over a real socket before it moved to
    /// [`relay_client_bytes`]: the server side gets what the pure core forwards, and is closed
    /// within 5 s of the client's EOF (or of the relay's refusal).
    #[tokio::test]
    async fn over_the_socket_the_relay_forwards_what_the_pure_core_does_and_closes() {
        use tokio_stream::StreamExt;
        let mut s = socket(RelayLimits::default());
        let mut inputs = valid_inputs();
        inputs.push(malformed_input());
        for input in &inputs {
            let (expected, _) = pure(input);
            let mut c = tokio::net::UnixStream::connect(&s.path).await.unwrap();
            let mut server_side = s.incoming.next().await.unwrap().unwrap();
            c.write_all(input).await.unwrap();
            c.shutdown().await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), server_side.read_to_end(&mut out))
                .await
                .expect("the relay closes the server side within 5 s of the client's EOF")
                .unwrap();
            assert_eq!(out, expected);
        }
        let name = "meshauth_agent_workload_connections_closed_total{reason=\"HpackError\"}";
        wait_for("the malformed one is counted", || {
            metric(&s.metrics, name) == "1"
        })
        .await;
    }
}
