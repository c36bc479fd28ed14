//! The control plane's view: once a second, one snapshot of every stream and viewer, with rates
//! and latency aggregates, shared by the dashboard feed (`/api/events`), the API and `/metrics`.
//!
//! Computing it once per second for everyone keeps the cost independent of how many dashboards
//! watch: each feed client only picks its page of viewer rows from the shared snapshot.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use onair_protocol::wire::{self, ViewerStats};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::hub::{
    AudioInfo, Hub, PublisherInfo, Stream, StreamSummary, SwitchReason, VideoInfo, ViewerState,
    now_us, playing_latency,
};

/// Snapshot period.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Seconds of history the charts start with.
const HISTORY: usize = 300;
/// A report older than this no longer counts towards latency aggregates (the viewer went quiet).
const REPORT_FRESH: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencyAgg {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
    pub p95: f64,
    /// Viewers whose fresh reports went into it.
    pub reporting: usize,
}

impl LatencyAgg {
    fn of(mut ms: Vec<f64>) -> Option<Self> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        // Nearest rank.
        let p95 = ms[((n as f64 * 0.95).ceil() as usize).clamp(1, n) - 1];
        Some(Self {
            min: ms[0],
            avg: round1(ms.iter().sum::<f64>() / n as f64),
            max: ms[n - 1],
            p95,
            reporting: n,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub streams: usize,
    pub live: usize,
    pub viewers: usize,
    pub bitrate_in_kbps: f64,
    pub bitrate_out_kbps: f64,
    pub latency_ms: Option<LatencyAgg>,
    /// Viewers moved to a lower / higher rendition, per second over the last period.
    pub switches_down_per_s: f64,
    pub switches_up_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamStats {
    pub name: String,
    pub live: bool,
    /// Synchronized playback is on for this stream.
    pub sync: bool,
    /// The latency its viewers hold in sync.
    pub sync_latency_ms: Option<u32>,
    pub publisher: Option<PublisherInfo>,
    pub uptime_s: Option<f64>,
    pub video: Option<VideoInfo>,
    pub audio: Option<AudioInfo>,
    pub bitrate_in_kbps: f64,
    pub fps_in: f64,
    pub viewers: usize,
    pub bitrate_out_kbps: f64,
    /// Keyframe skips of its current viewers.
    pub keyframe_skips: u64,
    pub latency_ms: Option<LatencyAgg>,
    /// Every rendition, the source first.
    pub renditions: Vec<RenditionStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RenditionStats {
    pub id: u8,
    pub name: String,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub fps: Option<f64>,
    /// Measured over the last period: what the rendition's log took in, framing included.
    pub bitrate_kbps: f64,
    /// What it was configured for (a ladder rung); 0 for the source.
    pub nominal_kbps: u32,
    pub viewers: usize,
}

impl RenditionStats {
    fn of(id: u8, info: crate::hub::RenditionInfo, bitrate_kbps: f64, viewers: usize) -> Self {
        Self {
            id,
            bitrate_kbps,
            viewers,
            name: info.name,
            codec: info.codec,
            width: info.width,
            height: info.height,
            fps: info.fps,
            nominal_kbps: info.nominal_kbps,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportRow {
    /// Null while the player does not know it yet.
    pub latency_ms: Option<u32>,
    pub buffer_ms: u32,
    pub decoded_frames: u32,
    pub dropped_frames: u32,
    pub stalls: u32,
    pub bandwidth_kbps: u32,
    pub state: &'static str,
    /// How old the report is.
    pub age_ms: u64,
}

impl ReportRow {
    fn of(s: &ViewerStats, at: Instant) -> Self {
        Self {
            latency_ms: (s.latency_ms > 0).then_some(s.latency_ms),
            buffer_ms: s.buffer_ms,
            decoded_frames: s.decoded_frames,
            dropped_frames: s.dropped_frames,
            stalls: s.stalls,
            bandwidth_kbps: s.bandwidth_kbps,
            state: state_name(s.state),
            age_ms: at.elapsed().as_millis() as u64,
        }
    }
}

pub fn state_name(state: u8) -> &'static str {
    match state {
        wire::PLAYER_IDLE => "idle",
        wire::PLAYER_PLAYING => "playing",
        wire::PLAYER_BUFFERING => "buffering",
        wire::PLAYER_PAUSED => "paused",
        _ => "error",
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ViewerRow {
    pub id: u64,
    pub stream: String,
    pub peer: String,
    pub user_agent: String,
    pub since_ms: u64,
    pub rendition: u8,
    pub send_kbps: f64,
    pub bytes_sent: u64,
    pub backlog_bytes: u64,
    pub keyframe_skips: u64,
    /// What the kernel and the network held for it at its last receipt (bytes sent less bytes
    /// received); None when it sent none in the last [`REPORT_FRESH`] (it sends them only while
    /// the server asks: on automatic, with renditions to choose from).
    pub in_flight_bytes: Option<u64>,
    /// Times it was moved between renditions, and why the last time.
    pub switches: u64,
    pub last_switch: Option<SwitchReason>,
    pub report: Option<ReportRow>,
}

/// One second's view of the hub.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Unix ms.
    pub t: u64,
    pub totals: Totals,
    pub streams: Vec<StreamStats>,
    /// Every viewer, in id order.
    #[serde(skip)]
    pub viewers: Vec<ViewerRow>,
    /// Indices into `viewers`, worst latency first and fastest first: sorted once here rather
    /// than for every dashboard.
    #[serde(skip)]
    by_latency: Vec<u32>,
    #[serde(skip)]
    by_throughput: Vec<u32>,
    /// `"totals":…,"streams":…` serialized once for every feed client.
    #[serde(skip)]
    pub common_json: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct HistoryPoint {
    pub t: u64,
    pub viewers: usize,
    pub bitrate_in_kbps: f64,
    pub bitrate_out_kbps: f64,
    pub latency: Option<LatencyAgg>,
    pub switches_down_per_s: f64,
    pub switches_up_per_s: f64,
}

/// The charts' starting data, column-wise as uPlot takes it.
#[derive(Debug, Default, Serialize)]
pub struct History {
    pub t: Vec<u64>,
    pub viewers: Vec<usize>,
    pub bitrate_in_kbps: Vec<f64>,
    pub bitrate_out_kbps: Vec<f64>,
    pub latency_min_ms: Vec<Option<f64>>,
    pub latency_avg_ms: Vec<Option<f64>>,
    pub latency_max_ms: Vec<Option<f64>>,
    pub switches_down_per_s: Vec<f64>,
    pub switches_up_per_s: Vec<f64>,
}

pub struct Stats {
    hub: Arc<Hub>,
    cfg: Arc<Config>,
    latest: watch::Sender<Arc<Snapshot>>,
    history: Mutex<VecDeque<HistoryPoint>>,
}

/// What the previous tick saw, for rates.
#[derive(Default)]
struct Previous {
    at: Option<Instant>,
    /// Stream name → (bytes in, video frames in).
    streams: HashMap<String, (u64, u64)>,
    /// Viewer id → bytes sent.
    viewers: HashMap<u64, u64>,
    /// (stream, rendition id) → bytes its log took in.
    renditions: HashMap<(String, u8), u64>,
    /// Rendition switches so far: (down, up).
    switches: (u64, u64),
}

impl Stats {
    pub fn new(hub: Arc<Hub>, cfg: Arc<Config>) -> Arc<Self> {
        let stats = Arc::new(Self {
            hub,
            cfg,
            latest: watch::channel(Arc::new(Snapshot::empty())).0,
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
        });
        // Something true from the start: the hub as it is, with rates of zero.
        let first = stats.take(&mut Previous::default());
        stats.latest.send_replace(Arc::new(first));
        stats
    }

    pub fn latest(&self) -> Arc<Snapshot> {
        self.latest.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.latest.subscribe()
    }

    pub fn history(&self) -> History {
        let mut h = History::default();
        for p in self.history.lock().iter() {
            h.t.push(p.t);
            h.viewers.push(p.viewers);
            h.bitrate_in_kbps.push(p.bitrate_in_kbps);
            h.bitrate_out_kbps.push(p.bitrate_out_kbps);
            h.latency_min_ms.push(p.latency.map(|l| l.min));
            h.latency_avg_ms.push(p.latency.map(|l| l.avg));
            h.latency_max_ms.push(p.latency.map(|l| l.max));
            h.switches_down_per_s.push(p.switches_down_per_s);
            h.switches_up_per_s.push(p.switches_up_per_s);
        }
        h
    }

    /// Takes a snapshot every [`PERIOD`] until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut prev = Previous::default();
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            // O(viewers) work: off the runtime's worker threads, so that joins and the fan-out
            // never wait behind it (with thousands of viewers it takes milliseconds).
            let me = self.clone();
            let started = Instant::now();
            let Ok((snap, back)) = tokio::task::spawn_blocking(move || {
                let snap = me.take(&mut prev);
                (snap, prev)
            })
            .await
            else {
                return;
            };
            prev = back;
            tracing::trace!(
                elapsed_us = started.elapsed().as_micros() as u64,
                viewers = snap.viewers.len(),
                "stats snapshot"
            );
            let mut history = self.history.lock();
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(HistoryPoint {
                t: snap.t / 1000,
                viewers: snap.totals.viewers,
                bitrate_in_kbps: snap.totals.bitrate_in_kbps,
                bitrate_out_kbps: snap.totals.bitrate_out_kbps,
                latency: snap.totals.latency_ms,
                switches_down_per_s: snap.totals.switches_down_per_s,
                switches_up_per_s: snap.totals.switches_up_per_s,
            });
            drop(history);
            self.latest.send_replace(Arc::new(snap));
        }
    }

    fn take(&self, prev: &mut Previous) -> Snapshot {
        let now = Instant::now();
        let secs = prev
            .at
            .map_or(PERIOD.as_secs_f64(), |at| (now - at).as_secs_f64())
            .max(1e-3);
        let kbps = |bytes: u64| round1(bytes as f64 * 8.0 / 1000.0 / secs);

        let switches = crate::metrics::switch_totals();
        // Each stream looked up once: viewers' backlogs read its rendition, and its row follows.
        let all_streams = self.hub.streams();
        let by_name: HashMap<&str, &Arc<Stream>> =
            all_streams.iter().map(|s| (s.name.as_str(), s)).collect();

        // Viewers first: streams aggregate over them.
        let mut viewers = Vec::new();
        let mut seen = HashMap::with_capacity(prev.viewers.len());
        let mut per_stream: HashMap<&str, (f64, u64, Vec<f64>)> = HashMap::new();
        let mut per_rendition: HashMap<(&str, u8), usize> = HashMap::new();
        let states = self.hub.viewers();
        for v in &states {
            v.account_bytes();
            let sent = v.bytes_sent();
            let before = prev.viewers.get(&v.id).copied().unwrap_or(0);
            seen.insert(v.id, sent);
            let send_kbps = kbps(sent.saturating_sub(before));
            v.send_kbps
                .store(send_kbps as u32, std::sync::atomic::Ordering::Relaxed);
            let report = v.report();
            let skips = v.skips.load(std::sync::atomic::Ordering::Relaxed);
            let agg = per_stream.entry(&v.stream).or_default();
            agg.0 += send_kbps;
            agg.1 += skips;
            if let Some((r, at)) = &report
                && at.elapsed() < REPORT_FRESH
                && let Some(ms) = playing_latency(r)
            {
                agg.2.push(f64::from(ms));
            }
            let rendition = v.rendition.load(std::sync::atomic::Ordering::Relaxed);
            *per_rendition.entry((&v.stream, rendition)).or_default() += 1;
            viewers.push(ViewerRow {
                id: v.id,
                stream: v.stream.clone(),
                peer: v.peer.to_string(),
                user_agent: v.user_agent.clone(),
                since_ms: v.since_ms,
                rendition,
                switches: v.switches.load(std::sync::atomic::Ordering::Relaxed),
                last_switch: v.last_switch(),
                send_kbps,
                bytes_sent: sent,
                backlog_bytes: by_name.get(v.stream.as_str()).map_or(0, |s| backlog(s, v)),
                keyframe_skips: skips,
                in_flight_bytes: v
                    .receipt()
                    .filter(|r| r.at.elapsed() < REPORT_FRESH)
                    .map(|r| r.sent.saturating_sub(r.received)),
                report: report.map(|(r, at)| ReportRow::of(&r, at)),
            });
        }
        prev.viewers = seen;

        let mut streams = Vec::new();
        let mut seen = HashMap::new();
        let mut seen_renditions = HashMap::new();
        let now_ms = now_us() / 1000;
        let mut all_latencies = Vec::new();
        for stream in &all_streams {
            let summary = StreamSummary::of(stream);
            let (bytes, frames) = stream.ingested();
            let (b0, f0) = prev
                .streams
                .get(&summary.name)
                .copied()
                .unwrap_or((bytes, frames));
            seen.insert(summary.name.clone(), (bytes, frames));
            let (out_kbps, skips, latencies) =
                per_stream.remove(summary.name.as_str()).unwrap_or_default();
            all_latencies.extend_from_slice(&latencies);
            let policy = self.cfg.stream_settings(&summary.name);
            let renditions = stream
                .renditions()
                .iter()
                .map(|r| {
                    let info = r.info();
                    let pushed = r.pushed_bytes();
                    let key = (summary.name.clone(), r.id);
                    let before = prev.renditions.get(&key).copied().unwrap_or(pushed);
                    seen_renditions.insert(key, pushed);
                    let viewers = per_rendition
                        .get(&(summary.name.as_str(), r.id))
                        .copied()
                        .unwrap_or(0);
                    RenditionStats::of(r.id, info, kbps(pushed.saturating_sub(before)), viewers)
                })
                .collect();
            streams.push(StreamStats {
                renditions,
                sync: policy.sync,
                sync_latency_ms: policy.sync.then_some(policy.latency_ms),
                uptime_s: summary
                    .publisher
                    .as_ref()
                    .map(|p| now_ms.saturating_sub(p.since_ms) as f64 / 1000.0),
                live: summary.live,
                publisher: summary.publisher,
                video: summary.video,
                audio: summary.audio,
                bitrate_in_kbps: kbps(bytes.saturating_sub(b0)),
                fps_in: round1(frames.saturating_sub(f0) as f64 / secs),
                viewers: summary.viewers as usize,
                bitrate_out_kbps: round1(out_kbps),
                keyframe_skips: skips,
                latency_ms: LatencyAgg::of(latencies),
                name: summary.name,
            });
        }
        prev.streams = seen;
        prev.renditions = seen_renditions;
        prev.at = Some(now);

        let totals = Totals {
            streams: streams.len(),
            live: streams.iter().filter(|s| s.live).count(),
            viewers: viewers.len(),
            bitrate_in_kbps: round1(streams.iter().map(|s| s.bitrate_in_kbps).sum()),
            bitrate_out_kbps: round1(viewers.iter().map(|v| v.send_kbps).sum()),
            latency_ms: LatencyAgg::of(all_latencies),
            switches_down_per_s: round1((switches.0.saturating_sub(prev.switches.0)) as f64 / secs),
            switches_up_per_s: round1((switches.1.saturating_sub(prev.switches.1)) as f64 / secs),
        };
        prev.switches = switches;
        let common_json = format!(
            "\"totals\":{},\"streams\":{}",
            serde_json::to_string(&totals).unwrap_or_else(|_| "null".into()),
            serde_json::to_string(&streams).unwrap_or_else(|_| "[]".into()),
        );
        let order = |key: &dyn Fn(&ViewerRow) -> f64| {
            let mut idx: Vec<u32> = (0..viewers.len() as u32).collect();
            idx.sort_by(|&a, &b| key(&viewers[b as usize]).total_cmp(&key(&viewers[a as usize])));
            idx
        };
        let by_latency = order(&|v| {
            v.report
                .as_ref()
                .and_then(|r| r.latency_ms)
                .map_or(-1.0, f64::from)
        });
        let by_throughput = order(&|v| v.send_kbps);
        Snapshot {
            t: now_ms,
            totals,
            streams,
            viewers,
            by_latency,
            by_throughput,
            common_json,
        }
    }
}

/// One decimal is all a rate shows; `+ 0.0` turns an empty sum's -0.0 into 0.
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0 + 0.0
}

/// A stream's renditions as they are now (a rung may have come or gone since the last
/// snapshot), with the last snapshot's measured bitrate and viewers where it had them.
pub fn renditions_now(stream: &Stream, measured: Option<&StreamStats>) -> Vec<RenditionStats> {
    stream
        .renditions()
        .iter()
        .map(|r| {
            let info = r.info();
            let m = measured.and_then(|m| {
                m.renditions
                    .iter()
                    .find(|x| x.id == r.id && x.name == info.name)
            });
            let (kbps, viewers) = m.map_or((0.0, 0), |m| (m.bitrate_kbps, m.viewers));
            RenditionStats::of(r.id, info, kbps, viewers)
        })
        .collect()
}

/// Bytes of its rendition's log the viewer has yet to receive.
pub fn backlog(stream: &Stream, v: &ViewerState) -> u64 {
    let rendition = v.rendition.load(std::sync::atomic::Ordering::Relaxed);
    match (stream.rendition(rendition), v.sink()) {
        (Some(r), Some(sink)) => r.backlog(sink.position()).bytes,
        _ => 0,
    }
}

/// How a feed client wants its viewer table.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    /// Worst latency first: who needs attention.
    #[default]
    Latency,
    Id,
    Throughput,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Page {
    pub stream: Option<String>,
    #[serde(default)]
    pub offset: usize,
    pub limit: Option<usize>,
    #[serde(default)]
    pub sort: Sort,
}

/// Most rows one page may hold.
pub const MAX_PAGE: usize = 200;
const DEFAULT_PAGE: usize = 50;

/// One page of the viewer table.
#[derive(Serialize)]
pub struct ViewerPage<'a> {
    /// Viewers matching the filter.
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub stream: Option<String>,
    pub sort: Sort,
    pub rows: Vec<&'a ViewerRow>,
}

impl Snapshot {
    fn empty() -> Self {
        Snapshot {
            t: 0,
            totals: Totals {
                streams: 0,
                live: 0,
                viewers: 0,
                bitrate_in_kbps: 0.0,
                bitrate_out_kbps: 0.0,
                latency_ms: None,
                switches_down_per_s: 0.0,
                switches_up_per_s: 0.0,
            },
            streams: Vec::new(),
            viewers: Vec::new(),
            by_latency: Vec::new(),
            by_throughput: Vec::new(),
            common_json: "\"totals\":null,\"streams\":[]".into(),
        }
    }

    /// One page of the viewer table, filtered by stream and sorted as asked.
    pub fn page(&self, page: &Page) -> ViewerPage<'_> {
        let stream = page.stream.as_deref().filter(|s| !s.is_empty());
        let matching = |v: &&ViewerRow| stream.is_none_or(|s| v.stream == s);
        let ordered: Box<dyn Iterator<Item = &ViewerRow>> = match page.sort {
            Sort::Id => Box::new(self.viewers.iter()),
            Sort::Latency => Box::new(self.by_latency.iter().map(|&i| &self.viewers[i as usize])),
            Sort::Throughput => Box::new(
                self.by_throughput
                    .iter()
                    .map(|&i| &self.viewers[i as usize]),
            ),
        };
        let limit = page.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        let mut total = 0;
        let mut rows = Vec::with_capacity(limit);
        for v in ordered.filter(matching) {
            if total >= page.offset && rows.len() < limit {
                rows.push(v);
            }
            total += 1;
        }
        ViewerPage {
            total,
            offset: page.offset.min(total),
            limit,
            stream: stream.map(str::to_owned),
            sort: page.sort,
            rows,
        }
    }

    /// The feed message for one client: the shared part plus its page of viewers.
    pub fn feed_json(&self, page: &Page) -> String {
        let viewers = self.page(page);
        format!(
            "{{\"t\":{},{},\"viewers\":{}}}",
            self.t,
            self.common_json,
            serde_json::to_string(&viewers).unwrap_or_else(|_| "null".into())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_aggregate() {
        assert_eq!(LatencyAgg::of(vec![]), None);
        let a = LatencyAgg::of((1..=100).rev().map(f64::from).collect()).unwrap();
        assert_eq!((a.min, a.max, a.p95, a.reporting), (1.0, 100.0, 95.0, 100));
        assert!((a.avg - 50.5).abs() < 1e-9);
        let one = LatencyAgg::of(vec![7.0]).unwrap();
        assert_eq!((one.min, one.p95, one.max), (7.0, 7.0, 7.0));
    }
}
