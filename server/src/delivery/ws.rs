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
use std::time::{Duration, Instant};

use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fastwebsockets::{OpCode, Role, WebSocketError};
use hyper_util::rt::TokioIo;
use onair_protocol::codec::Decodes;
use onair_protocol::wire::{
    self, Control, Hello, Message, ServerStats, TimeSyncResponse, ViewerStats,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::abr::{self, Auto};
use super::framing as frame;
use super::http::{App, Peer};
use crate::hub::fanout::MAX_IOV;
use crate::hub::follow::Preference;
use crate::hub::{self, Follow, Sink, Stream, SwitchReason, ViewerState, now_us};
use crate::metrics::{DisconnectReason, METRICS};

/// Bytes per write batch. The socket takes about [`VIEWER_NOTSENT_LOWAT`] plus a segment per
/// call anyway, so a bigger batch would not save calls; a smaller one lets a move decided while
/// a slow viewer is writing start sooner (it starts at the first keyframe after the batch).
const MAX_BATCH_BYTES: usize = 64 << 10;
/// Largest message a viewer may send us. Ours are tens of bytes; this bounds the read buffer.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Unsent bytes a viewer's socket may hold in the kernel (`TCP_NOTSENT_LOWAT`). Left to the
/// default, a socket buffers seconds of a slow viewer's stream where the server cannot see
/// it; with this bound the backlog stays in the rendition's log, where the keyframe skip and
/// the automatic rendition choice see it. Bytes in flight (the link's bandwidth-delay
/// product) are not limited by it.
pub(super) const VIEWER_NOTSENT_LOWAT: u32 = 16 * 1024;

/// Close codes (RFC 6455 7.4.1 and the private range).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_POLICY: u16 = 1008;
/// An operator removed this viewer: players do not reconnect after it (docs/protocol.md).
pub const CLOSE_REMOVED: u16 = 4001;

/// Messages a viewer may send: a steady 20 per second, in bursts of up to 40 (its time sync at
/// connect is 5, then 1 report and 4 receipts a second). Past that it is flooding, and is
/// closed.
const MESSAGE_RATE: f64 = 20.0;
const MESSAGE_BURST: f64 = 40.0;
/// Largest latency or buffer a report may claim: an hour. Anything more is a broken or hostile
/// client, and would poison the stream's aggregates.
const MAX_REPORTED_MS: u32 = 3_600_000;

#[derive(Debug, Default, serde::Deserialize)]
pub struct PlayQuery {
    /// A rendition by name, or `auto` (the default): the server chooses.
    rendition: Option<String>,
    /// A play token, where the stream needs one.
    token: Option<String>,
    /// The video codecs the player decodes, by family (`avc1,hvc1,av01,vp09`); every one when
    /// it does not say.
    codecs: Option<String>,
}

impl PlayQuery {
    fn decodes(&self) -> Decodes {
        self.codecs
            .as_deref()
            .map_or(Decodes::ALL, Decodes::parse_list)
    }

    fn preference(&self) -> Preference {
        match self.rendition.as_deref() {
            None | Some("auto") | Some("") => Preference::Auto,
            Some(name) => Preference::Pinned(name.to_string()),
        }
    }
}

pub async fn play(
    State(app): State<App>,
    Path(stream): Path<String>,
    Query(query): Query<PlayQuery>,
    Extension(Peer(peer)): Extension<Peer>,
    Extension(slot): Extension<crate::limits::ConnSlot>,
    mut req: Request,
) -> Response {
    if let Some(refused) = crate::net::refuse_upgrade(&req, &stream, "playing") {
        return refused;
    }
    if let Err(origin) = crate::net::check_origin(req.headers(), &app.cfg.allowed_origins, true) {
        tracing::info!(%peer, %origin, "websocket refused: origin not allowed");
        return (
            StatusCode::FORBIDDEN,
            format!("origin {origin} is not allowed\n"),
        )
            .into_response();
    }
    let play = crate::auth::Action::Play;
    let token = query.token.as_deref();
    if let Err(refusal) = app.cfg.auth.admit(play, &stream, "ws", peer, token).await {
        return crate::net::refuse_credentials(&refusal, play, "ws", peer, &stream);
    }
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (response, upgrade) = match crate::net::upgrade(&mut req) {
        Ok(x) => x,
        Err(refused) => return *refused,
    };
    let preference = query.preference();
    if let Preference::Pinned(name) = &preference
        && (name.len() > 64 || !hub::valid_stream_name(name))
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("invalid rendition name {name:?}\n"),
        )
            .into_response();
    }
    let decodes = query.decodes();
    let viewer = app.hub.subscribe(&stream, peer, &user_agent);
    let span = tracing::info_span!("viewer", stream = %stream, id = viewer.id, %peer);
    let shutdown = app.shutdown.clone();
    let cfg = app.cfg.clone();
    let memory = app.abr_memory.clone();
    app.tracker.spawn(
        async move {
            // The socket counts against the connection limit for as long as it is served.
            let _slot = slot;
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
                preference,
                decodes,
                parts.io.into_inner(),
                parts.read_buf,
                &cfg,
                &memory,
                shutdown,
            )
            .await;
            METRICS.disconnect(reason.metric());
            tracing::info!(%reason, "viewer disconnected");
        }
        .instrument(span),
    );
    response.into_response()
}

/// Why a viewer connection ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientGone(String),
    Stalled(Duration),
    /// Bytes that are not the protocol.
    Protocol(String),
    /// Well-formed messages we refuse: out-of-range reports, flooding.
    Policy(String),
    /// An operator's `DELETE /api/viewers/ID`.
    Removed,
    /// The same, and the write in flight did not finish within a second: no close frame, it
    /// would land inside a media frame.
    RemovedMidWrite,
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
            End::Policy(e) => write!(f, "refused: {e}"),
            End::Removed | End::RemovedMidWrite => write!(f, "removed by the server's operator"),
            End::Shutdown | End::ShutdownMidWrite => write!(f, "server shutting down"),
            End::WriteError(e) => write!(f, "write failed: {e}"),
        }
    }
}

impl End {
    fn metric(&self) -> DisconnectReason {
        match self {
            End::ClientClosed => DisconnectReason::ClientClosed,
            End::ClientGone(_) => DisconnectReason::ClientGone,
            End::Stalled(_) => DisconnectReason::Stalled,
            End::Protocol(_) => DisconnectReason::Protocol,
            End::Policy(_) => DisconnectReason::Refused,
            End::Removed | End::RemovedMidWrite => DisconnectReason::Kicked,
            End::Shutdown | End::ShutdownMidWrite => DisconnectReason::Shutdown,
            End::WriteError(_) => DisconnectReason::WriteError,
        }
    }
}

/// Events from the reader task to the writer.
enum FromReader {
    /// A frame to send as is (pong, close echo, time sync response).
    Send(Bytes),
    /// The viewer asked for a rendition (`SwitchRendition`).
    Prefer(Preference),
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

#[allow(clippy::too_many_arguments)]
async fn run(
    viewer: hub::Viewer,
    preference: Preference,
    decodes: Decodes,
    tcp: TcpStream,
    read_buf: Bytes,
    cfg: &crate::config::Config,
    memory: &abr::Memory,
    shutdown: CancellationToken,
) -> End {
    if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(VIEWER_NOTSENT_LOWAT) {
        tracing::warn!(error = %e, "could not bound the socket's unsent bytes");
    }
    let (rd, wr) = tcp.into_split();
    let wr = Arc::new(wr);
    let (tx, mut rx) = mpsc::channel(32);
    let reader_stop = CancellationToken::new();
    let sink = Arc::new(Sink::new(wr.clone()));
    viewer.state.attach(sink.clone());
    let reader = tokio::spawn(
        read_loop(
            std::io::Cursor::new(read_buf).chain(rd),
            tx,
            reader_stop.clone(),
            Client {
                state: viewer.state.clone(),
                stream: viewer.stream.clone(),
                budget: MESSAGE_BURST,
                refilled: std::time::Instant::now(),
            },
        )
        .in_current_span(),
    );
    let start = (preference == Preference::Auto)
        .then(|| memory.recall(viewer.state.peer.ip(), &viewer.stream.name, Instant::now()))
        .flatten();
    let (end, follow, auto) = write_loop(
        &viewer,
        preference,
        decodes,
        start.as_deref(),
        &wr,
        &sink,
        &mut rx,
        cfg,
        &shutdown,
    )
    .await;
    if let Some(follow) = &follow {
        follow.rendition().detach_sink(&sink);
        if auto {
            let evicted = memory.remember(
                viewer.state.peer.ip(),
                &viewer.stream.name,
                follow.rendition().name(),
                Instant::now(),
            );
            METRICS.abr_memory_evictions.increment(evicted as u64);
        }
    }
    reader_stop.cancel();
    let _ = reader.await;
    let close = match &end {
        End::Shutdown => Some(frame::close(CLOSE_GOING_AWAY, "server shutting down")),
        End::Protocol(e) => Some(frame::close(CLOSE_PROTOCOL, e)),
        End::Policy(e) => Some(frame::close(CLOSE_POLICY, e)),
        End::Removed => Some(frame::close(
            CLOSE_REMOVED,
            "removed by the server's operator",
        )),
        // ClientClosed: the echo was already sent. The rest: the socket is gone or unusable.
        _ => None,
    };
    if let Some(close) = close {
        let _ = write_all(&wr, &sink, &[close], Duration::from_secs(1)).await;
    }
    // Dropping the last handle on the write half shuts it down (FIN).
    end
}

/// Why a promoted viewer's task woke up.
enum Wake {
    Returned,
    /// The automatic choice decided a move.
    Move,
    Reader(Option<FromReader>),
    Renditions,
    Removed,
    Shutdown,
}

/// Applies what a viewer asked for: a rendition to pin, or the server's choice.
fn prefer(follow: &mut Follow, auto: &mut Option<Auto>, stream: &Stream, preference: Preference) {
    let is_auto = preference == Preference::Auto;
    follow.set_preference(preference);
    if is_auto {
        // Stay where it is until the server has a reason to move it.
        let here = follow.rendition().clone();
        follow.request(here, SwitchReason::Requested);
        auto.get_or_insert_with(|| Auto::new(Instant::now()));
    } else {
        *auto = None;
    }
    follow.reconcile(stream);
}

/// The next sample of a viewer on automatic, when its stream has renditions to choose from;
/// never otherwise.
async fn next_sample(auto: &Option<Auto>, stream: &Stream, tick: &mut tokio::time::Interval) {
    match auto {
        Some(a) if a.active(stream) => {
            tick.tick().await;
        }
        _ => std::future::pending().await,
    }
}

/// Samples a viewer on automatic; starts the move it decides. Returns whether it did.
fn sample(
    auto: &mut Option<Auto>,
    stream: &Stream,
    follow: &mut Follow,
    state: &ViewerState,
    promoted: bool,
) -> bool {
    let Some(a) = auto else { return false };
    match a.sample(Instant::now(), stream, follow, state, promoted) {
        Some((to, why)) => {
            follow.request(to, why);
            true
        }
        None => false,
    }
}

/// Returns why the viewer ended, where it was, and whether it was on automatic at the end.
#[allow(clippy::too_many_arguments)]
async fn write_loop(
    viewer: &hub::Viewer,
    preference: Preference,
    decodes: Decodes,
    start: Option<&str>,
    wr: &OwnedWriteHalf,
    sink: &Arc<Sink>,
    rx: &mut mpsc::Receiver<FromReader>,
    cfg: &crate::config::Config,
    shutdown: &CancellationToken,
) -> (End, Option<Follow>, bool) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_IOV);
    let hello = frame::message(&Message::Hello(Hello {
        version: wire::VERSION,
        viewer_id: viewer.id,
        server_time_us: now_us(),
        stream: &viewer.stream.name,
    }));
    match hello {
        Ok(h) => batch.push(h),
        Err(e) => return (End::Protocol(e.to_string()), None, false),
    }
    let policy = cfg.stream_settings(&viewer.stream.name);
    if policy.sync {
        // A synchronized stream: every player holds this latency exactly (docs/protocol.md).
        let sync = Control::SetTargetLatency {
            ms: policy.latency_ms,
        };
        batch.extend(frame::message(&Message::Control(sync)).ok());
    }
    let stream = viewer.stream.clone();
    let mut auto = (preference == Preference::Auto).then(|| Auto::new(Instant::now()));
    let mut follow = Follow::join(&stream, preference, start, decodes, &mut batch);
    follow.rendition().attach_sink(sink);
    viewer
        .state
        .rendition
        .store(follow.rendition().id, std::sync::atomic::Ordering::Relaxed);
    let end = write_frames(
        viewer,
        &stream,
        &mut follow,
        &mut auto,
        &mut batch,
        wr,
        sink,
        rx,
        cfg,
        shutdown,
    )
    .await;
    (end, Some(follow), auto.is_some())
}

#[allow(clippy::too_many_arguments)]
async fn write_frames(
    viewer: &hub::Viewer,
    stream: &Stream,
    follow: &mut Follow,
    auto: &mut Option<Auto>,
    batch: &mut Vec<Bytes>,
    wr: &OwnedWriteHalf,
    sink: &Arc<Sink>,
    rx: &mut mpsc::Receiver<FromReader>,
    cfg: &crate::config::Config,
    shutdown: &CancellationToken,
) -> End {
    let mut tick = tokio::time::interval(abr::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether this viewer was last asked to send receipts.
    let mut receipts = false;
    loop {
        follow.reconcile(stream);
        let wanted = auto.as_ref().is_some_and(|a| a.active(stream));
        if wanted != receipts {
            receipts = wanted;
            let every_ms = if wanted { abr::RECEIPT_EVERY_MS } else { 0 };
            batch.extend(frame::message(&Message::Control(Control::Receipts { every_ms })).ok());
        }
        let rendition = follow.rendition().clone();
        let target = follow.target().cloned();
        let notified = rendition.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let renditions_changed = stream.renditions_changed();
        tokio::pin!(renditions_changed);
        renditions_changed.as_mut().enable();

        // Everything before the cursor has been written: the rest is this viewer's backlog.
        sink.set_position(follow.cursor().next());
        let room = MAX_IOV.saturating_sub(batch.len());
        let (outcome, switched) = follow.read(Some(sink), batch, room, MAX_BATCH_BYTES);
        if outcome.skipped {
            viewer.state.count_skip();
            tracing::info!(
                skips = follow.cursor().skips,
                "viewer fell behind; skipped to the next keyframe"
            );
        }
        if let Some(s) = switched {
            if let Some(a) = auto.as_mut() {
                a.switched(follow, Instant::now());
            }
            viewer.state.count_switch(s.to, s.up, s.reason);
            tracing::info!(
                from = s.from,
                to = s.to,
                reason = s.reason.name(),
                "viewer switched rendition"
            );
            continue;
        }
        let mut closed = None;
        while batch.len() < MAX_IOV {
            match rx.try_recv() {
                Ok(FromReader::Send(b)) => batch.push(b),
                Ok(FromReader::Prefer(p)) => prefer(follow, auto, stream, p),
                Ok(FromReader::Closed(end)) => {
                    closed = Some(end);
                    break;
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() && closed.is_none() {
            if rendition.promote(sink, follow.cursor()) {
                if let Some(a) = auto.as_mut() {
                    a.caught_up();
                }
                // At the live edge: the fan-out writes for us until it hands the socket back
                // or we take it back (a sample that decides nothing leaves it there).
                let wake = loop {
                    let wake = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => Wake::Shutdown,
                        _ = viewer.state.removed() => Wake::Removed,
                        m = rx.recv() => Wake::Reader(m),
                        _ = sink.returned() => Wake::Returned,
                        _ = &mut renditions_changed => Wake::Renditions,
                        _ = next_sample(auto, stream, &mut tick) => {
                            if !sample(auto, stream, follow, &viewer.state, true) {
                                continue;
                            }
                            Wake::Move
                        }
                    };
                    break wake;
                };
                let back = sink.reclaim();
                follow.cursor_mut().resume(&back);
                let mid_frame = back.partial.is_some();
                batch.extend(back.partial);
                if let Some(e) = back.error {
                    return End::WriteError(e);
                }
                match wake {
                    Wake::Returned | Wake::Renditions | Wake::Move => {}
                    Wake::Reader(Some(FromReader::Send(b))) => batch.push(b),
                    Wake::Reader(Some(FromReader::Prefer(p))) => prefer(follow, auto, stream, p),
                    Wake::Reader(Some(FromReader::Closed(end))) => closed = Some(end),
                    Wake::Reader(None) => return End::ClientGone("reader ended".into()),
                    // Finish the frame in flight, then close.
                    Wake::Removed => closed = Some(End::Removed),
                    Wake::Shutdown if mid_frame => return End::ShutdownMidWrite,
                    Wake::Shutdown => return End::Shutdown,
                }
            } else {
                // A switch stopped at a keyframe waits for the target to reach it, too.
                let target_news = async {
                    match &target {
                        Some(t) if follow.waiting_for_target() => t.notified().await,
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = &mut notified => {}
                    _ = target_news => {}
                    _ = &mut renditions_changed => {}
                    _ = next_sample(auto, stream, &mut tick) => {
                        sample(auto, stream, follow, &viewer.state, false);
                    }
                    m = rx.recv() => match m {
                        Some(FromReader::Send(b)) => batch.push(b),
                        Some(FromReader::Prefer(p)) => prefer(follow, auto, stream, p),
                        Some(FromReader::Closed(end)) => closed = Some(end),
                        None => return End::ClientGone("reader ended".into()),
                    },
                    _ = shutdown.cancelled() => return End::Shutdown,
                    _ = viewer.state.removed() => return End::Removed,
                }
            }
            if closed.is_none() {
                continue;
            }
        }
        if let Some(end) = closed {
            // Send what is queued, the close echo included, then stop.
            let _ = write_all(wr, sink, batch, Duration::from_secs(1)).await;
            return end;
        }
        {
            let write = write_all(wr, sink, batch, cfg.stall_timeout);
            tokio::pin!(write);
            loop {
                tokio::select! {
                    r = &mut write => match r {
                        Ok(()) => break,
                        Err(end) => return end,
                    },
                    _ = shutdown.cancelled() => return End::ShutdownMidWrite,
                    _ = viewer.state.removed() => {
                        // Finish what is in flight (a slow viewer is the one an operator
                        // removes), so that the close frame with its reason can follow.
                        return match tokio::time::timeout(Duration::from_secs(1), write).await {
                            Ok(Ok(())) => End::Removed,
                            _ => End::RemovedMidWrite,
                        };
                    }
                    // A slow viewer spends its time here: sample it here too. A move decided
                    // now starts at the first keyframe after this batch.
                    _ = next_sample(auto, stream, &mut tick) => {
                        sample(auto, stream, follow, &viewer.state, false);
                    }
                }
            }
        }
        batch.clear();
    }
}

/// Writes every frame of `batch` with vectored writes, up to `MAX_IOV` frames per call. A
/// socket that accepts nothing for `stall` ends the connection: the viewer stopped reading.
async fn write_all(
    wr: &OwnedWriteHalf,
    sink: &Sink,
    batch: &[Bytes],
    stall: Duration,
) -> Result<(), End> {
    for group in batch.chunks(MAX_IOV) {
        let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
        for (slot, b) in iov.iter_mut().zip(group) {
            *slot = IoSlice::new(b);
        }
        let mut slices = &mut iov[..group.len()];
        while !slices.is_empty() {
            match hub::SinkWrite::try_write_vectored(wr, slices) {
                Ok(0) => return Err(End::ClientGone("socket closed".into())),
                Ok(n) => {
                    sink.add_sent(n);
                    IoSlice::advance_slices(&mut slices, n);
                }
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
    mut client: Client,
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
        // Every frame counts, pings too: each one costs us a write.
        if let Err(end) = client.charge() {
            break end;
        }
        match frame.opcode {
            OpCode::Close => break End::ClientClosed,
            OpCode::Binary => match client.handle(&frame.payload) {
                Ok(Some(to_writer)) => {
                    if tx.send(to_writer).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(end) => break end,
            },
            OpCode::Text => break End::Protocol("text frames are not part of the protocol".into()),
            _ => {}
        }
    };
    let _ = tx.send(FromReader::Closed(end)).await;
}

/// What the reader task needs to act on a viewer's messages.
struct Client {
    state: Arc<ViewerState>,
    stream: Arc<Stream>,
    /// Token bucket against floods.
    budget: f64,
    refilled: std::time::Instant,
}

impl Client {
    /// Takes one frame from the token bucket; a viewer out of tokens is flooding.
    fn charge(&mut self) -> Result<(), End> {
        let now = std::time::Instant::now();
        self.budget = (self.budget
            + now.duration_since(self.refilled).as_secs_f64() * MESSAGE_RATE)
            .min(MESSAGE_BURST);
        self.refilled = now;
        if self.budget < 1.0 {
            return Err(End::Policy(format!(
                "too many messages (more than {MESSAGE_RATE} a second)"
            )));
        }
        self.budget -= 1.0;
        Ok(())
    }

    /// Handles one message from the viewer; returns what the writer must do (a reply to send,
    /// a rendition to move to), if anything, or why the connection must close. A bad message
    /// never reaches shared state: it is checked whole before anything is recorded.
    fn handle(&mut self, buf: &[u8]) -> Result<Option<FromReader>, End> {
        let t1 = now_us();
        let message = Message::decode(buf)
            .map_err(|e| End::Protocol(format!("bad message from viewer: {e}")))?;
        match message {
            Message::TimeSyncRequest(req) => {
                let reply = TimeSyncResponse {
                    t0: req.t0,
                    t1,
                    t2: now_us(),
                };
                Ok(frame::message(&Message::TimeSyncResponse(reply))
                    .ok()
                    .map(FromReader::Send))
            }
            Message::ViewerStats(stats) => {
                check_report(&stats).map_err(End::Policy)?;
                self.state.set_report(stats);
                let reply = ServerStats {
                    bytes_sent: self.state.bytes_sent(),
                    send_kbps: self
                        .state
                        .send_kbps
                        .load(std::sync::atomic::Ordering::Relaxed),
                    backlog_bytes: crate::stats::backlog(&self.stream, &self.state)
                        .try_into()
                        .unwrap_or(u32::MAX),
                    keyframe_skips: u32::try_from(
                        self.state.skips.load(std::sync::atomic::Ordering::Relaxed),
                    )
                    .unwrap_or(u32::MAX),
                };
                Ok(frame::message(&Message::ServerStats(reply))
                    .ok()
                    .map(FromReader::Send))
            }
            Message::Receipt(r) => {
                // Not checked against what was sent: the count can run a write's length
                // ahead of the server's (the bytes arrive before the write call returns).
                self.state.set_receipt(r.bytes);
                Ok(None)
            }
            Message::Control(Control::SwitchRendition(r)) => {
                if r == wire::RENDITION_AUTO {
                    tracing::debug!("viewer asked for automatic renditions");
                    return Ok(Some(FromReader::Prefer(Preference::Auto)));
                }
                let Some(rendition) = self.stream.rendition(r) else {
                    return Err(End::Policy(format!("no rendition {r} on this stream")));
                };
                tracing::debug!(rendition = r, "viewer asked for a rendition");
                Ok(Some(FromReader::Prefer(Preference::Pinned(
                    rendition.name(),
                ))))
            }
            Message::Control(Control::SetTargetLatency { ms }) => {
                if ms > MAX_REPORTED_MS {
                    return Err(End::Policy(format!("target latency {ms} ms out of range")));
                }
                tracing::debug!(ms, "viewer set its target latency");
                Ok(None)
            }
            Message::Control(Control::Receipts { .. }) => Err(End::Protocol(
                "a viewer may not send control op 3 (receipts)".into(),
            )),
            other => Err(End::Protocol(format!(
                "a viewer may not send {}",
                other.kind_name()
            ))),
        }
    }
}

/// Checks a viewer report before it is recorded: a value no real player produces means a broken
/// or hostile client, and would skew the stream's latency aggregates.
///
/// The rendition a report names is not checked against the stream's: the player reports the
/// one whose init it last got, which may have just gone.
fn check_report(s: &ViewerStats) -> Result<(), String> {
    if s.state > wire::PLAYER_ERROR {
        return Err(format!("stats: unknown player state {}", s.state));
    }
    if s.latency_ms > MAX_REPORTED_MS || s.buffer_ms > MAX_REPORTED_MS {
        return Err(format!(
            "stats: latency {} ms / buffer {} ms out of range (max {MAX_REPORTED_MS})",
            s.latency_ms, s.buffer_ms
        ));
    }
    if s.dropped_frames > s.decoded_frames {
        return Err(format!(
            "stats: {} dropped frames of {} decoded",
            s.dropped_frames, s.decoded_frames
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_out_of_range_are_refused() {
        let ok = ViewerStats {
            latency_ms: 250,
            buffer_ms: 120,
            decoded_frames: 100,
            dropped_frames: 2,
            state: wire::PLAYER_PLAYING,
            ..Default::default()
        };
        assert!(check_report(&ok).is_ok());
        for bad in [
            ViewerStats { state: 9, ..ok },
            ViewerStats {
                latency_ms: u32::MAX,
                ..ok
            },
            ViewerStats {
                buffer_ms: MAX_REPORTED_MS + 1,
                ..ok
            },
            ViewerStats {
                dropped_frames: 101,
                ..ok
            },
        ] {
            assert!(check_report(&bad).is_err(), "{bad:?}");
        }
    }
}
