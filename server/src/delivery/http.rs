//! The HTTP side: one listener for WebSocket play, the JSON API, the web pages and the player
//! (and later HLS).
//!
//! We run hyper's HTTP/1 connection loop ourselves rather than `axum::serve`: it lets upgraded
//! WebSocket connections be taken back as the plain `TcpStream` (for vectored writes of pre-framed
//! messages), and lets shutdown close connections gracefully.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, get_service};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::config::Config;
use crate::hub::{Hub, StreamSummary};
pub use crate::net::Peer;
use crate::stats::{Page, Stats, StreamStats, ViewerPage};

#[derive(Clone)]
pub struct App {
    pub hub: Arc<Hub>,
    pub cfg: Arc<Config>,
    pub stats: Arc<Stats>,
    pub hls: Arc<crate::hls::Hls>,
    pub transcoders: Arc<crate::transcode::Transcoders>,
    /// Sources the server fetches (`[[pull]]`, `POST /api/streams`).
    pub pulls: Arc<crate::ingest::pull::Pulls>,
    /// HTTP CMAF pushes under way (`/push/...`).
    pub pushes: Arc<crate::ingest::cmaf::Pushes>,
    /// Where automatic viewers left off, per address.
    pub abr_memory: Arc<super::abr::Memory>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    pub limits: Arc<crate::limits::Limits>,
    /// Blocking LL-HLS playlist requests held now ([`super::hls::MAX_HLS_HELD`]).
    pub hls_held: Arc<crate::limits::Counted>,
    /// Dashboard feed subscribers now ([`MAX_FEED_SUBSCRIBERS`]).
    pub feed_subscribers: Arc<crate::limits::Counted>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl axum::extract::FromRef<App> for crate::ingest::ws::PushContext {
    fn from_ref(app: &App) -> Self {
        Self {
            hub: app.hub.clone(),
            cfg: app.cfg.clone(),
            shutdown: app.shutdown.clone(),
            tracker: app.tracker.clone(),
            pushes: app.pushes.clone(),
        }
    }
}

pub fn router(app: App) -> Router {
    let web = &app.cfg.web_dir;
    // The pages are small and change with every deploy: revalidate (ServeFile sends
    // Last-Modified). The player's wasm is served pre-gzipped when `make player` wrote a .gz.
    let no_cache = || {
        SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        )
    };
    let page = |name: &str| get_service(ServeFile::new(web.join(name))).layer(no_cache());
    let player = Router::new()
        .fallback_service(
            ServeDir::new(web.join("player"))
                .precompressed_gzip()
                .fallback(get(player_missing).with_state(app.clone())),
        )
        .layer(no_cache());
    // What `read_token` protects: the API, its feed, the dashboard and the metrics.
    let read = Router::new()
        .route("/api/streams", get(list_streams).post(create_stream))
        .route(
            "/api/streams/{stream}",
            get(get_stream).delete(delete_stream),
        )
        .route("/api/viewers/{id}", axum::routing::delete(delete_viewer))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .route("/dashboard", page("dashboard.html"))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            read_guard,
        ));
    Router::new()
        .merge(read)
        .route("/ws/{stream}", get(super::ws::play))
        .route("/ingest/{stream}", get(crate::ingest::ws::push))
        .route(
            "/push/{stream}/{*file}",
            axum::routing::put(crate::ingest::cmaf::push)
                .post(crate::ingest::cmaf::push)
                .delete(crate::ingest::cmaf::push),
        )
        .route(
            "/hls/{stream}/index.m3u8",
            get(super::hls::index).options(super::hls::preflight),
        )
        // `{epoch}` here is a rendition's name: matchit wants one name per position.
        .route(
            "/hls/{stream}/{epoch}/index.m3u8",
            get(super::hls::media_playlist).options(super::hls::preflight),
        )
        .route(
            "/hls/{stream}/{epoch}/{file}",
            get(super::hls::media_file).options(super::hls::preflight),
        )
        .route(
            "/hls/{stream}/{epoch}/{file}/{part}",
            get(super::hls::variant_file).options(super::hls::preflight),
        )
        .route("/", page("index.html"))
        .route("/watch/{stream}", page("watch.html"))
        .nest("/player", player)
        .nest_service("/vendor", ServeDir::new(web.join("vendor")))
        .fallback(not_found)
        .with_state(app)
}

/// Refuses a read without the `read_token` (when one is set), given as `Authorization: Bearer`
/// or as `?token=` (an EventSource cannot set headers, so the dashboard sends it that way).
async fn read_guard(
    State(app): State<App>,
    axum::extract::Extension(Peer(peer)): axum::extract::Extension<Peer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if app.cfg.auth.read_is_protected() {
        let given = crate::auth::bearer(req.headers())
            .map(str::to_string)
            .or_else(|| req.uri().query().and_then(crate::auth::token_in_query));
        if let Err(refusal) = app.cfg.auth.read(given.as_deref()) {
            crate::metrics::auth_refusal("read", "http", refusal.label());
            tracing::info!(%peer, path = req.uri().path(), reason = %refusal, "read refused");
            return (
                refusal.status(),
                [(header::WWW_AUTHENTICATE, "Bearer")],
                format!(
                    "{}: {refusal}: this server needs its read token (Authorization: Bearer \
                     TOKEN, or ?token=TOKEN)\n",
                    refusal.status().as_u16()
                ),
            )
                .into_response();
        }
    }
    next.run(req).await
}

async fn player_missing(State(app): State<App>, uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "404: no player file {} in {}: build the player with `make player`\n",
            uri.path(),
            app.cfg.web_dir.join("player").display()
        ),
    )
        .into_response()
}

async fn list_streams(State(app): State<App>) -> impl IntoResponse {
    axum::Json(app.hub.summaries())
}

/// One stream: the hub's live summary, the last second's rates and latency, and a page of its
/// viewers (`?offset=&limit=&sort=`, as the feed; 50 by default, at most 200).
#[derive(serde::Serialize)]
struct StreamDetail<'a> {
    #[serde(flatten)]
    summary: StreamSummary,
    /// From the last stats period.
    stats: Option<&'a StreamStats>,
    /// Its renditions now, with the last stats period's measured bitrate and viewers.
    renditions: Vec<crate::stats::RenditionStats>,
    /// The ladder's ffmpeg, if the stream has a ladder.
    transcoder: Option<crate::transcode::TranscoderState>,
    viewers: ViewerPage<'a>,
}

async fn get_stream(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(mut page): Query<Page>,
) -> Response {
    let pull = app.pulls.get(&name);
    let Some(s) = app.hub.stream(&name) else {
        // A source not publishing yet (on demand and unwatched, or failing) is still a stream.
        if let Some(p) = pull {
            return axum::Json(serde_json::json!({
                "name": name, "live": false, "publisher": p.view(), "renditions": [],
            }))
            .into_response();
        }
        return (StatusCode::NOT_FOUND, format!("no stream named {name:?}\n")).into_response();
    };
    let snap = app.stats.latest();
    page.stream = Some(name.clone());
    let stats = snap.streams.iter().find(|x| x.name == name);
    let detail = StreamDetail {
        summary: StreamSummary::of(&s),
        stats,
        renditions: crate::stats::renditions_now(&s, stats),
        transcoder: app.transcoders.state(&name),
        viewers: snap.page(&page),
    };
    let Some(p) = pull else {
        return axum::Json(detail).into_response();
    };
    // A pulled stream's publisher is its source: the URL and what ffmpeg is doing.
    let mut json = serde_json::to_value(&detail).unwrap_or_default();
    let mut publisher = serde_json::to_value(p.view()).unwrap_or_default();
    if let (Some(live), Some(shown)) = (json.get("publisher"), publisher.as_object_mut()) {
        for key in ["since_ms", "clock"] {
            if let Some(v) = live.get(key) {
                shown.insert(key.into(), v.clone());
            }
        }
    }
    json["publisher"] = publisher;
    axum::Json(json).into_response()
}

/// `POST /api/streams`: a source to pull, as `[[pull]]` would.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewStream {
    name: String,
    source_url: String,
    ladder: Option<Vec<crate::config::LadderEntry>>,
    #[serde(default)]
    on_demand: bool,
}

/// Starts pulling a source at run time (admin token); 201 with the stream.
async fn create_stream(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(denied) = refusal(&app, &headers) {
        return denied;
    }
    let bad = |why: String| (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response();
    let new: NewStream = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return bad(format!("bad stream: {e}")),
    };
    let ladder = match new
        .ladder
        .map(|l| crate::config::resolve_ladder(&l))
        .transpose()
    {
        Ok(l) => l,
        Err(e) => return bad(format!("bad ladder: {e}")),
    };
    let spec = crate::ingest::pull::PullSpec {
        name: new.name.clone(),
        source_url: new.source_url,
        on_demand: new.on_demand,
        ladder,
    };
    use crate::ingest::pull::PullError;
    match app
        .pulls
        .start(spec, &app.hub, &app.cfg, &app.shutdown, &app.tracker)
    {
        Ok(p) => {
            tracing::info!(stream = %new.name, source = %p.source_url, "source added through the API");
            let body = serde_json::json!({ "name": p.name, "live": false, "publisher": p.view() });
            (StatusCode::CREATED, axum::Json(body)).into_response()
        }
        Err(e @ (PullError::Duplicate(_) | PullError::Published(_))) => {
            (StatusCode::CONFLICT, format!("{e}\n")).into_response()
        }
        Err(e) => bad(e.to_string()),
    }
}

/// Dashboard feed subscribers at once: each is a connection and a task.
pub const MAX_FEED_SUBSCRIBERS: usize = 256;

/// The dashboard's feed: Server-Sent Events, a `history` event first (the charts' last minutes),
/// then the latest `snapshot` at once and a new one every second, each with the client's page of
/// the viewer table.
async fn events(State(app): State<App>, Query(page): Query<Page>) -> Response {
    let Some(subscribed) = app.feed_subscribers.take() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("503: the feed has {MAX_FEED_SUBSCRIBERS} subscribers already\n"),
        )
            .into_response();
    };
    let history = serde_json::to_string(&app.stats.history()).unwrap_or_default();
    // Reconnect after a second, not the browser's default of about three.
    let first = Event::default()
        .event("history")
        .retry(Duration::from_secs(1))
        .data(history);
    let mut updates = app.stats.subscribe();
    updates.mark_changed();
    let shutdown = app.shutdown.clone();
    let snapshots = futures_util::stream::unfold(
        (updates, page, shutdown, subscribed),
        |(mut updates, page, shutdown, subscribed)| async move {
            tokio::select! {
                r = updates.changed() => r.ok()?,
                _ = shutdown.cancelled() => return None,
            }
            let json = updates.borrow_and_update().feed_json(&page);
            let event = Event::default().event("snapshot").data(json);
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (updates, page, shutdown, subscribed),
            ))
        },
    );
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok(first) }),
        snapshots,
    );
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )
        .into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&app.prometheus, &app.hub, &app.transcoders, &app.limits),
    )
        .into_response()
}

/// Disconnects one viewer (close code 4001: its player does not reconnect).
async fn delete_viewer(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = refusal(&app, &headers) {
        return denied;
    }
    let Ok(id) = id.parse::<u64>() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("viewer ids are numbers, not {id:?}\n"),
        )
            .into_response();
    };
    if app.hub.disconnect_viewer(id) {
        tracing::info!(viewer = id, "viewer removed through the API");
        StatusCode::NO_CONTENT.into_response()
    } else {
        (StatusCode::NOT_FOUND, format!("no viewer {id}\n")).into_response()
    }
}

/// Checks `Authorization: Bearer TOKEN` against the configured admin token; returns the refusal
/// if it does not match. Without a token configured, every mutating call is refused.
fn refusal(app: &App, headers: &HeaderMap) -> Option<Response> {
    let refusal = app.cfg.auth.admin(crate::auth::bearer(headers)).err()?;
    crate::metrics::auth_refusal(
        "admin",
        "http",
        refusal.as_ref().map_or("disabled", |r| r.label()),
    );
    // As for reading: 401 without a credential (or with mutations disabled), 403 with one that
    // does not grant this.
    let (status, text) = match refusal {
        None => (
            StatusCode::UNAUTHORIZED,
            "401: mutating API calls are disabled: set admin_token (ONAIR_ADMIN_TOKEN) and send \
             Authorization: Bearer TOKEN\n",
        ),
        Some(crate::auth::Refusal::Missing) => (
            StatusCode::UNAUTHORIZED,
            "401: this call needs the admin token (Authorization: Bearer TOKEN)\n",
        ),
        Some(_) => (
            StatusCode::FORBIDDEN,
            "403: wrong admin token (Authorization: Bearer TOKEN)\n",
        ),
    };
    Some((status, [(header::WWW_AUTHENTICATE, "Bearer")], text).into_response())
}

/// Stops the stream's source if it is pulled, or else disconnects its publisher. Viewers stay,
/// waiting, as when a publisher leaves.
async fn delete_stream(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = refusal(&app, &headers) {
        return denied;
    }
    if app.pulls.stop(&name) {
        tracing::info!(stream = %name, "source stopped through the API");
        return StatusCode::NO_CONTENT.into_response();
    }
    if app.hub.disconnect_publisher(&name) {
        tracing::info!(stream = %name, "publisher removed through the API");
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("no live publisher on {name:?}\n"),
        )
            .into_response()
    }
}

async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "404: nothing at {}. Pages are /, /watch/STREAM and /dashboard, WebSocket play is at \
             /ws/STREAM, HLS at /hls/STREAM/index.m3u8, the API at /api/streams, metrics at \
             /metrics\n",
            uri.path()
        ),
    )
        .into_response()
}

/// Serves HTTP connections until `shutdown`, then lets in-flight requests finish.
pub async fn serve(listener: TcpListener, app: App) {
    let router = router(app.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            c = crate::net::accept(&listener, "http") => c,
            _ = app.shutdown.cancelled() => return,
        };
        let Some(slot) = app.limits.admit(peer, "http") else {
            continue;
        };
        // The connection's place in the limits: its handshake ends with its first request's
        // head, and a WebSocket handler keeps the slot for as long as it serves the socket.
        let slot = Arc::new(slot);
        // The connection's facts go into each request's extensions in front of the router:
        // `Router::layer` here would rebuild every route for every connection (tens of KB
        // each, held for as long as the connection lives).
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            slot.handshake_done();
            req.extensions_mut().insert(Peer(peer));
            req.extensions_mut()
                .insert(crate::limits::ConnSlot(slot.clone()));
            tower_service::Service::call(&mut router.clone(), req)
        });
        let shutdown = app.shutdown.clone();
        app.tracker.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "http connection error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
}
