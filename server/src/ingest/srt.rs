//! SRT ingest: a listener in live mode (srt-tokio) taking MPEG-TS with H.264 or HEVC and AAC, as OBS,
//! Larix, hardware encoders and `ffmpeg -f mpegts 'srt://HOST:8890?streamid=publish:NAME'`
//! send it.
//!
//! - The stream name comes from the streamid, in either common form: `publish:NAME` (MediaMTX;
//!   also `publish:NAME:QUERY` and `publish:NAME:USER:PASS[:QUERY]`, QUERY as in a URL, e.g.
//!   `token=T`) or SRT's access-control syntax `#!::r=NAME,m=publish` (SRS; `r=APP/NAME` with
//!   the RTMP application name is the same stream; a `token=T` key carries a token). A bare
//!   `NAME` publishes too.
//! - Everything is decided before the handshake completes, so a refusal (bad streamid, read
//!   mode, credentials, the name being published already, a missing or unexpected passphrase)
//!   reaches the caller as an SRT rejection code (ffmpeg prints "Connection setup failure").
//! - Payload: MPEG-TS, into the hub through [`super::ts::TsIngest`].
//!
//! srt-tokio announces its payload size as the handshake's MSS, and a libsrt caller then caps
//! its messages at that MSS less the headers: the default payload size (1316) would hold
//! ffmpeg to 1272-byte messages, short of the standard 1316 (seven TS packets). The listener
//! raises it to 1456, the live-mode maximum, so that callers send their 1316.
//!
//! srt-protocol 0.4.4 panics (`unimplemented!`) on some mismatched crypto handshakes: a caller
//! with a passphrase where none is set, a key size other than the one announced. The acceptor
//! refuses those combinations itself before srt-protocol sees them; the listener task is
//! restarted if it ends anyway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use srt_tokio::access::{RejectReason, ServerRejectReason};
use srt_tokio::options::{PacketSize, Passphrase};
use srt_tokio::{ConnectionRequest, SrtListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::MediaIngest;
use super::ts::TsIngest;
use crate::config::Config;
use crate::hub::{Hub, PublisherInfo, now_us};

/// The payload size announced in the handshake (see the module docs).
const PAYLOAD_SIZE: u32 = 1456;
/// A streamid longer than SRT's own bound (512) is refused.
const MAX_STREAMID: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum SrtError {
    #[error("{0}")]
    Media(#[from] super::ts::TsIngestError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("nothing received for {} s", .0.as_secs())]
    Idle(Duration),
    #[error("no keyframe in the first {} s", .0.as_secs())]
    NoKeyframe(Duration),
    #[error("removed by the server's operator")]
    Removed,
}

impl SrtError {
    fn kind(&self) -> &'static str {
        match self {
            SrtError::Media(_) => "media",
            SrtError::Io(_) => "io",
            SrtError::Idle(_) => "timeout",
            SrtError::NoKeyframe(_) => "no_idr",
            SrtError::Removed => "removed",
        }
    }
}

/// What a caller's streamid asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamId {
    pub name: String,
    pub token: Option<String>,
}

/// Why a streamid is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamIdError {
    #[error("no streamid: give ?streamid=publish:NAME")]
    Missing,
    #[error("streamid too long")]
    TooLong,
    #[error("{0}")]
    Malformed(String),
    #[error("mode {0:?}: this server takes publishers only (watch at /watch/NAME)")]
    NotPublish(String),
}

/// Parses a streamid in any of the forms the module docs list. `app` is the RTMP application
/// name, which may prefix the resource in the `#!::` form (`r=live/NAME`).
pub fn parse_streamid(raw: Option<&str>, app: &str) -> Result<StreamId, StreamIdError> {
    let raw = raw.map(str::trim).filter(|r| !r.is_empty());
    let raw = raw.ok_or(StreamIdError::Missing)?;
    if raw.len() > MAX_STREAMID {
        return Err(StreamIdError::TooLong);
    }
    if let Some(kvs) = raw.strip_prefix("#!::") {
        let (mut name, mut token, mut mode) = (None, None, None);
        for kv in kvs.split(',') {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(StreamIdError::Malformed(format!("{kv:?} is not key=value")));
            };
            match k.trim() {
                "r" => name = Some(v.trim()),
                "m" => mode = Some(v.trim()),
                "token" => token = Some(v.trim().to_string()),
                // user, session, host, type: nothing onair decides by
                _ => {}
            }
        }
        if let Some(m) = mode.filter(|m| *m != "publish") {
            return Err(StreamIdError::NotPublish(m.to_string()));
        }
        let name = name.ok_or_else(|| StreamIdError::Malformed("no r= (resource)".into()))?;
        let name = name
            .strip_prefix(app)
            .and_then(|n| n.strip_prefix('/'))
            .unwrap_or(name);
        return Ok(StreamId {
            name: name.to_string(),
            token,
        });
    }
    let parts: Vec<&str> = raw.split(':').collect();
    let (name, query) = match parts.as_slice() {
        [name] => (*name, None),
        ["publish", name] => (*name, None),
        ["publish", name, query] => (*name, Some(*query)),
        ["publish", name, _user, pass] => {
            return Ok(StreamId {
                name: name.to_string(),
                token: Some(pass.to_string()),
            });
        }
        ["publish", name, _user, _pass, query] => (*name, Some(*query)),
        [mode, ..] if *mode == "read" || *mode == "request" => {
            return Err(StreamIdError::NotPublish(mode.to_string()));
        }
        _ => {
            return Err(StreamIdError::Malformed(
                "use publish:NAME or #!::r=NAME,m=publish".into(),
            ));
        }
    };
    let token = query.and_then(|q| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
    });
    Ok(StreamId {
        name: name.to_string(),
        token,
    })
}

/// The SRT listener's UDP socket, bound before the server says it is ready.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::UdpSocket, String> {
    tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for SRT on {addr}: {e}"))
}

/// Serves the SRT listener on `socket` until shutdown.
pub fn start(
    socket: tokio::net::UdpSocket,
    hub: Arc<Hub>,
    cfg: Arc<Config>,
    limits: Arc<crate::limits::Limits>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), String> {
    let local = socket
        .local_addr()
        .map_err(|e| format!("SRT socket: {e}"))?;
    let inner = tracker.clone();
    tracker.spawn(async move {
        let mut socket = Some(socket);
        loop {
            let udp = match socket.take() {
                Some(s) => s,
                // The listener ended on its own (see the module docs): the same port again.
                None => match tokio::net::UdpSocket::bind(local).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, %local, "SRT listener: cannot bind again");
                        return;
                    }
                },
            };
            let bound = SrtListener::builder()
                .latency(cfg.srt_latency)
                .set(|o| o.sender.max_payload_size = PacketSize(PAYLOAD_SIZE.into()))
                .socket(udp)
                .bind(local)
                .await;
            let (mut listener, mut incoming) = match bound {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "SRT listener failed");
                    return;
                }
            };
            let requests = incoming.incoming();
            loop {
                let request = tokio::select! {
                    r = requests.next() => r,
                    _ = shutdown.cancelled() => {
                        listener.close().await;
                        return;
                    }
                };
                let Some(request) = request else { break };
                let (hub, cfg, limits, shutdown) =
                    (hub.clone(), cfg.clone(), limits.clone(), shutdown.clone());
                let peer = request.remote();
                let span = tracing::info_span!("ingest", protocol = "srt", %peer);
                inner.spawn(
                    async move { caller(request, peer, &hub, &cfg, &limits, &shutdown).await }
                        .instrument(span),
                );
            }
            crate::metrics::ingest_error("srt", "listener_restarted");
            tracing::error!("SRT listener ended; starting it again");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    Ok(())
}

/// Refuses a caller with `reason`, said in the log and counted.
async fn refuse(request: ConnectionRequest, reason: ServerRejectReason, why: &str) {
    tracing::warn!(why, code = reason as i32, "SRT publisher refused");
    let _ = request.reject(RejectReason::Server(reason)).await;
}

/// Decides on one caller, then serves its publish.
async fn caller(
    request: ConnectionRequest,
    peer: SocketAddr,
    hub: &Arc<Hub>,
    cfg: &Config,
    limits: &Arc<crate::limits::Limits>,
    shutdown: &CancellationToken,
) {
    let Some(slot) = limits.admit(peer, "srt") else {
        let _ = request
            .reject(RejectReason::Server(ServerRejectReason::Overload))
            .await;
        return;
    };
    let raw = request.stream_id().map(|s| s.to_string());
    let id = match parse_streamid(raw.as_deref(), &cfg.rtmp_app) {
        Ok(id) => id,
        Err(e) => {
            crate::metrics::ingest_error("srt", "bad_streamid");
            let code = match e {
                StreamIdError::NotPublish(_) => ServerRejectReason::BadMode,
                _ => ServerRejectReason::BadRequest,
            };
            return refuse(request, code, &e.to_string()).await;
        }
    };
    let publish = crate::auth::Action::Publish;
    if let Err(refusal) = cfg
        .auth
        .admit(publish, &id.name, "srt", peer, id.token.as_deref())
        .await
    {
        crate::metrics::auth_refusal("publish", "srt", refusal.label());
        let code = match refusal {
            crate::auth::Refusal::Missing => ServerRejectReason::Unauthorized,
            _ => ServerRejectReason::Forbidden,
        };
        return refuse(request, code, &format!("{}: {refusal}", id.name)).await;
    }
    // The passphrase, with the key size the caller announced (srt-protocol panics on any
    // other). A caller that does not encrypt is then refused by srt-protocol (Unsecure), one
    // with another passphrase too (BadSecret): both in the handshake.
    let keys = match &cfg.srt_passphrase {
        None => None,
        Some(p) => match Passphrase::try_from(p.clone()) {
            Ok(passphrase) => Some(srt_protocol::settings::KeySettings {
                key_size: request.key_size(),
                passphrase,
            }),
            Err(_) => return refuse(request, ServerRejectReason::InternalServerError, "").await,
        },
    };
    let info = PublisherInfo {
        protocol: "srt",
        peer,
        since_ms: now_us() / 1000,
        clock: None,
    };
    let publisher = match hub.publish(&id.name, info) {
        Ok(p) => p,
        Err(e) => {
            crate::metrics::ingest_error("srt", "refused");
            let code = match e {
                crate::hub::PublishError::BadName(_) => ServerRejectReason::BadRequest,
                crate::hub::PublishError::ShuttingDown => ServerRejectReason::Down,
                _ => ServerRejectReason::Conflict,
            };
            return refuse(request, code, &e.to_string()).await;
        }
    };
    let socket = match request.accept(keys).await {
        Ok(s) => s,
        Err(e) => {
            // A wrong passphrase ends here: srt-protocol rejects the keying material.
            crate::metrics::ingest_error("srt", "handshake");
            tracing::warn!(stream = %id.name, error = %e, "SRT handshake failed");
            return;
        }
    };
    slot.handshake_done();
    tracing::info!(stream = %id.name, "publishing (SRT)");
    let mut ts = TsIngest::new(MediaIngest::new(publisher));
    let end = run(&mut ts, socket, cfg, shutdown).await;
    tracing::info!(
        stream = %id.name,
        video_frames = ts.video_frames(),
        stats = ?ts.stats(),
        "SRT publish ended"
    );
    match end {
        Ok(()) => tracing::info!(stream = %id.name, "SRT publisher left"),
        Err(e) => {
            crate::metrics::ingest_error("srt", e.kind());
            tracing::warn!(stream = %id.name, error = %e, "SRT publisher ended");
        }
    }
}

/// Reads one publisher's SRT messages into `ts` until it leaves, fails or times out.
async fn run(
    ts: &mut TsIngest,
    mut socket: srt_tokio::SrtSocket,
    cfg: &Config,
    shutdown: &CancellationToken,
) -> Result<(), SrtError> {
    let keyframe_deadline = tokio::time::Instant::now() + cfg.ingest_idr_timeout;
    let mut first = true;
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout(cfg.rtmp_idle_timeout, socket.next()) => match r {
                Ok(r) => r,
                Err(_) => return Err(SrtError::Idle(cfg.rtmp_idle_timeout)),
            },
            _ = tokio::time::sleep_until(keyframe_deadline), if !ts.got_keyframe() => {
                return Err(SrtError::NoKeyframe(cfg.ingest_idr_timeout));
            }
            _ = ts.removed() => return Err(SrtError::Removed),
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Some(message) = next else {
            return Ok(ts.finish()?);
        };
        let (_, bytes) = message?;
        if std::mem::take(&mut first) {
            // ffmpeg and OBS send seven TS packets (1316 bytes) a message.
            tracing::info!(bytes = bytes.len(), "first SRT message");
        }
        ts.push(&bytes)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, token: Option<&str>) -> Result<StreamId, StreamIdError> {
        Ok(StreamId {
            name: name.into(),
            token: token.map(Into::into),
        })
    }

    #[test]
    fn both_streamid_forms_and_their_tokens() {
        let p = |s| parse_streamid(Some(s), "live");
        assert_eq!(p("publish:cam"), id("cam", None));
        assert_eq!(p("publish:cam:token=abc"), id("cam", Some("abc")));
        assert_eq!(p("publish:cam:user:pass"), id("cam", Some("pass")));
        assert_eq!(p("publish:cam:u:p:token=t%20x"), id("cam", Some("t x")));
        assert_eq!(p("cam"), id("cam", None));
        assert_eq!(p("#!::r=cam,m=publish"), id("cam", None));
        assert_eq!(p("#!::r=live/cam,m=publish,token=k"), id("cam", Some("k")));
        assert_eq!(p("#!::m=publish,u=alice,r=cam"), id("cam", None));
        assert!(matches!(p("read:cam"), Err(StreamIdError::NotPublish(_))));
        assert!(matches!(
            p("#!::r=cam,m=request"),
            Err(StreamIdError::NotPublish(_))
        ));
        assert!(matches!(p("#!::r"), Err(StreamIdError::Malformed(_))));
        assert!(matches!(
            p("#!::m=publish"),
            Err(StreamIdError::Malformed(_))
        ));
        assert!(matches!(p("a:b:c:d:e:f"), Err(StreamIdError::Malformed(_))));
        assert_eq!(parse_streamid(None, "live"), Err(StreamIdError::Missing));
        assert_eq!(
            parse_streamid(Some("  "), "live"),
            Err(StreamIdError::Missing)
        );
        let long = "x".repeat(MAX_STREAMID + 1);
        assert_eq!(p(&long), Err(StreamIdError::TooLong));
    }
}
