//! A rendition: one encoding of a stream, its GOP cache, and the cursor each viewer reads with.
//!
//! The rendition keeps one shared log of pre-framed messages. The publisher appends (each frame
//! framed once); every viewer holds only a cursor into the log and writes the very same `Bytes`.
//! So a viewer's backlog costs nothing beyond the shared log, which is bounded in bytes and age:
//!
//! - the log always keeps everything since the last keyframe (the GOP cache), so a new viewer
//!   starts at once, on a keyframe;
//! - beyond that it keeps at most `max_backlog_bytes` and `max_lag` of history for viewers that
//!   are slightly behind;
//! - a viewer whose cursor falls out of that window, or whose next frame waited longer than
//!   `max_lag` (plus, until it first catches up, the age of the GOP it joined with), skips to the
//!   next keyframe, and the skip is counted.
//!
//! Viewers at the live edge are written by the rendition's fan-out task instead of their own
//! (see [`super::fanout`]); this module's cursor rules apply to the others.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::fanout::{Fanout, Flush, FlushState, Returned, Sink, SinkWrite};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_backlog_bytes: u64,
    pub max_lag: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `sync`: a viewer may start here (a video keyframe, or any frame of an audio-only stream).
    Media {
        sync: bool,
    },
    Init {
        generation: u64,
    },
    Status {
        generation: u64,
    },
}

struct Entry {
    frame: Bytes,
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
    init: Option<(u64, Bytes)>,
    /// The status a viewer joining now is given, with the generation of the last status entry.
    status: (u64, Bytes),
    generation: u64,
    warned_gop_too_big: bool,
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
    /// Times this viewer skipped ahead to catch up.
    pub skips: u64,
}

pub struct Rendition {
    pub id: u8,
    limits: Limits,
    log: Mutex<Log>,
    notify: Notify,
    /// Sent to a viewer when it skips (a `skipped` status), framed once.
    skip_notice: Bytes,
    fanout: Fanout,
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
                .push((e.frame.clone(), matches!(e.kind, Kind::Media { .. })));
        }
        state.flushed = log.head();
        lo
    }
}

impl Rendition {
    pub fn new(id: u8, limits: Limits, initial_status: Bytes, skip_notice: Bytes) -> Self {
        Self {
            id,
            limits,
            skip_notice,
            log: Mutex::new(Log {
                entries: VecDeque::new(),
                base: 0,
                pushed: 0,
                retained: 0,
                gop_start: None,
                init: None,
                status: (0, initial_status),
                generation: 0,
                warned_gop_too_big: false,
            }),
            notify: Notify::new(),
            fanout: Fanout::default(),
        }
    }

    /// Appends a media frame. `sync` marks a point where a viewer can start decoding.
    pub fn push_media(&self, frame: Bytes, sync: bool) {
        self.push(frame, Kind::Media { sync });
    }

    /// Appends a new codec configuration. Viewers receive it in order; media resumes for them at
    /// the next sync point, and the GOP cache restarts there too.
    pub fn push_init(&self, frame: Bytes) {
        let mut log = self.log.lock();
        log.generation += 1;
        let generation = log.generation;
        log.init = Some((generation, frame.clone()));
        log.gop_start = None;
        self.push_locked(&mut log, frame, Kind::Init { generation });
    }

    /// Appends a status for the viewers already here; viewers joining later are given
    /// `for_joiners` instead (a joiner is told `live`, not `republished`). `clears_init`: the
    /// configuration no longer holds (publisher gone), so joiners get no init until the next one.
    pub fn push_status(&self, frame: Bytes, for_joiners: Bytes, clears_init: bool) {
        let mut log = self.log.lock();
        log.generation += 1;
        let generation = log.generation;
        log.status = (generation, for_joiners);
        if clears_init {
            log.init = None;
            log.gop_start = None;
        }
        self.push_locked(&mut log, frame, Kind::Status { generation });
    }

    fn push(&self, frame: Bytes, kind: Kind) {
        let mut log = self.log.lock();
        self.push_locked(&mut log, frame, kind);
    }

    fn push_locked(&self, log: &mut Log, frame: Bytes, kind: Kind) {
        let now = Instant::now();
        let len = frame.len() as u64;
        if kind == (Kind::Media { sync: true }) {
            log.gop_start = Some(log.head());
        }
        let offset = log.pushed;
        log.entries.push_back(Entry {
            frame,
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
            log.retained -= front.frame.len() as u64;
            log.entries.pop_front();
            log.base += 1;
        }
    }

    /// A cursor for a new viewer, and the messages it starts with: the current status, the
    /// current init if any. Media follows from the GOP cache through [`Rendition::read`].
    pub fn join(&self, out: &mut Vec<Bytes>) -> Cursor {
        let log = self.log.lock();
        out.push(log.status.1.clone());
        let mut cursor = Cursor {
            next: log.head(),
            need_sync: true,
            init_generation: 0,
            status_generation: log.status.0,
            allowance: Duration::ZERO,
            skips: 0,
        };
        if let Some((generation, init)) = &log.init {
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

    /// Adds up to `max_frames` messages / about `max_bytes` from the log to `out` (cheap `Bytes`
    /// clones), advancing the cursor. Applies the viewer's backlog bounds first; returns whether
    /// the viewer was too far behind and skipped to the next keyframe.
    pub fn read(
        &self,
        cursor: &mut Cursor,
        out: &mut Vec<Bytes>,
        max_frames: usize,
        max_bytes: usize,
    ) -> bool {
        let now = Instant::now();
        let log = self.log.lock();
        let head = log.head();

        let behind = log.entry(cursor.next).is_some_and(|e| {
            now.duration_since(e.pushed) > self.limits.max_lag + cursor.allowance
                || log.pushed - e.offset > self.limits.max_backlog_bytes
        });
        let skipped = cursor.next < log.base || behind;
        if skipped {
            cursor.next = head;
            cursor.need_sync = true;
            cursor.allowance = Duration::ZERO;
            cursor.skips += 1;
            out.push(self.skip_notice.clone());
            // What the viewer skipped may have changed its configuration: catch it up.
            if cursor.status_generation != log.status.0 {
                out.push(log.status.1.clone());
                cursor.status_generation = log.status.0;
            }
            if let Some((generation, init)) = &log.init
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
            cursor.next += 1;
            match e.kind {
                Kind::Media { sync } => {
                    if cursor.need_sync && !sync {
                        continue;
                    }
                    cursor.need_sync = false;
                }
                Kind::Init { generation } => {
                    cursor.init_generation = generation;
                    cursor.need_sync = true;
                }
                Kind::Status { generation } => cursor.status_generation = generation,
            }
            bytes += e.frame.len();
            out.push(e.frame.clone());
        }

        if cursor.next >= head {
            cursor.allowance = Duration::ZERO;
        }
        skipped
    }

    /// Resolves when something is appended after this call. Create it before calling
    /// [`Rendition::read`] (and `enable` it) so that no append in between is missed.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Registers a viewer's socket for the fast path; it is written by the fan-out task while
    /// promoted. Remove it with [`Rendition::remove_sink`].
    pub fn add_sink(self: &Arc<Self>, io: Arc<dyn SinkWrite>) -> Arc<Sink> {
        self.fanout.add(self, io)
    }

    pub fn remove_sink(&self, sink: &Arc<Sink>) {
        self.fanout.remove(sink);
    }

    /// Hands the viewer's socket to the fan-out if its cursor is at the live edge (and not
    /// waiting for a keyframe); returns whether it did.
    pub fn promote(&self, sink: &Sink, cursor: &Cursor) -> bool {
        let log = self.log.lock();
        let head = log.head();
        if cursor.next != head || cursor.need_sync {
            return false;
        }
        sink.promote(head);
        true
    }

    /// Bytes in the log from entry `next` to the head: what a viewer there still has to get.
    pub fn backlog_bytes(&self, next: u64) -> u64 {
        let log = self.log.lock();
        if next >= log.head() {
            return 0;
        }
        let from = log
            .entry(next)
            .or_else(|| log.entries.front())
            .map_or(log.pushed, |e| e.offset);
        log.pushed - from
    }

    /// Bytes retained in the log (GOP cache plus backlog window).
    pub fn retained_bytes(&self) -> u64 {
        self.log.lock().retained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(max_bytes: u64, max_lag_ms: u64) -> Rendition {
        Rendition::new(
            0,
            Limits {
                max_backlog_bytes: max_bytes,
                max_lag: Duration::from_millis(max_lag_ms),
            },
            Bytes::from_static(b"S0"),
            Bytes::from_static(b"SKIP"),
        )
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn read_all(r: &Rendition, c: &mut Cursor) -> Vec<Bytes> {
        let mut out = Vec::new();
        r.read(c, &mut out, 1000, usize::MAX);
        out
    }

    #[test]
    fn new_viewer_starts_at_the_last_keyframe() {
        let r = r(1 << 20, 10_000);
        r.push_init(b("I1"));
        r.push_media(b("d0"), false); // before any keyframe
        r.push_media(b("K1"), true);
        r.push_media(b("d1"), false);
        r.push_media(b("K2"), true);
        r.push_media(b("d2"), false);
        let mut first = Vec::new();
        let mut c = r.join(&mut first);
        assert_eq!(first, vec![b("S0"), b("I1")]);
        assert_eq!(read_all(&r, &mut c), vec![b("K2"), b("d2")]);
    }

    #[test]
    fn joining_before_any_keyframe_waits_for_one() {
        let r = r(1 << 20, 10_000);
        r.push_init(b("I1"));
        r.push_media(b("d0"), false);
        let mut first = Vec::new();
        let mut c = r.join(&mut first);
        assert_eq!(first, vec![b("S0"), b("I1")]);
        r.push_media(b("d1"), false);
        r.push_media(b("K1"), true);
        assert_eq!(read_all(&r, &mut c), vec![b("K1")]);
    }

    #[test]
    fn new_init_restarts_at_the_next_keyframe() {
        let r = r(1 << 20, 10_000);
        r.push_init(b("I1"));
        r.push_media(b("K1"), true);
        let mut c = r.join(&mut Vec::new());
        assert_eq!(read_all(&r, &mut c), vec![b("K1")]);
        r.push_status(b("W"), b("W"), true);
        r.push_status(b("R"), b("L"), false);
        r.push_init(b("I2"));
        r.push_media(b("d"), false);
        r.push_media(b("K2"), true);
        assert_eq!(read_all(&r, &mut c), vec![b("W"), b("R"), b("I2"), b("K2")]);
        // A viewer joining now is told "live", not "republished".
        let mut first = Vec::new();
        r.join(&mut first);
        assert_eq!(first, vec![b("L"), b("I2")]);
        // A viewer joining while waiting gets the status only.
        r.push_status(b("W2"), b("W2"), true);
        let mut first = Vec::new();
        r.join(&mut first);
        assert_eq!(first, vec![b("W2")]);
    }

    #[test]
    fn slow_viewer_skips_to_next_keyframe_and_catches_up_on_config() {
        let r = r(64, 10_000);
        r.push_init(b("I1"));
        r.push_media(b("K1"), true);
        let mut c = r.join(&mut Vec::new());
        // The viewer reads nothing while a new config and far more than 64 bytes arrive.
        r.push_init(b("I2"));
        for _ in 0..10 {
            r.push_media(Bytes::from(vec![b'k'; 16]), true);
            for _ in 0..3 {
                r.push_media(Bytes::from(vec![b'd'; 16]), false);
            }
        }
        assert!(r.retained_bytes() <= 64);
        let mut out = Vec::new();
        assert!(r.read(&mut c, &mut out, 1000, usize::MAX));
        assert_eq!(c.skips, 1);
        assert_eq!(
            out,
            vec![b("SKIP"), b("I2")],
            "told, and given the config it missed"
        );
        r.push_media(b("dd"), false);
        r.push_media(b("KK"), true);
        assert_eq!(read_all(&r, &mut c), vec![b("KK")]);
    }

    #[test]
    fn viewer_behind_for_longer_than_max_lag_skips() {
        let r = r(1 << 20, 20);
        r.push_init(b("I"));
        r.push_media(b("K"), true);
        let mut c = r.join(&mut Vec::new());
        r.push_media(b("a"), false);
        r.push_media(b("b"), false);
        let mut out = Vec::new();
        r.read(&mut c, &mut out, 1, usize::MAX); // reads one, stays behind
        assert_eq!(out, vec![b("K")]);
        std::thread::sleep(Duration::from_millis(60));
        out.clear();
        assert!(r.read(&mut c, &mut out, 1000, usize::MAX));
        assert_eq!(out, vec![b("SKIP")]);
    }

    #[test]
    fn joining_with_an_old_gop_is_not_lag() {
        let r = r(1 << 20, 20);
        r.push_init(b("I"));
        r.push_media(b("K"), true);
        r.push_media(b("a"), false);
        std::thread::sleep(Duration::from_millis(60)); // the cached GOP is older than max_lag
        let mut c = r.join(&mut Vec::new());
        let mut out = Vec::new();
        assert!(!r.read(&mut c, &mut out, 1, usize::MAX));
        assert_eq!(out, vec![b("K")]);
        out.clear();
        assert!(!r.read(&mut c, &mut out, 1000, usize::MAX));
        assert_eq!(out, vec![b("a")]);
    }

    #[test]
    fn oversize_gop_is_not_cached() {
        let r = r(64, 10_000);
        r.push_init(b("I"));
        r.push_media(b("K"), true);
        for _ in 0..10 {
            r.push_media(Bytes::from(vec![0u8; 16]), false);
        }
        assert!(r.retained_bytes() <= 64);
        let mut c = r.join(&mut Vec::new());
        assert!(
            read_all(&r, &mut c).is_empty(),
            "waits for the next keyframe"
        );
    }
}
