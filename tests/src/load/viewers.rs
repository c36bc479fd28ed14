//! Load-test viewers: many WebSocket clients in one process, each a task that reads frames with
//! fastwebsockets and records what the benchmark reports. Cheap per frame: no allocation, one
//! clock read, latencies pushed into a preallocated vector.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use http_body_util::Empty;
use onair_protocol::flv::{VideoTag, parse_video};
use onair_protocol::wire::{Control, Message, Receipt, StatusCode, framed_len};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::flv::{self, TAG_VIDEO};
use super::source::find_stamp;
use crate::unix_us;

/// What the viewers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// onair's framed protocol at `/ws/STREAM`.
    Onair,
    /// WS-FLV, as node-media-server serves at `/live/STREAM.flv`.
    WsFlv,
}

/// State shared by all viewers of a run.
pub struct Shared {
    pub proto: Proto,
    pub addr: String,
    /// Request paths, taken in turn: viewer `i` asks for `paths[i % paths.len()]`. An onair
    /// viewer sends receipts when the server asks for them, as onair's player does.
    pub paths: Vec<String>,
    /// Record latencies, bytes and losses only while set: the steady window.
    pub recording: AtomicBool,
    pub stop: CancellationToken,
    /// Viewers that have their first video frame, and a wake-up when it changes.
    pub started: AtomicUsize,
    pub progress: Notify,
}

impl Shared {
    fn first_frame(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.progress.notify_waiters();
    }
}

/// What one viewer saw.
#[derive(Debug, Default)]
pub struct ViewerStats {
    pub error: Option<String>,
    /// Connect start to the first video frame.
    pub ttff_us: Option<u64>,
    pub first_video_key: Option<bool>,
    /// While recording:
    pub bytes: u64,
    pub video_frames: u64,
    pub lost: u64,
    pub unstamped: u64,
    /// Server ingest → receipt (onair's header); µs.
    pub delivery_us: Vec<u32>,
    /// Publisher stamp → receipt (SEI); µs.
    pub e2e_us: Vec<u32>,
    /// Any time:
    pub skips: u64,
    last_seq: Option<u64>,
}

impl ViewerStats {
    /// Records a video frame; returns whether it was this viewer's first.
    fn on_video(
        &mut self,
        started: Instant,
        key: bool,
        avcc: &[u8],
        ingest_us: Option<u64>,
        recording: bool,
    ) -> bool {
        let now = unix_us(SystemTime::now());
        let first = self.first_video_key.is_none();
        if first {
            self.first_video_key = Some(key);
            self.ttff_us = Some(started.elapsed().as_micros() as u64);
        }
        let stamp = find_stamp(avcc);
        if let Some(s) = stamp {
            if recording
                && let Some(last) = self.last_seq
                && s.seq > last + 1
            {
                self.lost += s.seq - last - 1;
            }
            self.last_seq = Some(s.seq);
        }
        if !recording {
            return first;
        }
        self.video_frames += 1;
        match stamp {
            Some(s) => self
                .e2e_us
                .push(now.saturating_sub(s.wall_us).min(u32::MAX as u64) as u32),
            None => self.unstamped += 1,
        }
        if let Some(i) = ingest_us {
            self.delivery_us
                .push(now.saturating_sub(i).min(u32::MAX as u64) as u32);
        }
        first
    }
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// Runs viewer number `i` until `shared.stop`; returns what it saw.
pub async fn run(shared: Arc<Shared>, i: usize, capacity: usize) -> ViewerStats {
    let mut st = ViewerStats {
        delivery_us: Vec::with_capacity(capacity),
        e2e_us: Vec::with_capacity(capacity),
        ..Default::default()
    };
    let path = &shared.paths[i % shared.paths.len()];
    if let Err(e) = watch(&shared, path, &mut st).await {
        st.error = Some(e);
    }
    st
}

/// A WebSocket viewer connection as [`connect`] opens it.
pub type Ws = fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Opens a WebSocket to `path` on `addr` (`host:port`), from `from` when given (a loopback
/// address other than 127.0.0.1, for the per-address rules).
pub async fn connect(addr: &str, path: &str, from: Option<std::net::IpAddr>) -> Result<Ws, String> {
    let tcp = match from {
        None => TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?,
        Some(ip) => {
            let to: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
            let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            socket
                .bind((ip, 0).into())
                .map_err(|e| format!("bind {ip}: {e}"))?;
            socket
                .connect(to)
                .await
                .map_err(|e| format!("connect: {e}"))?
        }
    };
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("Host", addr)
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let (mut ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, tcp)
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    ws.set_max_message_size(64 << 20);
    Ok(ws)
}

async fn watch(shared: &Shared, path: &str, st: &mut ViewerStats) -> Result<(), String> {
    let started = Instant::now();
    let ws = connect(&shared.addr, path, None).await?;
    let (mut ws, mut wr) = ws.split(tokio::io::split);
    // Bytes of every message as the server framed them: the count a receipt carries.
    let received = Arc::new(AtomicU64::new(0));
    // How often the server asked for receipts (0: not now).
    let (receipts, mut asked) = tokio::sync::watch::channel(0u16);
    if shared.proto == Proto::Onair {
        let received = received.clone();
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            let mut tick: Option<tokio::time::Interval> = None;
            loop {
                let next = async {
                    match tick.as_mut() {
                        Some(t) => {
                            t.tick().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = asked.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let every_ms = *asked.borrow_and_update();
                        tick = (every_ms > 0).then(|| {
                            let every = std::time::Duration::from_millis(every_ms.into());
                            tokio::time::interval_at(tokio::time::Instant::now() + every, every)
                        });
                        continue;
                    }
                    _ = next => {}
                }
                let bytes = received.load(Ordering::Relaxed);
                let Ok(msg) = Message::Receipt(Receipt { bytes }).to_vec() else {
                    return;
                };
                if wr
                    .write_frame(Frame::binary(Payload::Owned(msg)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    // The server never pings, and its close ends the run: nothing to answer.
    let mut obligated = |_: Frame<'_>| async { Ok::<_, WebSocketError>(()) };
    let mut flv = flv::Reader::default();
    let stop = shared.stop.cancelled();
    tokio::pin!(stop);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stop => return Ok(()),
            f = ws.read_frame(&mut obligated) => f,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(WebSocketError::ConnectionClosed) => return Err("server closed".into()),
            Err(e) => return Err(format!("read: {e}")),
        };
        received.fetch_add(framed_len(frame.payload.len()), Ordering::Relaxed);
        let recording = shared.recording.load(Ordering::Relaxed);
        match frame.opcode {
            OpCode::Binary if frame.fin => {}
            OpCode::Close => return Err("server sent close".into()),
            OpCode::Binary | OpCode::Continuation => {
                return Err("fragmented message (neither server fragments)".into());
            }
            _ => continue,
        }
        if recording {
            st.bytes += frame.payload.len() as u64;
        }
        match shared.proto {
            Proto::Onair => match Message::decode(&frame.payload) {
                Ok(Message::Media { header, payload }) if header.track == 0 => {
                    let ingest = Some(header.ingest_us);
                    if st.on_video(started, header.keyframe, payload, ingest, recording) {
                        shared.first_frame();
                    }
                }
                Ok(Message::Status(s)) if s.code == StatusCode::Skipped => st.skips += 1,
                Ok(Message::Control(Control::Receipts { every_ms })) => {
                    receipts.send_replace(every_ms);
                }
                Ok(_) => {}
                Err(e) => return Err(format!("undecodable message: {e}")),
            },
            Proto::WsFlv => {
                let mut bad = None;
                flv.feed(&frame.payload, |kind, _ts, body| {
                    if kind != TAG_VIDEO {
                        return;
                    }
                    match parse_video(body) {
                        Ok(VideoTag::Frame { keyframe, data, .. }) => {
                            if st.on_video(started, keyframe, data, None, recording) {
                                shared.first_frame();
                            }
                        }
                        Ok(_) => {}
                        Err(e) => bad = Some(e.to_string()),
                    }
                })?;
                if let Some(e) = bad {
                    return Err(format!("bad FLV video tag: {e}"));
                }
            }
        }
    }
}
