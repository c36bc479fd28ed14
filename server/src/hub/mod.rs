//! The hub: live streams by name, each with its renditions, publisher and viewers.
//!
//! It knows nothing of codecs beyond what ingest tells it: it stores pre-framed wire messages and
//! hands the same bytes to every viewer of a rendition.

pub mod fanout;
pub mod frame;
pub mod rendition;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use dashmap::DashMap;
use onair_protocol::wire::{Init, MediaHeader, Message, Status, StatusCode};
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use fanout::{Sink, SinkWrite};
pub use rendition::{Cursor, Limits, Rendition};

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
    renditions: Vec<Arc<Rendition>>,
    publisher: Mutex<Option<PublisherInfo>>,
    media: Mutex<MediaInfo>,
    published_before: AtomicBool,
    viewers: AtomicU64,
    /// Cancelled to disconnect the current publisher (an operator's `DELETE`).
    kick: Mutex<Option<CancellationToken>>,
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
}

impl Stream {
    /// Rendition 0 is the source as published. ABR adds more.
    pub fn rendition(&self, id: usize) -> Option<&Arc<Rendition>> {
        self.renditions.get(id)
    }

    fn is_idle(&self) -> bool {
        self.publisher.lock().is_none() && self.viewers.load(Ordering::Acquire) == 0
    }
}

pub struct Hub {
    streams: DashMap<String, Arc<Stream>>,
    limits: Limits,
    next_viewer_id: AtomicU64,
    shutting_down: AtomicBool,
}

/// A status message, framed. Ours are short constants, well within the 255-byte string limit.
fn status(code: StatusCode, message: &str) -> Bytes {
    frame::message(&Message::Status(Status { code, message })).unwrap_or_default()
}

impl Hub {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            streams: DashMap::new(),
            limits,
            next_viewer_id: AtomicU64::new(1),
            shutting_down: Default::default(),
        })
    }

    fn new_stream(&self, name: &str) -> Arc<Stream> {
        let waiting = status(StatusCode::Waiting, "waiting for the publisher");
        let skipped = status(
            StatusCode::Skipped,
            "fell behind: skipped to the next keyframe",
        );
        Arc::new(Stream {
            name: name.to_string(),
            renditions: vec![Arc::new(Rendition::new(0, self.limits, waiting, skipped))],
            publisher: Mutex::new(None),
            media: Mutex::new(MediaInfo::default()),
            published_before: AtomicBool::new(false),
            viewers: AtomicU64::new(0),
            kick: Mutex::new(None),
            frames_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
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
        let live = status(StatusCode::Live, "publisher connected");
        let now = if republished {
            status(StatusCode::Republished, "publisher is back")
        } else {
            live.clone()
        };
        for r in &stream.renditions {
            r.push_status(now.clone(), live.clone(), false);
        }
        Ok(Publisher {
            hub: self.clone(),
            stream,
            kick,
        })
    }

    /// Subscribes a viewer to `name`, creating a waiting stream if nobody publishes it yet.
    pub fn subscribe(self: &Arc<Self>, name: &str) -> Viewer {
        let stream = {
            let entry = self
                .streams
                .entry(name.to_string())
                .or_insert_with(|| self.new_stream(name));
            // Counted under the map's entry lock, so cleanup can't remove the stream in between.
            entry.viewers.fetch_add(1, Ordering::AcqRel);
            entry.value().clone()
        };
        Viewer {
            id: self.next_viewer_id.fetch_add(1, Ordering::Relaxed),
            hub: self.clone(),
            stream,
        }
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
        let mut v: Vec<_> = self.streams.iter().map(|s| StreamSummary::of(&s)).collect();
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
            retained_bytes: s.renditions.iter().map(|r| r.retained_bytes()).collect(),
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

    /// Resolves when an operator removed this publisher ([`Hub::disconnect_publisher`]).
    pub async fn removed(&self) {
        self.kick.cancelled().await
    }

    /// Announces a (new) codec configuration for the source rendition.
    pub fn set_init(
        &self,
        init: &Init<'_>,
        media: MediaInfo,
    ) -> Result<(), onair_protocol::wire::WireError> {
        let framed = frame::message(&Message::Init(init.clone()))?;
        *self.stream.media.lock() = media;
        if let Some(r) = self.stream.rendition(0) {
            r.push_init(framed);
        }
        Ok(())
    }

    /// Frames one media frame once and appends it for every viewer of the source rendition.
    pub fn push_media(&self, header: &MediaHeader, payload: &[u8], sync: bool) {
        self.stream.frames_in.fetch_add(1, Ordering::Relaxed);
        self.stream
            .bytes_in
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        if let Some(r) = self.stream.rendition(0) {
            r.push_media(frame::media(header, payload), sync);
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let waiting = status(StatusCode::Waiting, "publisher disconnected");
        for r in &self.stream.renditions {
            r.push_status(waiting.clone(), waiting.clone(), true);
        }
        // Reset before releasing the claim, so a new publisher's media info is never wiped.
        *self.stream.media.lock() = MediaInfo::default();
        *self.stream.kick.lock() = None;
        *self.stream.publisher.lock() = None;
        self.hub.cleanup(&self.stream.name);
    }
}

/// A viewer's subscription. Dropping it removes the stream once nobody uses it.
pub struct Viewer {
    pub id: u64,
    hub: Arc<Hub>,
    pub stream: Arc<Stream>,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.stream.viewers.fetch_sub(1, Ordering::AcqRel);
        self.hub.cleanup(&self.stream.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn hub() -> Arc<Hub> {
        Hub::new(Limits {
            max_backlog_bytes: 1 << 20,
            max_lag: Duration::from_secs(3),
        })
    }

    fn info() -> PublisherInfo {
        PublisherInfo {
            protocol: "rtmp",
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            since_ms: 0,
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
        let v = hub.subscribe("s");
        let p = hub.publish("s", info()).unwrap();
        drop(p);
        assert!(hub.stream("s").is_some(), "viewer still waiting");
        assert_eq!(hub.summaries()[0].viewers, 1);
        drop(v);
        assert!(hub.stream("s").is_none());
    }
}
