//! The hub: live streams by name, each with its renditions, publisher and viewers.
//!
//! It knows nothing of codecs beyond what ingest tells it, and nothing of WebSocket or metrics:
//! entries are framed for viewers by the [`Framer`] delivery gives it, and what happens is
//! reported through [`Events`], which the metrics side implements.

pub mod fanout;
pub mod follow;
pub mod frame;
pub mod lossless;
pub mod rendition;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use dashmap::DashMap;
use onair_protocol::wire::{MediaHeader, StatusCode, ViewerStats, WireError};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use fanout::{Sink, SinkWrite};
pub use follow::{Follow, SwitchReason};
pub use frame::{Frame, Framer, InitConfig, Item, TrackConfig, VIDEO_TRACK};
pub use lossless::{Event, Lossless, QueueLimits};
pub use rendition::{Cursor, Limits, ReadOutcome, Rendition, RenditionInfo};

/// The name of the rendition a publisher sends.
pub const SOURCE: &str = "source";

/// Where the hub's own tasks (fan-out) are tracked, and the signal that ends them.
#[derive(Clone, Default)]
pub struct Tasks {
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
}

/// What happens in the hub, for whoever counts it (metrics). Every method defaults to nothing.
pub trait Events: Send + Sync + 'static {
    fn viewer_joined(&self) {}
    /// A media frame of `bytes` payload bytes came in from a publisher.
    fn media_in(&self, _bytes: usize) {}
    /// A viewer's report was recorded; its latency when it vouches for one.
    fn viewer_report(&self, _latency_ms: Option<u32>) {}
    fn keyframe_skip(&self) {}
    fn bytes_out(&self, _bytes: u64) {}
    /// A viewer was moved from one rendition to another.
    fn switch(&self, _up: bool, _reason: SwitchReason) {}
}

/// Events that nobody counts (the hub's own tests).
pub struct NoEvents;
impl Events for NoEvents {}

/// Stream names are path segments and stream keys: keep them to a safe alphabet.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.')
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize)]
pub struct PublisherInfo {
    /// `rtmp`, later also `ws`, `tcp`.
    pub protocol: &'static str,
    pub peer: SocketAddr,
    /// Unix ms when publishing started.
    pub since_ms: u64,
    /// Where the timestamps come from, for sources without any (raw H.264).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock: Option<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VideoInfo {
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub fps: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AudioInfo {
    pub codec: String,
    pub sample_rate: u32,
    pub channels: u8,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MediaInfo {
    pub video: Option<VideoInfo>,
    pub audio: Option<AudioInfo>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("stream {0:?} is already being published")]
    AlreadyLive(String),
    #[error("invalid stream name {0:?}: use letters, digits, '_', '-' and '.'")]
    BadName(String),
    #[error("server is shutting down")]
    ShuttingDown,
}

pub struct Stream {
    pub name: String,
    /// The source first, then others in the order they came. Ids are unique among the live
    /// ones; a removed rendition's id may be given again later.
    renditions: RwLock<Vec<Arc<Rendition>>>,
    /// Bumped (and waiters woken) whenever a rendition comes or goes.
    renditions_version: AtomicU64,
    renditions_changed: Notify,
    publisher: Mutex<Option<PublisherInfo>>,
    media: Mutex<MediaInfo>,
    published_before: AtomicBool,
    viewers: AtomicU64,
    /// Holders that are not viewers (the HLS packager): the stream stays while they are here.
    holds: AtomicU64,
    /// Cancelled to disconnect the current publisher (an operator's `DELETE`).
    kick: Mutex<Option<CancellationToken>>,
    frames_in: AtomicU64,
    video_frames_in: AtomicU64,
    bytes_in: AtomicU64,
    limits: Limits,
    framer: Arc<dyn Framer>,
    tasks: Tasks,
}

impl Stream {
    /// Viewers connected to it now.
    pub fn viewer_count(&self) -> u64 {
        self.viewers.load(Ordering::Acquire)
    }

    pub fn publisher(&self) -> Option<PublisherInfo> {
        self.publisher.lock().clone()
    }

    /// Payload bytes and video frames received so far.
    pub fn ingested(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.video_frames_in.load(Ordering::Relaxed),
        )
    }

    /// Every rendition, the source first.
    pub fn renditions(&self) -> Vec<Arc<Rendition>> {
        self.renditions.read().clone()
    }

    pub fn rendition_count(&self) -> usize {
        self.renditions.read().len()
    }

    /// The published rendition.
    pub fn source(&self) -> Arc<Rendition> {
        self.renditions.read()[0].clone()
    }

    pub fn rendition(&self, id: u8) -> Option<Arc<Rendition>> {
        self.renditions.read().iter().find(|r| r.id == id).cloned()
    }

    pub fn rendition_named(&self, name: &str) -> Option<Arc<Rendition>> {
        self.renditions
            .read()
            .iter()
            .find(|r| r.name() == name)
            .cloned()
    }

    /// The remaining rendition closest to `like` in height, then in bitrate.
    pub fn nearest(&self, like: &RenditionInfo) -> Option<Arc<Rendition>> {
        self.renditions
            .read()
            .iter()
            .filter(|r| !r.is_gone())
            .min_by_key(|r| {
                let i = r.info();
                (
                    i.height.abs_diff(like.height),
                    i.nominal_kbps.abs_diff(like.nominal_kbps),
                )
            })
            .cloned()
    }

    /// Changes whenever a rendition comes or goes.
    pub fn renditions_version(&self) -> u64 {
        self.renditions_version.load(Ordering::Acquire)
    }

    /// Resolves when a rendition comes or goes after this call.
    pub fn renditions_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.renditions_changed.notified()
    }

    /// Adds a rendition (a ladder rung, a track of a multitrack publish) on this stream's
    /// timeline. It lives until the returned writer is dropped; None if the name is taken or
    /// there is no id left.
    pub fn add_rendition(self: &Arc<Self>, info: RenditionInfo) -> Option<RenditionWriter> {
        let mut list = self.renditions.write();
        if list.iter().any(|r| r.name() == info.name) {
            return None;
        }
        let id = (1..=u8::MAX - 1).find(|id| list.iter().all(|r| r.id != *id))?;
        let label = format!("{}/{}", self.name, info.name);
        let rendition = Arc::new(Rendition::new(
            id,
            info,
            self.limits,
            self.framer.clone(),
            (StatusCode::Live, "rendition started"),
            self.tasks.clone(),
        ));
        list.push(rendition.clone());
        drop(list);
        self.renditions_version.fetch_add(1, Ordering::AcqRel);
        self.renditions_changed.notify_waiters();
        Some(RenditionWriter {
            stream: self.clone(),
            rendition,
            label,
        })
    }

    fn remove_rendition(&self, id: u8) {
        let removed = {
            let mut list = self.renditions.write();
            let at = list.iter().position(|r| r.id == id);
            at.map(|i| list.remove(i))
        };
        if let Some(r) = removed {
            r.set_gone();
            self.renditions_version.fetch_add(1, Ordering::AcqRel);
            self.renditions_changed.notify_waiters();
        }
    }

    fn is_idle(&self) -> bool {
        self.publisher.lock().is_none()
            && self.viewers.load(Ordering::Acquire) == 0
            && self.holds.load(Ordering::Acquire) == 0
    }
}

/// A rendition other than the source, fed by whoever added it. Dropping it removes the
/// rendition: its viewers are moved to the nearest remaining one at a keyframe.
pub struct RenditionWriter {
    stream: Arc<Stream>,
    pub rendition: Arc<Rendition>,
    /// `STREAM/RENDITION`, for log lines.
    label: String,
}

impl RenditionWriter {
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Announces this rendition's codec configuration (and its resolution and codec, from the
    /// init's video track).
    pub fn set_init(&self, init: InitConfig) -> Result<(), WireError> {
        describe(&self.rendition, &init);
        self.rendition.push_init(Arc::new(init))
    }

    pub fn push_media(&self, header: &MediaHeader, payload: &[u8], sync: bool) {
        self.rendition.push_media(header, payload, sync);
    }

    /// Tells this rendition's viewers the state of the stream (waiting, republished).
    pub fn push_status(&self, code: StatusCode, message: &'static str) {
        self.rendition.push_status(
            (code, message),
            (code, message),
            code == StatusCode::Waiting,
        );
    }
}

impl Drop for RenditionWriter {
    fn drop(&mut self) {
        self.stream.remove_rendition(self.rendition.id);
    }
}

/// Takes a rendition's description from its init's video track (or audio, for audio only).
fn describe(r: &Rendition, init: &InitConfig) {
    r.update_info(|info| match init.video() {
        Some(v) => {
            info.codec = v.codec.clone();
            if let onair_protocol::wire::TrackParams::Video {
                width,
                height,
                fps_milli,
            } = v.params
            {
                info.width = u32::from(width);
                info.height = u32::from(height);
                info.fps = (fps_milli > 0).then(|| f64::from(fps_milli) / 1000.0);
            }
        }
        None => {
            info.codec = init
                .tracks
                .first()
                .map(|t| t.codec.clone())
                .unwrap_or_default();
            (info.width, info.height, info.fps) = (0, 0, None);
        }
    });
}

pub struct Hub {
    streams: DashMap<String, Arc<Stream>>,
    /// Every connected viewer, by id: for the API, the dashboard and `DELETE /api/viewers/ID`.
    viewers: DashMap<u64, Arc<ViewerState>>,
    limits: Limits,
    framer: Arc<dyn Framer>,
    events: Arc<dyn Events>,
    tasks: Tasks,
    next_viewer_id: AtomicU64,
    shutting_down: AtomicBool,
    /// Every publish, for whoever follows them (the transcoder).
    published: tokio::sync::broadcast::Sender<Arc<Stream>>,
}

impl Hub {
    pub fn new(
        limits: Limits,
        framer: Arc<dyn Framer>,
        events: Arc<dyn Events>,
        tasks: Tasks,
    ) -> Arc<Self> {
        Arc::new(Self {
            streams: DashMap::new(),
            viewers: DashMap::new(),
            limits,
            framer,
            events,
            tasks,
            next_viewer_id: AtomicU64::new(1),
            shutting_down: Default::default(),
            published: tokio::sync::broadcast::channel(64).0,
        })
    }

    /// Streams as they are published (a republish again). A receiver that lags misses some,
    /// and is told so by the channel.
    pub fn published(&self) -> tokio::sync::broadcast::Receiver<Arc<Stream>> {
        self.published.subscribe()
    }

    pub fn events(&self) -> &Arc<dyn Events> {
        &self.events
    }

    fn new_stream(&self, name: &str) -> Arc<Stream> {
        let source = Rendition::new(
            0,
            RenditionInfo {
                name: SOURCE.to_string(),
                ..Default::default()
            },
            self.limits,
            self.framer.clone(),
            (StatusCode::Waiting, "waiting for the publisher"),
            self.tasks.clone(),
        );
        Arc::new(Stream {
            name: name.to_string(),
            renditions: RwLock::new(vec![Arc::new(source)]),
            renditions_version: AtomicU64::new(0),
            renditions_changed: Notify::new(),
            publisher: Mutex::new(None),
            media: Mutex::new(MediaInfo::default()),
            published_before: AtomicBool::new(false),
            viewers: AtomicU64::new(0),
            holds: AtomicU64::new(0),
            kick: Mutex::new(None),
            frames_in: AtomicU64::new(0),
            video_frames_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            limits: self.limits,
            framer: self.framer.clone(),
            tasks: self.tasks.clone(),
        })
    }

    /// Claims `name` for a publisher. A second publisher on a live name is refused.
    pub fn publish(
        self: &Arc<Self>,
        name: &str,
        info: PublisherInfo,
    ) -> Result<Publisher, PublishError> {
        if !valid_stream_name(name) {
            return Err(PublishError::BadName(name.to_string()));
        }
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(PublishError::ShuttingDown);
        }
        let kick = CancellationToken::new();
        let stream = {
            let entry = self
                .streams
                .entry(name.to_string())
                .or_insert_with(|| self.new_stream(name));
            let mut publisher = entry.publisher.lock();
            if publisher.is_some() {
                return Err(PublishError::AlreadyLive(name.to_string()));
            }
            *publisher = Some(info);
            *entry.kick.lock() = Some(kick.clone());
            entry.value().clone()
        };
        let republished = stream.published_before.swap(true, Ordering::AcqRel);
        let live = (StatusCode::Live, "publisher connected");
        let now = if republished {
            (StatusCode::Republished, "publisher is back")
        } else {
            live
        };
        stream.source().push_status(now, live, false);
        let _ = self.published.send(stream.clone());
        Ok(Publisher {
            hub: self.clone(),
            stream,
            kick,
        })
    }

    /// Subscribes a viewer to `name`, creating a waiting stream if nobody publishes it yet.
    pub fn subscribe(self: &Arc<Self>, name: &str, peer: SocketAddr, user_agent: &str) -> Viewer {
        let stream = {
            let entry = self
                .streams
                .entry(name.to_string())
                .or_insert_with(|| self.new_stream(name));
            // Counted under the map's entry lock, so cleanup can't remove the stream in between.
            entry.viewers.fetch_add(1, Ordering::AcqRel);
            entry.value().clone()
        };
        let id = self.next_viewer_id.fetch_add(1, Ordering::Relaxed);
        // User agents are the client's to choose: keep a bounded, printable prefix.
        let user_agent: String = user_agent
            .chars()
            .filter(|c| !c.is_control())
            .take(256)
            .collect();
        let state = Arc::new(ViewerState {
            id,
            stream: stream.name.clone(),
            peer,
            user_agent,
            since_ms: now_us() / 1000,
            sink: OnceLock::new(),
            rendition: AtomicU8::new(0),
            switches: AtomicU64::new(0),
            last_switch: Mutex::new(None),
            events: self.events.clone(),
            skips: AtomicU64::new(0),
            send_kbps: Default::default(),
            report: Mutex::new(None),
            receipt: Mutex::new(None),
            kick: CancellationToken::new(),
            accounted: AtomicU64::new(0),
        });
        self.viewers.insert(id, state.clone());
        self.events.viewer_joined();
        Viewer {
            id,
            hub: self.clone(),
            stream,
            state,
        }
    }

    /// Keeps stream `name` (if it exists) in the hub while the hold lives, without counting as a
    /// viewer: a republish then continues the same stream (the HLS packager's timeline).
    pub fn hold(self: &Arc<Self>, name: &str) -> Option<StreamHold> {
        let entry = self.streams.get(name)?;
        entry.holds.fetch_add(1, Ordering::AcqRel);
        Some(StreamHold {
            hub: self.clone(),
            stream: entry.value().clone(),
        })
    }

    /// Disconnects viewer `id`; returns whether it was connected.
    pub fn disconnect_viewer(&self, id: u64) -> bool {
        match self.viewers.get(&id) {
            Some(v) => {
                v.kick.cancel();
                true
            }
            None => false,
        }
    }

    /// Every connected viewer, in id order.
    pub fn viewers(&self) -> Vec<Arc<ViewerState>> {
        let mut v: Vec<_> = self.viewers.iter().map(|v| v.value().clone()).collect();
        v.sort_by_key(|v| v.id);
        v
    }

    fn cleanup(&self, name: &str) {
        self.streams.remove_if(name, |_, s| s.is_idle());
    }

    /// Disconnects the publisher of `name`, if one is live. Its ingest sees [`Publisher::removed`]
    /// and closes the connection; viewers are told the stream is waiting, as for any departure.
    pub fn disconnect_publisher(&self, name: &str) -> bool {
        let Some(stream) = self.stream(name) else {
            return false;
        };
        let kick = stream.kick.lock();
        match kick.as_ref() {
            Some(k) => {
                k.cancel();
                true
            }
            None => false,
        }
    }

    /// Refuses new publishers from now on (graceful shutdown).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn stream(&self, name: &str) -> Option<Arc<Stream>> {
        self.streams.get(name).map(|s| s.value().clone())
    }

    pub fn summaries(&self) -> Vec<StreamSummary> {
        self.streams()
            .iter()
            .map(|s| StreamSummary::of(s))
            .collect()
    }

    /// Every stream, in name order.
    pub fn streams(&self) -> Vec<Arc<Stream>> {
        let mut v: Vec<_> = self.streams.iter().map(|s| s.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[derive(Debug, Serialize)]
pub struct StreamSummary {
    pub name: String,
    pub live: bool,
    pub publisher: Option<PublisherInfo>,
    pub viewers: u64,
    pub video: Option<VideoInfo>,
    pub audio: Option<AudioInfo>,
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Bytes held by the GOP cache and backlog window of each rendition.
    pub retained_bytes: Vec<u64>,
}

impl StreamSummary {
    pub fn of(s: &Stream) -> Self {
        let publisher = s.publisher.lock().clone();
        let media = s.media.lock().clone();
        Self {
            name: s.name.clone(),
            live: publisher.is_some(),
            publisher,
            viewers: s.viewers.load(Ordering::Relaxed),
            video: media.video,
            audio: media.audio,
            frames_in: s.frames_in.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            retained_bytes: s.renditions().iter().map(|r| r.retained_bytes()).collect(),
        }
    }
}

/// A publisher's claim on a stream. Dropping it tells the viewers the stream is waiting.
pub struct Publisher {
    hub: Arc<Hub>,
    stream: Arc<Stream>,
    kick: CancellationToken,
}

impl Publisher {
    pub fn name(&self) -> &str {
        &self.stream.name
    }

    /// Records where this source's timestamps come from (shown in the API and dashboard).
    pub fn set_clock_source(&self, clock: &'static str) {
        if let Some(p) = self.stream.publisher.lock().as_mut() {
            p.clock = Some(clock);
        }
    }

    /// Resolves when an operator removed this publisher ([`Hub::disconnect_publisher`]).
    pub async fn removed(&self) {
        self.kick.cancelled().await
    }

    /// What [`Publisher::removed`] waits on, for a task that does not hold the publisher.
    pub fn removal(&self) -> CancellationToken {
        self.kick.clone()
    }

    /// Announces a (new) codec configuration for the source rendition.
    pub fn set_init(&self, init: InitConfig, media: MediaInfo) -> Result<(), WireError> {
        *self.stream.media.lock() = media;
        let source = self.stream.source();
        describe(&source, &init);
        source.push_init(Arc::new(init))
    }

    /// Appends one media frame to the source rendition (framed once, for every viewer).
    pub fn push_media(&self, header: &MediaHeader, payload: &[u8], sync: bool) {
        self.stream.frames_in.fetch_add(1, Ordering::Relaxed);
        if header.track == VIDEO_TRACK {
            self.stream.video_frames_in.fetch_add(1, Ordering::Relaxed);
        }
        self.stream
            .bytes_in
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        self.hub.events.media_in(payload.len());
        self.stream.source().push_media(header, payload, sync);
    }

    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let waiting = (StatusCode::Waiting, "publisher disconnected");
        for r in self.stream.renditions() {
            r.push_status(waiting, waiting, true);
        }
        // Reset before releasing the claim, so a new publisher's media info is never wiped.
        *self.stream.media.lock() = MediaInfo::default();
        *self.stream.kick.lock() = None;
        *self.stream.publisher.lock() = None;
        self.hub.cleanup(&self.stream.name);
    }
}

/// See [`Hub::hold`].
pub struct StreamHold {
    hub: Arc<Hub>,
    pub stream: Arc<Stream>,
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        self.stream.holds.fetch_sub(1, Ordering::AcqRel);
        self.hub.cleanup(&self.stream.name);
    }
}

/// A viewer's subscription. Dropping it removes the stream once nobody uses it.
pub struct Viewer {
    pub id: u64,
    hub: Arc<Hub>,
    pub stream: Arc<Stream>,
    pub state: Arc<ViewerState>,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.state.account_bytes();
        self.hub.viewers.remove(&self.id);
        self.stream.viewers.fetch_sub(1, Ordering::AcqRel);
        self.hub.cleanup(&self.stream.name);
    }
}

/// The latency a report vouches for: only a playing viewer's, and 0 means not known yet.
pub fn playing_latency(stats: &ViewerStats) -> Option<u32> {
    (stats.state == onair_protocol::wire::PLAYER_PLAYING && stats.latency_ms > 0)
        .then_some(stats.latency_ms)
}

/// A viewer's receipt as it arrived: the bytes it had received, the bytes the server had sent it
/// by then (what the network and the kernel held for it is the difference), and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub received: u64,
    pub sent: u64,
    pub at: Instant,
}

/// What the server knows about one viewer, shared by its connection, the stats task and the API.
pub struct ViewerState {
    pub id: u64,
    pub stream: String,
    pub peer: SocketAddr,
    pub user_agent: String,
    /// Unix ms when it connected.
    pub since_ms: u64,
    sink: OnceLock<Arc<Sink>>,
    /// The id of the rendition it is on.
    pub rendition: AtomicU8,
    /// Times it was moved to another rendition, and why the last time.
    pub switches: AtomicU64,
    last_switch: Mutex<Option<SwitchReason>>,
    events: Arc<dyn Events>,
    /// Times it fell behind and skipped to the next keyframe.
    pub skips: AtomicU64,
    /// Send rate over the last stats period, set by the stats task.
    pub send_kbps: std::sync::atomic::AtomicU32,
    /// Its last report, and when it came.
    report: Mutex<Option<(ViewerStats, Instant)>>,
    /// Its last receipt: what it said it had received, what had been sent by then, and when
    /// it came.
    receipt: Mutex<Option<Receipt>>,
    kick: CancellationToken,
    /// Bytes sent already added to the process-wide counter.
    accounted: AtomicU64,
}

impl ViewerState {
    /// The viewer's socket as the fan-out sees it: its byte counter and position.
    pub fn attach(&self, sink: Arc<Sink>) {
        let _ = self.sink.set(sink);
    }

    pub fn sink(&self) -> Option<&Arc<Sink>> {
        self.sink.get()
    }

    pub fn bytes_sent(&self) -> u64 {
        self.sink.get().map_or(0, |s| s.bytes_sent())
    }

    /// Adds the bytes sent since the last call to `onair_viewer_bytes_sent_total`.
    pub fn account_bytes(&self) {
        let sent = self.bytes_sent();
        // fetch_max: whoever comes second (the stats task, the viewer leaving) adds nothing.
        let before = self.accounted.fetch_max(sent, Ordering::AcqRel);
        self.events.bytes_out(sent.saturating_sub(before));
    }

    pub fn set_report(&self, stats: ViewerStats) {
        *self.report.lock() = Some((stats, Instant::now()));
        self.events.viewer_report(playing_latency(&stats));
    }

    pub fn report(&self) -> Option<(ViewerStats, Instant)> {
        *self.report.lock()
    }

    /// The player says it has received `bytes` of what was sent to it.
    pub fn set_receipt(&self, bytes: u64) {
        *self.receipt.lock() = Some(Receipt {
            received: bytes,
            sent: self.bytes_sent(),
            at: Instant::now(),
        });
    }

    pub fn receipt(&self) -> Option<Receipt> {
        *self.receipt.lock()
    }

    pub fn count_skip(&self) {
        self.skips.fetch_add(1, Ordering::Relaxed);
        self.events.keyframe_skip();
    }

    /// Records a move from rendition `from` to `to` (ids; `up` by the caller's judgement).
    pub fn count_switch(&self, to: u8, up: bool, reason: SwitchReason) {
        self.rendition.store(to, Ordering::Relaxed);
        self.switches.fetch_add(1, Ordering::Relaxed);
        *self.last_switch.lock() = Some(reason);
        self.events.switch(up, reason);
    }

    pub fn last_switch(&self) -> Option<SwitchReason> {
        *self.last_switch.lock()
    }

    /// Resolves when an operator removed this viewer ([`Hub::disconnect_viewer`]).
    pub async fn removed(&self) {
        self.kick.cancelled().await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    /// A hub for tests: wire messages without WebSocket framing, nothing counted.
    pub(crate) fn hub() -> Arc<Hub> {
        Hub::new(
            Limits {
                max_backlog_bytes: 1 << 20,
                max_lag: Duration::from_secs(30),
            },
            Arc::new(frame::WireFramer),
            Arc::new(NoEvents),
            Tasks::default(),
        )
    }

    fn info() -> PublisherInfo {
        PublisherInfo {
            protocol: "rtmp",
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            since_ms: 0,
            clock: None,
        }
    }

    #[test]
    fn second_publisher_is_refused_and_name_frees_on_drop() {
        let hub = hub();
        let p = hub.publish("a", info()).unwrap();
        assert!(matches!(
            hub.publish("a", info()),
            Err(PublishError::AlreadyLive(_))
        ));
        drop(p);
        assert!(hub.stream("a").is_none(), "idle stream removed");
        assert!(hub.publish("a", info()).is_ok());
        assert!(matches!(
            hub.publish("../x", info()),
            Err(PublishError::BadName(_))
        ));
    }

    #[test]
    fn stream_lives_while_viewers_wait() {
        let hub = hub();
        let v = hub.subscribe("s", SocketAddr::from(([127, 0, 0, 1], 2)), "test");
        let p = hub.publish("s", info()).unwrap();
        drop(p);
        assert!(hub.stream("s").is_some(), "viewer still waiting");
        assert_eq!(hub.summaries()[0].viewers, 1);
        drop(v);
        assert!(hub.stream("s").is_none());
    }
}
