//! Raw H.264 ingest: an Annex B bytestream (a camera's, `ffmpeg -f h264`'s) into the hub, the
//! same as RTMP's frames. Access units come from `onair_protocol::codec::annexb`; the avcC
//! from the stream's own SPS/PPS (a change of either is a new init); frames go in as AVCC,
//! converted once, here.
//!
//! Raw H.264 has no timestamps, so they are made, in this order of preference:
//! 1. a frame rate given by the source's configuration or `?fps=`;
//! 2. the SPS VUI timing;
//! 3. the arrival time of each frame.
//!
//! They only ever go forward, and the stream's stats say which clock is in use.

use std::time::{Duration, Instant};

use bytes::Bytes;
use onair_protocol::codec::VideoCodec;
use onair_protocol::codec::annexb::{AccessUnit, AccessUnits, AnnexBError};
use onair_protocol::codec::avc::{AvcError, AvcInfo, avcc_from_parameter_sets};

use super::{IngestError, MediaIngest};

/// Largest NAL unit accepted: a 4K IDR at a high bitrate fits.
pub const MAX_NAL: usize = 8 << 20;
/// Largest access unit (one frame, all its NAL units): a 4K IDR in several slices fits.
pub const MAX_ACCESS_UNIT: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("{0}")]
    AnnexB(#[from] AnnexBError),
    #[error("parameter sets: {0}")]
    Avc(#[from] AvcError),
    #[error("{0}")]
    Ingest(#[from] IngestError),
    #[error("no IDR frame within {} s: a viewer could never start", .0.as_secs())]
    NoIdr(Duration),
    #[error("text messages are not H.264: send the Annex B bytes as binary messages")]
    Text,
}

impl RawError {
    /// The `kind` label of `onair_ingest_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            RawError::AnnexB(AnnexBError::NalTooLarge { .. })
            | RawError::AnnexB(AnnexBError::AccessUnitTooLarge { .. }) => "oversize",
            RawError::AnnexB(_) | RawError::Text => "not_h264",
            RawError::Avc(_) => "bad_parameter_sets",
            RawError::Ingest(_) => "media",
            RawError::NoIdr(_) => "no_idr",
        }
    }
}

/// Where a raw stream's timestamps come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClockSource {
    Configured(f64),
    Vui(f64),
    Arrival,
}

impl ClockSource {
    pub fn name(self) -> &'static str {
        match self {
            ClockSource::Configured(_) => "configured fps",
            ClockSource::Vui(_) => "SPS VUI timing",
            ClockSource::Arrival => "arrival time",
        }
    }
}

pub struct RawH264 {
    ingest: MediaIngest,
    units: AccessUnits,
    configured_fps: Option<f64>,
    clock: Option<ClockSource>,
    frames: u64,
    started: Instant,
    last_ms: Option<u64>,
    got_idr: bool,
    idr_timeout: Duration,
    scratch: Vec<AccessUnit>,
}

impl RawH264 {
    /// `fps`: the frame rate to stamp frames with, if the source's configuration gives one.
    pub fn new(ingest: MediaIngest, fps: Option<f64>, idr_timeout: Duration) -> Self {
        Self {
            ingest,
            units: AccessUnits::new(MAX_NAL, MAX_ACCESS_UNIT),
            configured_fps: fps.filter(|f| f.is_finite() && *f > 0.0 && *f <= 1000.0),
            clock: None,
            frames: 0,
            started: Instant::now(),
            last_ms: None,
            got_idr: false,
            idr_timeout,
            scratch: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        self.ingest.name()
    }

    /// Resolves when an operator removed the publisher.
    pub async fn removed(&self) {
        self.ingest.removed().await
    }

    /// Takes the next bytes of the stream, in any chunking.
    pub fn push(&mut self, data: &[u8]) -> Result<(), RawError> {
        let mut units = std::mem::take(&mut self.scratch);
        let pushed = self.units.push(data, &mut units);
        let result = pushed
            .map_err(RawError::from)
            .and_then(|()| self.frames_out(&mut units));
        units.clear();
        self.scratch = units;
        result?;
        self.check_idr_deadline()
    }

    /// The stream ended: its last frame is complete.
    pub fn finish(&mut self) -> Result<(), RawError> {
        let mut units = Vec::new();
        self.units.finish(&mut units)?;
        self.frames_out(&mut units)
    }

    /// An error if the stream has gone on for the timeout without an IDR.
    pub fn check_idr_deadline(&self) -> Result<(), RawError> {
        if !self.got_idr && self.started.elapsed() >= self.idr_timeout {
            return Err(RawError::NoIdr(self.idr_timeout));
        }
        Ok(())
    }

    /// When [`RawH264::check_idr_deadline`] fails if no IDR comes first; None once one came.
    /// The connection loops wait for it, so the rule holds even for a source that sends
    /// nothing at all.
    pub fn idr_deadline(&self) -> Option<tokio::time::Instant> {
        if self.got_idr {
            return None;
        }
        // A timeout too long to add to a clock is none at all.
        self.started
            .checked_add(self.idr_timeout)
            .map(tokio::time::Instant::from_std)
    }

    /// The error for a source whose [`RawH264::idr_deadline`] passed.
    pub fn no_idr(&self) -> RawError {
        RawError::NoIdr(self.idr_timeout)
    }

    fn frames_out(&mut self, units: &mut Vec<AccessUnit>) -> Result<(), RawError> {
        if let Some((sps, pps)) = self.units.take_parameter_sets() {
            let avcc = avcc_from_parameter_sets(&sps, &pps)?;
            if self.clock.is_none() {
                let vui = AvcInfo::parse(&avcc)?.fps;
                let clock = match (self.configured_fps, vui) {
                    (Some(f), _) => ClockSource::Configured(f),
                    (None, Some(f)) => ClockSource::Vui(f),
                    (None, None) => ClockSource::Arrival,
                };
                tracing::info!(
                    stream = self.name(),
                    clock = clock.name(),
                    "raw H.264 clock"
                );
                if let ClockSource::Configured(f) = clock {
                    self.ingest.set_video_fps(f);
                }
                self.ingest.set_clock_source(clock.name());
                self.clock = Some(clock);
            }
            self.ingest
                .video_config(VideoCodec::Avc, Bytes::from(avcc))?;
        }
        for au in units.drain(..) {
            // Until the first IDR nothing can be decoded, and no viewer could start.
            if !self.got_idr && !au.idr {
                continue;
            }
            self.got_idr = true;
            let dts = self.next_dts();
            self.ingest.video_frame(dts, 0, au.idr, &au.to_avcc())?;
        }
        Ok(())
    }

    /// The next frame's timestamp, ms: from the frame rate, or the arrival time; never back.
    fn next_dts(&mut self) -> u32 {
        let ms = match self.clock {
            Some(ClockSource::Configured(fps) | ClockSource::Vui(fps)) => {
                (self.frames as f64 * 1000.0 / fps).round() as u64
            }
            _ => self.started.elapsed().as_millis() as u64,
        };
        let ms = match self.last_ms {
            Some(last) if ms <= last => last + 1,
            _ => ms,
        };
        self.frames += 1;
        self.last_ms = Some(ms);
        // MediaIngest takes RTMP's 32-bit milliseconds and unwraps them.
        ms as u32
    }
}
