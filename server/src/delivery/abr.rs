//! Automatic rendition choice for one viewer, on the server: a controller fed what the server
//! sees of the viewer's socket and what the player reports, returning "stay" or "move to this
//! rendition at its next keyframe". No I/O and no clock of its own: every call is given `now`,
//! so the rules are tested on made-up timelines.
//!
//! Throughput cannot be measured from a live push (data flows at the encode rate), so:
//! - **down** on the signals a live push has: the viewer's backlog (how long its oldest unsent
//!   frame has waited), a keyframe skip, a stall the player reports, or a player dropping more
//!   than a tenth of its frames (CPU-bound: a lower resolution helps it too);
//! - **up** by probing: after [`HOLD`] without trouble, the next higher rendition is tried. A
//!   rendition the viewer had to leave within [`PROBE_FAILED_WITHIN`] of moving to it is not
//!   tried again for a back-off that doubles each time (OvenMediaEngine's rule of a growing
//!   back-off for a rung that failed), so a viewer does not flap.
//!
//! Not wired to the viewers' connections yet: `?rendition=auto` still stays where it is. What
//! is missing is the kernel side of the backlog (a viewer socket's send buffer can hold seconds
//! that the server never sees) and the shaped-link test that sets the thresholds.

use std::time::{Duration, Instant};

/// Backlog age above which the viewer is moved down.
pub const BEHIND_DOWN: Duration = Duration::from_millis(1000);
/// Backlog age under which a viewer counts as keeping up.
pub const BEHIND_OK: Duration = Duration::from_millis(250);
/// Time without trouble before probing a higher rendition, and after any move.
pub const HOLD: Duration = Duration::from_secs(10);
/// A move up that fails this soon marks the rendition as failed.
pub const PROBE_FAILED_WITHIN: Duration = Duration::from_secs(15);
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
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Counters as the player sends them (totals since it started).
    pub stalls: u32,
    pub decoded_frames: u32,
    pub dropped_frames: u32,
}

/// Why a move was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Backlog,
    Skipped,
    Stalled,
    DroppedFrames,
    Probe,
}

impl Why {
    pub fn name(self) -> &'static str {
        match self {
            Why::Backlog => "backlog",
            Why::Skipped => "skipped",
            Why::Stalled => "stalled",
            Why::DroppedFrames => "dropped_frames",
            Why::Probe => "probe",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Stay,
    /// Move to the rendition at this index of the ladder (0 is the highest bitrate).
    MoveTo(usize, Why),
}

/// One viewer's controller. Renditions are given by index into the stream's ladder sorted by
/// bitrate, highest first.
#[derive(Debug)]
pub struct Abr {
    /// Where the viewer is (index into the ladder) and since when.
    at: usize,
    since: Instant,
    /// When trouble was last seen.
    trouble: Instant,
    /// Per index: not to be probed before this, and the back-off to apply next.
    banned_until: Vec<Option<Instant>>,
    backoff: Vec<Duration>,
    /// Whether the last move was up (a probe), to judge it.
    probing_from: Option<usize>,
    last: Option<Report>,
}

impl Abr {
    pub fn new(at: usize, renditions: usize, now: Instant) -> Self {
        Self {
            at,
            since: now,
            trouble: now,
            banned_until: vec![None; renditions],
            backoff: vec![FIRST_BACKOFF; renditions],
            probing_from: None,
            last: None,
        }
    }

    pub fn at(&self) -> usize {
        self.at
    }

    /// The ladder changed (a rung came or went) or the viewer was moved by something else: it
    /// is now at `at` of `renditions`.
    pub fn reset(&mut self, at: usize, renditions: usize, now: Instant) {
        self.at = at;
        self.since = now;
        self.banned_until.resize(renditions, None);
        self.backoff.resize(renditions, FIRST_BACKOFF);
        self.probing_from = None;
    }

    /// Takes one sample; returns what to do.
    pub fn on_sample(&mut self, now: Instant, s: &Sample) -> Decision {
        let lowest = self.banned_until.len().saturating_sub(1);
        let trouble = self.trouble_in(s);
        if let Some(why) = trouble {
            self.trouble = now;
            if self.at < lowest {
                return self.move_to(self.at + 1, why, now);
            }
            return Decision::Stay;
        }
        let calm = s.behind <= BEHIND_OK;
        if !calm {
            self.trouble = now;
        }
        if self.at == 0
            || now.duration_since(self.since) < HOLD
            || now.duration_since(self.trouble) < HOLD
        {
            return Decision::Stay;
        }
        let up = self.at - 1;
        if self.banned_until[up].is_some_and(|t| now < t) {
            return Decision::Stay;
        }
        self.probing_from = Some(self.at);
        self.move_to(up, Why::Probe, now)
    }

    fn trouble_in(&mut self, s: &Sample) -> Option<Why> {
        let mut why = None;
        if let Some(r) = s.report {
            if let Some(last) = self.last {
                let decoded = r.decoded_frames.saturating_sub(last.decoded_frames);
                let dropped = r.dropped_frames.saturating_sub(last.dropped_frames);
                if r.stalls > last.stalls {
                    why = Some(Why::Stalled);
                } else if decoded >= 10 && dropped * 10 > decoded {
                    why = Some(Why::DroppedFrames);
                }
            }
            self.last = Some(r);
        }
        if s.skipped {
            why = Some(Why::Skipped);
        } else if s.behind > BEHIND_DOWN {
            why = why.or(Some(Why::Backlog));
        }
        why
    }

    fn move_to(&mut self, to: usize, why: Why, now: Instant) -> Decision {
        // A move down soon after a probe up: the probed rendition failed.
        if why != Why::Probe
            && self.probing_from == Some(to)
            && now.duration_since(self.since) < PROBE_FAILED_WITHIN
        {
            let failed = self.at;
            let backoff = self.backoff[failed];
            self.banned_until[failed] = Some(now + backoff);
            self.backoff[failed] = (backoff * 2).min(MAX_BACKOFF);
        }
        if why != Why::Probe {
            self.probing_from = None;
        }
        self.at = to;
        self.since = now;
        Decision::MoveTo(to, why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let d = abr.on_sample(t0 + Duration::from_secs_f64(t), &sample);
            if d != Decision::Stay {
                out.push((t, d));
            }
            t += 0.25;
        }
        out
    }

    #[test]
    fn a_growing_backlog_moves_down_one_step_at_a_time_and_calm_probes_back_up() {
        let t0 = Instant::now();
        let mut abr = Abr::new(0, 3, t0);
        let moves = run(&mut abr, t0, 0.0, 1.0, behind(1500));
        assert_eq!(moves[0].1, Decision::MoveTo(1, Why::Backlog));
        assert_eq!(abr.at(), 2, "down again while still behind: {moves:?}");
        // Calm: nothing for HOLD, then one step up, then after another HOLD the next.
        let moves = run(&mut abr, t0, 1.0, 30.0, behind(0));
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert_eq!(moves[0].1, Decision::MoveTo(1, Why::Probe));
        assert!(moves[0].0 >= 10.75, "held: {moves:?}");
        assert_eq!(moves[1].1, Decision::MoveTo(0, Why::Probe));
        assert!(
            moves[1].0 - moves[0].0 >= 10.0,
            "held after the probe: {moves:?}"
        );
    }

    #[test]
    fn a_failed_probe_is_not_tried_again_until_its_backoff_and_the_backoff_grows() {
        let t0 = Instant::now();
        let mut abr = Abr::new(0, 2, t0);
        run(&mut abr, t0, 0.0, 0.25, behind(2000));
        assert_eq!(abr.at(), 1);
        let mut probes = Vec::new();
        let mut t = 0.25;
        // The top rendition is too much for this viewer: every probe fails a second later.
        while t < 200.0 {
            let now = t0 + Duration::from_secs_f64(t);
            let s = if abr.at() == 0 {
                behind(2000)
            } else {
                behind(0)
            };
            if let Decision::MoveTo(0, Why::Probe) = abr.on_sample(now, &s) {
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
        assert!(probes.len() <= 5, "no flapping: {probes:?}");
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
        assert_eq!(abr.on_sample(t0, &report(0, 100, 0)), Decision::Stay);
        let t = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            abr.on_sample(t(1), &report(1, 130, 0)),
            Decision::MoveTo(1, Why::Stalled)
        );
        assert_eq!(
            abr.on_sample(t(2), &report(1, 160, 10)),
            Decision::MoveTo(2, Why::DroppedFrames)
        );
        let skipped = Sample {
            skipped: true,
            ..Default::default()
        };
        assert_eq!(
            abr.on_sample(t(3), &skipped),
            Decision::Stay,
            "nothing lower"
        );
    }
}
