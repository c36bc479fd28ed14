//! A rendition: one encoding of a stream, its log of frames (and GOP cache), a keyframe index,
//! and the two ways to read it.
//!
//! The log holds codec-neutral entries ([`Item`]), each framed once for WebSocket viewers by the
//! stream's [`Framer`] when it is pushed; a media frame's payload is a slice of those bytes.
//! Viewers hold only a cursor into the log and write the very same `Bytes`. So a viewer's
//! backlog costs nothing beyond the shared log, which is bounded in bytes and age:
//!
//! - the log always keeps everything since the last keyframe (the GOP cache), so a new viewer
//!   starts at once, on a keyframe;
//! - beyond that it keeps at most `max_backlog_bytes` and `max_lag` of history for viewers that
//!   are slightly behind;
//! - a viewer whose cursor falls out of that window, or whose next frame waited longer than
//!   `max_lag` (plus, until it first catches up, the age of the GOP it joined with), skips to the
//!   next keyframe, and the skip is counted. This is the *lossy* cursor ([`Cursor`]).
//!
//! Consumers that must see every frame subscribe a *lossless* queue instead
//! ([`Rendition::subscribe_lossless`], see [`super::lossless`]).
//!
//! Every keyframe's dts is indexed with its place in the log, so a viewer can start on, or
//! switch to, this rendition at a given keyframe ([`Rendition::switch_cursor`]).
//!
//! Viewers at the live edge are written by the rendition's fan-out task instead of their own
//! (see [`super::fanout`]); this module's cursor rules apply to the others.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use onair_protocol::codec::Decodes;
use onair_protocol::wire::{MediaHeader, Message, Status, StatusCode, WireError};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::Notify;

use super::Tasks;
use super::fanout::{Fanout, Flush, FlushState, Returned, Sink};
use super::frame::{Frame, Framer, InitConfig, Item};
use super::lossless::{Lossless, QueueLimits};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_backlog_bytes: u64,
    pub max_lag: Duration,
}

/// What a rendition is, as the API and the multivariant playlist describe it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RenditionInfo {
    /// `source` for the published one.
    pub name: String,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub fps: Option<f64>,
    /// Nominal video bitrate (the ladder's setting); 0 when unknown (the source).
    pub nominal_kbps: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `sync`: a viewer may start here (a video keyframe, or any frame of an audio-only stream).
    Media {
        sync: bool,
        video: bool,
        dts: u64,
        /// dts + cts: where renditions line up.
        pts: u64,
    },
    Init {
        generation: u64,
    },
    Status {
        generation: u64,
    },
}

/// A viewer's backlog in a rendition's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub bytes: u64,
    /// How long its oldest entry has waited since it was pushed.
    pub age: Duration,
}

struct Entry {
    item: Item,
    /// The entry as a WebSocket viewer receives it.
    framed: Bytes,
    kind: Kind,
    pushed: Instant,
    /// Bytes pushed before this entry, for O(1) backlog sizes.
    offset: u64,
}

struct Log {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    base: u64,
    /// Bytes ever pushed.
    pushed: u64,
    /// Bytes in `entries`.
    retained: u64,
    /// Sequence number of the newest sync point: where new viewers start.
    gop_start: Option<u64>,
    /// Sync points still in the log, oldest first: (pts, dts, sequence number). Renditions
    /// line up by presentation time: a ladder rung without B-frames has its keyframe's dts
    /// where a source with B-frames has the keyframe's pts.
    keyframes: VecDeque<(u64, u64, u64)>,
    /// The newest media frame's dts.
    newest_dts: Option<u64>,
    /// The current configuration: its generation, framed, and as pushed.
    init: Option<(u64, Bytes, Arc<InitConfig>)>,
    /// The status a viewer joining now is given, with the generation of the last status entry.
    status: (u64, Bytes),
    generation: u64,
    warned_gop_too_big: bool,
    lossless: Vec<Weak<Lossless>>,
}

impl Log {
    fn head(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    fn entry(&self, seq: u64) -> Option<&Entry> {
        seq.checked_sub(self.base)
            .and_then(|i| self.entries.get(i as usize))
    }
}

/// Where one viewer is in a rendition's log.
#[derive(Debug)]
pub struct Cursor {
    next: u64,
    /// Drop media until the next sync point.
    need_sync: bool,
    init_generation: u64,
    status_generation: u64,
    /// Extra lag tolerated until the viewer first reaches the live edge: a new viewer starts a
    /// GOP behind by design.
    allowance: Duration,
    /// After a switch: video before this dts, and audio at or before `audio_after`, were sent
    /// from the rendition switched from.
    video_from: Option<u64>,
    audio_after: Option<u64>,
    /// Stop before the next video keyframe (a switch waits there), unless it is this one (pts).
    stop_at_keyframe: bool,
    passed_keyframe: Option<u64>,
    /// The last media sent through this cursor, per kind.
    last_video_dts: Option<u64>,
    last_audio_dts: Option<u64>,
    /// Times this viewer skipped ahead to catch up.
    pub skips: u64,
    /// The video codecs the viewer decodes: it is sent no configuration, and so no media, of
    /// any other.
    decodes: Decodes,
    /// The rendition's configuration is one the viewer cannot decode: it is sent nothing and
    /// never promoted until it moves (or the configuration changes).
    undecodable: bool,
}

/// What [`Rendition::read`] did besides adding frames.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The viewer was too far behind and skipped to the next keyframe.
    pub skipped: bool,
    /// Reading stopped before a video keyframe presented at this pts
    /// ([`Cursor::stop_at_keyframes`]).
    pub at_keyframe: Option<u64>,
    /// Nothing was read: the rendition's configuration is one the viewer cannot decode.
    pub undecodable: bool,
}

impl Cursor {
    /// Sequence number of the next log entry this viewer needs.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Continues where the fan-out left off. (It was promoted at the head, so its join
    /// allowance is already spent and it is not waiting for a keyframe.)
    pub fn resume(&mut self, r: &Returned) {
        self.next = r.next;
    }

    /// Reading stops before every video keyframe from now on (a switch is waiting for one).
    pub fn stop_at_keyframes(&mut self, stop: bool) {
        self.stop_at_keyframe = stop;
        self.passed_keyframe = None;
    }

    /// The keyframe reading stopped at (its pts) is read next time after all.
    pub fn pass_keyframe(&mut self, pts: u64) {
        self.passed_keyframe = Some(pts);
    }

    /// The video codecs the viewer decodes.
    pub fn decodes(&self) -> Decodes {
        self.decodes
    }

    /// Whether the viewer is held: its rendition's configuration is one it cannot decode.
    pub fn undecodable(&self) -> bool {
        self.undecodable
    }
}

/// Whether a viewer that decodes `decodes` can be sent the log's current configuration (or
/// there is none yet).
fn decodable(log: &Log, decodes: Decodes) -> bool {
    log.init
        .as_ref()
        .and_then(|(_, _, init)| init.video())
        .is_none_or(|v| decodes.can(&v.codec))
}

pub struct Rendition {
    pub id: u8,
    info: RwLock<RenditionInfo>,
    limits: Limits,
    framer: Arc<dyn Framer>,
    log: Mutex<Log>,
    notify: Notify,
    /// Sent to a viewer when it skips (a `skipped` status), framed once.
    skip_notice: Bytes,
    fanout: Fanout,
    tasks: Tasks,
    /// Removed from its stream: no more frames will come.
    gone: AtomicBool,
}

impl Flush for Rendition {
    fn fanout(&self) -> &Fanout {
        &self.fanout
    }

    fn collect(&self, state: &mut FlushState) -> u64 {
        let log = self.log.lock();
        let lo = state.flushed.max(log.base);
        for e in log.entries.range((lo - log.base) as usize..) {
            state
                .entries
                .push((e.framed.clone(), matches!(e.kind, Kind::Media { .. })));
        }
        state.flushed = log.head();
        lo
    }
}

/// A status message, framed.
fn status(framer: &dyn Framer, code: StatusCode, message: &str) -> Bytes {
    framer
        .message(&Message::Status(Status { code, message }))
        .unwrap_or_default()
}

impl Rendition {
    pub(super) fn new(
        id: u8,
        info: RenditionInfo,
        limits: Limits,
        framer: Arc<dyn Framer>,
        initial_status: (StatusCode, &'static str),
        tasks: Tasks,
    ) -> Self {
        let skip_notice = status(
            &*framer,
            StatusCode::Skipped,
            "fell behind: skipped to the next keyframe",
        );
        let initial = status(&*framer, initial_status.0, initial_status.1);
        Self {
            id,
            info: RwLock::new(info),
            limits,
            skip_notice,
            log: Mutex::new(Log {
                entries: VecDeque::new(),
                base: 0,
                pushed: 0,
                retained: 0,
                gop_start: None,
                keyframes: VecDeque::new(),
                newest_dts: None,
                init: None,
                status: (0, initial),
                generation: 0,
                warned_gop_too_big: false,
                lossless: Vec::new(),
            }),
            framer,
            notify: Notify::new(),
            fanout: Fanout::default(),
            tasks,
            gone: AtomicBool::new(false),
        }
    }

    pub fn info(&self) -> RenditionInfo {
        self.info.read().clone()
    }

    pub fn name(&self) -> String {
        self.info.read().name.clone()
    }

    pub(super) fn update_info(&self, f: impl FnOnce(&mut RenditionInfo)) {
        f(&mut self.info.write());
    }

    /// Whether it was removed from its stream.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    pub(super) fn set_gone(&self) {
        self.gone.store(true, Ordering::Release);
        let log = self.log.lock();
        for l in log.lossless.iter().filter_map(Weak::upgrade) {
            l.end();
        }
        drop(log);
        self.notify.notify_waiters();
        self.fanout.wake();
    }

    /// Appends a media frame, framed once. `sync` marks a point where a viewer can start.
    pub(super) fn push_media(&self, header: &MediaHeader, payload: &[u8], sync: bool) {
        let (framed, at) = self.framer.media(header, payload);
        let frame = Frame {
            header: *header,
            payload: framed.slice(at..),
        };
        let kind = Kind::Media {
            sync,
            video: frame.is_video(),
            dts: header.dts,
            pts: header.dts.saturating_add_signed(i64::from(header.cts)),
        };
        let mut log = self.log.lock();
        log.newest_dts = Some(header.dts);
        self.push_locked(&mut log, Item::Media(frame), framed, kind);
    }

    /// Appends a new codec configuration. Viewers receive it in order; media resumes for them at
    /// the next sync point, and the GOP cache restarts there too.
    pub(super) fn push_init(&self, init: Arc<InitConfig>) -> Result<(), WireError> {
        let framed = self.framer.message(&Message::Init(init.wire(self.id)))?;
        let mut log = self.log.lock();
        log.generation += 1;
        let generation = log.generation;
        log.init = Some((generation, framed.clone(), init.clone()));
        log.gop_start = None;
        self.push_locked(
            &mut log,
            Item::Init(init),
            framed,
            Kind::Init { generation },
        );
        Ok(())
    }

    /// Appends a status for the viewers already here; viewers joining later are given
    /// `for_joiners` instead (a joiner is told `live`, not `republished`). `clears_init`: the
    /// configuration no longer holds (publisher gone), so joiners get no init until the next one.
    pub(super) fn push_status(
        &self,
        now: (StatusCode, &'static str),
        for_joiners: (StatusCode, &'static str),
        clears_init: bool,
    ) {
        let framed = status(&*self.framer, now.0, now.1);
        let joiners = if for_joiners == now {
            framed.clone()
        } else {
            status(&*self.framer, for_joiners.0, for_joiners.1)
        };
        let mut log = self.log.lock();
        log.generation += 1;
        let generation = log.generation;
        log.status = (generation, joiners);
        if clears_init {
            log.init = None;
            log.gop_start = None;
        }
        self.push_locked(
            &mut log,
            Item::Status(now.0, now.1),
            framed,
            Kind::Status { generation },
        );
    }

    fn push_locked(&self, log: &mut Log, item: Item, framed: Bytes, kind: Kind) {
        let now = Instant::now();
        let len = framed.len() as u64;
        let sync = matches!(kind, Kind::Media { sync: true, .. });
        if let Kind::Media {
            sync: true,
            dts,
            pts,
            ..
        } = kind
        {
            let seq = log.head();
            log.gop_start = Some(seq);
            log.keyframes.push_back((pts, dts, seq));
        }
        log.lossless.retain(|l| match l.upgrade() {
            Some(l) => {
                l.offer(&item, sync);
                true
            }
            None => false,
        });
        let offset = log.pushed;
        log.entries.push_back(Entry {
            item,
            framed,
            kind,
            pushed: now,
            offset,
        });
        log.pushed += len;
        log.retained += len;
        self.trim(log, now);
        self.notify.notify_waiters();
        self.fanout.wake();
    }

    fn trim(&self, log: &mut Log, now: Instant) {
        let limits = self.limits;
        if log.retained > limits.max_backlog_bytes && log.gop_start.is_some_and(|g| g <= log.base) {
            // The current GOP alone exceeds the bound: stop caching it. New viewers wait for the
            // next keyframe instead of pinning unbounded memory.
            if !log.warned_gop_too_big {
                tracing::warn!(
                    rendition = self.id,
                    bytes = log.retained,
                    "GOP exceeds max_backlog_bytes; new viewers wait for the next keyframe"
                );
                log.warned_gop_too_big = true;
            }
            log.gop_start = None;
        }
        while let Some(front) = log.entries.front() {
            let in_gop = log.gop_start.is_some_and(|g| log.base >= g);
            let over_bytes = log.retained > limits.max_backlog_bytes;
            let too_old = now.duration_since(front.pushed) > limits.max_lag;
            if in_gop || !(over_bytes || too_old) {
                break;
            }
            log.retained -= front.framed.len() as u64;
            log.entries.pop_front();
            log.base += 1;
        }
        while log
            .keyframes
            .front()
            .is_some_and(|&(_, _, seq)| seq < log.base)
        {
            log.keyframes.pop_front();
        }
    }

    fn cursor_at(log: &Log, next: u64, decodes: Decodes) -> Cursor {
        Cursor {
            decodes,
            undecodable: false,
            next,
            need_sync: true,
            init_generation: 0,
            status_generation: log.status.0,
            allowance: Duration::ZERO,
            video_from: None,
            audio_after: None,
            stop_at_keyframe: false,
            passed_keyframe: None,
            last_video_dts: None,
            last_audio_dts: None,
            skips: 0,
        }
    }

    /// A cursor for a new viewer that decodes `decodes`, and the messages it starts with: the
    /// current status, the current init if any (and if it can decode it). Media follows from
    /// the GOP cache through [`Rendition::read`].
    pub fn join(&self, decodes: Decodes, out: &mut Vec<Bytes>) -> Cursor {
        let log = self.log.lock();
        out.push(log.status.1.clone());
        let mut cursor = Self::cursor_at(&log, log.head(), decodes);
        if !decodable(&log, decodes) {
            cursor.undecodable = true;
            return cursor;
        }
        if let Some((generation, init, _)) = &log.init {
            out.push(init.clone());
            cursor.init_generation = *generation;
            if let Some(g) = log.gop_start {
                cursor.next = g;
                cursor.need_sync = false;
                cursor.allowance = log.entry(g).map_or(Duration::ZERO, |e| e.pushed.elapsed());
            }
        }
        cursor
    }

    /// The sequence number of the keyframe presented at `pts` (±1 ms of timestamp rounding),
    /// if the log still holds it.
    pub fn keyframe_at(&self, pts: u64) -> Option<u64> {
        let log = self.log.lock();
        log.keyframes
            .iter()
            .rev()
            .find(|&&(k, _, _)| k.abs_diff(pts) <= 1)
            .map(|&(_, _, seq)| seq)
    }

    /// The newest media frame's dts.
    pub fn newest_dts(&self) -> Option<u64> {
        self.log.lock().newest_dts
    }

    /// A cursor that continues a viewer here, switched from another rendition of the same
    /// stream that sent video up to dts `last_video` and audio up to `last_audio`: from the
    /// keyframe presented at `at` (±1 ms), or, with `at` None, from the first keyframe whose dts
    /// is after `last_video`. Its
    /// init goes to `out` first. Audio resumes right after `last_audio` (it may sit before the
    /// keyframe in this log), video at the keyframe, so there is no hole and no overlap.
    /// None if there is no such keyframe (yet), or no configuration.
    pub fn switch_cursor(
        &self,
        at: Option<u64>,
        last_video: Option<u64>,
        last_audio: Option<u64>,
        decodes: Decodes,
        out: &mut Vec<Bytes>,
    ) -> Option<Cursor> {
        let log = self.log.lock();
        if !decodable(&log, decodes) {
            return None;
        }
        let (generation, init, _) = log.init.as_ref()?;
        let &(_, k_dts, k_seq) = match at {
            Some(at) => log
                .keyframes
                .iter()
                .rev()
                .find(|&&(k, _, _)| k.abs_diff(at) <= 1)?,
            None => log
                .keyframes
                .iter()
                .find(|&&(_, k, _)| last_video.is_none_or(|v| k > v))?,
        };
        // The init must precede the keyframe in this log, or the keyframe belongs to an older
        // configuration than the one we would send.
        let init_seq = log
            .entries
            .iter()
            .rposition(|e| matches!(e.kind, Kind::Init { generation: g } if g == *generation));
        if init_seq.is_some_and(|i| log.base + i as u64 > k_seq) {
            return None;
        }
        // Back from the keyframe over audio the old rendition has not sent yet.
        let mut start = k_seq;
        let floor = init_seq.map_or(log.base, |i| log.base + i as u64 + 1);
        let mut seq = k_seq;
        while seq > floor {
            seq -= 1;
            match log.entry(seq).map(|e| e.kind) {
                Some(Kind::Media {
                    video: false, dts, ..
                }) => {
                    if last_audio.is_some_and(|a| dts <= a) {
                        break;
                    }
                    start = seq;
                }
                Some(Kind::Media { video: true, .. }) => {}
                _ => break,
            }
        }
        out.push(init.clone());
        let mut cursor = Self::cursor_at(&log, start, decodes);
        cursor.init_generation = *generation;
        cursor.need_sync = false;
        cursor.video_from = Some(k_dts);
        cursor.audio_after = last_audio;
        cursor.last_video_dts = last_video;
        cursor.last_audio_dts = last_audio;
        Some(cursor)
    }

    /// The dts of the last video and audio frames before entry `next` (what a viewer there was
    /// last sent, the fan-out's writes included).
    pub fn last_sent(&self, cursor: &Cursor) -> (Option<u64>, Option<u64>) {
        let log = self.log.lock();
        let (mut video, mut audio) = (None, None);
        let mut seq = cursor.next;
        while seq > log.base && (video.is_none() || audio.is_none()) {
            seq -= 1;
            match log.entry(seq).map(|e| e.kind) {
                Some(Kind::Media {
                    video: true, dts, ..
                }) => {
                    video.get_or_insert(dts);
                }
                Some(Kind::Media { dts, .. }) => {
                    audio.get_or_insert(dts);
                }
                Some(_) => {}
                None => break,
            }
        }
        (
            video.or(cursor.last_video_dts),
            audio.or(cursor.last_audio_dts),
        )
    }

    /// Adds up to `max_frames` messages / about `max_bytes` from the log to `out` (cheap `Bytes`
    /// clones), advancing the cursor. Applies the viewer's backlog bounds first.
    pub fn read(
        &self,
        cursor: &mut Cursor,
        out: &mut Vec<Bytes>,
        max_frames: usize,
        max_bytes: usize,
    ) -> ReadOutcome {
        let now = Instant::now();
        let log = self.log.lock();
        let head = log.head();
        let mut outcome = ReadOutcome::default();
        cursor.undecodable = !decodable(&log, cursor.decodes);
        if cursor.undecodable {
            // Held where it is: it moves to another rendition, or this one's configuration
            // changes to one it decodes.
            outcome.undecodable = true;
            return outcome;
        }

        let behind = log.entry(cursor.next).is_some_and(|e| {
            now.duration_since(e.pushed) > self.limits.max_lag + cursor.allowance
                || log.pushed - e.offset > self.limits.max_backlog_bytes
        });
        if cursor.next < log.base || behind {
            outcome.skipped = true;
            cursor.next = head;
            cursor.need_sync = true;
            cursor.allowance = Duration::ZERO;
            cursor.video_from = None;
            cursor.audio_after = None;
            cursor.skips += 1;
            out.push(self.skip_notice.clone());
            // What the viewer skipped may have changed its configuration: catch it up.
            if cursor.status_generation != log.status.0 {
                out.push(log.status.1.clone());
                cursor.status_generation = log.status.0;
            }
            if let Some((generation, init, _)) = &log.init
                && cursor.init_generation != *generation
            {
                out.push(init.clone());
                cursor.init_generation = *generation;
            }
        }

        let mut bytes = 0;
        let limit = out.len() + max_frames;
        while cursor.next < head && out.len() < limit && bytes < max_bytes {
            let Some(e) = log.entry(cursor.next) else {
                break;
            };
            match e.kind {
                Kind::Media {
                    sync,
                    video,
                    dts,
                    pts,
                } => {
                    if video
                        && sync
                        && cursor.stop_at_keyframe
                        && cursor.passed_keyframe != Some(pts)
                        && !cursor.need_sync
                    {
                        outcome.at_keyframe = Some(pts);
                        break;
                    }
                    cursor.next += 1;
                    if cursor.need_sync && !sync {
                        continue;
                    }
                    if video {
                        if cursor.video_from.is_some_and(|from| dts < from) {
                            continue;
                        }
                        cursor.video_from = None;
                        cursor.last_video_dts = Some(dts);
                    } else {
                        if cursor.audio_after.is_some_and(|after| dts <= after) {
                            continue;
                        }
                        cursor.audio_after = None;
                        cursor.last_audio_dts = Some(dts);
                    }
                    cursor.need_sync = false;
                }
                Kind::Init { generation } => {
                    cursor.next += 1;
                    cursor.init_generation = generation;
                    cursor.need_sync = true;
                    cursor.video_from = None;
                    cursor.audio_after = None;
                }
                Kind::Status { generation } => {
                    cursor.next += 1;
                    cursor.status_generation = generation;
                }
            }
            bytes += e.framed.len();
            out.push(e.framed.clone());
        }

        if cursor.next >= head {
            cursor.allowance = Duration::ZERO;
        }
        outcome
    }

    /// Resolves when something is appended after this call (or the rendition is removed).
    /// Create it before calling [`Rendition::read`] (and `enable` it) so that no append in
    /// between is missed.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// A lossless reader, starting with the current status, init and GOP cache.
    pub fn subscribe_lossless(&self, limits: QueueLimits) -> Arc<Lossless> {
        let reader = Lossless::new(limits);
        let mut log = self.log.lock();
        if let Some((_, _, init)) = &log.init {
            reader.offer(&Item::Init(init.clone()), false);
            if let Some(g) = log.gop_start {
                for e in log.entries.range((g - log.base) as usize..) {
                    let sync = matches!(e.kind, Kind::Media { sync: true, .. });
                    reader.offer(&e.item, sync);
                }
            }
        }
        if self.is_gone() {
            reader.end();
        }
        log.lossless.push(Arc::downgrade(&reader));
        reader
    }

    /// Registers a viewer's socket for the fast path; it is written by the fan-out task while
    /// promoted. Remove it with [`Rendition::detach_sink`].
    pub fn attach_sink(self: &Arc<Self>, sink: &Arc<Sink>) {
        self.fanout.attach(self, sink.clone(), &self.tasks);
    }

    pub fn detach_sink(&self, sink: &Arc<Sink>) {
        self.fanout.remove(sink);
    }

    /// Hands the viewer's socket to the fan-out if its cursor is at the live edge (and not
    /// waiting for a keyframe); returns whether it did.
    pub fn promote(&self, sink: &Sink, cursor: &Cursor) -> bool {
        let log = self.log.lock();
        let head = log.head();
        if cursor.next != head || cursor.need_sync || cursor.stop_at_keyframe || cursor.undecodable
        {
            return false;
        }
        sink.promote(head);
        true
    }

    /// What a viewer whose next entry is `next` still has to get: the bytes from there to the
    /// head, and how long the first of them has waited.
    pub fn backlog(&self, next: u64) -> Backlog {
        let log = self.log.lock();
        if next >= log.head() {
            return Backlog::default();
        }
        let Some(first) = log.entry(next).or_else(|| log.entries.front()) else {
            return Backlog::default();
        };
        Backlog {
            bytes: log.pushed - first.offset,
            age: first.pushed.elapsed(),
        }
    }

    /// The rate of this rendition over the last `window` of its log (at most what the log
    /// retains), in kbit/s; None when the log holds less than half of `window`.
    pub fn recent_kbps(&self, window: Duration) -> Option<u32> {
        let log = self.log.lock();
        let last = log.entries.back()?;
        let since = last.pushed.checked_sub(window)?;
        let i = log.entries.partition_point(|e| e.pushed < since);
        let first = log.entries.get(i)?;
        let span = last.pushed.duration_since(first.pushed);
        if span < window / 2 {
            return None;
        }
        let bits = (log.pushed - first.offset) * 8;
        Some((bits as f64 / span.as_secs_f64() / 1000.0) as u32)
    }

    /// Bytes retained in the log (GOP cache plus backlog window).
    pub fn retained_bytes(&self) -> u64 {
        self.log.lock().retained
    }

    /// Bytes ever pushed.
    pub fn pushed_bytes(&self) -> u64 {
        self.log.lock().pushed
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hub::frame::WireFramer;
    use onair_protocol::wire::{TrackParams, VERSION};

    fn r(max_bytes: u64, max_lag_ms: u64) -> Rendition {
        Rendition::new(
            0,
            RenditionInfo::default(),
            Limits {
                max_backlog_bytes: max_bytes,
                max_lag: Duration::from_millis(max_lag_ms),
            },
            Arc::new(WireFramer),
            (StatusCode::Waiting, "S0"),
            Tasks::default(),
        )
    }

    fn init(tag: &str) -> Arc<InitConfig> {
        Arc::new(InitConfig {
            tracks: vec![crate::hub::frame::TrackConfig {
                id: 0,
                timescale: 1000,
                codec: tag.to_string(),
                params: TrackParams::Video {
                    width: 2,
                    height: 2,
                    fps_milli: 0,
                },
                config: Bytes::new(),
            }],
        })
    }

    pub(crate) fn header(track: u8, keyframe: bool, dts: u64) -> MediaHeader {
        MediaHeader {
            track,
            keyframe,
            dts,
            cts: 0,
            ingest_us: 0,
        }
    }

    /// Pushes a video frame whose payload is `tag` (a keyframe if it has a 'K').
    fn video(r: &Rendition, tag: &str, dts: u64) {
        let key = tag.contains('K');
        r.push_media(&header(0, key, dts), tag.as_bytes(), key);
    }

    fn audio(r: &Rendition, tag: &str, dts: u64) {
        r.push_media(&header(1, true, dts), tag.as_bytes(), false);
    }

    /// What a viewer read, as readable tags: a media frame's payload, `I:codec` for an init,
    /// the message of a status.
    fn tags(out: &[Bytes]) -> Vec<String> {
        out.iter()
            .map(|b| match Message::decode(b).expect("decodes") {
                Message::Media { payload, .. } => String::from_utf8_lossy(payload).into_owned(),
                Message::Init(i) => format!("I:{}", i.tracks[0].codec),
                Message::Status(s) => s.message.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn read_all(r: &Rendition, c: &mut Cursor) -> Vec<String> {
        let mut out = Vec::new();
        r.read(c, &mut out, 1000, usize::MAX);
        tags(&out)
    }

    #[test]
    fn the_wire_framer_is_the_protocol() {
        let (b, at) = WireFramer.media(&header(0, true, 5), b"xyz");
        assert_eq!(&b[at..], b"xyz");
        assert!(matches!(Message::decode(&b), Ok(Message::Media { .. })));
        assert_eq!(VERSION, onair_protocol::wire::VERSION);
    }

    #[test]
    fn new_viewer_starts_at_the_last_keyframe() {
        let r = r(1 << 20, 10_000);
        r.push_init(init("I1")).unwrap();
        video(&r, "d0", 0); // before any keyframe
        video(&r, "K1", 33);
        video(&r, "d1", 66);
        video(&r, "K2", 100);
        video(&r, "d2", 133);
        let mut first = Vec::new();
        let mut c = r.join(Decodes::ALL, &mut first);
        assert_eq!(tags(&first), ["S0", "I:I1"]);
        assert_eq!(read_all(&r, &mut c), ["K2", "d2"]);
        assert_eq!(r.keyframe_at(33), Some(2));
        assert_eq!(r.keyframe_at(101), Some(4), "within a millisecond");
        assert_eq!(r.keyframe_at(66), None);
    }

    #[test]
    fn joining_before_any_keyframe_waits_for_one() {
        let r = r(1 << 20, 10_000);
        r.push_init(init("I1")).unwrap();
        video(&r, "d0", 0);
        let mut first = Vec::new();
        let mut c = r.join(Decodes::ALL, &mut first);
        assert_eq!(tags(&first), ["S0", "I:I1"]);
        video(&r, "d1", 33);
        video(&r, "K1", 66);
        assert_eq!(read_all(&r, &mut c), ["K1"]);
    }

    #[test]
    fn new_init_restarts_at_the_next_keyframe() {
        let r = r(1 << 20, 10_000);
        r.push_init(init("I1")).unwrap();
        video(&r, "K1", 0);
        let mut c = r.join(Decodes::ALL, &mut Vec::new());
        assert_eq!(read_all(&r, &mut c), ["K1"]);
        r.push_status((StatusCode::Waiting, "W"), (StatusCode::Waiting, "W"), true);
        r.push_status(
            (StatusCode::Republished, "R"),
            (StatusCode::Live, "L"),
            false,
        );
        r.push_init(init("I2")).unwrap();
        video(&r, "d", 33);
        video(&r, "K2", 66);
        assert_eq!(read_all(&r, &mut c), ["W", "R", "I:I2", "K2"]);
        // A viewer joining now is told "live", not "republished".
        let mut first = Vec::new();
        r.join(Decodes::ALL, &mut first);
        assert_eq!(tags(&first), ["L", "I:I2"]);
        // A viewer joining while waiting gets the status only.
        r.push_status(
            (StatusCode::Waiting, "W2"),
            (StatusCode::Waiting, "W2"),
            true,
        );
        let mut first = Vec::new();
        r.join(Decodes::ALL, &mut first);
        assert_eq!(tags(&first), ["W2"]);
    }

    #[test]
    fn slow_viewer_skips_to_next_keyframe_and_catches_up_on_config() {
        let r = r(400, 10_000);
        r.push_init(init("I1")).unwrap();
        video(&r, "K1", 0);
        let mut c = r.join(Decodes::ALL, &mut Vec::new());
        // The viewer reads nothing while a new config and far more than 400 bytes arrive.
        r.push_init(init("I2")).unwrap();
        for i in 0..10 {
            video(&r, &format!("K{:016}", i), i * 100);
            for j in 1..4 {
                video(&r, &format!("d{:016}", j), i * 100 + j * 25);
            }
        }
        assert!(r.retained_bytes() <= 400);
        let mut out = Vec::new();
        assert!(r.read(&mut c, &mut out, 1000, usize::MAX).skipped);
        assert_eq!(c.skips, 1);
        assert_eq!(
            tags(&out),
            ["fell behind: skipped to the next keyframe", "I:I2"],
            "told, and given the config it missed"
        );
        video(&r, "dd", 2000);
        video(&r, "KK", 2033);
        assert_eq!(read_all(&r, &mut c), ["KK"]);
    }

    #[test]
    fn viewer_behind_for_longer_than_max_lag_skips() {
        let r = r(1 << 20, 20);
        r.push_init(init("I")).unwrap();
        video(&r, "K", 0);
        let mut c = r.join(Decodes::ALL, &mut Vec::new());
        video(&r, "a", 33);
        video(&r, "b", 66);
        let mut out = Vec::new();
        r.read(&mut c, &mut out, 1, usize::MAX); // reads one, stays behind
        assert_eq!(tags(&out), ["K"]);
        std::thread::sleep(Duration::from_millis(60));
        out.clear();
        assert!(r.read(&mut c, &mut out, 1000, usize::MAX).skipped);
        assert_eq!(tags(&out), ["fell behind: skipped to the next keyframe"]);
    }

    #[test]
    fn joining_with_an_old_gop_is_not_lag() {
        let r = r(1 << 20, 20);
        r.push_init(init("I")).unwrap();
        video(&r, "K", 0);
        video(&r, "a", 33);
        std::thread::sleep(Duration::from_millis(60)); // the cached GOP is older than max_lag
        let mut c = r.join(Decodes::ALL, &mut Vec::new());
        let mut out = Vec::new();
        assert!(!r.read(&mut c, &mut out, 1, usize::MAX).skipped);
        assert_eq!(tags(&out), ["K"]);
        out.clear();
        assert!(!r.read(&mut c, &mut out, 1000, usize::MAX).skipped);
        assert_eq!(tags(&out), ["a"]);
    }

    #[test]
    fn oversize_gop_is_not_cached() {
        let r = r(200, 10_000);
        r.push_init(init("I")).unwrap();
        video(&r, "K", 0);
        for i in 1..=10 {
            video(&r, &"d".repeat(16), i * 33);
        }
        assert!(r.retained_bytes() <= 200);
        let mut c = r.join(Decodes::ALL, &mut Vec::new());
        assert!(
            read_all(&r, &mut c).is_empty(),
            "waits for the next keyframe"
        );
    }

    /// Two renditions on one timeline (keyframes every 100 ms at the same dts), audio
    /// interleaved at other places in each log.
    fn aligned() -> (Rendition, Rendition) {
        let (hi, lo) = (r(1 << 20, 10_000), r(1 << 20, 10_000));
        hi.push_init(init("HI")).unwrap();
        lo.push_init(init("LO")).unwrap();
        for gop in 0..3u64 {
            let t = gop * 100;
            video(&hi, &format!("hK{t}"), t);
            audio(&hi, &format!("a{}", t + 10), t + 10);
            video(&hi, &format!("hd{}", t + 50), t + 50);
            audio(&hi, &format!("a{}", t + 60), t + 60);
            // The low rendition has its audio before the video at each point.
            audio(&lo, &format!("a{}", t + 10), t + 10);
            video(&lo, &format!("lK{t}"), t);
            audio(&lo, &format!("a{}", t + 60), t + 60);
            video(&lo, &format!("ld{}", t + 50), t + 50);
        }
        (hi, lo)
    }

    #[test]
    fn a_switch_stops_at_the_keyframe_and_continues_there_with_no_hole_or_overlap() {
        let (hi, lo) = aligned();
        let mut first = Vec::new();
        let mut c = hi.join(Decodes::ALL, &mut first); // the GOP at 200
        let mut out = Vec::new();
        hi.read(&mut c, &mut out, 1000, usize::MAX);
        assert_eq!(tags(&out), ["hK200", "a210", "hd250", "a260"]);
        c.stop_at_keyframes(true);
        video(&hi, "hK300", 300);
        audio(&hi, "a310", 310);
        audio(&lo, "a310", 310);
        video(&lo, "lK300", 300);
        out.clear();
        let got = hi.read(&mut c, &mut out, 1000, usize::MAX);
        assert_eq!(got.at_keyframe, Some(300));
        assert!(out.is_empty());
        let (v, a) = hi.last_sent(&c);
        assert_eq!((v, a), (Some(250), Some(260)));
        let mut out = Vec::new();
        let mut c2 = lo
            .switch_cursor(Some(300), v, a, Decodes::ALL, &mut out)
            .expect("aligned");
        lo.read(&mut c2, &mut out, 1000, usize::MAX);
        assert_eq!(
            tags(&out),
            ["I:LO", "a310", "lK300"],
            "the audio that sat before the keyframe is not lost, the audio already sent not repeated"
        );
    }

    #[test]
    fn a_switch_without_the_keyframe_waits_or_takes_the_next() {
        let (hi, lo) = aligned();
        let mut out = Vec::new();
        assert!(
            lo.switch_cursor(Some(300), Some(250), Some(260), Decodes::ALL, &mut out)
                .is_none()
        );
        assert!(out.is_empty());
        // From a rendition that went away: the first keyframe after what was sent.
        let mut c = hi
            .switch_cursor(None, Some(150), Some(160), Decodes::ALL, &mut out)
            .expect("a later keyframe");
        hi.read(&mut c, &mut out, 1000, usize::MAX);
        assert_eq!(tags(&out), ["I:HI", "hK200", "a210", "hd250", "a260"]);
    }

    #[test]
    fn a_lossless_reader_starts_with_the_gop_and_sees_every_frame() {
        let r = r(1 << 20, 10_000);
        r.push_init(init("I")).unwrap();
        video(&r, "K0", 0);
        video(&r, "d1", 33);
        let reader = r.subscribe_lossless(QueueLimits::DEFAULT);
        video(&r, "d2", 66);
        let mut got = Vec::new();
        while let Some(super::super::lossless::Event::Item(item)) = reader.try_next() {
            got.push(match item {
                Item::Media(f) => String::from_utf8_lossy(&f.payload).into_owned(),
                Item::Init(i) => format!("I:{}", i.tracks[0].codec),
                Item::Status(_, m) => m.to_string(),
            });
        }
        assert_eq!(got, ["I:I", "K0", "d1", "d2"]);
        r.set_gone();
        assert_eq!(
            reader.try_next(),
            Some(super::super::lossless::Event::Ended)
        );
    }
}
