//! A viewer's place in a stream: the rendition it is on, its cursor there, and a switch to
//! another rendition while one is under way.
//!
//! A switch happens at a keyframe, with no hole and no overlap: the viewer reads its rendition up
//! to the next video keyframe (presented at K), and continues in the target rendition from the
//! target's keyframe presented at K, after the target's init; audio continues right after the
//! last audio frame sent. Renditions of a stream share one timeline, so the target has a
//! keyframe at K; if it has not got there yet (a transcoded rung runs a little behind its
//! source), the viewer waits for it up to [`WAIT_FOR_TARGET`]. A target without that keyframe
//! is tried again at the next one, [`MAX_MISSES`] times. A viewer whose rendition was removed
//! continues at the target's first keyframe after what it was sent: the rendition it was on
//! has nothing more to give.
//!
//! A viewer is never sent a configuration its player cannot decode (it says which codecs it
//! decodes when it connects): it joins the highest rendition it decodes, and a viewer whose
//! rendition turns into one it cannot (a republish in HEVC) is held, sent nothing, until it is
//! moved to one it can, where it starts afresh from the GOP cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use onair_protocol::codec::Decodes;
use serde::Serialize;

use super::rendition::{Cursor, ReadOutcome, Rendition};
use super::{Sink, Stream};

/// How long a viewer stopped at a keyframe waits for the target rendition to reach it.
pub const WAIT_FOR_TARGET: Duration = Duration::from_millis(1500);
/// Keyframes tried before a switch is given up.
pub const MAX_MISSES: u32 = 3;

/// Why a viewer was moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchReason {
    /// The viewer (or its page) asked for this rendition.
    Requested,
    /// The rendition it was on went away.
    RenditionGone,
    /// Automatic, down: its backlog grew (the link carries less than the rendition needs).
    Backlog,
    /// Automatic, down: it fell so far behind that it skipped to a keyframe.
    Skipped,
    /// Automatic, down: its player reported a stall.
    Stalled,
    /// Automatic, down: its player dropped frames (it cannot decode this one in time).
    DroppedFrames,
    /// Automatic, up: calm long enough to try the next higher rendition.
    Probe,
    /// Its rendition's codec is one the viewer's player cannot decode (a source in HEVC, say):
    /// moved to one it can.
    Undecodable,
}

impl SwitchReason {
    pub fn name(self) -> &'static str {
        match self {
            SwitchReason::Requested => "requested",
            SwitchReason::RenditionGone => "rendition_gone",
            SwitchReason::Backlog => "backlog",
            SwitchReason::Skipped => "skipped",
            SwitchReason::Stalled => "stalled",
            SwitchReason::DroppedFrames => "dropped_frames",
            SwitchReason::Probe => "probe",
            SwitchReason::Undecodable => "undecodable",
        }
    }
}

/// Which rendition a viewer wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preference {
    /// The server chooses.
    Auto,
    /// This one, by name, whenever the stream has it.
    Pinned(String),
}

struct Pending {
    to: Arc<Rendition>,
    reason: SwitchReason,
    /// Since when the viewer has been stopped at `at`.
    stopped: Option<(u64, Instant)>,
    misses: u32,
}

/// A completed switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switched {
    pub from: u8,
    pub to: u8,
    /// To a taller picture (then a higher bitrate) than the one left.
    pub up: bool,
    pub reason: SwitchReason,
}

pub struct Follow {
    rendition: Arc<Rendition>,
    cursor: Cursor,
    pending: Option<Pending>,
    preference: Preference,
    /// The stream's renditions version last reconciled with.
    seen_version: Option<u64>,
    /// The video codecs the viewer's player decodes.
    decodes: Decodes,
}

/// The highest rendition (by picture height, then nominal bitrate) whose codec a player that
/// decodes `decodes` can decode, among those configured.
fn best_decodable(stream: &Stream, decodes: Decodes) -> Option<Arc<Rendition>> {
    stream
        .renditions()
        .into_iter()
        .filter(|r| {
            let info = r.info();
            !r.is_gone() && !info.codec.is_empty() && decodes.can(&info.codec)
        })
        .max_by_key(|r| {
            let info = r.info();
            (info.height, info.nominal_kbps)
        })
}

impl Follow {
    /// Joins `stream` on the rendition the preference names, or on automatic on `start` (by
    /// name), or else the source, each if the player decodes it (`decodes`), else on the
    /// highest it decodes; the status and init it starts with go to `out`. A viewer whose
    /// player decodes none of them is held (sent nothing more) until one it decodes appears.
    pub fn join(
        stream: &Stream,
        preference: Preference,
        start: Option<&str>,
        decodes: Decodes,
        out: &mut Vec<Bytes>,
    ) -> Follow {
        let can = |r: &Arc<Rendition>| !r.is_gone() && decodes.can(&r.info().codec);
        let rendition = match &preference {
            Preference::Pinned(name) => stream.rendition_named(name),
            Preference::Auto => start.and_then(|name| stream.rendition_named(name)),
        }
        .filter(can)
        .or_else(|| Some(stream.source()).filter(can))
        .or_else(|| best_decodable(stream, decodes))
        .unwrap_or_else(|| stream.source());
        let cursor = rendition.join(decodes, out);
        Follow {
            rendition,
            cursor,
            pending: None,
            preference,
            seen_version: None,
            decodes,
        }
    }

    /// The video codecs the viewer's player decodes.
    pub fn decodes(&self) -> Decodes {
        self.decodes
    }

    pub fn rendition(&self) -> &Arc<Rendition> {
        &self.rendition
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    pub fn cursor_mut(&mut self) -> &mut Cursor {
        &mut self.cursor
    }

    /// The rendition a switch is waiting for, if one is under way.
    pub fn target(&self) -> Option<&Arc<Rendition>> {
        self.pending.as_ref().map(|p| &p.to)
    }

    pub fn set_preference(&mut self, preference: Preference) {
        self.preference = preference;
        self.seen_version = None;
    }

    /// Starts a switch to `to` (replacing one under way); a switch to where it is cancels it.
    pub fn request(&mut self, to: Arc<Rendition>, reason: SwitchReason) {
        if Arc::ptr_eq(&to, &self.rendition) {
            self.pending = None;
            self.cursor.stop_at_keyframes(false);
            return;
        }
        tracing::debug!(
            from = self.rendition.id,
            to = to.id,
            ?reason,
            "switch requested"
        );
        self.pending = Some(Pending {
            to,
            reason,
            stopped: None,
            misses: 0,
        });
        self.cursor.stop_at_keyframes(true);
    }

    /// Follows what changed in the stream's renditions: a viewer on a rendition that went is
    /// moved to the nearest remaining one; a pinned viewer to its rendition once it exists.
    pub fn reconcile(&mut self, stream: &Stream) {
        if self.cursor.undecodable()
            && self.target().is_none_or(|t| t.is_gone())
            && let Some(r) = best_decodable(stream, self.decodes)
            && !Arc::ptr_eq(&r, &self.rendition)
        {
            self.request(r, SwitchReason::Undecodable);
            return;
        }
        let version = stream.renditions_version();
        if self.seen_version == Some(version) && !self.rendition.is_gone() {
            return;
        }
        self.seen_version = Some(version);
        if self.target().is_some_and(|t| t.is_gone()) {
            self.pending = None;
            self.cursor.stop_at_keyframes(false);
        }
        if let Preference::Pinned(name) = &self.preference
            && let Some(r) = stream.rendition_named(name)
            && !Arc::ptr_eq(&r, &self.rendition)
            && self.decodes.can(&r.info().codec)
        {
            if self.target().is_none_or(|t| !Arc::ptr_eq(t, &r)) {
                self.request(r, SwitchReason::Requested);
            }
            return;
        }
        if self.rendition.is_gone()
            && self.pending.is_none()
            && let Some(r) = stream.nearest(&self.rendition.info())
        {
            self.request(r, SwitchReason::RenditionGone);
        }
    }

    /// Reads like [`Rendition::read`], and carries out a switch under way when it reaches its
    /// keyframe; the viewer's socket (`sink`) moves to the new rendition's fan-out with it.
    pub fn read(
        &mut self,
        sink: Option<&Arc<Sink>>,
        out: &mut Vec<Bytes>,
        max_frames: usize,
        max_bytes: usize,
    ) -> (ReadOutcome, Option<Switched>) {
        let mut switched = None;
        if self.cursor.undecodable()
            && let Some(to) = self.target().cloned()
        {
            // Nothing of this rendition was sent since it became undecodable: the viewer
            // starts afresh on the target, from its GOP cache, as a new viewer would.
            let cursor = to.join(self.decodes, out);
            if let Some(p) = self.pending.take() {
                switched = Some(self.complete(p, cursor, sink));
            }
        } else if self.rendition.is_gone()
            && let Some(to) = self.target().cloned()
        {
            let (video, audio) = self.rendition.last_sent(&self.cursor);
            if let Some(cursor) = to.switch_cursor(None, video, audio, self.decodes, out)
                && let Some(p) = self.pending.take()
            {
                switched = Some(self.complete(p, cursor, sink));
            }
        }
        let outcome = self
            .rendition
            .read(&mut self.cursor, out, max_frames, max_bytes);
        let Some(at) = outcome.at_keyframe else {
            return (outcome, switched);
        };
        let Some(to) = self.target().cloned() else {
            self.cursor.stop_at_keyframes(false);
            return (outcome, switched);
        };
        let (video, audio) = self.rendition.last_sent(&self.cursor);
        if let Some(cursor) = to.switch_cursor(Some(at), video, audio, self.decodes, out)
            && let Some(p) = self.pending.take()
        {
            let s = self.complete(p, cursor, sink);
            let room = max_frames.saturating_sub(out.len());
            let more = self.rendition.read(&mut self.cursor, out, room, max_bytes);
            return (
                ReadOutcome {
                    skipped: outcome.skipped || more.skipped,
                    at_keyframe: None,
                    undecodable: more.undecodable,
                },
                Some(s),
            );
        }
        let Some(pending) = &mut self.pending else {
            return (outcome, switched);
        };
        let stopped_since = match pending.stopped {
            Some((k, since)) if k == at => since,
            _ => {
                let now = Instant::now();
                pending.stopped = Some((at, now));
                now
            }
        };
        // The target's newest dts has not reached the keyframe's presentation time: it is
        // still coming (a rung's dts equal its pts; a source's trail its pts by the B-frames).
        let behind = to.newest_dts().is_none_or(|d| d < at);
        if behind && stopped_since.elapsed() < WAIT_FOR_TARGET && !to.is_gone() {
            return (outcome, switched); // wait here for the target to reach the keyframe
        }
        pending.misses += 1;
        pending.stopped = None;
        self.cursor.pass_keyframe(at);
        if pending.misses >= MAX_MISSES || to.is_gone() {
            tracing::info!(
                to = to.id,
                misses = pending.misses,
                "switch given up: the target has no keyframe where this rendition has one"
            );
            self.pending = None;
            self.cursor.stop_at_keyframes(false);
        }
        (outcome, switched)
    }

    /// Whether the viewer is stopped at a keyframe, waiting for the target to reach it: it
    /// should wait for either rendition's news.
    pub fn waiting_for_target(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.stopped.is_some())
    }

    fn complete(&mut self, pending: Pending, cursor: Cursor, sink: Option<&Arc<Sink>>) -> Switched {
        let skips = self.cursor.skips;
        let from = std::mem::replace(&mut self.rendition, pending.to);
        self.cursor = cursor;
        self.cursor.skips = skips;
        if let Some(sink) = sink {
            from.detach_sink(sink);
            self.rendition.attach_sink(sink);
            sink.set_position(self.cursor.next());
        }
        // The rendition left is still at hand, even when it was removed from the stream.
        let (a, b) = (from.info(), self.rendition.info());
        Switched {
            from: from.id,
            to: self.rendition.id,
            up: (b.height, b.nominal_kbps) > (a.height, a.nominal_kbps),
            reason: pending.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::frame::{InitConfig, TrackConfig};
    use crate::hub::rendition::tests::header as h;
    use crate::hub::tests::hub;
    use crate::hub::{PublisherInfo, RenditionInfo};
    use onair_protocol::wire::{Message, TrackParams};
    use std::net::SocketAddr;

    fn init(height: u16) -> InitConfig {
        init_of("avc1", height)
    }

    fn init_of(family: &str, height: u16) -> InitConfig {
        InitConfig {
            tracks: vec![TrackConfig {
                id: 0,
                timescale: 1000,
                codec: format!("{family}.{height}"),
                params: TrackParams::Video {
                    width: height * 16 / 9,
                    height,
                    fps_milli: 30_000,
                },
                config: bytes::Bytes::new(),
            }],
        }
    }

    /// What a viewer got, a tag each: `K`/`v` + dts for video (keyframe or not), `a` + dts
    /// for audio, `I` + rendition id for an init.
    fn seen(out: &[Bytes]) -> Vec<String> {
        out.iter()
            .filter_map(|b| match Message::decode(b).expect("decodes") {
                Message::Media { header, .. } => Some(format!(
                    "{}{}",
                    if header.track == 0 {
                        if header.keyframe { "K" } else { "v" }
                    } else {
                        "a"
                    },
                    header.dts
                )),
                Message::Init(i) => Some(format!("I{}", i.rendition)),
                _ => None,
            })
            .collect()
    }

    fn publish(hub: &Arc<crate::hub::Hub>) -> crate::hub::Publisher {
        let info = PublisherInfo {
            protocol: "rtmp",
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            since_ms: 0,
            clock: None,
        };
        hub.publish("s", info).unwrap()
    }

    #[test]
    fn a_pinned_viewer_moves_at_a_keyframe_and_back_when_its_rendition_goes() {
        let hub = hub();
        let publisher = publish(&hub);
        let stream = publisher.stream().clone();
        publisher.set_init(init(720), Default::default()).unwrap();
        let rung = stream
            .add_rendition(RenditionInfo {
                name: "240p".into(),
                nominal_kbps: 300,
                ..Default::default()
            })
            .expect("added");
        assert!(
            stream
                .add_rendition(RenditionInfo {
                    name: "240p".into(),
                    ..Default::default()
                })
                .is_none(),
            "names are unique"
        );
        rung.set_init(init(240)).unwrap();
        assert_eq!(rung.rendition.info().height, 240);

        let mut out = Vec::new();
        let mut follow = Follow::join(&stream, Preference::Auto, None, Decodes::ALL, &mut out);
        assert_eq!(follow.rendition().id, 0);
        // Both renditions: a keyframe every 100 ms, audio between.
        let frame = |t: u64| {
            let key = t.is_multiple_of(100);
            publisher.push_media(&h(0, key, t), b"v", key);
            rung.push_media(&h(0, key, t), b"v", key);
            publisher.push_media(&h(1, true, t + 5), b"a", false);
            rung.push_media(&h(1, true, t + 5), b"a", false);
        };
        for t in (0..100).step_by(50) {
            frame(t);
        }
        follow.read(None, &mut out, 1000, usize::MAX);
        follow.set_preference(Preference::Pinned("240p".into()));
        follow.reconcile(&stream);
        assert!(follow.target().is_some());
        for t in (100..200).step_by(50) {
            frame(t);
        }
        let mut got = Vec::new();
        let (_, switched) = follow.read(None, &mut got, 1000, usize::MAX);
        assert_eq!(
            switched.map(|s| (s.from, s.to, s.up)),
            Some((0, rung.rendition.id, false))
        );
        assert_eq!(seen(&got), ["I1", "K100", "a105", "v150", "a155"]);

        // The rung goes: the viewer is moved to the nearest remaining one, the source.
        follow.set_preference(Preference::Auto);
        drop(rung);
        follow.reconcile(&stream);
        for t in (200..300u64).step_by(50) {
            let key = t.is_multiple_of(100);
            publisher.push_media(&h(0, key, t), b"v", key);
            publisher.push_media(&h(1, true, t + 5), b"a", false);
        }
        let mut got = Vec::new();
        let (_, switched) = follow.read(None, &mut got, 1000, usize::MAX);
        assert_eq!(
            switched.map(|s| (s.to, s.up, s.reason)),
            Some((0, true, SwitchReason::RenditionGone)),
            "up, compared with the rendition that went"
        );
        assert_eq!(seen(&got), ["I0", "K200", "a205", "v250", "a255"]);
    }

    /// An HEVC source and an H.264 rung: a player that decodes only H.264 is never sent the
    /// source's init. Joined before the rung exists, it is held (sent the status and nothing
    /// else, never promoted), then started on the rung from its GOP cache once it appears.
    #[test]
    fn a_viewer_is_never_sent_a_codec_its_player_cannot_decode() {
        let hub = hub();
        let publisher = publish(&hub);
        let stream = publisher.stream().clone();
        publisher
            .set_init(init_of("hvc1", 720), Default::default())
            .unwrap();
        let h264 = Decodes::parse_list("avc1");
        let mut out = Vec::new();
        let mut held = Follow::join(&stream, Preference::Auto, None, h264, &mut out);
        assert_eq!(held.rendition().id, 0, "nothing else yet");
        assert!(seen(&out).is_empty(), "no init: {:?}", seen(&out));
        for t in (0..200).step_by(50) {
            publisher.push_media(&h(0, t % 100 == 0, t), b"v", t % 100 == 0);
        }
        let mut got = Vec::new();
        let (outcome, switched) = held.read(None, &mut got, 1000, usize::MAX);
        assert!(outcome.undecodable && switched.is_none() && got.is_empty());
        assert!(held.cursor().undecodable());

        let rung = stream
            .add_rendition(RenditionInfo {
                name: "360p".into(),
                nominal_kbps: 800,
                ..Default::default()
            })
            .expect("added");
        rung.set_init(init(360)).unwrap();
        for t in (0..200).step_by(50) {
            rung.push_media(&h(0, t % 100 == 0, t), b"v", t % 100 == 0);
        }
        held.reconcile(&stream);
        let mut got = Vec::new();
        let (_, switched) = held.read(None, &mut got, 1000, usize::MAX);
        assert_eq!(
            switched.map(|s| (s.to, s.reason)),
            Some((rung.rendition.id, SwitchReason::Undecodable))
        );
        assert_eq!(
            seen(&got),
            ["I1", "K100", "v150"],
            "from the rung's GOP cache"
        );

        // Joining now: straight onto the rung; a player that says nothing gets the source.
        let mut out = Vec::new();
        let direct = Follow::join(&stream, Preference::Auto, None, h264, &mut out);
        assert_eq!(direct.rendition().id, rung.rendition.id);
        assert_eq!(seen(&out), ["I1"]);
        let pinned = Follow::join(
            &stream,
            Preference::Pinned("source".into()),
            None,
            h264,
            &mut Vec::new(),
        );
        assert_eq!(
            pinned.rendition().id,
            rung.rendition.id,
            "pinned to what it cannot decode"
        );
        let any = Follow::join(
            &stream,
            Preference::Auto,
            None,
            Decodes::ALL,
            &mut Vec::new(),
        );
        assert_eq!(any.rendition().id, 0);
    }
}
