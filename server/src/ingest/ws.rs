//! Raw H.264 pushed over a WebSocket: `ws://HOST:8080/ingest/STREAM[?fps=30]`, binary messages
//! of Annex B bytes in any chunking (a NAL may span messages, a message may hold many).
//!
//! The stream is claimed before the upgrade, so a name already live is refused with an HTTP
//! error a client can read. A message's fragments go to the Annex B reader as they come, never
//! reassembled: memory per publisher is one frame's payload (at most [`MAX_FRAME`]) and the
//! access unit being gathered (bounded in `raw`), however long a fragmented message runs. Bad input closes the connection with a reason (1003 for bytes that
//! are not H.264, 1008 for a stream without an IDR); nothing else on the server is touched.

use std::time::Duration;

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fastwebsockets::{Frame, OpCode, WebSocket};
use tracing::Instrument;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::MediaIngest;
use super::raw::{RawError, RawH264};
use crate::config::Config;
use crate::hub::{Hub, PublishError, PublisherInfo, now_us};
use crate::net::Peer;

/// What the push endpoint needs of the server.
#[derive(Clone)]
pub struct PushContext {
    pub hub: Arc<Hub>,
    pub cfg: Arc<Config>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// HTTP CMAF pushes under way (`super::cmaf`).
    pub pushes: Arc<super::cmaf::Pushes>,
}

/// Largest WebSocket frame taken (a message may be any number of them): far more than any
/// chunking needs, and a bound on a publisher's read buffer.
const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Default, serde::Deserialize)]
pub struct PushQuery {
    /// Frame rate to stamp frames with (raw H.264 has no timestamps).
    fps: Option<f64>,
    /// The stream's publish key or a publish token, where publishing needs one.
    token: Option<String>,
}

pub async fn push(
    State(app): State<PushContext>,
    Path(stream): Path<String>,
    Query(q): Query<PushQuery>,
    Extension(Peer(peer)): Extension<Peer>,
    Extension(slot): Extension<crate::limits::ConnSlot>,
    mut req: Request,
) -> Response {
    if let Some(refused) = crate::net::refuse_upgrade(&req, &stream, "raw H.264 (Annex B) ingest") {
        return refused;
    }
    if let Err(origin) = crate::net::check_origin(req.headers(), &app.cfg.allowed_origins, false) {
        tracing::warn!(%peer, %origin, stream, "ingest refused: origin not allowed");
        crate::metrics::ingest_error("ws", "refused");
        return (
            StatusCode::FORBIDDEN,
            format!("403: origin {origin} may not publish here\n"),
        )
            .into_response();
    }
    let publish = crate::auth::Action::Publish;
    let token = q.token.as_deref();
    if let Err(refusal) = app
        .cfg
        .auth
        .admit(publish, &stream, "ws", peer, token)
        .await
    {
        return crate::net::refuse_credentials(&refusal, publish, "ws", peer, &stream);
    }
    if q.fps
        .is_some_and(|f| !(f.is_finite() && f > 0.0 && f <= 1000.0))
    {
        return (StatusCode::BAD_REQUEST, "fps must be between 0 and 1000\n").into_response();
    }
    let info = PublisherInfo {
        protocol: "ws",
        peer,
        since_ms: now_us() / 1000,
        clock: None,
    };
    let publisher = match app.hub.publish(&stream, info) {
        Ok(p) => p,
        Err(e) => {
            let status = match e {
                PublishError::AlreadyLive(_) => StatusCode::CONFLICT,
                PublishError::BadName(_) => StatusCode::BAD_REQUEST,
                PublishError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            };
            crate::metrics::ingest_error("ws", "refused");
            return (status, format!("{e}\n")).into_response();
        }
    };
    let (response, upgrade) = match crate::net::upgrade(&mut req) {
        Ok(x) => x,
        Err(refused) => return *refused,
    };
    let raw = RawH264::new(
        MediaIngest::new(publisher),
        q.fps,
        app.cfg.ingest_idr_timeout,
    );
    let span = tracing::info_span!("ingest", protocol = "ws", stream = %stream, %peer);
    let (idle, shutdown) = (app.cfg.rtmp_idle_timeout, app.shutdown.clone());
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
            tracing::info!("publishing");
            let mut ws = ws;
            ws.set_max_message_size(MAX_FRAME);
            let (code, reason) = match run(&mut ws, raw, idle, shutdown).await {
                Ok(()) => {
                    tracing::info!("publisher finished");
                    return;
                }
                Err(End::Shutdown) => (1001, "server shutting down".to_string()),
                Err(End::Removed) => (1008, "removed by the server's operator".to_string()),
                Err(End::Client(e)) => {
                    tracing::info!(error = %e, "publisher gone");
                    return;
                }
                Err(End::Raw(e)) => {
                    crate::metrics::ingest_error("ws", e.kind());
                    tracing::warn!(error = %e, "raw H.264 refused");
                    let code = if matches!(e, RawError::AnnexB(_) | RawError::Text) {
                        1003
                    } else {
                        1008
                    };
                    (code, e.to_string())
                }
            };
            let mut end = reason.len().min(123);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            let close = Frame::close(code, &reason.as_bytes()[..end]);
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.write_frame(close)).await;
        }
        .instrument(span),
    );
    response.into_response()
}

enum End {
    Shutdown,
    Removed,
    Client(String),
    Raw(RawError),
}

async fn run<S>(
    ws: &mut WebSocket<S>,
    mut raw: RawH264,
    idle: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), End>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        // Only terminal branches may interrupt `read_frame`: it is not cancel-safe (a frame
        // header half read would be lost), so nothing periodic is selected beside it.
        let idr_deadline = raw.idr_deadline();
        let frame = tokio::select! {
            f = tokio::time::timeout(idle, ws.read_frame()) => match f {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => return Err(End::Client(e.to_string())),
                Err(_) => return Err(End::Client(format!("nothing for {} s", idle.as_secs()))),
            },
            _ = tokio::time::sleep_until(idr_deadline.unwrap_or_else(tokio::time::Instant::now)),
                if idr_deadline.is_some() => return Err(End::Raw(raw.no_idr())),
            _ = raw.removed() => return Err(End::Removed),
            _ = shutdown.cancelled() => return Err(End::Shutdown),
        };
        match frame.opcode {
            // A fragment of a text message starts with a Text frame, refused below, so every
            // continuation here belongs to a binary message.
            OpCode::Binary | OpCode::Continuation => raw.push(&frame.payload).map_err(End::Raw)?,
            OpCode::Close => {
                raw.finish().map_err(End::Raw)?;
                return Ok(());
            }
            OpCode::Text => return Err(End::Raw(RawError::Text)),
            _ => {}
        }
    }
}
