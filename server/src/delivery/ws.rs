//! WebSocket play: `ws://HOST:8080/ws/STREAM`.
//!
//! Media starts right after the upgrade. Each viewer has a task that writes pre-framed messages
//! from its rendition's shared log with vectored writes (no per-viewer copies): the join burst
//! from the GOP cache, catching up, control replies. Once at the live edge it hands its socket
//! to the rendition's fan-out task, which writes new frames to every caught-up viewer directly
//! (`hub::fanout`), and takes it back when the fan-out returns it or it has something to send.
//! A small reader task handles what the viewer sends (time sync, stats, control, pings, close).

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fastwebsockets::{OpCode, Role, WebSocketError};
use hyper_util::rt::TokioIo;
use onair_protocol::wire::{self, Hello, Message, TimeSyncResponse};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::http::{App, Peer};
use crate::hub::fanout::MAX_IOV;
use crate::hub::{self, Rendition, Sink, frame, now_us, valid_stream_name};

/// Bytes per write batch: enough to fill a socket buffer in one call.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Largest message a viewer may send us. Ours are tens of bytes; this bounds the read buffer.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// Close codes (RFC 6455 7.4.1 and the private range).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL: u16 = 1002;

pub async fn play(
    State(app): State<App>,
    Path(stream): Path<String>,
    Extension(Peer(peer)): Extension<Peer>,
    mut req: Request,
) -> Response {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, "websocket")],
            "this is a WebSocket endpoint: connect with ws://\n",
        )
            .into_response();
    }
    if !valid_stream_name(&stream) {
        return (
            StatusCode::BAD_REQUEST,
            format!("invalid stream name {stream:?}\n"),
        )
            .into_response();
    }
    if let Err(origin) = check_origin(req.headers(), &app.cfg.allowed_origins) {
        tracing::info!(%peer, %origin, "websocket refused: origin not allowed");
        return (
            StatusCode::FORBIDDEN,
            format!("origin {origin} is not allowed\n"),
        )
            .into_response();
    }
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("bad WebSocket upgrade: {e}\n"),
            )
                .into_response();
        }
    };
    let viewer = app.hub.subscribe(&stream);
    let span = tracing::info_span!("viewer", stream = %stream, id = viewer.id, %peer);
    let shutdown = app.shutdown.clone();
    let cfg = app.cfg.clone();
    app.tracker.spawn(
        async move {
            let ws = match upgrade.await {
                Ok(ws) => ws,
                Err(e) => {
                    tracing::info!(error = %e, "upgrade failed");
                    return;
                }
            };
            // We serve HTTP/1 on plain TCP ourselves, so the upgraded I/O is our TcpStream.
            let parts = match ws
                .into_inner()
                .into_inner()
                .downcast::<TokioIo<TcpStream>>()
            {
                Ok(parts) => parts,
                Err(_) => {
                    tracing::error!("upgraded connection is not a TcpStream");
                    return;
                }
            };
            tracing::info!(user_agent, "viewer connected");
            let reason = run(
                viewer,
                parts.io.into_inner(),
                parts.read_buf,
                &cfg,
                shutdown,
            )
            .await;
            tracing::info!(%reason, "viewer disconnected");
        }
        .instrument(span),
    );
    response.into_response()
}

fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), String> {
    if allowed.is_empty() {
        return Ok(());
    }
    // Non-browser clients send no Origin; the check protects browser users, so let them through.
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("<non-ascii>");
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        Ok(())
    } else {
        Err(origin.to_string())
    }
}

/// Why a viewer connection ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientGone(String),
    Stalled(Duration),
    Protocol(String),
    Shutdown,
    /// Shutdown interrupted a write: a close frame now would land inside a media frame.
    ShutdownMidWrite,
    WriteError(std::io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => write!(f, "client closed"),
            End::ClientGone(e) => write!(f, "client gone: {e}"),
            End::Stalled(d) => write!(
                f,
                "stalled: socket accepted nothing for {} ms",
                d.as_millis()
            ),
            End::Protocol(e) => write!(f, "protocol error: {e}"),
            End::Shutdown | End::ShutdownMidWrite => write!(f, "server shutting down"),
            End::WriteError(e) => write!(f, "write failed: {e}"),
        }
    }
}

/// Events from the reader task to the writer.
enum FromReader {
    /// A frame to send as is (pong, close echo, time sync response).
    Send(Bytes),
    Closed(End),
}

impl hub::SinkWrite for OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        // sendmsg(2) straight on the socket (tokio's readiness bookkeeping kept): skips the VFS
        // layer writev goes through, and MSG_NOSIGNAL comes with it.
        let tcp: &TcpStream = self.as_ref();
        tcp.try_io(tokio::io::Interest::WRITABLE, || {
            socket2::SockRef::from(tcp).send_vectored(bufs)
        })
    }
}

async fn run(
    viewer: hub::Viewer,
    tcp: TcpStream,
    read_buf: Bytes,
    cfg: &crate::config::Config,
    shutdown: CancellationToken,
) -> End {
    let Some(rendition) = viewer.stream.rendition(0).cloned() else {
        return End::Protocol("stream has no rendition".into());
    };
    let (rd, wr) = tcp.into_split();
    let wr = Arc::new(wr);
    let (tx, mut rx) = mpsc::channel(32);
    let reader_stop = CancellationToken::new();
    let reader = tokio::spawn(
        read_loop(
            std::io::Cursor::new(read_buf).chain(rd),
            tx,
            reader_stop.clone(),
        )
        .in_current_span(),
    );
    let sink = rendition.add_sink(wr.clone());
    let end = write_loop(&viewer, &rendition, &wr, &sink, &mut rx, cfg, &shutdown).await;
    rendition.remove_sink(&sink);
    reader_stop.cancel();
    let _ = reader.await;
    let close = match &end {
        End::Shutdown => Some(frame::close(CLOSE_GOING_AWAY, "server shutting down")),
        End::Protocol(e) => Some(frame::close(CLOSE_PROTOCOL, e)),
        // ClientClosed: the echo was already sent. The rest: the socket is gone or unusable.
        _ => None,
    };
    if let Some(close) = close {
        let _ = write_all(&wr, &[close], Duration::from_secs(1)).await;
    }
    // Dropping the last handle on the write half shuts it down (FIN).
    end
}

/// Why a promoted viewer's task woke up.
enum Wake {
    Returned,
    Reader(Option<FromReader>),
    Shutdown,
}

async fn write_loop(
    viewer: &hub::Viewer,
    rendition: &Rendition,
    wr: &OwnedWriteHalf,
    sink: &Sink,
    rx: &mut mpsc::Receiver<FromReader>,
    cfg: &crate::config::Config,
    shutdown: &CancellationToken,
) -> End {
    let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_IOV);
    let hello = frame::message(&Message::Hello(Hello {
        version: wire::VERSION,
        viewer_id: viewer.id,
        server_time_us: now_us(),
        stream: &viewer.stream.name,
    }));
    match hello {
        Ok(h) => batch.push(h),
        Err(e) => return End::Protocol(e.to_string()),
    }
    let mut cursor = rendition.join(&mut batch);
    loop {
        let notified = rendition.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let room = MAX_IOV.saturating_sub(batch.len());
        if rendition.read(&mut cursor, &mut batch, room, MAX_BATCH_BYTES) {
            tracing::info!(
                skips = cursor.skips,
                "viewer fell behind; skipped to the next keyframe"
            );
        }
        let mut closed = None;
        while batch.len() < MAX_IOV {
            match rx.try_recv() {
                Ok(FromReader::Send(b)) => batch.push(b),
                Ok(FromReader::Closed(end)) => {
                    closed = Some(end);
                    break;
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() && closed.is_none() {
            if rendition.promote(sink, &cursor) {
                // At the live edge: the fan-out writes for us until it hands the socket back
                // or we take it back.
                let wake = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => Wake::Shutdown,
                    m = rx.recv() => Wake::Reader(m),
                    _ = sink.returned() => Wake::Returned,
                };
                let back = sink.reclaim();
                cursor.resume(&back);
                let mid_frame = back.partial.is_some();
                batch.extend(back.partial);
                if let Some(e) = back.error {
                    return End::WriteError(e);
                }
                match wake {
                    Wake::Returned => {}
                    Wake::Reader(Some(FromReader::Send(b))) => batch.push(b),
                    Wake::Reader(Some(FromReader::Closed(end))) => closed = Some(end),
                    Wake::Reader(None) => return End::ClientGone("reader ended".into()),
                    Wake::Shutdown if mid_frame => return End::ShutdownMidWrite,
                    Wake::Shutdown => return End::Shutdown,
                }
            } else {
                tokio::select! {
                    _ = &mut notified => {}
                    m = rx.recv() => match m {
                        Some(FromReader::Send(b)) => batch.push(b),
                        Some(FromReader::Closed(end)) => closed = Some(end),
                        None => return End::ClientGone("reader ended".into()),
                    },
                    _ = shutdown.cancelled() => return End::Shutdown,
                }
            }
            if closed.is_none() {
                continue;
            }
        }
        if let Some(end) = closed {
            // Send what is queued, the close echo included, then stop.
            let _ = write_all(wr, &batch, Duration::from_secs(1)).await;
            return end;
        }
        tokio::select! {
            r = write_all(wr, &batch, cfg.stall_timeout) => if let Err(end) = r { return end },
            _ = shutdown.cancelled() => return End::ShutdownMidWrite,
        }
        batch.clear();
    }
}

/// Writes every frame of `batch` with vectored writes, up to `MAX_IOV` frames per call. A
/// socket that accepts nothing for `stall` ends the connection: the viewer stopped reading.
async fn write_all(wr: &OwnedWriteHalf, batch: &[Bytes], stall: Duration) -> Result<(), End> {
    for group in batch.chunks(MAX_IOV) {
        let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
        for (slot, b) in iov.iter_mut().zip(group) {
            *slot = IoSlice::new(b);
        }
        let mut slices = &mut iov[..group.len()];
        while !slices.is_empty() {
            match hub::SinkWrite::try_write_vectored(wr, slices) {
                Ok(0) => return Err(End::ClientGone("socket closed".into())),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    match tokio::time::timeout(stall, wr.writable()).await {
                        Err(_) => return Err(End::Stalled(stall)),
                        Ok(Err(e)) => return Err(End::WriteError(e)),
                        Ok(Ok(())) => {}
                    }
                }
                Err(e) => return Err(End::WriteError(e)),
            }
        }
    }
    Ok(())
}

async fn read_loop(
    rd: impl AsyncRead + Unpin,
    tx: mpsc::Sender<FromReader>,
    stop: CancellationToken,
) {
    // Writes go through our own pre-framed path; obligated replies (pong, close echo) come back
    // through `read_frame`'s callback, so the split's write half is never used.
    let (mut ws, _) = fastwebsockets::after_handshake_split(rd, tokio::io::sink(), Role::Server);
    ws.set_max_message_size(MAX_CLIENT_MESSAGE);
    let obligated_tx = tx.clone();
    let mut send_obligated = move |f| {
        let tx = obligated_tx.clone();
        let bytes = frame::control(f);
        async move {
            tx.send(FromReader::Send(bytes))
                .await
                .map_err(|_| "writer gone")
        }
    };
    let end = loop {
        let frame = tokio::select! {
            f = ws.read_frame(&mut send_obligated) => f,
            _ = stop.cancelled() => return,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(WebSocketError::ConnectionClosed | WebSocketError::UnexpectedEOF) => {
                break End::ClientGone("connection closed without a close frame".into());
            }
            Err(e) => break End::Protocol(e.to_string()),
        };
        match frame.opcode {
            OpCode::Close => break End::ClientClosed,
            OpCode::Binary => {
                if let Some(reply) = handle_client_message(&frame.payload)
                    && tx.send(FromReader::Send(reply)).await.is_err()
                {
                    return;
                }
            }
            OpCode::Text => break End::Protocol("text frames are not part of the protocol".into()),
            _ => {}
        }
    };
    let _ = tx.send(FromReader::Closed(end)).await;
}

/// Handles one message from a viewer; returns a reply to send, if any.
fn handle_client_message(buf: &[u8]) -> Option<Bytes> {
    let t1 = now_us();
    match Message::decode(buf) {
        Ok(Message::TimeSyncRequest(req)) => {
            frame::message(&Message::TimeSyncResponse(TimeSyncResponse {
                t0: req.t0,
                t1,
                t2: now_us(),
            }))
            .ok()
        }
        Ok(Message::ViewerStats(stats)) => {
            tracing::trace!(?stats, "viewer stats");
            None
        }
        Ok(Message::Control(c)) => {
            tracing::debug!(?c, "viewer control");
            None
        }
        Ok(other) => {
            tracing::debug!(
                kind = other.kind_name(),
                "ignoring unexpected message from viewer"
            );
            None
        }
        Err(e) => {
            tracing::info!(error = %e, "undecodable message from viewer");
            None
        }
    }
}
