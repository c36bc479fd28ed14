//! LL-HLS over HTTP: playlists (with blocking reload and delta updates), init segments,
//! segments and parts, from the packager's memory.
//!
//! Made to sit behind a CDN: everything under a packager's epoch is immutable and says so;
//! playlists are cacheable for about a part, and blocking requests per query string (the same
//! `_HLS_msn`/`_HLS_part` always gets a playlist that has that part). CORS is open, since players
//! are embedded anywhere, and segments and parts take byte ranges.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::http::{App, Peer};
use crate::hls::{HlsStream, playlist};

const PLAYLIST_TYPE: &str = "application/vnd.apple.mpegurl";
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Blocking playlist requests held at once, every stream together: an LL-HLS player holds one
/// or two, so this is thousands of players.
pub const MAX_HLS_HELD: usize = 8192;
/// Segments further ahead than this are a client bug, not a wait (the spec's 400).
const MAX_AHEAD_SEGMENTS: u64 = 2;

#[derive(Debug, Default, serde::Deserialize)]
pub struct PlaylistQuery {
    #[serde(rename = "_HLS_msn")]
    msn: Option<u64>,
    #[serde(rename = "_HLS_part")]
    part: Option<u64>,
    #[serde(rename = "_HLS_skip")]
    skip: Option<String>,
    /// A play token, where the stream needs one; carried on in every URI the playlist lists.
    token: Option<String>,
}

/// What a media playlist request asks for, once its query is checked.
#[derive(Debug, PartialEq, Eq)]
pub struct PlaylistAsk {
    /// A delta update (`_HLS_skip=YES`).
    pub skip: bool,
    /// A blocking request: held until this segment (and part, if given) exists.
    pub block: Option<(u64, Option<u64>)>,
}

impl PlaylistQuery {
    /// Checks the LL-HLS query against a playlist whose last segment is `last`: the reason
    /// for the 400 the spec asks for, or what to serve.
    pub fn check(&self, last: u64) -> Result<PlaylistAsk, String> {
        let skip = match self.skip.as_deref() {
            None => false,
            Some("YES") | Some("v2") => true,
            Some(other) => return Err(format!("_HLS_skip={other:?}: only YES is supported\n")),
        };
        let block = match (self.msn, self.part) {
            (Some(msn), _) if msn > last.saturating_add(MAX_AHEAD_SEGMENTS) => {
                return Err(format!(
                    "_HLS_msn={msn} is too far ahead: the last segment is {last}\n"
                ));
            }
            (Some(msn), part) => Some((msn, part)),
            (None, Some(_)) => return Err("_HLS_part needs _HLS_msn\n".into()),
            (None, None) => None,
        };
        Ok(PlaylistAsk { skip, block })
    }
}

/// The query of a media file: only the play token matters.
#[derive(Debug, Default, serde::Deserialize)]
pub struct FileQuery {
    pub token: Option<String>,
}

/// The refusal of an HLS request without the play token its stream needs.
async fn check_play(app: &App, name: &str, token: Option<&str>, peer: Peer) -> Option<Response> {
    let play = crate::auth::Action::Play;
    let auth = &app.cfg.auth;
    let refusal = auth.admit(play, name, "hls", peer.0, token).await.err()?;
    Some(cors(crate::net::refuse_credentials(
        &refusal, play, "hls", peer.0, name,
    )))
}

/// What follows every URI of a playlist: the play token, where the stream needs one.
fn uri_suffix(app: &App, name: &str, token: Option<&str>) -> String {
    match token {
        Some(t) if app.cfg.auth.play_is_protected(name) => {
            format!(
                "?{}",
                serde_urlencoded::to_string([("token", t)]).unwrap_or_default()
            )
        }
        _ => String::new(),
    }
}

fn cors(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Content-Length, Content-Range, ETag, Age, X-Onair-Ready-Us"),
    );
    r
}

fn error(status: StatusCode, msg: String) -> Response {
    cors((status, [(header::CACHE_CONTROL, "no-store")], msg).into_response())
}

fn no_stream(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("404: no HLS for stream {name:?}: nobody publishes it (or it ended)\n"),
    )
}

/// CORS preflight (a `Range` header makes one).
pub async fn preflight() -> Response {
    let mut r = cors(StatusCode::NO_CONTENT.into_response());
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Range, If-None-Match"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

fn has_parts(s: &crate::hls::segmenter::Segmenter) -> bool {
    s.segments().iter().any(|g| !g.parts.is_empty())
}

/// Whether the playlist already has segment `msn` (and its part `part`, if asked).
fn has(hls: &HlsStream, msn: u64, part: Option<u64>) -> bool {
    hls.read(|s| {
        s.segments().iter().any(|g| {
            g.msn > msn
                || (g.msn == msn
                    && (g.complete || part.is_some_and(|p| (g.parts.len() as u64) > p)))
        })
    })
}

/// Waits (boundedly) for a packager that just started to have its first part: it boxes the
/// GOP cache at once, and an empty playlist would only make the client wait longer. Without
/// one in time: the 503 to answer with.
async fn first_part(hls: &HlsStream, name: &str) -> Result<(), Response> {
    if hls.read(has_parts) {
        return Ok(());
    }
    let mut updates = hls.subscribe();
    let wait =
        Duration::from_millis(u64::from(hls.read(|s| s.settings().segment_target_ms)) + 2000);
    let _ = tokio::time::timeout(wait, async {
        while !hls.read(has_parts) {
            if updates.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    if hls.read(has_parts) {
        return Ok(());
    }
    Err(error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no media from {name:?} yet: try again in a moment\n"),
    ))
}

/// `GET /hls/STREAM/index.m3u8`: the multivariant playlist of every rendition when the stream
/// has a ladder, else (`ladder = []`) the source's media playlist, as it always was.
pub async fn index(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<PlaylistQuery>,
    Extension(peer): Extension<Peer>,
) -> Response {
    if let Some(refused) = check_play(&app, &name, q.token.as_deref(), peer).await {
        return refused;
    }
    let ladder_off = app
        .cfg
        .stream_settings(&name)
        .ladder
        .as_ref()
        .is_some_and(|l| l.is_empty());
    if ladder_off {
        let Some(hls) = app.hls.stream_or_start(&name) else {
            return no_stream(&name);
        };
        return serve_media(&app, &name, &hls, q).await;
    }
    let suffix = uri_suffix(&app, &name, q.token.as_deref());
    multivariant(&app, &name, &suffix).await
}

/// `GET /hls/STREAM/RENDITION/index.m3u8[?_HLS_msn=M[&_HLS_part=P]][&_HLS_skip=YES]`: one
/// rendition's media playlist.
pub async fn media_playlist(
    State(app): State<App>,
    Path((name, rendition)): Path<(String, String)>,
    Query(q): Query<PlaylistQuery>,
    Extension(peer): Extension<Peer>,
) -> Response {
    if let Some(refused) = check_play(&app, &name, q.token.as_deref(), peer).await {
        return refused;
    }
    let Some(hls) = app.hls.variant_or_start(&name, &rendition) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("404: stream {name:?} has no live rendition {rendition:?}\n"),
        );
    };
    serve_media(&app, &name, &hls, q).await
}

/// How long the multivariant playlist waits for the ladder a stream will have: its rungs start
/// a moment after the source (a player reads the multivariant playlist once).
const LADDER_WAIT: Duration = Duration::from_secs(8);

async fn multivariant(app: &App, name: &str, suffix: &str) -> Response {
    let Some(source) = app.hls.stream_or_start(name) else {
        return no_stream(name);
    };
    if let Err(unavailable) = first_part(&source, name).await {
        return unavailable;
    }
    let Some(stream) = app.hub.stream(name) else {
        return no_stream(name);
    };
    let height = stream.source().info().height;
    let policy = app.cfg.stream_settings(name);
    let planned = crate::config::plan_ladder(policy.ladder.as_deref(), height).len();
    // Every rendition the stream has (or will have within LADDER_WAIT), each with media.
    let deadline = tokio::time::Instant::now() + LADDER_WAIT;
    let variants = loop {
        let mut ready = vec![source.clone()];
        for r in stream.renditions().iter().skip(1).filter(|r| !r.is_gone()) {
            if let Some(v) = app.hls.variant_or_start(name, &r.name())
                && v.read(has_parts)
            {
                ready.push(v);
            }
        }
        if ready.len() > planned || tokio::time::Instant::now() >= deadline {
            break ready;
        }
        // A rung comes when its ffmpeg has encoded a frame, and its packager boxes a first
        // part a moment after it starts: re-checked when a rendition comes, and every 200 ms
        // (a part's time) for the packagers, which announce nothing across streams.
        tokio::select! {
            _ = stream.renditions_changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    };
    let list: Vec<playlist::VariantStream> = variants
        .iter()
        .filter_map(|v| {
            let uri = format!("{}/index.m3u8{suffix}", v.rendition);
            // Until it has a complete segment: its log's recent rate, or the ladder's nominal
            // video bitrate for a rung that just started, with a margin for the peak.
            let kbps = stream.rendition_named(&v.rendition).map(|r| {
                r.recent_kbps(Duration::from_secs(2))
                    .unwrap_or_else(|| r.info().nominal_kbps)
            });
            v.read(|s| {
                let init = s.init()?;
                let (peak, average) = s.bitrates().unwrap_or_else(|| {
                    let bps = u64::from(kbps.unwrap_or(0)) * 1000;
                    (bps + bps / 4, bps)
                });
                Some(playlist::VariantStream {
                    uri,
                    bandwidth: peak.max(1),
                    average_bandwidth: average.max(1),
                    resolution: init.resolution,
                    codecs: init.codecs.join(","),
                    fps: init.fps,
                })
            })
        })
        .collect();
    cors(
        (
            [
                (header::CONTENT_TYPE, PLAYLIST_TYPE.to_string()),
                // Renditions come and go with the ladder: a client reads it anew each time.
                (header::CACHE_CONTROL, "no-cache".to_string()),
            ],
            playlist::multivariant(&list),
        )
            .into_response(),
    )
}

async fn serve_media(app: &App, name: &str, hls: &HlsStream, q: PlaylistQuery) -> Response {
    if let Err(unavailable) = first_part(hls, name).await {
        return unavailable;
    }
    let last = hls.read(|s| s.segments().back().map_or(0, |g| g.msn));
    let ask = match q.check(last) {
        Ok(ask) => ask,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let blocking = ask.block.is_some();
    if let Some((msn, part)) = ask.block {
        let td = hls.read(|s| s.target_duration());
        // Held until that part exists, for at most three target durations (the spec's bound),
        // and only so many at once: each holds a connection and a task.
        let _held = if has(hls, msn, part) {
            None
        } else {
            let Some(held) = app.hls_held.take() else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("503: {MAX_HLS_HELD} blocking playlist requests are held already\n"),
                );
            };
            Some(held)
        };
        let mut updates = hls.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3 * td);
        while !has(hls, msn, part) {
            tokio::select! {
                r = updates.changed() => if r.is_err() { return no_stream(name) },
                _ = tokio::time::sleep_until(deadline) => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("segment {msn} part {part:?} did not come in time\n"),
                    );
                }
                _ = app.shutdown.cancelled() => {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
                }
            }
        }
    }
    let body = hls.playlist(
        playlist::Variant { skip: ask.skip },
        &uri_suffix(app, name, q.token.as_deref()),
    );
    let part_target_ms = hls.read(|s| s.settings().part_target_ms);
    // A blocking answer for a given part never goes out of date for that query; a plain one is
    // good for about a part (max-age has whole seconds).
    let cache = if blocking {
        "public, max-age=60".to_string()
    } else {
        format!(
            "public, max-age={}",
            u64::from(part_target_ms).div_ceil(1000)
        )
    };
    cors(
        (
            [
                (header::CONTENT_TYPE, PLAYLIST_TYPE.to_string()),
                (header::CACHE_CONTROL, cache),
            ],
            body,
        )
            .into_response(),
    )
}

/// What a media file name asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum File {
    Init(u32),
    Segment(u64),
    Part(u64),
}

pub fn parse_file(file: &str) -> Option<File> {
    if let Some(id) = file
        .strip_prefix("init")
        .and_then(|f| f.strip_suffix(".mp4"))
    {
        return id.parse().ok().map(File::Init);
    }
    let stem = file.strip_suffix(".m4s")?;
    if let Some(n) = stem.strip_prefix('s') {
        return n.parse().ok().map(File::Segment);
    }
    stem.strip_prefix('p')?.parse().ok().map(File::Part)
}

/// `GET /hls/STREAM/EPOCH/{init<id>.mp4, s<msn>.m4s, p<seq>.m4s}`: the source's files, as
/// its media playlist at `/hls/STREAM/index.m3u8` (no ladder) lists them.
pub async fn media_file(
    State(app): State<App>,
    Path((name, epoch, file)): Path<(String, String, String)>,
    Query(q): Query<FileQuery>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = check_play(&app, &name, q.token.as_deref(), peer).await {
        return refused;
    }
    serve_file(&app, &name, crate::hls::SOURCE, &epoch, &file, &headers).await
}

/// `GET /hls/STREAM/RENDITION/EPOCH/FILE`: a rendition's files, as its media playlist lists
/// them.
pub async fn variant_file(
    State(app): State<App>,
    Path((name, rendition, epoch, file)): Path<(String, String, String, String)>,
    Query(q): Query<FileQuery>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = check_play(&app, &name, q.token.as_deref(), peer).await {
        return refused;
    }
    serve_file(&app, &name, &rendition, &epoch, &file, &headers).await
}

async fn serve_file(
    app: &App,
    name: &str,
    rendition: &str,
    epoch: &str,
    file: &str,
    headers: &HeaderMap,
) -> Response {
    let Ok(epoch) = epoch.parse::<u64>() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("404: no {epoch}/{file} here\n"),
        );
    };
    let Some(hls) = app
        .hls
        .variant(name, rendition)
        .filter(|h| h.epoch == epoch)
    else {
        return no_stream(name);
    };
    let Some(what) = parse_file(file) else {
        return error(StatusCode::NOT_FOUND, format!("404: no {file} here\n"));
    };
    let etag = format!("\"{epoch}-{file}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return cors(
            (
                StatusCode::NOT_MODIFIED,
                [
                    (header::ETAG, etag),
                    (header::CACHE_CONTROL, IMMUTABLE.into()),
                ],
            )
                .into_response(),
        );
    }
    let (content_type, chunks, ready_us) = match what {
        File::Init(id) => match hls.read(|s| s.init_by_id(id).map(|i| i.bytes.clone())) {
            Some(b) => ("video/mp4", vec![b], None),
            None => return error(StatusCode::NOT_FOUND, format!("404: no {file} here\n")),
        },
        File::Segment(msn) => {
            let parts = hls.read(|s| {
                s.segments()
                    .iter()
                    .find(|g| g.msn == msn && g.complete)
                    .map(|g| g.parts.iter().map(|p| p.bytes.clone()).collect::<Vec<_>>())
            });
            match parts {
                Some(p) => ("video/iso.segment", p, None),
                None => return error(StatusCode::NOT_FOUND, format!("404: no {file} here\n")),
            }
        }
        File::Part(seq) => match part(app, &hls, seq).await {
            Ok((bytes, ready)) => ("video/iso.segment", vec![bytes], Some(ready)),
            Err(r) => return r,
        },
    };
    let mut r = ranged(headers, chunks);
    if r.status() == StatusCode::RANGE_NOT_SATISFIABLE {
        return cors(r);
    }
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Some(us) = ready_us
        && let Ok(v) = HeaderValue::from_str(&us.to_string())
    {
        h.insert("x-onair-ready-us", v);
    }
    cors(r)
}

/// A part, waiting for it if it is the next one (the preload hint): a player asks for it
/// before it exists, and gets it the moment it is complete.
async fn part(app: &App, hls: &HlsStream, seq: u64) -> Result<(Bytes, u64), Response> {
    let find = || {
        hls.read(|s| {
            let found = s
                .segments()
                .iter()
                .flat_map(|g| g.parts.iter())
                .find(|p| p.seq == seq)
                .map(|p| (p.bytes.clone(), p.ready_us));
            (found, s.next_part_seq(), s.init().is_some())
        })
    };
    let mut updates = hls.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (found, next, live) = find();
        if let Some(found) = found {
            return Ok(found);
        }
        if seq < next || seq > next + 1 || !live {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("404: no part {seq} (the next one is {next})\n"),
            ));
        }
        tokio::select! {
            r = updates.changed() => if r.is_err() {
                return Err(error(StatusCode::NOT_FOUND, "404: the stream ended\n".into()));
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(error(StatusCode::SERVICE_UNAVAILABLE, format!("part {seq} did not come in time\n")));
            }
            _ = app.shutdown.cancelled() => {
                return Err(error(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()));
            }
        }
    }
}

/// The whole body, or the single byte range asked for (206), or 416 when it starts past the
/// end. A Range header this does not handle (several ranges, not bytes) gets the whole body, as
/// RFC 9110 allows. The chunks are the parts' own buffers: nothing is copied to serve a segment.
fn ranged(headers: &HeaderMap, chunks: Vec<Bytes>) -> Response {
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, total));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, total),
        Some(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(None) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{total}"))],
            )
                .into_response();
        }
    };
    let mut out = Vec::new();
    let mut offset = 0u64;
    for c in chunks {
        let len = c.len() as u64;
        let (lo, hi) = (start.max(offset), end.min(offset + len));
        if lo < hi {
            out.push(c.slice((lo - offset) as usize..(hi - offset) as usize));
        }
        offset += len;
    }
    let body = Body::from_stream(futures_util::stream::iter(
        out.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&(end - start).to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` over `total` bytes: None to ignore the header (not a
/// single well-formed byte range), Some(None) when it cannot be satisfied, else the half-open
/// range.
pub fn parse_range(v: &str, total: u64) -> Option<Option<(u64, u64)>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return Some(None);
        }
        (total.saturating_sub(n), total)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            total
        } else {
            let last: u64 = b.parse().ok()?;
            if last < start {
                return None; // invalid: ignored
            }
            last.saturating_add(1).min(total)
        };
        (start, end)
    };
    Some((start < end).then_some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some(Some((0, 100))));
        assert_eq!(parse_range("bytes=900-", 1000), Some(Some((900, 1000))));
        assert_eq!(parse_range("bytes=-100", 1000), Some(Some((900, 1000))));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some(Some((990, 1000))));
        assert_eq!(parse_range("bytes=1000-", 1000), Some(None), "416");
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None, "ignored: 200");
        assert_eq!(parse_range("bytes=5-3", 1000), None, "ignored: 200");
        assert_eq!(parse_range("items=0-1", 1000), None);
    }

    #[test]
    fn playlist_queries() {
        let q = |s: &str| {
            axum::extract::Query::<PlaylistQuery>::try_from_uri(
                &format!("/x/index.m3u8?{s}").parse().unwrap(),
            )
            .unwrap()
            .0
        };
        let plain = PlaylistAsk {
            skip: false,
            block: None,
        };
        assert_eq!(q("").check(5), Ok(plain));
        assert_eq!(
            q("_HLS_msn=7&_HLS_part=2&_HLS_skip=YES").check(5),
            Ok(PlaylistAsk {
                skip: true,
                block: Some((7, Some(2)))
            })
        );
        assert!(
            q("_HLS_msn=8")
                .check(5)
                .unwrap_err()
                .contains("too far ahead")
        );
        assert!(
            q("_HLS_part=1")
                .check(5)
                .unwrap_err()
                .contains("needs _HLS_msn")
        );
        assert!(q("_HLS_skip=no").check(5).unwrap_err().contains("only YES"));
        assert_eq!(
            q(&format!("_HLS_msn={}", u64::MAX))
                .check(u64::MAX)
                .map(|a| a.block),
            Ok(Some((u64::MAX, None))),
            "no overflow at the top"
        );
    }

    #[test]
    fn file_names() {
        assert!(matches!(parse_file("init3.mp4"), Some(File::Init(3))));
        assert!(matches!(parse_file("s12.m4s"), Some(File::Segment(12))));
        assert!(matches!(parse_file("p7.m4s"), Some(File::Part(7))));
        assert!(parse_file("x.m4s").is_none());
        assert!(parse_file("p-1.m4s").is_none());
    }
}
