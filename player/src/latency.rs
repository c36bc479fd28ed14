//! Holding the live latency at its target: the part of the player that is the point of onair.
//!
//! flv.js and mpegts.js let latency creep: every stall leaves the playhead further behind, and
//! nothing brings it back until a seek. Here a controller runs a few times a second on the
//! *measured* latency (server ingest time of the frame on screen versus the server's clock now)
//! and nudges `playbackRate` by a few percent, which nobody hears or sees, instead of seeking.
//! It seeks only when far behind (after a long stall, or a reconnect), plays faster for a few
//! seconds when a backlog arrived all at once (see [`CATCHUP_BEYOND_MS`]), and it slows down a
//! little when the buffer runs low, which turns a would-be stall into an imperceptible slowdown.

/// Differences smaller than this are noise: the on-screen frame changes every frame time, so the
/// measured latency is a sawtooth of that height.
const DEADBAND_MS: f64 = 15.0;
/// In synchronized playback every viewer must hold the very same latency: a narrower band,
/// since the smoothed latency averages the sawtooth out.
const SYNC_DEADBAND_MS: f64 = 4.0;
/// In sync, being off is worse than a brief, pitch-preserved change of pace: twice as steep,
/// up to 8 % either way, so a 100 ms hiccup (a stall) is made good in about a second.
const SYNC_MS_PER_PERCENT: f64 = 10.0;
const SYNC_MAX_NUDGE: f64 = 0.08;
/// The largest nudge, either way. 5 % is below what listeners notice with pitch preserved.
const MAX_SPEEDUP: f64 = 0.05;
const MAX_SLOWDOWN: f64 = 0.03;
/// Milliseconds of error per 1 % of rate: 100 ms behind plays 5 % fast, caught up in ~2 s.
const MS_PER_PERCENT: f64 = 20.0;
/// Further behind than this with the excess in the buffer (congestion that has cleared: the
/// backlog arrived all at once), 5 % would take many seconds: up to [`MAX_CATCHUP`] faster,
/// which is noticeable (dash.js and hls.js catch up as fast or faster) but over in a few
/// seconds, and smoother than a seek.
const CATCHUP_BEYOND_MS: f64 = 300.0;
const MAX_CATCHUP: f64 = 0.20;
/// Further behind than this, catching up by rate would take too long: seek.
const SEEK_BEYOND_MS: f64 = 1500.0;
/// Below this much buffer the decoder is about to starve: slow down whatever the latency says.
const LOW_BUFFER_MS: f64 = 40.0;
/// Rates are quantised so the element is not touched on every tick.
const RATE_STEP: f64 = 0.005;
/// Weight of a new latency sample.
const SMOOTHING: f64 = 0.2;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Leave the playback rate as it is.
    Keep,
    /// Set `playbackRate`.
    Rate(f64),
    /// Seek to this many seconds before the buffered end.
    Seek { behind_end_s: f64 },
}

#[derive(Debug, Clone)]
pub struct Controller {
    target_ms: f64,
    smoothed_ms: Option<f64>,
    rate: f64,
    /// The server set the target for synchronized playback: the page may not change it.
    synced: bool,
}

impl Controller {
    pub fn new(target_ms: f64) -> Self {
        Self {
            target_ms,
            smoothed_ms: None,
            rate: 1.0,
            synced: false,
        }
    }

    /// Synchronized playback: hold exactly `ms`, as every other viewer of the stream does.
    pub fn sync_to(&mut self, ms: f64) {
        self.target_ms = ms;
        self.synced = true;
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn target_ms(&self) -> f64 {
        self.target_ms
    }

    /// The page's target; ignored while the server holds the stream in sync.
    pub fn set_target_ms(&mut self, ms: f64) {
        if !self.synced {
            self.target_ms = ms;
        }
    }

    /// Smoothed live latency, if any sample arrived since the last reset.
    pub fn latency_ms(&self) -> Option<f64> {
        self.smoothed_ms
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// How far behind the buffered end to place the playhead when starting or seeking: the
    /// target minus what delivery already costs, and never less than two frames' worth.
    pub fn start_behind_end_s(&self, delivery_ms: f64) -> f64 {
        ((self.target_ms - delivery_ms.max(0.0)) / 1000.0).max(0.066)
    }

    /// The element's actual rate: something else (a new MediaSource, the page) may set it.
    pub fn observe_rate(&mut self, rate: f64) {
        self.rate = rate;
    }

    /// Forget the latency history: after a seek or a new stream the old samples mean nothing.
    pub fn reset(&mut self) {
        self.smoothed_ms = None;
    }

    /// One control step. `latency_ms`: the measured live latency, if the clock is known;
    /// `buffer_ms`: media buffered ahead of the playhead.
    pub fn update(
        &mut self,
        latency_ms: Option<f64>,
        buffer_ms: f64,
        delivery_ms: f64,
    ) -> Decision {
        // Without a clock, the buffer stands in for the latency: it is the part we control.
        let sample = latency_ms.unwrap_or(buffer_ms + delivery_ms.max(0.0));
        let smoothed = match self.smoothed_ms {
            Some(s) => s + SMOOTHING * (sample - s),
            None => sample,
        };
        self.smoothed_ms = Some(smoothed);
        let err = smoothed - self.target_ms;
        if err > SEEK_BEYOND_MS && buffer_ms > err / 2.0 {
            self.smoothed_ms = None;
            return Decision::Seek {
                behind_end_s: self.start_behind_end_s(delivery_ms),
            };
        }
        let (deadband, per_percent, speedup, slowdown) = if self.synced {
            (
                SYNC_DEADBAND_MS,
                SYNC_MS_PER_PERCENT,
                SYNC_MAX_NUDGE,
                SYNC_MAX_NUDGE,
            )
        } else {
            (DEADBAND_MS, MS_PER_PERCENT, MAX_SPEEDUP, MAX_SLOWDOWN)
        };
        let wanted = if buffer_ms < LOW_BUFFER_MS {
            1.0 - MAX_SLOWDOWN
        } else if err > deadband {
            let cap = if !self.synced && err > CATCHUP_BEYOND_MS && buffer_ms > err / 2.0 {
                MAX_CATCHUP
            } else {
                speedup
            };
            1.0 + (err / per_percent / 100.0).min(cap)
        } else if err < -deadband {
            1.0 - (-err / per_percent / 100.0).min(slowdown)
        } else {
            1.0
        };
        let wanted = (wanted / RATE_STEP).round() * RATE_STEP;
        if (wanted - self.rate).abs() < RATE_STEP / 2.0 {
            return Decision::Keep;
        }
        self.rate = wanted;
        Decision::Rate(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays a simulated stream: frames arrive every `frame_ms` with network delay; the
    /// controller runs every `tick_ms`; returns the latency after `secs`.
    fn simulate(target: f64, start_latency: f64, secs: f64) -> (f64, Controller) {
        let mut c = Controller::new(target);
        let delivery = 5.0;
        // buffer = latency - delivery, in this idealised model.
        let mut latency = start_latency;
        let tick = 100.0;
        let mut t = 0.0;
        while t < secs * 1000.0 {
            match c.update(Some(latency), latency - delivery, delivery) {
                Decision::Seek { behind_end_s } => latency = behind_end_s * 1000.0 + delivery,
                Decision::Rate(_) | Decision::Keep => {}
            }
            // Playing at rate r for `tick` ms consumes r*tick of media while tick ms arrive.
            latency -= (c.rate() - 1.0) * tick;
            t += tick;
        }
        (latency, c)
    }

    #[test]
    fn synced_controller_holds_tighter_and_ignores_the_page() {
        let mut c = Controller::new(200.0);
        c.sync_to(500.0);
        c.set_target_ms(100.0);
        assert_eq!(c.target_ms(), 500.0, "the server's target stands");
        // 10 ms behind: inside the normal band, outside the sync band.
        assert!(matches!(c.update(Some(510.0), 480.0, 5.0), Decision::Rate(r) if r > 1.0));
        let mut free = Controller::new(500.0);
        assert_eq!(free.update(Some(510.0), 480.0, 5.0), Decision::Keep);
    }

    #[test]
    fn converges_from_behind_by_rate_not_seek() {
        let (latency, c) = simulate(200.0, 600.0, 20.0);
        assert!((latency - 200.0).abs() < 30.0, "{latency}");
        assert!(
            (c.rate() - 1.0).abs() < 0.011,
            "settles near 1.0, got {}",
            c.rate()
        );
    }

    #[test]
    fn builds_buffer_when_too_close() {
        let (latency, _) = simulate(300.0, 100.0, 20.0);
        assert!((latency - 300.0).abs() < 30.0, "{latency}");
    }

    #[test]
    fn seeks_when_far_behind() {
        let mut c = Controller::new(200.0);
        assert_eq!(
            c.update(Some(5000.0), 4990.0, 10.0),
            Decision::Seek { behind_end_s: 0.19 }
        );
        assert_eq!(c.latency_ms(), None, "history is dropped after a seek");
    }

    #[test]
    fn low_buffer_slows_down_even_when_late() {
        let mut c = Controller::new(100.0);
        assert_eq!(c.update(Some(300.0), 10.0, 5.0), Decision::Rate(0.97));
        assert_eq!(c.update(Some(300.0), 10.0, 5.0), Decision::Keep);
    }

    #[test]
    fn rates_stay_within_a_few_percent_unless_far_behind_with_the_excess_buffered() {
        let mut c = Controller::new(100.0);
        for lat in [100.0, 300.0, 0.0, 120.0, 80.0, 390.0] {
            if let Decision::Rate(r) = c.update(Some(lat), 1000.0, 5.0) {
                assert!((0.97..=1.05).contains(&r), "{r}");
            }
        }
        // 700 ms behind with a second buffered (congestion cleared): catches up faster.
        let mut c = Controller::new(200.0);
        assert_eq!(c.update(Some(900.0), 1000.0, 5.0), Decision::Rate(1.2));
        // The same lag with little buffered is in the network: playing faster would only
        // empty the buffer.
        let mut c = Controller::new(200.0);
        assert_eq!(c.update(Some(900.0), 200.0, 5.0), Decision::Rate(1.05));
    }

    #[test]
    fn a_lag_after_congestion_is_made_good_in_a_few_seconds() {
        let (latency, _) = simulate(200.0, 1000.0, 4.0);
        assert!(latency < 450.0, "{latency}");
    }

    #[test]
    fn start_position_leaves_room_for_delivery() {
        let c = Controller::new(200.0);
        assert!((c.start_behind_end_s(50.0) - 0.15).abs() < 1e-9);
        assert!((c.start_behind_end_s(500.0) - 0.066).abs() < 1e-9);
    }
}
