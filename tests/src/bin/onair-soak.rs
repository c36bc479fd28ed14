//! `make soak`: the fault and soak runs R1, R3, R4, R5 and R6 of docs/reliability.md, against
//! the release binary, with a table of what held. Not part of `make test` (about 45 minutes
//! with the defaults); `make test` runs a short R4 and all of R5.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use onair_tests::BoxError;
use onair_tests::load::source::{Clip, ClipSpec};
use onair_tests::soak::{self, attack, republish};

#[derive(Parser, Debug)]
#[command(about = "onair fault and soak runs (see docs/reliability.md)")]
struct Args {
    /// Runs to do, in order.
    #[arg(long, value_delimiter = ',', default_value = "r1,r3,r4,r5,r6")]
    only: Vec<String>,
    /// R1 and R6: viewers (R1 stalls a tenth of them).
    #[arg(long, default_value_t = 1000)]
    viewers: usize,
    /// R1: the measuring window (the run with stalled viewers lasts until the server has
    /// dropped them all, at least this long).
    #[arg(long, default_value_t = 60)]
    r1_window_secs: u64,
    /// R4: viewers, idle sockets, held LL-HLS requests, attackers per port and kind, window.
    #[arg(long, default_value_t = 200)]
    r4_viewers: usize,
    #[arg(long, default_value_t = 10_000)]
    r4_idle: usize,
    #[arg(long, default_value_t = 2000)]
    r4_held_hls: usize,
    #[arg(long, default_value_t = 16)]
    r4_per_port: usize,
    #[arg(long, default_value_t = 60)]
    r4_window_secs: u64,
    /// R6: how long.
    #[arg(long, default_value_t = 30)]
    r6_minutes: u64,
    /// The onair binary (default: the workspace's release build).
    #[arg(long)]
    onair_bin: Option<PathBuf>,
    /// Also write every report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One line of the table: the run, what was measured, and whether it held.
struct Row {
    run: &'static str,
    measured: String,
    held: bool,
}

fn mb(b: u64) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    // Thousands of sockets (R4's idle ones, R6's viewers) in this one process.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let bin = args
        .onair_bin
        .clone()
        .unwrap_or_else(|| onair_tests::load::target_dir().join("release/onair"));
    if !bin.exists() {
        return Err(format!("{} not found: `make soak` builds it", bin.display()).into());
    }
    let work = onair_tests::load::work_dir();
    let clip = Arc::new(Clip::prepare(&work, ClipSpec::default()).await?);
    let small = Arc::new(
        Clip::prepare(
            &work,
            ClipSpec {
                width: 640,
                height: 360,
                video_kbps: 500,
                ..ClipSpec::default()
            },
        )
        .await?,
    );
    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();
    for run in &args.only {
        eprintln!("soak: {run} ...");
        match run.as_str() {
            "r1" => {
                let stalled = args.viewers / 10;
                let r = soak::r1(
                    &bin,
                    clip.clone(),
                    args.viewers - stalled,
                    stalled,
                    Duration::from_secs(args.r1_window_secs),
                    Duration::from_secs(240),
                )
                .await?;
                let (a, b) = (&r.alone, &r.beside_stalled);
                rows.push(Row {
                    run: "R1",
                    measured: format!(
                        "{} readers, {} stalled: readers' delivery p99 {:.1} ms alone, {:.1} ms beside the stalled ({:.2}×); readers lost {} frames, {} failed; the server dropped the stalled ones {:.0}–{:.0} s after they stopped reading ({} of {} found their connection closed); RSS {} alone, {} at most beside them, {} after",
                        r.readers,
                        r.stalled,
                        a.delivery_ms.p99,
                        b.delivery_ms.p99,
                        b.delivery_ms.p99 / a.delivery_ms.p99.max(0.001),
                        b.lost_total,
                        b.failed,
                        r.dropped_first_s.unwrap_or(f64::NAN),
                        r.dropped_all_s.unwrap_or(f64::NAN),
                        r.stalled_closed,
                        r.stalled,
                        mb(r.rss_alone),
                        mb(r.rss_stalled_max),
                        mb(r.rss_after),
                    ),
                    held: b.lost_total == 0
                        && b.failed == 0
                        && r.dropped_all_s.is_some()
                        && r.stalled_closed == r.stalled,
                });
                json.insert("r1".into(), serde_json::to_value(&r)?);
            }
            "r3" => {
                let r = republish::r3(
                    &bin,
                    clip.clone(),
                    small.clone(),
                    50,
                    Duration::from_secs(6),
                    &work,
                )
                .await?;
                let cuts: Vec<String> = r
                    .cuts
                    .iter()
                    .map(|c| {
                        format!(
                            "cut after {} of a {}-byte read, then {}: resumed by frame {} ({} of {} on a keyframe), that frame {:.0} ms after it was published and {:.1} ms after the server had it",
                            c.cut_at.0, c.cut_at.1, c.then, c.first_frame_max, c.on_keyframe, r.viewers, c.latency_max_ms, c.delivery_max_ms
                        )
                    })
                    .collect();
                rows.push(Row {
                    run: "R3",
                    measured: format!(
                        "{} viewers, {} failed, {} saw every republish; {}; ffmpeg decoded {} of {} frames{}",
                        r.viewers,
                        r.failed,
                        r.saw_all,
                        cuts.join("; "),
                        r.decoded_frames,
                        r.recorded_frames,
                        if r.decode_errors.is_empty() {
                            " without an error".to_string()
                        } else {
                            format!(", saying: {}", r.decode_errors.lines().next().unwrap_or(""))
                        }
                    ),
                    held: r.failed == 0
                        && r.saw_all == r.viewers
                        && r.cuts.iter().all(|c| c.first_frame_max < u64::from(r.gop))
                        && r.decode_errors.is_empty()
                        && r.decoded_frames == r.recorded_frames,
                });
                json.insert("r3".into(), serde_json::to_value(&r)?);
            }
            "r4" => {
                let mut tcp = [0; attack::TCP_LISTENERS];
                for p in &mut tcp {
                    *p = onair_tests::free_port()?;
                }
                let mut live =
                    soak::Live::start(&bin, &attack::config(tcp), &[], clip.clone()).await?;
                let plan = attack::Plan {
                    viewers: args.r4_viewers,
                    idle_sockets: args.r4_idle,
                    held_hls: args.r4_held_hls,
                    per_port: args.r4_per_port,
                    window: Duration::from_secs(args.r4_window_secs),
                };
                let r = attack::r4(&mut live, tcp, &plan).await?;
                live.stop().await;
                rows.push(Row {
                    run: "R4",
                    measured: r4_summary(&r),
                    held: r4_held(&r),
                });
                json.insert("r4".into(), serde_json::to_value(&r)?);
            }
            "r5" => {
                let (passed, failed, out) = r5(&bin).await?;
                rows.push(Row {
                    run: "R5",
                    measured: format!(
                        "tests/tests/auth.rs against this binary: {passed} passed, {failed} failed{}",
                        if failed > 0 { format!(": {out}") } else { String::new() }
                    ),
                    held: failed == 0 && passed > 0,
                });
            }
            "r6" => {
                let r = soak::r6(
                    &bin,
                    clip.clone(),
                    args.viewers,
                    Duration::from_secs(args.r6_minutes * 60),
                )
                .await?;
                rows.push(Row {
                    run: "R6",
                    measured: format!(
                        "{} viewers for {:.0} min: {} frames published, {} lost ({} at most by one viewer), {} failed; RSS {} → {} (max {}), slope {:.0} KiB/min after the first minute; descriptors {} idle, {} with every viewer, {} after they left",
                        r.viewers,
                        r.seconds / 60.0,
                        r.frames_published,
                        r.seen.lost_total,
                        r.seen.lost_max,
                        r.seen.failed,
                        mb(r.rss_start),
                        mb(r.rss_end),
                        mb(r.rss_max),
                        r.rss_slope_kib_per_min,
                        r.fds_idle,
                        r.fds_end,
                        r.fds_after,
                    ),
                    held: r.seen.lost_total == 0
                        && r.seen.failed == 0
                        && r.fds_after <= r.fds_idle + 2,
                });
                json.insert("r6".into(), serde_json::to_value(&r)?);
            }
            other => return Err(format!("unknown run {other:?}: r1, r3, r4, r5 or r6").into()),
        }
    }
    println!("| run | measured | held |\n|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} |",
            r.run,
            r.measured,
            if r.held { "yes" } else { "NO" }
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if rows.iter().any(|r| !r.held) {
        return Err("a run did not hold".into());
    }
    Ok(())
}

pub fn r4_summary(r: &attack::R4) -> String {
    let attacks: Vec<String> = r
        .attacks
        .iter()
        .map(|a| {
            format!(
                "{}: {} of {} ended by the server (within {:.1} s), {} outlasted 20 s",
                a.name, a.ended_by_server, a.connections, a.longest_s, a.outlasted
            )
        })
        .collect();
    format!(
        "{} viewers for {:.0} s: {} frames lost, {} skips, {} failed; {} idle sockets from one address ({} closed at accept); held LL-HLS requests answered {} × 200, {} × 503, {} refused at accept, {} other; {}; another address meanwhile: first frame {:.0} ms, API {:.0} ms, HLS {:.0} ms, RTMP handshake {:.0} ms; RSS {} before, {} at most in the first half of the attacks, {} in all, {} after; up: {}",
        r.viewers,
        r.window_s,
        r.seen.lost_total,
        r.seen.skips,
        r.seen.failed,
        r.idle_opened,
        r.idle_closed_at_once,
        r.hls_200,
        r.hls_503,
        r.hls_refused,
        r.hls_other,
        attacks.join(", "),
        r.other_viewer_ms,
        r.other_api_ms,
        r.other_hls_ms,
        r.other_rtmp_ms,
        mb(r.rss_before),
        mb(r.rss_max_first_half),
        mb(r.rss_max),
        mb(r.rss_after),
        r.server_up,
    )
}

fn r4_held(r: &attack::R4) -> bool {
    r.server_up
        && r.seen.lost_total == 0
        && r.seen.failed == 0
        && r.hls_other == 0
        && r.attacks
            .iter()
            .all(|a| a.ended_by_server > 0 && a.outlasted == 0)
}

/// R5: the authentication tests, against `bin`: (passed, failed, the failures' output).
async fn r5(bin: &std::path::Path) -> Result<(u64, u64, String), BoxError> {
    let out =
        tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "test",
                "-p",
                "onair-tests",
                "--test",
                "auth",
                "--locked",
                "--",
                "--test-threads=1",
            ])
            .env("E2E_ONAIR_BIN", bin)
            .output()
            .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let count = |what: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("test result: "))
            .filter_map(|l| {
                l.split(';').find_map(|p| {
                    p.trim().strip_suffix(what).map(|n| {
                        n.trim()
                            .trim_start_matches("ok.")
                            .trim_start_matches("FAILED.")
                            .trim()
                            .to_string()
                    })
                })
            })
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    let (passed, failed) = (count(" passed"), count(" failed"));
    let failed = if out.status.success() {
        failed
    } else {
        failed.max(1)
    };
    Ok((
        passed,
        failed,
        text.lines()
            .filter(|l| l.contains("panicked"))
            .take(3)
            .collect::<Vec<_>>()
            .join(" / "),
    ))
}
