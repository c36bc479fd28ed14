//! Automatic rendition choice for one viewer, on the server: a controller fed what the server
//! sees of the viewer's socket and what the player reports, returning "stay" or "move to this
//! rendition at its next keyframe". No I/O and no clock of its own: every call is given `now`,
//! so the rules are tested on made-up timelines. The viewer's connection ([`super::ws`]) takes
//! a [`Sample`] every [`SAMPLE_EVERY`] and carries out the moves.
//!
//! Throughput cannot be measured from a live push while the viewer keeps up (data flows at the
//! encode rate), so:
//! - **down** on the signals a live push has: the viewer's backlog (how long its oldest unsent
//!   frame has waited; viewer sockets keep little unsent in the kernel, so the backlog is in
//!   the server's log where it can be seen), a keyframe skip, a stall the player reports, or a
//!   player dropping more than a tenth of its frames (CPU-bound: a lower resolution helps it
//!   too). While the socket was full for a whole sample, what it took *is* the link's rate:
//!   the move goes straight to the highest rendition that rate carries with 10 % to spare
//!   (OvenMediaEngine's rule), otherwise one step down.
//! - **up** by probing: after [`HOLD`] without trouble, the next higher rendition is tried (not
//!   when a recent measured rate says it would not fit). A rendition the viewer had to leave
//!   within [`PROBE_FAILED_WITHIN`] of moving to it is not tried again for a back-off that
//!   doubles each time (OvenMediaEngine's rule of a growing back-off for a rung that failed),
//!   so a viewer does not flap. After a probe that held for [`PROBE_HELD`], the next step up
//!   is tried without waiting a whole hold again.
//!
//! For [`SETTLE`] after a move down, backlog, stalls and dropped frames do not count: what the
//! viewer has queued then, and what its player reports, is from before the move. After a probe
//! up they count at once: it left a calm rendition, so trouble is the probe's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hub::{Follow, Rendition, Stream, SwitchReason, ViewerState};

/// How often the connection samples a viewer on automatic.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How often a viewer on automatic is asked to send receipts (docs/protocol.md): once a sample.
pub const RECEIPT_EVERY_MS: u16 = SAMPLE_EVERY.as_millis() as u16;
/// Backlog age above which the viewer is moved down at once.
pub const BEHIND_DOWN: Duration = Duration::from_millis(600);
/// Backlog age under which a viewer counts as keeping up. Above it for [`BEHIND_FOR`] in a
/// row (not a keyframe's burst, which drains in a sample or two) also moves it down.
pub const BEHIND_OK: Duration = Duration::from_millis(250);
pub const BEHIND_FOR: Duration = Duration::from_millis(1500);
/// Time without trouble before probing a higher rendition.
pub const HOLD: Duration = Duration::from_secs(8);
/// A probe that held this long without trouble is followed by the next step up.
pub const PROBE_HELD: Duration = Duration::from_secs(4);
/// A move up that fails this soon marks the rendition as failed.
pub const PROBE_FAILED_WITHIN: Duration = Duration::from_secs(15);
/// After a move down, trouble other than a skip is not acted on for this long.
pub const SETTLE: Duration = Duration::from_millis(1500);
/// A measured rate older than this says nothing about the link any more.
const RATE_VALID_FOR: Duration = Duration::from_secs(15);
const FIRST_BACKOFF: Duration = Duration::from_secs(20);
const MAX_BACKOFF: Duration = Duration::from_secs(160);

/// What the server saw of the viewer in the last interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// How long the oldest frame the viewer has not been sent yet has waited.
    pub behind: Duration,
    /// The viewer skipped to a keyframe since the last sample.
    pub skipped: bool,
    /// From the player's latest report, when one came since the last sample.
    pub report: Option<Report>,
    /// What the viewer's socket took since the last sample, in kbit/s, when it had a backlog
    /// the whole time: the rate of the link. None when it kept up. The controller takes the
    /// rate over a run of such samples, not one alone.
    pub saturated_kbps: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Counters as the player sends them (totals since it started).
    pub stalls: u32,
    pub decoded_frames: u32,
    pub dropped_frames: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Stay,
    /// Move to the rendition at this index of the ladder (0 is the highest bitrate).
    MoveTo(usize, SwitchReason),
}

/// One viewer's controller. Renditions are given by index into the stream's ladder, highest
/// first (by height, then bitrate: see [`Auto`]); each sample comes with the ladder's bitrates.
#[derive(Debug)]
pub struct Abr {
    /// Where the viewer is (index into the ladder) and since when.
    at: usize,
    since: Instant,
    /// When trouble was last seen.
    trouble: Instant,
    /// Since when the backlog has been above [`BEHIND_OK`].
    behind_since: Option<Instant>,
    /// Per index: not to be probed before this, and the back-off to apply next.
    banned_until: Vec<Option<Instant>>,
    backoff: Vec<Duration>,
    /// Whether the last move was up (a probe), to judge it.
    probing_from: Option<usize>,
    last: Option<Report>,
    /// The link's rate as last measured, and when.
    rate: Option<(f64, Instant)>,
    /// The current run of full samples: kbit taken and seconds, for the rate over the run (a
    /// single sample can catch a loss recovery that took nothing).
    run: (f64, f64),
    last_sample: Option<Instant>,
    /// When the viewer was last seen more than [`BEHIND_LINK`] behind, and its last stall.
    behind_at: Option<Instant>,
    stalled_at: Option<Instant>,
    /// Samples in a row with the socket full the whole time.
    saturated: u32,
}

/// Samples in a row with the socket full, taking less than the rendition's bitrate over the
/// intervals between them, that move the viewer down.
const SATURATED_SAMPLES: u32 = 2;

/// A stall counts against the rendition if the viewer was this far behind within
/// [`STALL_WINDOW`] (the link was involved), or if it is the second within that window. A lone
/// stall of a viewer that had everything sent in time is its player's own (a start, a busy
/// tab), and moving it down would not help.
const BEHIND_LINK: Duration = Duration::from_millis(100);
const STALL_WINDOW: Duration = Duration::from_secs(10);

impl Abr {
    pub fn new(at: usize, renditions: usize, now: Instant) -> Self {
        Self {
            at,
            since: now,
            trouble: now,
            behind_since: None,
            banned_until: vec![None; renditions],
            backoff: vec![FIRST_BACKOFF; renditions],
            probing_from: None,
            last: None,
            rate: None,
            behind_at: None,
            stalled_at: None,
            saturated: 0,
            run: (0.0, 0.0),
            last_sample: None,
        }
    }

    pub fn at(&self) -> usize {
        self.at
    }

    /// The link's rate as last measured, in kbit/s, if recent.
    pub fn rate_kbps(&self, now: Instant) -> Option<u32> {
        self.rate
            .filter(|&(_, t)| now.duration_since(t) < RATE_VALID_FOR)
            .map(|(r, _)| r as u32)
    }

    /// The ladder changed (a rung came or went) or the viewer was moved by something else: it
    /// is now at `at` of `renditions`. What was learnt of the old indices no longer applies.
    pub fn reset(&mut self, at: usize, renditions: usize, now: Instant) {
        self.at = at;
        self.since = now;
        self.behind_since = None;
        self.banned_until = vec![None; renditions];
        self.backoff = vec![FIRST_BACKOFF; renditions];
        self.probing_from = None;
    }

    /// A move this controller decided has been carried out (at the target's keyframe): the
    /// settle time runs from now.
    pub fn moved(&mut self, now: Instant) {
        self.since = now;
        self.behind_since = None;
    }

    /// Takes one sample; `kbps` are the ladder's bitrates, in the ladder's order. Returns what
    /// to do.
    pub fn on_sample(&mut self, now: Instant, s: &Sample, kbps: &[u32]) -> Decision {
        if kbps.len() != self.banned_until.len() {
            self.reset(self.at.min(kbps.len().saturating_sub(1)), kbps.len(), now);
        }
        let interval = self
            .last_sample
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.last_sample = Some(now);
        match s.saturated_kbps {
            Some(kbps) => {
                // The run's first sample says the socket was full at both ends of its interval,
                // not in between: the rate is taken from the intervals after it.
                if self.saturated > 0 {
                    self.run.0 += f64::from(kbps) * interval;
                    self.run.1 += interval;
                }
                self.saturated += 1;
                if self.run.1 > 0.0 && self.run.0 > 0.0 {
                    self.rate = Some((self.run.0 / self.run.1, now));
                }
            }
            None => {
                self.saturated = 0;
                self.run = (0.0, 0.0);
            }
        }
        let lowest = kbps.len().saturating_sub(1);
        let current = kbps.get(self.at).copied().unwrap_or(0);
        if let Some(why) = self.trouble_in(now, s, current) {
            self.trouble = now;
            if self.at < lowest {
                let to = match self.rate_kbps(now) {
                    // The highest rendition the measured rate carries with 10 % to spare, at
                    // least one step down.
                    Some(rate) => (self.at + 1..=lowest)
                        .find(|&i| f64::from(kbps[i]) * 1.1 <= f64::from(rate))
                        .unwrap_or(lowest),
                    None => self.at + 1,
                };
                return self.move_to(to, why, now);
            }
            return Decision::Stay;
        }
        if s.behind > BEHIND_OK {
            self.trouble = now;
        }
        if self.at == 0 {
            return Decision::Stay;
        }
        let held = if self.probing_from.is_some() {
            // Climbing: the last probe held, so the next step needs less proof.
            PROBE_HELD
        } else {
            HOLD
        };
        if now.duration_since(self.since) < held || now.duration_since(self.trouble) < held {
            return Decision::Stay;
        }
        let up = self.at - 1;
        if self.banned_until[up].is_some_and(|t| now < t) {
            return Decision::Stay;
        }
        if self
            .rate_kbps(now)
            .is_some_and(|rate| f64::from(rate) * 0.75 <= f64::from(kbps[up]))
        {
            // Measured recently: the link would not carry it.
            return Decision::Stay;
        }
        self.probing_from = Some(self.at);
        self.move_to(up, SwitchReason::Probe, now)
    }

    fn trouble_in(&mut self, now: Instant, s: &Sample, current_kbps: u32) -> Option<SwitchReason> {
        let mut why = None;
        if self.saturated >= SATURATED_SAMPLES
            && self.run.1 > 0.0
            && self.run.0 / self.run.1 < f64::from(current_kbps)
        {
            // Full for a quarter of a second and taking less than the rendition needs: the link cannot
            // carry it, whatever the backlog is yet (a keyframe's burst on a link that can
            // takes more, not less).
            why = Some(SwitchReason::Backlog);
        }
        if let Some(r) = s.report {
            if let Some(last) = self.last {
                let decoded = r.decoded_frames.saturating_sub(last.decoded_frames);
                let dropped = r.dropped_frames.saturating_sub(last.dropped_frames);
                if r.stalls > last.stalls {
                    let within = |t: Option<Instant>| {
                        t.is_some_and(|t| now.duration_since(t) < STALL_WINDOW)
                    };
                    if r.stalls > last.stalls + 1
                        || within(self.stalled_at)
                        || within(self.behind_at)
                    {
                        why = Some(SwitchReason::Stalled);
                    }
                    self.stalled_at = Some(now);
                } else if decoded >= 10 && dropped * 10 > decoded {
                    why = Some(SwitchReason::DroppedFrames);
                }
            }
            self.last = Some(r);
        }
        if s.behind > BEHIND_LINK {
            self.behind_at = Some(now);
        }
        // Behind, but the socket is taking more than the rendition needs: the backlog (from
        // before a move, or a burst) is draining, not growing.
        let draining = self.saturated >= SATURATED_SAMPLES
            && self.run.1 > 0.0
            && self.run.0 / self.run.1 > 1.1 * f64::from(current_kbps);
        if s.behind > BEHIND_OK {
            let since = *self.behind_since.get_or_insert(now);
            if !draining && (s.behind > BEHIND_DOWN || now.duration_since(since) >= BEHIND_FOR) {
                why = why.or(Some(SwitchReason::Backlog));
            }
        } else {
            self.behind_since = None;
        }
        if s.skipped {
            return Some(SwitchReason::Skipped);
        }
        // A probe up leaves a calm rendition: what comes after it is the probe's own, and a
        // probe the link cannot carry is best left at once, before the player runs dry.
        if self.probing_from.is_none() && now.duration_since(self.since) < SETTLE {
            return None;
        }
        why
    }

    fn move_to(&mut self, to: usize, why: SwitchReason, now: Instant) -> Decision {
        // A move down soon after a probe up: the probed rendition failed.
        if why != SwitchReason::Probe
            && self.probing_from.is_some_and(|from| to >= from)
            && now.duration_since(self.since) < PROBE_FAILED_WITHIN
        {
            let failed = self.at;
            let backoff = self.backoff[failed];
            self.banned_until[failed] = Some(now + backoff);
            self.backoff[failed] = (backoff * 2).min(MAX_BACKOFF);
        }
        if why != SwitchReason::Probe {
            self.probing_from = None;
        }
        self.at = to;
        self.since = now;
        self.behind_since = None;
        Decision::MoveTo(to, why)
    }
}

/// Receipts older than this say nothing about the network now (a background tab's timers run
/// once a second).
const RECEIPT_FRESH: Duration = Duration::from_millis(1000);
/// The least a path holds in flight is its floor (its round trip at the rate it carries),
/// taken over this long.
const FLOOR_OVER: Duration = Duration::from_secs(10);
/// A queue stands in the network when it holds this much of the rendition's bitrate above the
/// floor, and at least [`QUEUE_MIN_BYTES`] (a keyframe's burst on a link that carries the
/// rendition is gone by the next receipt).
const QUEUE_MS: u64 = 100;
const QUEUE_MIN_BYTES: u64 = 16 * 1024;
/// What the link delivered is measured over receipts this far apart, at least.
const DELIVERED_OVER: Duration = Duration::from_millis(500);

/// What the player's receipts say about the network between the server and the viewer. A
/// receipt is the bytes the player has received; the server's count of bytes sent when it
/// arrives, less that, is what the kernel and the network hold for the viewer. That is where a
/// slow link's backlog builds first, before the server's own queue sees any (the kernel takes
/// what the link's bottleneck queue has room for), and while it stands, what the player
/// received per second is the link's rate. No I/O: tested on made-up receipts.
#[derive(Debug, Default)]
pub struct Network {
    /// Receipts of the last [`FLOOR_OVER`]: arrival, bytes received, bytes in flight.
    recent: std::collections::VecDeque<(Instant, u64, u64)>,
}

/// What [`Network::sample`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkSample {
    /// A queue stands in the network (as of the last receipt).
    pub queued: bool,
    /// The network holds next to nothing beyond its floor: less than half the kernel's unsent
    /// bytes a socket that refuses writes has (`TCP_NOTSENT_LOWAT`). A server queue beside it
    /// is the server's own doing.
    pub idle: bool,
    /// What the player received per second over the last receipts, kbit/s.
    pub delivered_kbps: Option<u32>,
}

impl Network {
    /// Records a receipt (the same receipt twice counts once).
    pub fn receipt(&mut self, r: crate::hub::Receipt) {
        if self.recent.back().is_some_and(|&(at, _, _)| at >= r.at) {
            return;
        }
        self.recent
            .push_back((r.at, r.received, r.sent.saturating_sub(r.received)));
        while self
            .recent
            .front()
            .is_some_and(|&(at, _, _)| r.at.duration_since(at) > FLOOR_OVER)
        {
            self.recent.pop_front();
        }
        // Bounded whatever the player sends: a flood is refused before this, at 20 a second.
        if self.recent.len() > 256 {
            self.recent.pop_front();
        }
    }

    /// At a sample of a viewer on a rendition of `kbps`: None when there is no fresh receipt
    /// (a player that sends none, or a hidden tab).
    pub fn sample(&self, now: Instant, kbps: u32) -> Option<NetworkSample> {
        let &(at, received, in_flight) = self.recent.back()?;
        if now.saturating_duration_since(at) > RECEIPT_FRESH {
            return None;
        }
        let floor = self.recent.iter().map(|r| r.2).min().unwrap_or(0);
        let min_queue = (u64::from(kbps) * QUEUE_MS / 8).max(QUEUE_MIN_BYTES);
        let above = in_flight.saturating_sub(floor);
        let queued = above >= min_queue;
        let idle = above < u64::from(super::ws::VIEWER_NOTSENT_LOWAT) / 2;
        let delivered_kbps = self
            .recent
            .iter()
            .rev()
            .find(|r| at.duration_since(r.0) >= DELIVERED_OVER)
            .map(|&(t0, r0, _)| {
                ((received - r0.min(received)) as f64 * 8.0
                    / at.duration_since(t0).as_secs_f64()
                    / 1000.0) as u32
            });
        Some(NetworkSample {
            queued,
            idle,
            delivered_kbps,
        })
    }
}

/// How long a finished session's rendition is remembered for the next from its address.
pub const REMEMBER_FOR: Duration = Duration::from_secs(600);
/// Addresses remembered at most; the oldest goes first (counted in
/// `onair_abr_memory_evictions_total`).
pub const REMEMBER_MAX: usize = 4096;

/// Where automatic viewers from an address left off, so that the next session from there (a
/// reload, a reconnect) starts on what the last one could sustain instead of at the top, and
/// probes up from there.
#[derive(Default)]
pub struct Memory {
    by_addr: parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, Remembered>>,
}

struct Remembered {
    stream: String,
    rendition: String,
    at: Instant,
}

impl Memory {
    /// The rendition the last automatic session of `stream` from `addr` ended on, if recent.
    pub fn recall(&self, addr: std::net::IpAddr, stream: &str, now: Instant) -> Option<String> {
        let map = self.by_addr.lock();
        let r = map.get(&addr)?;
        (r.stream == stream && now.duration_since(r.at) < REMEMBER_FOR).then(|| r.rendition.clone())
    }

    /// Returns how many entries were evicted to stay within [`REMEMBER_MAX`].
    pub fn remember(
        &self,
        addr: std::net::IpAddr,
        stream: &str,
        rendition: String,
        now: Instant,
    ) -> usize {
        let mut map = self.by_addr.lock();
        let mut evicted = 0;
        if map.len() >= REMEMBER_MAX && !map.contains_key(&addr) {
            let before = map.len();
            map.retain(|_, r| now.duration_since(r.at) < REMEMBER_FOR);
            evicted = before - map.len();
            if map.len() >= REMEMBER_MAX
                && let Some(oldest) = map.iter().min_by_key(|(_, r)| r.at).map(|(a, _)| *a)
            {
                map.remove(&oldest);
                evicted += 1;
            }
        }
        map.insert(
            addr,
            Remembered {
                stream: stream.to_string(),
                rendition,
                at: now,
            },
        );
        evicted
    }
}

/// Over how much of a rendition's log its bitrate is measured, and how often a viewer's
/// controller reads it again.
const BITRATE_WINDOW: Duration = Duration::from_secs(2);
const BITRATE_REFRESH: Duration = Duration::from_secs(1);

/// A viewer on automatic, as its connection sees it: the controller, the ladder it indexes,
/// and what the last sample left to compare with.
pub struct Auto {
    abr: Abr,
    /// The stream's renditions by height and bitrate, highest first, as of `version`.
    ladder: Vec<Arc<Rendition>>,
    version: Option<u64>,
    /// Their bitrates, measured at `kbps_at`: a stream's figure, read again once a
    /// [`BITRATE_REFRESH`] rather than at every sample.
    kbps: Vec<u32>,
    kbps_at: Option<Instant>,
    /// The move this controller asked for, until it is carried out or given up.
    asked: Option<Arc<Rendition>>,
    last_at: Instant,
    last_sent: u64,
    /// The viewer had a backlog at the last sample.
    had_backlog: bool,
    skips: u64,
    report_at: Option<Instant>,
    /// How old the first frame was when the viewer joined or switched: until it first reaches
    /// the live edge, only lag beyond that is its own.
    start_age: Option<Duration>,
    network: Network,
}

impl Auto {
    pub fn new(now: Instant) -> Self {
        Self {
            abr: Abr::new(0, 1, now),
            ladder: Vec::new(),
            version: None,
            kbps: Vec::new(),
            kbps_at: None,
            asked: None,
            last_at: now,
            last_sent: 0,
            had_backlog: false,
            skips: 0,
            report_at: None,
            start_age: None,
            network: Network::default(),
        }
    }

    /// Whether there is a choice to make: more than one rendition.
    pub fn active(&self, stream: &Stream) -> bool {
        stream.rendition_count() > 1
    }

    /// The viewer is at the live edge (handed to the fan-out).
    pub fn caught_up(&mut self) {
        self.start_age = Some(Duration::ZERO);
    }

    /// A switch was carried out (by this controller or not): settle from now, and measure lag
    /// from where the new rendition started.
    pub fn switched(&mut self, follow: &Follow, now: Instant) {
        let ours = self
            .asked
            .take()
            .is_some_and(|r| Arc::ptr_eq(&r, follow.rendition()));
        self.start_age = None;
        match self.index_of(follow.rendition()) {
            Some(i) if ours && i == self.abr.at() => self.abr.moved(now),
            Some(i) => self.abr.reset(i, self.ladder.len(), now),
            None => self.version = None,
        }
    }

    fn index_of(&self, r: &Arc<Rendition>) -> Option<usize> {
        self.ladder.iter().position(|x| Arc::ptr_eq(x, r))
    }

    /// Takes a sample of the viewer (`promoted`: at the live edge, written by the fan-out) and
    /// returns the rendition to move to, if the controller decided a move.
    pub fn sample(
        &mut self,
        now: Instant,
        stream: &Stream,
        follow: &Follow,
        state: &ViewerState,
        promoted: bool,
    ) -> Option<(Arc<Rendition>, SwitchReason)> {
        let version = stream.renditions_version();
        if self.version != Some(version) {
            // Only what the viewer's player decodes is a rung of its ladder.
            let decodes = follow.decodes();
            let mut ladder: Vec<_> = stream
                .renditions()
                .into_iter()
                .filter(|r| !r.is_gone() && decodes.can(&r.info().codec))
                .collect();
            // Highest first: by picture height, then bitrate. Not by the measured bitrate
            // alone: two renditions of about the same rate (or a still scene in a big one)
            // would swap places from one reading to the next.
            ladder.sort_by_key(|r| std::cmp::Reverse((r.info().height, bitrate(r))));
            self.ladder = ladder;
            self.version = Some(version);
            self.kbps_at = None;
            let at = self.index_of(follow.rendition()).unwrap_or(0);
            self.abr.reset(at, self.ladder.len(), now);
        }
        if self.asked.is_some() && follow.target().is_none() {
            // Our move was given up (the target had no keyframe where this rendition has).
            self.asked = None;
        }
        if self.asked.is_none()
            && let Some(i) = self.index_of(follow.rendition())
            && i != self.abr.at()
        {
            self.abr.reset(i, self.ladder.len(), now);
        }
        let sent = state.bytes_sent();
        let interval = now.duration_since(self.last_at);
        let sent_kbps = ((sent - self.last_sent.min(sent)) as f64 * 8.0
            / interval.as_secs_f64().max(1e-3)
            / 1000.0) as u32;
        self.last_at = now;
        self.last_sent = sent;
        let backlog = match (promoted, state.sink()) {
            (false, Some(sink)) => follow.rendition().backlog(sink.position()),
            _ => Default::default(),
        };
        let had_backlog = std::mem::replace(&mut self.had_backlog, backlog.bytes > 0);
        let skips = follow.cursor().skips;
        let skipped = skips > std::mem::replace(&mut self.skips, skips);
        let report = state.report().and_then(|(r, at)| {
            (self.report_at != Some(at)).then(|| {
                self.report_at = Some(at);
                Report {
                    stalls: r.stalls,
                    decoded_frames: r.decoded_frames,
                    dropped_frames: r.dropped_frames,
                }
            })
        });
        if follow.target().is_some() || self.ladder.len() < 2 {
            // A switch is under way (ours or the viewer's): judge what comes after it.
            return None;
        }
        if self
            .kbps_at
            .is_none_or(|t| now.duration_since(t) >= BITRATE_REFRESH)
        {
            self.kbps = self.ladder.iter().map(|r| bitrate(r)).collect();
            self.kbps_at = Some(now);
        }
        let kbps = &self.kbps;
        let start_age = *self.start_age.get_or_insert(backlog.age);
        let mut behind = backlog.age.saturating_sub(start_age);
        let backlogged = had_backlog && backlog.bytes > 0;
        if let Some(r) = state.receipt() {
            self.network.receipt(r);
        }
        let current_kbps = kbps.get(self.abr.at()).copied().unwrap_or(0);
        let network = self.network.sample(now, current_kbps);
        let saturated_kbps = match network {
            // The player's receipts show a queue in the network: what it received per second
            // is the link's rate (what the socket took includes filling the kernel's queue).
            Some(n) if n.queued => n.delivered_kbps.or(backlogged.then_some(sent_kbps)),
            // Nothing queued beyond the server while its own queue holds frames: the server was
            // slow to write them (a busy machine), not the link, and a lower rendition would
            // not help.
            Some(n) if n.idle => {
                behind = Duration::ZERO;
                None
            }
            // No receipts, or a little in flight: what the server sees of its own queue.
            _ => backlogged.then_some(sent_kbps),
        };
        let sample = Sample {
            behind,
            skipped,
            report,
            saturated_kbps,
        };
        tracing::trace!(
            at = self.abr.at(),
            behind_ms = sample.behind.as_millis() as u64,
            backlog = backlog.bytes,
            promoted,
            sent_kbps,
            saturated = sample.saturated_kbps.is_some(),
            ?network,
            ?kbps,
            "abr sample"
        );
        match self.abr.on_sample(now, &sample, kbps) {
            Decision::Stay => None,
            Decision::MoveTo(i, why) => {
                let to = self.ladder.get(i)?.clone();
                tracing::debug!(
                    to = to.id,
                    reason = why.name(),
                    behind_ms = sample.behind.as_millis() as u64,
                    rate_kbps = self.abr.rate_kbps(now),
                    "automatic switch decided"
                );
                self.asked = Some(to.clone());
                Some((to, why))
            }
        }
    }
}

/// A rendition's bitrate as measured over its recent log, or as configured until there is
/// enough of it.
fn bitrate(r: &Rendition) -> u32 {
    r.recent_kbps(BITRATE_WINDOW)
        .unwrap_or_else(|| r.info().nominal_kbps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LADDER: [u32; 3] = [2500, 1000, 300];

    fn behind(ms: u64) -> Sample {
        Sample {
            behind: Duration::from_millis(ms),
            ..Default::default()
        }
    }

    /// Feeds `sample` every 250 ms for `secs`; returns the moves with their times.
    fn run(
        abr: &mut Abr,
        t0: Instant,
        from_s: f64,
        secs: f64,
        sample: Sample,
    ) -> Vec<(f64, Decision)> {
        let mut out = Vec::new();
        let mut t = from_s;
        while t < from_s + secs {
            let d = abr.on_sample(t0 + Duration::from_secs_f64(t), &sample, &LADDER);
            if d != Decision::Stay {
                out.push((t, d));
            }
            t += 0.25;
        }
        out
    }

    #[test]
    fn a_growing_backlog_moves_down_a_step_at_a_time_after_settling_and_calm_climbs_back() {
        let t0 = Instant::now();
        let mut abr = Abr::new(0, 3, t0);
        // Right after it joined (the GOP it starts with is old by design): nothing.
        assert!(run(&mut abr, t0, 0.0, 1.5, behind(1500)).is_empty());
        let moves = run(&mut abr, t0, 1.5, 1.0, behind(1500));
        assert_eq!(
            moves,
            [(1.5, Decision::MoveTo(1, SwitchReason::Backlog))],
            "one step, then it settles"
        );
        let moves = run(&mut abr, t0, 2.5, 1.0, behind(1500));
        assert_eq!(moves, [(3.0, Decision::MoveTo(2, SwitchReason::Backlog))]);
        // Calm: nothing for HOLD, then one step up, then after PROBE_HELD the next.
        let moves = run(&mut abr, t0, 3.5, 30.0, behind(0));
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert_eq!(moves[0].1, Decision::MoveTo(1, SwitchReason::Probe));
        assert!(moves[0].0 >= 3.0 + 8.0, "held: {moves:?}");
        assert_eq!(moves[1].1, Decision::MoveTo(0, SwitchReason::Probe));
        assert!(
            moves[1].0 - moves[0].0 >= 4.0,
            "held after the probe: {moves:?}"
        );
    }

    #[test]
    fn a_keyframe_burst_is_not_a_backlog_but_a_lasting_one_is() {
        let t0 = Instant::now();
        let mut abr = Abr::new(0, 3, t0);
        // 400 ms behind for half a second, every two seconds: a big keyframe on a link that
        // carries the stream.
        for gop in 0..10 {
            let t = 2.0 + f64::from(gop) * 2.0;
            assert!(run(&mut abr, t0, t, 0.5, behind(400)).is_empty());
            assert!(run(&mut abr, t0, t + 0.5, 1.5, behind(50)).is_empty());
        }
        // 400 ms for longer than BEHIND_FOR: down.
        let moves = run(&mut abr, t0, 30.0, 2.0, behind(400));
        assert_eq!(moves, [(31.5, Decision::MoveTo(1, SwitchReason::Backlog))]);
    }

    #[test]
    fn a_measured_rate_picks_the_rendition_it_carries_and_blocks_probes_above_it() {
        let t0 = Instant::now();
        let mut abr = Abr::new(0, 3, t0);
        let full = Sample {
            behind: Duration::from_millis(100),
            saturated_kbps: Some(1200),
            ..Default::default()
        };
        // Full for two samples at 1200 < 2500; 1000 × 1.1 ≤ 1200: the middle one.
        assert_eq!(
            run(&mut abr, t0, 2.0, 0.5, full),
            [(2.25, Decision::MoveTo(1, SwitchReason::Backlog))]
        );
        // Calm for long, but 2500 is far above what was measured: no probe while it is recent.
        let moves = run(
            &mut abr,
            t0,
            2.25,
            RATE_VALID_FOR.as_secs_f64() - 1.0,
            behind(0),
        );
        assert!(moves.is_empty(), "{moves:?}");
        // Once the measure is old, probing resumes.
        let moves = run(
            &mut abr,
            t0,
            2.25 + RATE_VALID_FOR.as_secs_f64(),
            10.0,
            behind(0),
        );
        assert_eq!(moves[0].1, Decision::MoveTo(0, SwitchReason::Probe));
        // A rate below every rendition: the lowest.
        let mut abr = Abr::new(0, 3, t0);
        let starved = Sample {
            saturated_kbps: Some(200),
            ..full
        };
        assert_eq!(
            run(&mut abr, t0, 2.0, 0.5, starved),
            [(2.25, Decision::MoveTo(2, SwitchReason::Backlog))]
        );
        // One sample that took nothing (a loss recovery) in a run does not make the link slow.
        let mut abr = Abr::new(0, 3, t0);
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        for (t, kbps) in [
            (2.0, 2000),
            (2.25, 2000),
            (2.5, 2000),
            (2.75, 0),
            (3.0, 2000),
        ] {
            let s = Sample {
                saturated_kbps: Some(kbps),
                ..full
            };
            abr.on_sample(at(t), &s, &[1200, 1000, 300]);
        }
        assert_eq!(abr.at(), 0, "{abr:?}");
        assert_eq!(abr.rate_kbps(at(3.0)), Some(1500), "over the run");
    }

    #[test]
    fn a_full_socket_taking_less_than_the_bitrate_moves_down_before_the_backlog_is_long() {
        let t0 = Instant::now();
        let mut abr = Abr::new(0, 3, t0);
        let full = |kbps| Sample {
            behind: Duration::from_millis(150),
            saturated_kbps: Some(kbps),
            ..Default::default()
        };
        // Full, but taking more than the 2500 the rendition needs: a burst, not a slow link.
        assert!(run(&mut abr, t0, 2.0, 2.0, full(6000)).is_empty());
        assert_eq!(abr.rate_kbps(t0 + Duration::from_secs(4)), Some(6000));
        let mut abr = Abr::new(0, 3, t0);
        assert_eq!(
            run(&mut abr, t0, 2.0, 1.0, full(1800)),
            [(2.25, Decision::MoveTo(1, SwitchReason::Backlog))]
        );
        // A sample that took nothing (a loss recovery) is trouble, but says nothing of the
        // rate: one step down, not to the lowest.
        let mut abr = Abr::new(0, 3, t0);
        assert_eq!(
            run(&mut abr, t0, 2.0, 0.5, full(0)),
            [(2.25, Decision::MoveTo(1, SwitchReason::Backlog))]
        );
    }

    #[test]
    fn a_backlog_that_drains_is_left_to_drain() {
        let t0 = Instant::now();
        let mut abr = Abr::new(1, 3, t0);
        // 700 ms behind after a move, the socket full and taking 1600 of the 1000 needed.
        let draining = Sample {
            behind: Duration::from_millis(700),
            saturated_kbps: Some(1600),
            ..Default::default()
        };
        // (The first full sample says nothing of the rate yet.)
        let first = Sample {
            behind: Duration::from_millis(200),
            ..draining
        };
        assert_eq!(
            abr.on_sample(t0 + Duration::from_secs(2), &first, &LADDER),
            Decision::Stay
        );
        assert!(run(&mut abr, t0, 2.25, 3.0, draining).is_empty());
        // The same backlog while taking 900: down.
        let mut abr = Abr::new(1, 3, t0);
        let growing = Sample {
            saturated_kbps: Some(900),
            ..draining
        };
        assert_eq!(
            run(&mut abr, t0, 2.0, 1.0, growing),
            [(2.0, Decision::MoveTo(2, SwitchReason::Backlog))]
        );
    }

    #[test]
    fn a_failed_probe_is_not_tried_again_until_its_backoff_and_the_backoff_grows() {
        let t0 = Instant::now();
        let mut abr = Abr::new(0, 2, t0);
        let ladder = [2500, 1000];
        assert_eq!(
            abr.on_sample(t0 + Duration::from_secs(2), &behind(2000), &ladder),
            Decision::MoveTo(1, SwitchReason::Backlog)
        );
        let mut probes = Vec::new();
        let mut t = 2.25;
        // The top rendition is too much for this viewer: every probe fails a few seconds later.
        while t < 300.0 {
            let now = t0 + Duration::from_secs_f64(t);
            let s = if abr.at() == 0 {
                behind(2000)
            } else {
                behind(0)
            };
            if let Decision::MoveTo(0, SwitchReason::Probe) = abr.on_sample(now, &s, &ladder) {
                probes.push(t);
            }
            t += 0.25;
        }
        assert!(probes.len() >= 3, "{probes:?}");
        let gaps: Vec<f64> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.windows(2).all(|g| g[1] > g[0]),
            "back-off grows: {probes:?}"
        );
        assert!(probes.len() <= 6, "no flapping: {probes:?}");
    }

    #[test]
    fn a_probe_the_link_cannot_carry_is_left_without_waiting_out_the_settle_time() {
        let t0 = Instant::now();
        let ladder = LADDER;
        let mut abr = Abr::new(1, 3, t0);
        let mut t = 0.25;
        let probe = loop {
            let now = t0 + Duration::from_secs_f64(t);
            if abr.on_sample(now, &behind(0), &ladder) == Decision::MoveTo(0, SwitchReason::Probe) {
                break t;
            }
            t += 0.25;
            assert!(t < 30.0, "no probe");
        };
        // The network fills at once: full samples taking 1500 kbit/s.
        let full = Sample {
            saturated_kbps: Some(1500),
            ..Default::default()
        };
        let down = (1..=8).find_map(|i| {
            let t = probe + 0.25 * f64::from(i);
            match abr.on_sample(t0 + Duration::from_secs_f64(t), &full, &ladder) {
                Decision::MoveTo(1, why) => Some((t - probe, why)),
                _ => None,
            }
        });
        let (after, why) = down.expect("back down");
        assert_eq!(why, SwitchReason::Backlog);
        assert!(
            after < SETTLE.as_secs_f64(),
            "left {after} s after the probe"
        );
        // A move down still settles: a backlog right after it moves nothing, until SETTLE.
        let at = |dt: f64| t0 + Duration::from_secs_f64(probe + after + dt);
        assert_eq!(
            abr.on_sample(at(0.25), &behind(2000), &ladder),
            Decision::Stay
        );
        assert_eq!(
            abr.on_sample(at(SETTLE.as_secs_f64()), &behind(2000), &ladder),
            Decision::MoveTo(2, SwitchReason::Backlog)
        );
    }

    #[test]
    fn stalls_skips_and_dropped_frames_move_down_and_the_lowest_stays() {
        let t0 = Instant::now();
        let report = |stalls, decoded, dropped| Sample {
            report: Some(Report {
                stalls,
                decoded_frames: decoded,
                dropped_frames: dropped,
            }),
            ..Default::default()
        };
        let mut abr = Abr::new(0, 3, t0);
        let t = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            abr.on_sample(t(2), &report(0, 100, 0), &LADDER),
            Decision::Stay
        );
        // A lone stall with nothing queued for the viewer is its player's own.
        assert_eq!(
            abr.on_sample(t(3), &report(1, 130, 0), &LADDER),
            Decision::Stay
        );
        // A second one within the window is not.
        assert_eq!(
            abr.on_sample(t(4), &report(2, 160, 0), &LADDER),
            Decision::MoveTo(1, SwitchReason::Stalled)
        );
        // Within SETTLE of the move, a report's trouble is from before it.
        assert_eq!(
            abr.on_sample(t(5), &report(3, 190, 0), &LADDER),
            Decision::Stay
        );
        assert_eq!(
            abr.on_sample(t(6), &report(3, 220, 10), &LADDER),
            Decision::MoveTo(2, SwitchReason::DroppedFrames)
        );
        let skipped = Sample {
            skipped: true,
            ..Default::default()
        };
        assert_eq!(
            abr.on_sample(t(8), &skipped, &LADDER),
            Decision::Stay,
            "nothing lower"
        );
    }

    #[test]
    fn the_memory_recalls_recent_sessions_of_the_same_stream_and_stays_bounded() {
        let t0 = Instant::now();
        let m = Memory::default();
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(m.recall(a, "cam", t0), None);
        assert_eq!(m.remember(a, "cam", "480p".into(), t0), 0);
        assert_eq!(m.recall(a, "cam", t0).as_deref(), Some("480p"));
        assert_eq!(m.recall(a, "other", t0), None, "another stream's ladder");
        assert_eq!(m.recall(a, "cam", t0 + REMEMBER_FOR), None, "too old");
        let mut evicted = 0;
        for i in 0..REMEMBER_MAX as u32 + 10 {
            let addr = std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            evicted += m.remember(
                addr,
                "cam",
                "240p".into(),
                t0 + Duration::from_millis(i.into()),
            );
        }
        assert_eq!(m.by_addr.lock().len(), REMEMBER_MAX);
        assert_eq!(evicted, 11, "the first one and the ten oldest made room");
        assert_eq!(m.recall(a, "cam", t0), None);
    }

    #[test]
    fn a_ladder_that_changes_size_restarts_the_controller_within_it() {
        let t0 = Instant::now();
        let mut abr = Abr::new(2, 3, t0);
        // A rung went: the viewer is re-indexed by its connection; here the ladder shrank
        // under it and it lands on what is now the lowest.
        assert_eq!(abr.on_sample(t0, &behind(0), &[2500, 1000]), Decision::Stay);
        assert_eq!(abr.at(), 1);
    }

    /// A viewer's path as receipts every 250 ms show it: bytes sent and received so far, and a
    /// floor always in flight (its round trip).
    struct Path {
        net: Network,
        sent: u64,
        received: u64,
        floor: u64,
        t: Instant,
    }

    impl Path {
        fn new(floor: u64) -> Self {
            Self {
                net: Network::default(),
                sent: 0,
                received: 0,
                floor,
                t: Instant::now(),
            }
        }

        /// A quarter second: `sent` more bytes sent, `received` more received; then a receipt
        /// and a sample on a 2600 kbit/s rendition.
        fn step(&mut self, sent: u64, received: u64) -> NetworkSample {
            self.sent += sent;
            self.received += received;
            self.t += Duration::from_millis(250);
            self.net.receipt(crate::hub::Receipt {
                received: self.received,
                sent: self.sent + self.floor,
                at: self.t,
            });
            self.net.sample(self.t, 2600).expect("a fresh receipt")
        }
    }

    #[test]
    fn receipts_show_a_queue_building_in_the_network_and_the_rate_the_link_delivers() {
        assert_eq!(
            Network::default().sample(Instant::now(), 2600),
            None,
            "no receipts"
        );
        // Keeping up with 40 KB in flight for its round trip: 81 KB a quarter second sent
        // and received. That is the floor: no queue.
        let mut p = Path::new(40_000);
        for _ in 0..8 {
            p.step(81_250, 81_250);
        }
        let s = p.step(81_250, 81_250);
        assert!(!s.queued && s.idle, "{s:?}");
        assert_eq!(s.delivered_kbps, Some(2600));
        // The link drops to 1600 kbit/s: 50 KB a quarter second get through, the rest queues.
        let s = p.step(81_250, 50_000);
        assert!(
            !s.queued && !s.idle,
            "31 KB above the floor is not yet a queue: {s:?}"
        );
        let s = p.step(81_250, 50_000);
        assert!(
            s.queued,
            "62 KB above the floor (190 ms of the rendition): {s:?}"
        );
        assert_eq!(
            s.delivered_kbps,
            Some(1600),
            "what got through, over the last 0.5 s"
        );
        // The receipts stop (a hidden tab): a second later they say nothing.
        assert_eq!(p.net.sample(p.t + Duration::from_millis(1001), 2600), None);
        // The same receipt again counts once.
        let n = p.net.recent.len();
        p.net.receipt(crate::hub::Receipt {
            received: p.received,
            sent: p.sent + p.floor,
            at: p.t,
        });
        assert_eq!(p.net.recent.len(), n);
    }

    #[test]
    fn a_keyframe_burst_on_a_link_that_carries_it_is_not_a_queue() {
        let mut p = Path::new(0);
        for _ in 0..8 {
            p.step(81_250, 81_250);
        }
        // A 60 KB keyframe, 30 KB of it caught in flight by one receipt, received by the next.
        let s = p.step(141_250, 111_250);
        assert!(!s.queued && !s.idle, "{s:?}");
        let s = p.step(81_250, 111_250);
        assert!(!s.queued && s.idle, "{s:?}");
    }
}
