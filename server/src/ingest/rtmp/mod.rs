//! RTMP ingest, on rml_rtmp's sans-IO handshake and server session.
//!
//! rml_rtmp is dormant and knows nothing of Enhanced RTMP, so it stays behind this module: it
//! does the handshake, chunking and commands, and hands us FLV tag bodies, which
//! `onair_protocol::flv` parses (ex-header included).
//!
//! Where rml_rtmp falls short on hostile input, [`chunks::ChunkCheck`] reads the same bytes
//! first and refuses, with a clear error, what its session could not take (interleaved chunk
//! streams, bad chunk sizes, deep AMF): no panic is reached, so none is caught.
//!
//! rml_rtmp reserves a message's declared length (at most 16 MiB, the 24-bit RTMP maximum) up
//! front, and the check lets only one message be unfinished at a time, which bounds a publisher
//! connection's buffers at about twice that.

pub mod chunks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rml_rtmp::chunk_io::ChunkSerializer;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::messages::RtmpMessage;
use rml_rtmp::rml_amf0::Amf0Value;
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{IngestError, MediaIngest};
use crate::config::Config;
use crate::hub::{Hub, PublishError, PublisherInfo};

/// Our outbound chunk size. Larger chunks mean fewer headers; OBS and ffmpeg use 4096 too.
const OUT_CHUNK_SIZE: u32 = 4096;
/// rml_rtmp numbers message streams from 1 and OBS/ffmpeg create exactly one to publish on.
const PUBLISH_STREAM_ID: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RtmpError {
    #[error("not an RTMP client (handshake failed: {0})")]
    Handshake(String),
    #[error("connection closed during the handshake after {0} bytes")]
    TruncatedHandshake(usize),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("RTMP protocol error: {0}")]
    Session(String),
    #[error("unknown RTMP app {0:?}")]
    UnknownApp(String),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("unauthorized: {0}")]
    Unauthorized(crate::auth::Refusal),
    #[error(transparent)]
    Chunks(#[from] chunks::ChunkError),
    #[error("RTMP playback is not offered; watch over WebSocket or HLS")]
    Play,
    #[error("{0}")]
    Ingest(#[from] IngestError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl RtmpError {
    /// The `kind` label of `onair_ingest_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            RtmpError::Handshake(_) | RtmpError::TruncatedHandshake(_) => "handshake",
            RtmpError::Timeout(_) => "timeout",
            RtmpError::Session(_) | RtmpError::Chunks(_) => "protocol",
            RtmpError::UnknownApp(_)
            | RtmpError::Publish(_)
            | RtmpError::Unauthorized(_)
            | RtmpError::Play => "refused",
            RtmpError::Ingest(_) => "media",
            RtmpError::Io(_) => "io",
        }
    }

    /// The onStatus (code, description) to send the client before closing, if any.
    fn status(&self, app: &str) -> Option<(&'static str, String)> {
        Some(match self {
            RtmpError::UnknownApp(a) => (
                "NetConnection.Connect.Rejected",
                format!("unknown app {a:?}: publish to rtmp://HOST/{app}/STREAM"),
            ),
            RtmpError::Publish(PublishError::AlreadyLive(_)) => {
                ("NetStream.Publish.BadName", self.to_string())
            }
            RtmpError::Publish(_) => ("NetStream.Publish.Rejected", self.to_string()),
            // What OBS shows for a wrong stream key.
            RtmpError::Unauthorized(_) => ("NetStream.Publish.BadName", self.to_string()),
            RtmpError::Play => ("NetStream.Play.Failed", self.to_string()),
            RtmpError::Chunks(_) => ("NetConnection.Connect.Rejected", self.to_string()),
            RtmpError::Ingest(e) if e.is_unsupported_codec() => (
                "NetStream.Publish.Rejected",
                format!("{e}; onair carries H.264 video and AAC audio"),
            ),
            RtmpError::Ingest(e) => ("NetStream.Publish.Rejected", e.to_string()),
            _ => return None,
        })
    }
}

/// Accepts RTMP connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    cfg: Arc<Config>,
    limits: Arc<crate::limits::Limits>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            c = crate::net::accept(&listener, "rtmp") => c,
            _ = shutdown.cancelled() => return,
        };
        let Some(slot) = limits.admit(peer, "rtmp") else {
            continue;
        };
        let (hub, cfg, shutdown) = (hub.clone(), cfg.clone(), shutdown.clone());
        let span = tracing::info_span!("publish", %peer, stream = tracing::field::Empty);
        tracker.spawn(
            async move {
                match connection(tcp, peer, hub, &cfg, &slot, shutdown).await {
                    Ok(()) => tracing::info!("rtmp connection closed"),
                    Err(e) => {
                        crate::metrics::ingest_error("rtmp", e.kind());
                        tracing::warn!(error = %e, "rtmp connection refused or failed");
                    }
                }
            }
            .instrument(span),
        );
    }
}

async fn connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    cfg: &Config,
    slot: &crate::limits::Slot,
    shutdown: CancellationToken,
) -> Result<(), RtmpError> {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + cfg.rtmp_handshake_timeout;

    let mut handshake = Handshake::new(PeerType::Server);
    let mut received = 0;
    let remaining = loop {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .map_err(|_| RtmpError::Timeout("waiting for the RTMP handshake"))??;
        if n == 0 {
            return Err(RtmpError::TruncatedHandshake(received));
        }
        received += n;
        match handshake
            .process_bytes(&buf[..n])
            .map_err(|e| RtmpError::Handshake(format!("{:?}", e)))?
        {
            HandshakeProcessResult::InProgress { response_bytes } => {
                tokio::time::timeout_at(deadline, tcp.write_all(&response_bytes))
                    .await
                    .map_err(|_| RtmpError::Timeout("writing the RTMP handshake"))??;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                tokio::time::timeout_at(deadline, tcp.write_all(&response_bytes))
                    .await
                    .map_err(|_| RtmpError::Timeout("writing the RTMP handshake"))??;
                break remaining_bytes;
            }
        }
    };

    let mut config = ServerSessionConfig::new();
    config.chunk_size = OUT_CHUNK_SIZE;
    let (session, initial) =
        ServerSession::new(config).map_err(|e| RtmpError::Session(e.to_string()))?;
    let mut conn = Conn {
        session,
        out: Vec::new(),
        hub,
        peer,
        cfg,
        ingest: None,
        pending: None,
        slot,
        guard: chunks::ChunkCheck::default(),
        finished: false,
    };
    let mut result = conn.handle(initial);
    if result.is_ok() {
        result = conn.input(&remaining);
    }
    loop {
        if result.is_ok()
            && let Some(p) = conn.pending.take()
        {
            result = conn.admit(p).await;
        }
        if let Err(e) = result {
            if let Some((code, description)) = e.status(&cfg.rtmp_app) {
                conn.out.extend(status_packet("error", code, &description));
            }
            // Best effort: the client may already be gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&conn.out)).await;
            return Err(e);
        }
        if !conn.out.is_empty() {
            // A publisher that does not read what we send (acknowledgements, status) is gone.
            tokio::time::timeout(cfg.rtmp_idle_timeout, tcp.write_all(&conn.out))
                .await
                .map_err(|_| RtmpError::Timeout("writing to the publisher"))??;
            conn.out.clear();
        }
        let wait = if conn.ingest.is_some() || conn.finished {
            Instant::now() + cfg.rtmp_idle_timeout
        } else {
            deadline
        };
        let n = tokio::select! {
            r = tokio::time::timeout_at(wait, tcp.read(&mut buf)) => match r {
                Ok(r) => r?,
                Err(_) if conn.ingest.is_some() => return Err(RtmpError::Timeout("waiting for media from the publisher")),
                Err(_) => return Err(RtmpError::Timeout("waiting for connect and publish")),
            },
            _ = async {
                match &conn.ingest {
                    Some(ingest) => ingest.removed().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!("publisher removed by an operator");
                let bye = status_packet("error", "NetStream.Publish.Denied", "removed by the server's operator");
                let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&bye)).await;
                return Ok(());
            }
            _ = shutdown.cancelled() => {
                let bye = status_packet("status", "NetStream.Unpublish.Success", "server shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&bye)).await;
                return Ok(());
            }
        };
        if n == 0 {
            if let Some(ingest) = &conn.ingest {
                tracing::info!(stream = ingest.name(), "publisher disconnected");
            }
            return Ok(());
        }
        result = conn.input(&buf[..n]);
    }
}

struct Conn<'a> {
    session: ServerSession,
    out: Vec<u8>,
    hub: Arc<Hub>,
    peer: SocketAddr,
    cfg: &'a Config,
    ingest: Option<MediaIngest>,
    guard: chunks::ChunkCheck,
    /// A publish request waiting for its credentials to be checked (which may ask the hook).
    pending: Option<Pending>,
    /// Its place in the connection limits: in its handshake until the publish is accepted.
    slot: &'a crate::limits::Slot,
    /// The publisher finished; the client is expected to close.
    finished: bool,
}

struct Pending {
    request_id: u32,
    name: String,
    token: Option<String>,
}

impl Conn<'_> {
    fn input(&mut self, bytes: &[u8]) -> Result<(), RtmpError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.guard.push(bytes)?;
        let results = self
            .session
            .handle_input(bytes)
            .map_err(|e| RtmpError::Session(e.to_string()))?;
        self.handle(results)
    }

    fn handle(&mut self, results: Vec<ServerSessionResult>) -> Result<(), RtmpError> {
        for r in results {
            match r {
                ServerSessionResult::OutboundResponse(p) => self.out.extend_from_slice(&p.bytes),
                ServerSessionResult::RaisedEvent(e) => self.event(e)?,
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        Ok(())
    }

    fn accept(&mut self, request_id: u32) -> Result<(), RtmpError> {
        let results = self
            .session
            .accept_request(request_id)
            .map_err(|e| RtmpError::Session(e.to_string()))?;
        self.handle(results)
    }

    /// Checks a publish request's credentials (perhaps asking the hook); then claims the
    /// stream and accepts.
    async fn admit(&mut self, p: Pending) -> Result<(), RtmpError> {
        let publish = crate::auth::Action::Publish;
        let token = p.token.as_deref();
        let auth = &self.cfg.auth;
        if let Err(refusal) = auth.admit(publish, &p.name, "rtmp", self.peer, token).await {
            crate::metrics::auth_refusal("publish", "rtmp", refusal.label());
            return Err(RtmpError::Unauthorized(refusal));
        }
        let publisher = self.hub.publish(
            &p.name,
            PublisherInfo {
                protocol: "rtmp",
                peer: self.peer,
                since_ms: crate::hub::now_us() / 1000,
                clock: None,
            },
        )?;
        tracing::info!("publishing");
        self.ingest = Some(MediaIngest::new(publisher));
        self.slot.handshake_done();
        self.accept(p.request_id)
    }

    fn event(&mut self, event: ServerSessionEvent) -> Result<(), RtmpError> {
        match event {
            ServerSessionEvent::ConnectionRequested {
                request_id,
                app_name,
            } => {
                if app_name != self.cfg.rtmp_app {
                    return Err(RtmpError::UnknownApp(app_name));
                }
                self.accept(request_id)
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                stream_key,
                ..
            } => {
                if self.ingest.is_some() || self.pending.is_some() {
                    return Err(RtmpError::Session(
                        "second publish on one connection".into(),
                    ));
                }
                // The key is `NAME` or `NAME?token=...` (OBS's Stream Key field takes either).
                let (name, token) = crate::auth::split_stream_key(&stream_key);
                tracing::Span::current().record("stream", name);
                // Answered once its credentials are checked: see `admit`.
                self.pending = Some(Pending {
                    request_id,
                    name: name.to_string(),
                    token,
                });
                Ok(())
            }
            ServerSessionEvent::PlayStreamRequested { .. } => Err(RtmpError::Play),
            ServerSessionEvent::PublishStreamFinished { .. } => {
                if let Some(ingest) = self.ingest.take() {
                    tracing::info!(stream = ingest.name(), "publisher finished");
                    self.finished = true;
                }
                Ok(())
            }
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                if let Some(ingest) = &mut self.ingest {
                    tracing::info!(
                        encoder = metadata.encoder.as_deref().unwrap_or("?"),
                        video_codec_id = ?metadata.video_codec_id,
                        audio_codec_id = ?metadata.audio_codec_id,
                        "metadata"
                    );
                    if metadata.video_codec_id.is_some() {
                        ingest.expect_video();
                    }
                    let tracks: Vec<(u8, super::TrackMeta)> = metadata
                        .video_track_id_info_map
                        .iter()
                        .filter_map(|(id, p)| {
                            let name = p.get("name").cloned().and_then(|v| v.get_string());
                            let rate = p.get("videodatarate").cloned().and_then(|v| v.get_number());
                            Some((id.parse().ok()?, super::TrackMeta::new(name, rate)))
                        })
                        .take(super::MAX_EXTRA_TRACKS + 1)
                        .collect();
                    if !tracks.is_empty() {
                        tracing::info!(?tracks, "metadata: videoTrackIdInfoMap");
                        ingest.set_track_meta(tracks);
                    }
                }
                Ok(())
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => self.video(data, timestamp),
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => self.audio(data, timestamp),
            _ => Ok(()),
        }
    }

    fn video(&mut self, data: Bytes, ts: RtmpTimestamp) -> Result<(), RtmpError> {
        let Some(ingest) = &mut self.ingest else {
            return Ok(()); // media before publish: rml_rtmp only raises it for publishing streams
        };
        Ok(ingest.flv_video(&data, ts.value)?)
    }

    fn audio(&mut self, data: Bytes, ts: RtmpTimestamp) -> Result<(), RtmpError> {
        let Some(ingest) = &mut self.ingest else {
            return Ok(());
        };
        Ok(ingest.flv_audio(&data, ts.value)?)
    }
}

/// An onStatus command on the publish stream, sent just before we close the connection.
///
/// rml_rtmp has no API for a status of our own after a publish was accepted, so this uses a
/// separate serializer with an uncompressed (type 0) chunk header: the peer needs no earlier
/// header to read it, and we send nothing after it.
fn status_packet(level: &str, code: &str, description: &str) -> Vec<u8> {
    let mut props = std::collections::HashMap::new();
    props.insert("level".to_string(), Amf0Value::Utf8String(level.into()));
    props.insert("code".to_string(), Amf0Value::Utf8String(code.into()));
    props.insert(
        "description".to_string(),
        Amf0Value::Utf8String(description.into()),
    );
    let message = RtmpMessage::Amf0Command {
        command_name: "onStatus".into(),
        transaction_id: 0.0,
        command_object: Amf0Value::Null,
        additional_arguments: vec![Amf0Value::Object(props)],
    };
    let mut serializer = ChunkSerializer::new();
    // The peer already knows our chunk size from the session; only our serializer needs it.
    let _ = serializer.set_max_chunk_size(OUT_CHUNK_SIZE, RtmpTimestamp::new(0));
    message
        .into_message_payload(RtmpTimestamp::new(0), PUBLISH_STREAM_ID)
        .ok()
        .and_then(|p| serializer.serialize(&p, true, false).ok())
        .map(|p| p.bytes)
        .unwrap_or_default()
}
