//! LL-HLS from memory: one packager per live rendition of a stream, reading every frame of it
//! (the hub's lossless reader), boxing parts and segments with the same fMP4 muxer as the
//! browser player. A ladder rung's packager cuts its segments where the source's did
//! ([`segmenter::Cut`]). Nothing is written to disk; a window of segments is kept, and a stream
//! that ends is served for a grace period, then forgotten (its URLs answer 404).
//!
//! A packager starts with the first HLS request for a stream, not with every publish: a stream
//! nobody watches over HLS costs no window of segments. Starting late costs the first client
//! nothing, since the packager joins from the GOP cache and boxes it at once.
//!
//! URLs: `/hls/STREAM/index.m3u8` (the multivariant playlist, or with `ladder = []` the
//! source's media playlist), `/hls/STREAM/RENDITION/index.m3u8`, and below `EPOCH/` next to a
//! media playlist the init segments, segments and parts it lists. EPOCH identifies one packager run, so the URLs of a stream published
//! again later never collide with cached copies of the earlier one: everything under it is
//! immutable.

pub mod playlist;
pub mod segmenter;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use onair_protocol::wire::StatusCode;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{Event, Hub, Item, QueueLimits, Stream, StreamHold, now_us};

/// The published rendition's name.
pub const SOURCE: &str = "source";
/// How long a stream's numbering is remembered after its packager ended: a player holding a
/// playlist URL across a longer gap starts over anyway.
const COUNTERS_KEPT: Duration = Duration::from_secs(3600);
/// Stream names whose numbering is remembered at most.
const COUNTERS_MAX: usize = 4096;
use segmenter::{Counters, Frame, Segmenter, Settings};

/// The HLS side of the server: a packager per stream.
pub struct Hls {
    settings: Settings,
    grace: Duration,
    streams: DashMap<String, Arc<HlsStream>>,
    /// Where each stream's numbering stopped when its last packager ended, and when: a later
    /// one continues it, so a playlist URL's sequence numbers never go back. Kept for
    /// [`COUNTERS_KEPT`], and for at most [`COUNTERS_MAX`] names (a publisher trying names
    /// must not grow it without end).
    counters: DashMap<String, (Counters, std::time::Instant)>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// One rendition's packaged window, shared by its packager and the HTTP handlers.
pub struct HlsStream {
    /// Unix ms when this packager started: the URLs' directory.
    pub epoch: u64,
    source: Arc<Stream>,
    /// The rendition it packages (`source`, or a ladder rung's name).
    pub rendition: String,
    /// The source's packager, whose segments a rung's are cut like.
    leader: Option<Arc<HlsStream>>,
    /// Its key in [`Hls`]'s maps: the stream's name, `/` and the rendition for a rung.
    key: String,
    segmenter: RwLock<Segmenter>,
    /// Bumped on every new part or segment; blocked requests wait on it.
    version: watch::Sender<u64>,
    /// The last rendered playlists, full and delta ([`playlist::Variant::skip`]), each with the
    /// version it shows; a variant is rendered when first asked for.
    cache: Mutex<[Option<(u64, Bytes)>; 2]>,
}

impl HlsStream {
    pub fn read<T>(&self, f: impl FnOnce(&Segmenter) -> T) -> T {
        f(&self.segmenter.read())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The media playlist, rendered once per change however many clients ask; with a `suffix`
    /// for its URIs (a viewer's play token), rendered for that viewer alone.
    pub fn playlist(&self, variant: playlist::Variant, suffix: &str) -> Bytes {
        let prefix = format!("{}/", self.epoch);
        if !suffix.is_empty() {
            return Bytes::from(
                self.read(|s| playlist::media_playlist(s, &prefix, suffix, variant)),
            );
        }
        let version = *self.version.borrow();
        let mut cache = self.cache.lock();
        let slot = &mut cache[usize::from(variant.skip)];
        match slot {
            Some((v, body)) if *v == version => body.clone(),
            _ => {
                let body =
                    Bytes::from(self.read(|s| playlist::media_playlist(s, &prefix, "", variant)));
                *slot = Some((version, body.clone()));
                body
            }
        }
    }
}

impl Hls {
    pub fn new(
        settings: Settings,
        grace: Duration,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            grace,
            streams: DashMap::new(),
            counters: DashMap::new(),
            hub,
            shutdown,
            tracker,
        })
    }

    /// The packaged stream (its source rendition), if one is running or in its grace period.
    pub fn stream(&self, name: &str) -> Option<Arc<HlsStream>> {
        self.streams.get(name).map(|s| s.value().clone())
    }

    /// A rendition's packager, if one is running or in its grace period.
    pub fn variant(&self, name: &str, rendition: &str) -> Option<Arc<HlsStream>> {
        if rendition == SOURCE {
            return self.stream(name);
        }
        self.streams
            .get(&format!("{name}/{rendition}"))
            .map(|s| s.value().clone())
    }

    /// A rendition's packager, starting it (and the source's, which it follows) if the stream
    /// is live with that rendition and has none yet.
    pub fn variant_or_start(
        self: &Arc<Self>,
        name: &str,
        rendition: &str,
    ) -> Option<Arc<HlsStream>> {
        let leader = self.stream_or_start(name)?;
        if rendition == SOURCE {
            return Some(leader);
        }
        let key = format!("{name}/{rendition}");
        let live = self
            .hub
            .stream(name)
            .filter(|s| Arc::ptr_eq(s, &leader.source) && s.publisher().is_some())
            .and_then(|s| {
                s.rendition_named(rendition)
                    .filter(|r| !r.is_gone())
                    .map(|_| s)
            });
        match (self.streams.entry(key.clone()), live) {
            (dashmap::Entry::Occupied(e), _) => Some(e.get().clone()),
            (entry, Some(stream)) => {
                let hls = self.start(key, stream, rendition, Some(leader), None);
                entry.insert(hls.clone());
                Some(hls)
            }
            (dashmap::Entry::Vacant(_), None) => None,
        }
    }

    /// The packaged stream, starting its packager if the stream is live and has none yet (or
    /// only one left from an earlier publish of the same name).
    pub fn stream_or_start(self: &Arc<Self>, name: &str) -> Option<Arc<HlsStream>> {
        let current = self.hub.stream(name);
        let live = current.as_ref().filter(|s| s.publisher().is_some());
        let entry = self.streams.entry(name.to_string());
        match (entry, live) {
            (dashmap::Entry::Occupied(e), Some(s)) if Arc::ptr_eq(&e.get().source, s) => {
                Some(e.get().clone())
            }
            (dashmap::Entry::Occupied(e), None) => Some(e.get().clone()),
            (entry, Some(stream)) => {
                // Held, the stream outlives a publisher's departure while this packager runs:
                // a republish within the grace period continues the same playlist.
                let hold = self
                    .hub
                    .hold(name)
                    .filter(|h| Arc::ptr_eq(&h.stream, stream));
                let hls = self.start(name.to_string(), stream.clone(), SOURCE, None, hold);
                entry.insert(hls.clone());
                Some(hls)
            }
            (dashmap::Entry::Vacant(_), None) => None,
        }
    }

    /// A new packager for `rendition` of `stream` under `key`, its numbering continuing where
    /// the last one of that key stopped; its task is spawned. The caller puts it in the map.
    fn start(
        self: &Arc<Self>,
        key: String,
        stream: Arc<Stream>,
        rendition: &str,
        leader: Option<Arc<HlsStream>>,
        hold: Option<StreamHold>,
    ) -> Arc<HlsStream> {
        let mut segmenter = Segmenter::new(self.settings);
        if let Some(c) = self.counters.get(&key) {
            segmenter.resume(c.0);
        }
        let hls = Arc::new(HlsStream {
            epoch: now_us() / 1000,
            source: stream,
            rendition: rendition.to_string(),
            leader,
            key,
            segmenter: RwLock::new(segmenter),
            version: watch::channel(0).0,
            cache: Mutex::new([None, None]),
        });
        self.tracker.spawn(package(
            self.clone(),
            hls.clone(),
            hold,
            self.shutdown.clone(),
        ));
        hls
    }

    fn remove(&self, hls: &Arc<HlsStream>) {
        let counters = hls.read(|s| s.counters());
        let now = std::time::Instant::now();
        self.counters.insert(hls.key.clone(), (counters, now));
        if self.counters.len() > COUNTERS_MAX {
            self.counters
                .retain(|_, (_, at)| now.duration_since(*at) < COUNTERS_KEPT);
        }
        if self.counters.len() > COUNTERS_MAX {
            // Still too many within the hour: the oldest go.
            let mut ages: Vec<_> = self.counters.iter().map(|e| e.value().1).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() - COUNTERS_MAX];
            self.counters.retain(|_, (_, at)| *at >= cut);
        }
        self.streams.remove_if(&hls.key, |_, h| Arc::ptr_eq(h, hls));
    }
}

/// Follows its rendition of the stream, every frame of it (a lossless reader), and packages
/// it, until the stream has been gone for the grace period, the rendition ends (a rung that
/// went), or shutdown.
async fn package(
    hls: Arc<Hls>,
    me: Arc<HlsStream>,
    hold: Option<StreamHold>,
    shutdown: CancellationToken,
) {
    let name = me.key.clone();
    tracing::info!(stream = %name, epoch = me.epoch, "hls: packaging");
    let rendition = match &me.leader {
        None => Some(me.source.source()),
        Some(_) => me.source.rendition_named(&me.rendition),
    };
    let Some(rendition) = rendition else {
        hls.remove(&me);
        return;
    };
    let reader = rendition.subscribe_lossless(QueueLimits::DEFAULT);
    // A rung cuts its segments where the source's packager cut them.
    let leader_cut = |t_us: u64| {
        me.leader
            .as_ref()
            .map_or(segmenter::Cut::Own, |l| l.read(|s| s.cut_at(t_us)))
    };
    let mut ended: Option<tokio::time::Instant> = None;
    // Frames the segmenter refused since the last init: logged once, not once per frame.
    let mut dropped = 0u64;
    let mut lost_logged = false;
    let mut events = Vec::new();
    'run: loop {
        while events.len() < 256
            && let Some(e) = reader.try_next()
        {
            events.push(e);
        }
        if events.is_empty() {
            let deadline = ended.map(|at| at + hls.grace);
            tokio::select! {
                e = reader.next() => events.push(e),
                _ = shutdown.cancelled() => break,
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                    if deadline.is_some() => {
                    tracing::info!(stream = %name, "hls: stream ended; its playlist is gone");
                    break;
                }
            }
        }
        let mut changed = false;
        let mut seg = me.segmenter.write();
        let now = now_us();
        for event in events.drain(..) {
            match event {
                Event::Item(Item::Media(f)) => {
                    let frame = Frame {
                        track: f.header.track,
                        keyframe: f.header.keyframe,
                        dts: f.header.dts,
                        cts: f.header.cts,
                        ingest_us: f.header.ingest_us,
                        payload: &f.payload,
                    };
                    let pushed = if me.leader.is_some() {
                        seg.push_following(&frame, now, Some(&leader_cut))
                    } else {
                        seg.push(&frame, now)
                    };
                    match pushed {
                        Ok(closed) => changed |= closed,
                        Err(e) => {
                            if dropped == 0 {
                                tracing::warn!(stream = %name, error = %e, "hls: frame dropped (logged once per init)");
                            }
                            dropped += 1;
                        }
                    }
                }
                Event::Item(Item::Init(init)) => {
                    if dropped > 1 {
                        tracing::warn!(stream = %name, dropped, "hls: frames dropped under the last init");
                    }
                    dropped = 0;
                    if let Err(e) = seg.set_init(&init.wire(0)) {
                        tracing::warn!(stream = %name, error = %e, "hls: cannot package this stream");
                    }
                    changed = true;
                    ended = None;
                }
                Event::Item(Item::Status(code, _)) => match code {
                    StatusCode::Waiting | StatusCode::Ended => {
                        seg.end_of_media();
                        changed = true;
                        ended.get_or_insert_with(tokio::time::Instant::now);
                    }
                    StatusCode::Live | StatusCode::Republished => ended = None,
                    StatusCode::Skipped => {}
                },
                Event::Lost(n) => {
                    // The packager fell behind the publisher (a starved machine): the queue
                    // dropped up to the next keyframe, where packaging goes on.
                    if !lost_logged {
                        tracing::warn!(stream = %name, frames = n, total = reader.dropped(), "hls: packager fell behind; frames dropped up to a keyframe");
                        lost_logged = true;
                    }
                }
                Event::Ended => {
                    drop(seg);
                    break 'run;
                }
            }
        }
        // Announced while the change is still locked in: a request woken by it, or one
        // that sees the change first, renders this version, never the one before.
        if changed {
            me.version.send_modify(|v| *v += 1);
        }
    }
    hls.remove(&me);
    drop(hold);
}
