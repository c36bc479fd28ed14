//! HTTP CMAF push: what `ffmpeg -f dash -method PUT -streaming 1 -ldash 1 -http_persistent 1
//! http://HOST:8080/push/STREAM/manifest.mpd` sends, into the hub.
//!
//! ffmpeg PUTs, per representation, `init-stream$RepresentationID$.m4s` and then
//! `chunk-stream$RepresentationID$-$Number$.m4s` with chunked transfer: one `moof` + `mdat`
//! per frame, written as the encoder makes them, each representation on its own connection. It
//! re-PUTs the MPD every segment, DELETEs old segments, and ignores the answers.
//!
//! - A representation is named by the first run of digits in a file's name (its
//!   `$RepresentationID$` in ffmpeg's default names and in most custom ones); a file whose name
//!   starts with `init` is its init segment, any other `.m4s`/`.mp4`/`.cmf?` a media segment.
//! - A media segment's body is cut into boxes as it arrives ([`BoxSplitter`]), so each frame
//!   reaches viewers when its `mdat` is complete, long before its segment is.
//! - The first video representation is the stream's video, the first AAC one its audio; others
//!   are left out and counted (`onair_ingest_tracks_left_out_total`).
//! - A publish (a [`Session`]) starts with the first init segment and ends with ffmpeg's last
//!   MPD (`type="static"`), when nothing has arrived for the idle timeout, without a keyframe in
//!   time, on bad data, when the operator removes it, or at shutdown. An init segment for a
//!   representation that already sent media is a new publish (ffmpeg restarted).
//! - Credentials, on every request, as for every other way in: `?token=` (ffmpeg drops a query
//!   from the segments' URLs, so for ffmpeg use the next form), `Authorization: Bearer`, or
//!   the password of HTTP Basic (`http://push:KEY@HOST:8080/push/STREAM/manifest.mpd` with
//!   `-http_opts auth_type=basic`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use onair_protocol::cmaf::{BoxSplitter, CmafError, Fragments, Init, Sample, TrackMedia};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::ws::PushContext;
use super::{IngestError, MediaIngest};
use crate::hub::{PublishError, PublisherInfo, now_us};
use crate::net::Peer;

/// The `protocol` of the publisher and of metrics.
const PROTOCOL: &str = "cmaf";
/// Largest init segment or MPD taken (ffmpeg's are a few KB).
const MAX_SMALL_FILE: usize = 1 << 20;
/// Most representations one publish may announce.
const MAX_REPRESENTATIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("CMAF: {0}")]
    Cmaf(#[from] CmafError),
    #[error("{0}")]
    Ingest(#[from] IngestError),
    #[error("media segment for representation {0:?} before its init segment")]
    NoInit(String),
    #[error("more than {MAX_REPRESENTATIONS} representations")]
    TooManyRepresentations,
    #[error("{0} bytes is more than the {MAX_SMALL_FILE} an init segment or MPD may have")]
    TooLarge(usize),
}

impl PushError {
    /// The `kind` label of `onair_ingest_errors_total`.
    fn kind(&self) -> &'static str {
        match self {
            PushError::Cmaf(CmafError::BoxTooLarge { .. }) | PushError::TooLarge(_) => "oversize",
            PushError::Cmaf(_) => "bad_cmaf",
            PushError::Ingest(e) if e.is_unsupported_codec() => "unsupported",
            PushError::Ingest(_) => "media",
            PushError::NoInit(_) => "no_init",
            PushError::TooManyRepresentations => "too_many_tracks",
        }
    }
}

/// What a representation is to the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Video,
    Audio,
    LeftOut,
}

struct Representation {
    init: Init,
    role: Role,
    /// Per track, the last decode time sent, so that a segment's first traf without a `tfdt`
    /// continues the timeline.
    fragments: Fragments,
    had_media: bool,
}

/// One publish over HTTP: its hub publisher and representations. Requests hold it while they
/// run; [`supervise`] ends it.
pub struct Session {
    id: u64,
    state: Mutex<Option<SessionState>>,
    /// Requests running now, and the last time one brought bytes (ms since `started`).
    active: AtomicUsize,
    last_bytes_ms: AtomicU64,
    started: Instant,
    end: CancellationToken,
    /// Cancelled once the session let its stream go (the name can be published again).
    done: CancellationToken,
    /// Why it ended, for the requests still running.
    why: Mutex<Option<String>>,
}

struct SessionState {
    ingest: MediaIngest,
    reps: HashMap<String, Representation>,
    got_keyframe: bool,
    /// One box's samples, reused.
    samples: Vec<Sample>,
    /// Video held at the start until the audio's init segment (see [`SessionState::holds`]).
    hold: Hold,
    /// Whether the MPD lists audio (`None` before one arrived).
    mpd_has_audio: Option<bool>,
}

/// A video frame held: dts and cts in ms, keyframe, bytes.
struct Held(u32, i32, bool, bytes::Bytes);

/// The video held at the start, and whether holding is over.
#[derive(Default)]
struct Hold {
    frames: Vec<Held>,
    over: bool,
}

impl Hold {
    /// Sends the video held, in order, and holds no more.
    fn release(&mut self, ingest: &mut MediaIngest) -> Result<(), IngestError> {
        self.over = true;
        for Held(dts, cts, keyframe, data) in self.frames.drain(..) {
            ingest.video_frame(dts, cts, keyframe, &data)?;
        }
        Ok(())
    }
}

/// How long video waits at the start for the audio's init segment, ms of video, and in frames
/// at most: ffmpeg PUTs each representation's init on its own connection when its first
/// packet is encoded, so the audio's may complete after the first video fragments.
const AUDIO_WAIT_MS: u32 = 1000;
const MAX_HELD: usize = 120;

impl SessionState {
    /// Whether a video frame must wait for the audio's init segment.
    fn holds(&self) -> bool {
        !self.hold.over
            && self.mpd_has_audio != Some(false)
            && !self.reps.values().any(|r| r.role == Role::Audio)
    }

    /// Sends the video held, in order, and holds no more.
    fn release(&mut self) -> Result<(), IngestError> {
        self.hold.release(&mut self.ingest)
    }
}

impl Session {
    fn touch(&self) {
        self.last_bytes_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn stop(&self, why: String) {
        let mut w = self.why.lock();
        if w.is_none() {
            *w = Some(why);
        }
        drop(w);
        self.end.cancel();
    }

    fn gone(&self) -> Response {
        let why = self.why.lock().clone().unwrap_or_default();
        (
            StatusCode::CONFLICT,
            format!("409: this publish has ended ({why}); start again with the init segments\n"),
        )
            .into_response()
    }
}

/// A request running on a session: counted from creation to drop.
struct Active<'a>(&'a Session);

impl<'a> Active<'a> {
    fn new(session: &'a Session) -> Self {
        session.active.fetch_add(1, Ordering::Relaxed);
        Self(session)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The HTTP pushes live now, by stream.
#[derive(Default)]
pub struct Pushes {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_id: AtomicU64,
}

impl Pushes {
    fn get(&self, stream: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(stream).cloned()
    }

    /// The stream's session, or a new publish.
    fn get_or_start(
        self: &Arc<Self>,
        app: &PushContext,
        stream: &str,
        peer: SocketAddr,
    ) -> Result<Arc<Session>, Box<Response>> {
        // Under the map's lock: two representations' inits may come at once for a new
        // publish, and only one may publish.
        let mut sessions = self.sessions.lock();
        if let Some(s) = sessions.get(stream) {
            return Ok(s.clone());
        }
        let info = PublisherInfo {
            protocol: PROTOCOL,
            peer,
            since_ms: now_us() / 1000,
            clock: None,
        };
        let publisher = app.hub.publish(stream, info).map_err(|e| {
            let status = match e {
                PublishError::AlreadyLive(_) => StatusCode::CONFLICT,
                PublishError::BadName(_) => StatusCode::BAD_REQUEST,
                PublishError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            };
            crate::metrics::ingest_error(PROTOCOL, "refused");
            Box::new((status, format!("{}: {e}\n", status.as_u16())).into_response())
        })?;
        let removed = publisher.removal();
        let mut ingest = MediaIngest::new(publisher);
        // Audio waits for the video's config (as after RTMP metadata), and video at the start
        // for the audio's init segment (`SessionState::hold`).
        ingest.expect_video();
        let session = Arc::new(Session {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(Some(SessionState {
                ingest,
                reps: HashMap::new(),
                got_keyframe: false,
                samples: Vec::new(),
                hold: Hold::default(),
                mpd_has_audio: None,
            })),
            active: AtomicUsize::new(0),
            last_bytes_ms: AtomicU64::new(0),
            started: Instant::now(),
            end: CancellationToken::new(),
            done: CancellationToken::new(),
            why: Mutex::new(None),
        });
        sessions.insert(stream.to_string(), session.clone());
        drop(sessions);
        tracing::info!(stream, %peer, "publishing (HTTP CMAF push)");
        app.tracker.spawn(supervise(
            self.clone(),
            stream.to_string(),
            session.clone(),
            removed,
            app.shutdown.clone(),
            app.cfg.rtmp_idle_timeout,
            app.cfg.ingest_idr_timeout,
        ));
        Ok(session)
    }
}

/// Ends a session when it should end, then drops its publisher.
async fn supervise(
    pushes: Arc<Pushes>,
    stream: String,
    session: Arc<Session>,
    removed: CancellationToken,
    shutdown: CancellationToken,
    idle: Duration,
    idr_timeout: Duration,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = session.end.cancelled() => break,
            _ = removed.cancelled() => {
                session.stop("removed by the server's operator".into());
                break;
            }
            _ = shutdown.cancelled() => {
                session.stop("server shutting down".into());
                break;
            }
            _ = tick.tick() => {
                let since = session.started.elapsed();
                let quiet = since.saturating_sub(Duration::from_millis(
                    session.last_bytes_ms.load(Ordering::Relaxed),
                ));
                if session.active.load(Ordering::Relaxed) == 0 && quiet >= idle {
                    session.stop(format!("nothing for {} s", idle.as_secs()));
                    break;
                }
                let keyframe = session.state.lock().as_ref().is_some_and(|s| s.got_keyframe);
                if !keyframe && since >= idr_timeout {
                    crate::metrics::ingest_error(PROTOCOL, "no_keyframe");
                    session.stop(format!(
                        "no keyframe within {} s: a viewer could never start",
                        idr_timeout.as_secs()
                    ));
                    break;
                }
            }
        }
    }
    let state = session.state.lock().take();
    {
        let mut sessions = pushes.sessions.lock();
        if sessions.get(&stream).is_some_and(|s| s.id == session.id) {
            sessions.remove(&stream);
        }
    }
    let why = session.why.lock().clone().unwrap_or_default();
    drop(state); // the publisher with it: the stream goes down now
    session.done.cancel();
    tracing::info!(stream, why, "HTTP CMAF push ended");
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct PushQuery {
    token: Option<String>,
}

/// The credential of a request: `?token=`, a bearer token, or a Basic password.
fn credential(q: &PushQuery, headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    if let Some(t) = &q.token {
        return Some(t.clone());
    }
    if let Some(t) = crate::auth::bearer(headers) {
        return Some(t.to_string());
    }
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_string())
}

/// What a pushed file is, by its name.
#[derive(Debug, PartialEq, Eq)]
enum File {
    Manifest,
    Init(String),
    Media(String),
}

fn classify(name: &str) -> Option<File> {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.ends_with(".mpd") || base.ends_with(".m3u8") {
        return Some(File::Manifest);
    }
    let media_ext = [".m4s", ".mp4", ".cmfv", ".cmfa", ".m4v", ".m4a"];
    if !media_ext.iter().any(|e| base.ends_with(e)) {
        return None;
    }
    let rep: String = base
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    Some(if base.starts_with("init") {
        File::Init(rep)
    } else {
        File::Media(rep)
    })
}

/// `PUT`/`POST`/`DELETE /push/{stream}/{*file}`.
pub async fn push(
    State(app): State<PushContext>,
    Path((stream, file)): Path<(String, String)>,
    Query(q): Query<PushQuery>,
    Extension(Peer(peer)): Extension<Peer>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let publish = crate::auth::Action::Publish;
    let token = credential(&q, &headers);
    if let Err(refusal) = app
        .cfg
        .auth
        .admit(publish, &stream, PROTOCOL, peer, token.as_deref())
        .await
    {
        return crate::net::refuse_credentials(&refusal, publish, PROTOCOL, peer, &stream);
    }
    let Some(kind) = classify(&file) else {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "400: {file:?} is not an MPD, an init segment (init*.m4s) or a media segment \
                 (.m4s, .mp4, .cmfv, .cmfa)\n"
            ),
        )
            .into_response();
    };
    if method == Method::DELETE {
        return StatusCode::NO_CONTENT.into_response(); // old segments: nothing is kept
    }
    let pushes = app.pushes.clone();
    match kind {
        File::Manifest => {
            // ffmpeg's last MPD, written at the end of the stream, is a static one. It may
            // close the connection before the body's last chunk, so look as the bytes come.
            let mut seen = Vec::new();
            let mut body = body;
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if seen.len() + data.len() > MAX_SMALL_FILE {
                    return refuse(&stream, None, PushError::TooLarge(seen.len() + data.len()));
                }
                seen.extend_from_slice(&data);
                if let Some(s) = pushes.get(&stream)
                    && let Some(state) = s.state.lock().as_mut()
                    && state.mpd_has_audio.is_none()
                    && memchr::memmem::find(&seen, b"</MPD>").is_some()
                {
                    // A whole MPD: does it list an audio adaptation set?
                    state.mpd_has_audio = Some(
                        memchr::memmem::find(&seen, b"contentType=\"audio\"").is_some()
                            || memchr::memmem::find(&seen, b"mimeType=\"audio/").is_some(),
                    );
                    if state.mpd_has_audio == Some(false)
                        && !state.hold.over
                        && let Err(e) = state.release()
                    {
                        return refuse(&stream, Some(&s), e.into());
                    }
                }
                if memchr::memmem::find(&seen, b"type=\"static\"").is_some() {
                    if let Some(s) = pushes.get(&stream) {
                        s.stop("the encoder's last MPD (type=\"static\")".into());
                    }
                    break;
                }
            }
            StatusCode::NO_CONTENT.into_response()
        }
        File::Init(rep) => {
            let bytes = match read_small(body).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let init = match Init::parse(&bytes) {
                Ok(i) => i,
                Err(e) => return refuse(&stream, None, e.into()),
            };
            let mut session = match pushes.get_or_start(&app, &stream, peer) {
                Ok(s) => s,
                Err(r) => return *r,
            };
            // A representation that sent media already sends its init again: ffmpeg
            // restarted. A new publish, from a clean timeline.
            let restarted = session
                .state
                .lock()
                .as_ref()
                .is_some_and(|s| s.reps.get(&rep).is_some_and(|r| r.had_media));
            if restarted {
                session.stop("the encoder started again".into());
                session.done.cancelled().await;
                session = match pushes.get_or_start(&app, &stream, peer) {
                    Ok(s) => s,
                    Err(r) => return *r,
                };
            }
            session.touch();
            let result = {
                let mut state = session.state.lock();
                match state.as_mut() {
                    None => return session.gone(),
                    Some(state) => add_representation(state, rep, init),
                }
            };
            match result {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => refuse(&stream, Some(&session), e),
            }
        }
        File::Media(rep) => {
            let Some(session) = pushes.get(&stream) else {
                return (
                    StatusCode::CONFLICT,
                    format!(
                        "409: {stream:?} has no push under way: send the init segments first \
                         (restart the encoder)\n"
                    ),
                )
                    .into_response();
            };
            let result = {
                // Counted while it runs, also when hyper drops it (the client went away).
                let _active = Active::new(&session);
                media(&session, &rep, body, app.cfg.rtmp_idle_timeout).await
            };
            tracing::debug!(stream, file, ok = result.is_ok(), "media segment done");
            match result {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(Stop::Ended) => session.gone(),
                Err(Stop::Client(e)) => {
                    tracing::info!(stream, error = %e, "push request ended early");
                    StatusCode::BAD_REQUEST.into_response()
                }
                Err(Stop::Bad(e)) => refuse(&stream, Some(&session), e),
            }
        }
    }
}

/// A request the publish cannot go on after: said to the client, logged, counted, and the
/// publish ended.
fn refuse(stream: &str, session: Option<&Session>, e: PushError) -> Response {
    crate::metrics::ingest_error(PROTOCOL, e.kind());
    tracing::warn!(stream, error = %e, "HTTP CMAF push refused");
    if let Some(s) = session {
        s.stop(e.to_string());
    }
    (StatusCode::BAD_REQUEST, format!("400: {e}\n")).into_response()
}

async fn read_small(body: Body) -> Result<bytes::Bytes, Response> {
    let limited = http_body_util::Limited::new(body, MAX_SMALL_FILE);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            Err((status, format!("{}: {e}\n", status.as_u16())).into_response())
        }
    }
}

fn add_representation(state: &mut SessionState, rep: String, init: Init) -> Result<(), PushError> {
    if !state.reps.contains_key(&rep) && state.reps.len() >= MAX_REPRESENTATIONS {
        return Err(PushError::TooManyRepresentations);
    }
    let taken = |role| state.reps.iter().any(|(k, r)| *k != rep && r.role == role);
    let first = init.tracks.first().map(|t| t.media.clone());
    let role = match &first {
        Some(TrackMedia::Video { .. }) if !taken(Role::Video) => Role::Video,
        Some(TrackMedia::Aac { .. }) if !taken(Role::Audio) => Role::Audio,
        _ => Role::LeftOut,
    };
    match first {
        Some(TrackMedia::Video { codec, config }) if role == Role::Video => {
            state.ingest.video_config(codec, config.into())?;
        }
        Some(TrackMedia::Aac { config }) if role == Role::Audio => {
            state.ingest.audio_config(config.into())?;
        }
        _ => tracing::info!(
            stream = state.ingest.name(),
            representation = rep,
            "left out: a second video or audio representation (counted in \
             onair_ingest_tracks_left_out_total)"
        ),
    }
    state.reps.insert(
        rep,
        Representation {
            init,
            role,
            fragments: Fragments::default(),
            had_media: false,
        },
    );
    if role == Role::Audio {
        // The audio's init is here: the video held for it goes now.
        state.release()?;
    }
    Ok(())
}

enum Stop {
    /// The publish ended while the request ran.
    Ended,
    /// The client's body failed or stalled.
    Client(String),
    Bad(PushError),
}

/// Reads one media segment's body into the stream, frame by frame as its boxes complete.
async fn media(session: &Session, rep: &str, body: Body, idle: Duration) -> Result<(), Stop> {
    {
        let state = session.state.lock();
        let Some(state) = state.as_ref() else {
            return Err(Stop::Ended);
        };
        if !state.reps.contains_key(rep) {
            return Err(Stop::Bad(PushError::NoInit(rep.to_string())));
        }
    }
    let mut body = body;
    let mut splitter = BoxSplitter::default();
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(idle, body.frame()) => match f {
                Ok(Some(Ok(f))) => f,
                Ok(Some(Err(e))) => return Err(Stop::Client(e.to_string())),
                Ok(None) => break,
                Err(_) => return Err(Stop::Client(format!("nothing for {} s", idle.as_secs()))),
            },
            _ = session.end.cancelled() => return Err(Stop::Ended),
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        session.touch();
        splitter.push(&data);
        let mut guard = session.state.lock();
        let Some(state) = guard.as_mut() else {
            return Err(Stop::Ended);
        };
        feed(state, rep, &mut splitter).map_err(Stop::Bad)?;
    }
    if splitter.pending() > 0 {
        return Err(Stop::Client(format!(
            "the segment ended inside a box ({} bytes left over)",
            splitter.pending()
        )));
    }
    Ok(())
}

/// Every whole box `splitter` holds, into the stream.
fn feed(state: &mut SessionState, rep: &str, splitter: &mut BoxSplitter) -> Result<(), PushError> {
    let holds = state.holds();
    let SessionState {
        ingest,
        reps,
        got_keyframe,
        samples,
        hold,
        ..
    } = state;
    let Some(r) = reps.get_mut(rep) else {
        return Err(PushError::NoInit(rep.to_string()));
    };
    while let Some((kind, data)) = splitter.next_box()? {
        samples.clear();
        r.fragments.push_box(&r.init, kind, data, samples)?;
        for s in samples.drain(..) {
            r.had_media = true;
            let Some(track) = r.init.track(s.track_id) else {
                continue;
            };
            let to_ms = |t: i64| (t as i128 * 1000 / i128::from(track.timescale)) as i64;
            // The hub's 32-bit millisecond timeline, which MediaIngest extends past its wraps.
            let dts = to_ms(s.dts as i64) as u32;
            match (r.role, &track.media) {
                (Role::Video, TrackMedia::Video { .. }) => {
                    let cts = i32::try_from(to_ms(s.cts)).unwrap_or(i32::MAX);
                    *got_keyframe |= s.keyframe;
                    if holds && !hold.over {
                        let frames = &mut hold.frames;
                        frames.push(Held(dts, cts, s.keyframe, s.data));
                        let span = frames.last().map_or(0, |l| l.0.wrapping_sub(frames[0].0));
                        if span >= AUDIO_WAIT_MS || frames.len() >= MAX_HELD {
                            tracing::info!(
                                stream = ingest.name(),
                                "no audio init segment within {AUDIO_WAIT_MS} ms of video: \
                                 video alone"
                            );
                            hold.release(ingest)?;
                        }
                        continue;
                    }
                    ingest.video_frame(dts, cts, s.keyframe, &s.data)?;
                }
                (Role::Audio, TrackMedia::Aac { .. }) => ingest.audio_frame(dts, &s.data)?,
                (_, TrackMedia::Video { .. }) => crate::metrics::track_left_out("video"),
                (_, TrackMedia::Aac { .. }) => crate::metrics::track_left_out("audio"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_by_name() {
        assert_eq!(classify("manifest.mpd"), Some(File::Manifest));
        assert_eq!(classify("init-stream0.m4s"), Some(File::Init("0".into())));
        assert_eq!(
            classify("chunk-stream1-00042.m4s"),
            Some(File::Media("1".into()))
        );
        assert_eq!(classify("init_12.mp4"), Some(File::Init("12".into())));
        assert_eq!(classify("seg_3_7.cmfv"), Some(File::Media("3".into())));
        assert_eq!(classify("index.html"), None);
        assert_eq!(classify("chunk.ts"), None);
    }

    #[test]
    fn credentials_in_every_form() {
        let mut h = HeaderMap::new();
        let none = PushQuery::default();
        assert_eq!(credential(&none, &h), None);
        let q = PushQuery {
            token: Some("q".into()),
        };
        assert_eq!(credential(&q, &h).as_deref(), Some("q"));
        h.insert("authorization", "Bearer b".parse().unwrap());
        assert_eq!(credential(&none, &h).as_deref(), Some("b"));
        // "push:s3cr:et" in base64: the password is everything after the first colon.
        h.insert("authorization", "Basic cHVzaDpzM2NyOmV0".parse().unwrap());
        assert_eq!(credential(&none, &h).as_deref(), Some("s3cr:et"));
        h.insert("authorization", "Basic !!!".parse().unwrap());
        assert_eq!(credential(&none, &h), None);
    }
}
