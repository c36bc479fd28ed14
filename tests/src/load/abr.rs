//! The ABR scenario of `make bench`: real headless Chromium in its own network namespace,
//! behind a veth whose server-side end is shaped with `tc … tbf`, plays `/watch/abr` of a
//! 720p30 publish (x264, 2500 kbit/s, 1 s GOP) with a 480p and a 240p rung, while the link's
//! rate follows a step profile. From the page's own trace (every 100 ms: state, height,
//! latency) it reports per step: how long until the first move, the rendition it ended on,
//! the time spent on each, the stall time and the latency. It also reports the ladder's CPU
//! (the server's ffmpeg child) over the run.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::browser::Browser;
use crate::netns::Netns;
use crate::{BoxError, Profile, Publisher, Server};

const STREAM: &str = "abr";

/// (link rate kbit/s, seconds).
pub const PROFILE: &[(u32, u64)] = &[(8000, 20), (1500, 25), (600, 25), (8000, 30)];

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub kbit: u32,
    pub secs: u64,
    /// Seconds from the step until the picture height first changed, if it did.
    pub first_move_s: Option<f64>,
    pub height_at_end: u64,
    /// Share of the step's time at each height, highest first: (height, %).
    pub time_on: Vec<(u64, f64)>,
    pub stalled_ms: f64,
    /// Median measured latency over the step's last 5 s.
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AbrReport {
    pub steps: Vec<Step>,
    /// The ladder's ffmpeg (two rungs), % of one core over the run.
    pub ladder_cpu_pct: Option<f64>,
    /// Moves the server made for the page, from its API row.
    pub switches: u64,
    /// The server's log lines of the moves it decided (with their reason, backlog and rate).
    pub decisions: Vec<String>,
}

/// Starts the page's trace: every 100 ms, [page ms, state, height, latency ms] of the
/// player's stats, in `window.__trace`. Returns the page's clock.
pub const TRACE: &str = "window.__trace = [];
  setInterval(() => {
    if (!window.onairPlayer) return;
    const s = window.onairPlayer.stats();
    window.__trace.push([performance.now(), s.state, s.height, s.latencyMs]);
  }, 100);
  return performance.now();";

/// One entry of the page's trace.
#[derive(Debug, Clone)]
pub struct Point {
    /// The page's clock, ms.
    pub t: f64,
    pub state: String,
    pub height: u64,
    pub latency_ms: Option<f64>,
}

/// The page's trace so far.
pub async fn trace(b: &Browser) -> Result<Vec<Point>, BoxError> {
    let v = b.eval("return window.__trace;").await?;
    Ok(v.as_array()
        .ok_or("no trace")?
        .iter()
        .map(|p| Point {
            t: p[0].as_f64().unwrap_or(0.0),
            state: p[1].as_str().unwrap_or_default().to_string(),
            height: p[2].as_u64().unwrap_or(0),
            latency_ms: p[3].as_f64(),
        })
        .collect())
}

/// The page's clock, ms.
pub async fn page_now(b: &Browser) -> Result<f64, BoxError> {
    let v: Value = b.eval("return performance.now();").await?;
    v.as_f64().ok_or_else(|| "no page clock".into())
}

/// Milliseconds the page spent buffering (stalled) between `from` and `to` (page ms).
pub fn stalled_ms(tr: &[Point], from: f64, to: f64) -> f64 {
    tr.windows(2)
        .filter(|w| w[0].t >= from && w[1].t <= to && w[0].state == "buffering")
        .map(|w| w[1].t - w[0].t)
        .sum()
}

/// Polls the API until `stream` has renditions of these heights (highest first), each with
/// an init: the ladder comes a moment after the source, and nothing outside the server can
/// be told when.
pub async fn wait_for_heights(
    server: &Server,
    stream: &str,
    heights: &[u64],
) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // 404 until the publisher is in.
        let (status, body) =
            crate::http_get(&server.http, &format!("/api/streams/{stream}")).await?;
        let mut got: Vec<u64> = Vec::new();
        if status == 200 {
            got = super::renditions_of(&serde_json::from_str(&body)?)
                .into_iter()
                .filter(|r| !r.codec.is_empty())
                .map(|r| r.height)
                .collect();
            got.sort_unstable_by(|a, b| b.cmp(a));
            if got == heights {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(
                format!("the ladder never came up: {got:?}, wanted {heights:?}: {body}").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The ladder's ffmpeg: the server's child processes (Linux lists each thread's children
/// under that thread, and any of the server's threads may have spawned it).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

pub async fn run(onair_bin: &Path, work: &Path) -> Result<AbrReport, BoxError> {
    let ns = Netns::create()?;
    ns.shape(PROFILE[0].0)?;
    std::fs::create_dir_all(work)?;
    let config = work.join("abr.toml");
    std::fs::write(&config, crate::LADDER_480_240)?;
    let http = format!("{}:0", ns.outer_addr());
    let server = Server::start_bin(
        onair_bin,
        &["--http", &http, "--config", &config.to_string_lossy()],
        &[("ONAIR_LOG", "info,onair_server::delivery::abr=debug")],
    )
    .await;
    let _publisher = Publisher::start(&server.rtmp_url(STREAM), Profile::hd_ladder_source());
    wait_for_heights(&server, STREAM, &[720, 480, 240]).await?;
    let b = Browser::start_in_netns(&ns).await?;
    b.goto(&format!("http://{}/watch/{STREAM}", server.http))
        .await?;
    b.eval(TRACE).await?;
    b.wait_for(
        "(() => { const s = window.onairPlayer && window.onairPlayer.stats(); \
         if (s && s.state === 'playing' && s.decodedFrames > 60) return s; \
         throw new Error(JSON.stringify(s)); })()",
        Duration::from_secs(30),
        "the page playing",
    )
    .await?;
    let ladder: Vec<u32> = children(server.pid());
    let cpu0: f64 = ladder
        .iter()
        .filter_map(|p| super::cpu_seconds(*p).ok())
        .sum();
    let t0 = Instant::now();
    let mut starts = Vec::new();
    for &(kbit, secs) in PROFILE {
        ns.shape(kbit)?;
        starts.push(page_now(&b).await?);
        b.play_for(Duration::from_secs(secs)).await?;
    }
    let end = page_now(&b).await?;
    let cpu1: f64 = ladder
        .iter()
        .filter_map(|p| super::cpu_seconds(*p).ok())
        .sum();
    let ladder_cpu_pct =
        (!ladder.is_empty()).then(|| 100.0 * (cpu1 - cpu0) / t0.elapsed().as_secs_f64());
    let points = trace(&b).await?;
    let mut steps = Vec::new();
    for (i, &(kbit, secs)) in PROFILE.iter().enumerate() {
        let from = starts[i];
        let to = starts.get(i + 1).copied().unwrap_or(end);
        let inside: Vec<&Point> = points.iter().filter(|p| p.t >= from && p.t < to).collect();
        let first_height = inside.first().map_or(0, |p| p.height);
        let first_move_s = inside
            .iter()
            .find(|p| p.height != first_height && p.height > 0)
            .map(|p| (p.t - from) / 1000.0);
        let mut on: Vec<(u64, f64)> = Vec::new();
        for p in &inside {
            match on.iter_mut().find(|(h, _)| *h == p.height) {
                Some(e) => e.1 += 1.0,
                None => on.push((p.height, 1.0)),
            }
        }
        let n = inside.len().max(1) as f64;
        on.iter_mut()
            .for_each(|e| e.1 = (100.0 * e.1 / n * 10.0).round() / 10.0);
        on.sort_by_key(|e| std::cmp::Reverse(e.0));
        let stalled_ms = stalled_ms(&points, from, to);
        let mut late: Vec<f64> = inside
            .iter()
            .filter(|p| p.t >= to - 5000.0)
            .filter_map(|p| p.latency_ms)
            .collect();
        late.sort_by(f64::total_cmp);
        steps.push(Step {
            kbit,
            secs,
            first_move_s,
            height_at_end: inside.last().map_or(0, |p| p.height),
            time_on: on,
            stalled_ms,
            latency_ms: late.get(late.len() / 2).copied(),
        });
    }
    let detail = server.api(&format!("/api/streams/{STREAM}")).await;
    let switches = detail["viewers"]["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            r["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with(ns.inner_addr()))
        })
        .filter_map(|r| r["switches"].as_u64())
        .sum();
    let _ = b.close().await;
    let decisions = server
        .log_matching("automatic switch decided")
        .into_iter()
        .map(|l| {
            l.split("viewer{")
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
                + " "
                + l.rsplit("}: ").next().unwrap_or_default()
        })
        .collect();
    Ok(AbrReport {
        steps,
        ladder_cpu_pct,
        switches,
        decisions,
    })
}

/// The report as a markdown table.
pub fn table(r: &AbrReport) -> String {
    let mut out = String::from(
        "\n### ABR: Chromium behind a shaped link (720p 2500 kbit/s, rungs 480p and 240p)\n\n\
         | step | link, kbit/s | s | first move after, s | height at end | time on (height: %) | stalled, ms | latency last 5 s p50, ms |\n\
         |---:|---:|---:|---:|---:|---|---:|---:|\n",
    );
    for (i, s) in r.steps.iter().enumerate() {
        let on: Vec<String> = s.time_on.iter().map(|(h, p)| format!("{h}: {p}")).collect();
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} |\n",
            i + 1,
            s.kbit,
            s.secs,
            s.first_move_s.map_or("–".into(), |v| format!("{v:.1}")),
            s.height_at_end,
            on.join(", "),
            s.stalled_ms.max(0.0),
            s.latency_ms.map_or("–".into(), |v| format!("{v:.0}")),
        );
    }
    out += "\nThe server's decisions:\n\n```\n";
    for d in &r.decisions {
        out += d;
        out += "\n";
    }
    out += "```\n";
    out += &format!(
        "\nMoves made for the page: {}. The ladder's ffmpeg (two rungs): {}.\n",
        r.switches,
        r.ladder_cpu_pct
            .map_or("not found".into(), |c| format!("{c:.1} % of one core"))
    );
    out
}
