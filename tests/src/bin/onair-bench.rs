//! `make bench`: onair's fan-out benchmark, side by side with node-media-server.
//!
//! Each run measures every server in turn with the same clip, publisher and viewer plan; the
//! tables print per run, then the medians over runs with the onair/peer ratios and the targets.
//! Method and results: docs/benchmarks.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use onair_tests::BoxError;
use onair_tests::load::{self, Env, Plan, Report, Target, source::Clip, source::ClipSpec};

#[derive(Parser, Debug)]
#[command(about = "onair fan-out benchmark (see docs/benchmarks.md)")]
struct Args {
    /// Viewers per server.
    #[arg(long, default_value_t = 1000)]
    viewers: usize,
    /// Viewers that join in the burst (the first ones).
    #[arg(long, default_value_t = 500)]
    burst: usize,
    /// Length of the join burst.
    #[arg(long, default_value_t = 1000)]
    burst_ms: u64,
    /// Arrival rate of the viewers after the burst.
    #[arg(long, default_value_t = 250)]
    ramp_per_sec: usize,
    /// Pause after the last viewer joined, before measuring.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// Steady measuring window.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// Runs; the summary takes medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Servers to measure, in order: onair, onair-ladder-source (onair with two ladder rungs,
    /// every viewer on the source), onair-ladder (the same, the viewers split over the three
    /// renditions), nms.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "onair,onair-ladder-source,onair-ladder,nms"
    )]
    servers: Vec<String>,
    /// The onair binary (default: the workspace's release build).
    #[arg(long)]
    onair_bin: Option<PathBuf>,
    /// Also write every report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// LL-HLS clients in the HLS run (onair only; 0 skips it).
    #[arg(long, default_value_t = 200)]
    hls_clients: usize,
    /// Measuring window of the HLS run.
    #[arg(long, default_value_t = 30)]
    hls_window_secs: u64,
    /// Run the ABR scenario (onair only): Chromium in its own network namespace behind a
    /// `tc tbf` link stepping 8 → 1.5 → 0.6 → 8 Mbit/s. Needs root, iproute2 and the player
    /// (`make player`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    abr: bool,
    /// Seconds the ladder's ffmpeg is measured for each of one rung, the other and both
    /// (onair only; 0 skips it).
    #[arg(long, default_value_t = 20)]
    ladder_secs: u64,
}

type Row = (&'static str, fn(&Report) -> Option<f64>, usize);

const ROWS: &[Row] = &[
    ("viewers", |r| Some(r.viewers as f64), 0),
    ("viewers failed", |r| Some(r.failed as f64), 0),
    ("stream bitrate, kbit/s", |r| Some(r.stream_kbps as f64), 0),
    ("delivered, Gbit/s", |r| Some(r.gbps()), 3),
    (
        "server CPU, s per GB delivered",
        |r| Some(r.cpu_s_per_gb()),
        3,
    ),
    ("Gbit/s per core", |r| Some(r.gbps_per_core()), 2),
    (
        "server CPU, % of one core",
        |r| Some(100.0 * r.cpu_s / r.window_s),
        1,
    ),
    (
        "RSS idle (publishing), MB",
        |r| Some(r.rss_idle as f64 / 1e6),
        1,
    ),
    (
        "RSS per viewer over idle, KB",
        |r| Some(r.rss_per_viewer_kb()),
        1,
    ),
    (
        "RSS slope burst→full, KB/viewer",
        |r| Some(r.rss_slope_kb()),
        1,
    ),
    (
        "delivery latency p50, ms",
        |r| r.delivery_ms.map(|p| p.p50),
        2,
    ),
    (
        "delivery latency p99, ms",
        |r| r.delivery_ms.map(|p| p.p99),
        2,
    ),
    (
        "delivery latency max, ms",
        |r| r.delivery_ms.map(|p| p.max),
        2,
    ),
    ("end-to-end latency p50, ms", |r| Some(r.e2e_ms.p50), 2),
    ("end-to-end latency p99, ms", |r| Some(r.e2e_ms.p99), 2),
    ("end-to-end latency max, ms", |r| Some(r.e2e_ms.max), 2),
    ("join burst TTFF p50, ms", |r| Some(r.ttff_ms.p50), 2),
    ("join burst TTFF p99, ms", |r| Some(r.ttff_ms.p99), 2),
    ("join burst TTFF max, ms", |r| Some(r.ttff_ms.max), 2),
    (
        "burst viewers starting on a keyframe, %",
        |r| Some(100.0 * r.burst_key_first),
        1,
    ),
    (
        "all viewers starting on a keyframe, %",
        |r| Some(100.0 * r.key_first),
        1,
    ),
    (
        "video frames published in window",
        |r| Some(r.frames_published as f64),
        0,
    ),
    (
        "fewest frames a viewer received",
        |r| Some(r.frames_min as f64),
        0,
    ),
    ("frames lost, worst viewer", |r| Some(r.lost_max as f64), 0),
    ("frames lost, all viewers", |r| Some(r.lost_total as f64), 0),
    ("keyframe skips", |r| Some(r.skips as f64), 0),
    (
        "ladder ffmpeg CPU, % of one core",
        |r| r.ladder_cpu_s.map(|c| 100.0 * c / r.window_s),
        1,
    ),
];

fn table(title: &str, servers: &[String], reports: &[&[Report]]) -> String {
    // reports[server][run]: one column per server, each cell the median over runs.
    let mut out = format!("\n### {title}\n\n| metric |");
    for s in servers {
        out += &format!(" {s} |");
    }
    out += "\n|---|";
    out += &"---:|".repeat(servers.len());
    out += "\n";
    for (label, get, prec) in ROWS {
        let cells: Vec<Option<f64>> = reports
            .iter()
            .map(|runs| median(runs.iter().filter_map(get).collect()))
            .collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        out += &format!("| {label} |");
        for c in cells {
            match c {
                Some(v) => out += &format!(" {v:.prec$} |", prec = *prec),
                None => out += " – |",
            }
        }
        out += "\n";
    }
    out
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `f(a) / f(b)` for each run, then the median over runs: runs are noisy, pairs from the same
/// run less so.
fn paired_ratio(a: &[Report], b: &[Report], f: fn(&Report) -> f64) -> f64 {
    median(a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect()).unwrap_or(f64::NAN)
}

fn targets(onair: &[Report], ladder: Option<&[Report]>, peer: Option<&[Report]>) -> String {
    let m = |f: fn(&Report) -> f64, rs: &[Report]| {
        median(rs.iter().map(f).collect()).unwrap_or(f64::NAN)
    };
    let mut lines = Vec::new();
    let check = |lines: &mut Vec<String>, ok: bool, what: String| {
        lines.push(format!("- [{}] {what}", if ok { "x" } else { " " }));
    };
    let p99 = m(|r| r.delivery_ms.map_or(f64::NAN, |p| p.p99), onair);
    check(
        &mut lines,
        p99 <= 20.0,
        format!("delivery latency p99 {p99:.2} ms ≤ 20 ms"),
    );
    let rss = m(Report::rss_per_viewer_kb, onair);
    check(
        &mut lines,
        rss <= 30.0,
        format!("RSS {rss:.1} KB per viewer ≤ 30 KB"),
    );
    let lost = m(|r| r.lost_total as f64, onair);
    let failed = m(|r| r.failed as f64, onair);
    check(
        &mut lines,
        lost == 0.0 && failed == 0.0,
        format!("every viewer received every frame (lost {lost}, failed viewers {failed})"),
    );
    let ttff = m(|r| r.ttff_ms.p99, onair);
    check(
        &mut lines,
        ttff <= 10.0,
        format!("join burst TTFF p99 {ttff:.2} ms ≤ 10 ms"),
    );
    let key = m(|r| r.burst_key_first, onair);
    check(
        &mut lines,
        key == 1.0,
        format!("burst viewers starting on a keyframe {:.1} %", key * 100.0),
    );
    if let Some(peer) = peer {
        let ratio = |f| paired_ratio(onair, peer, f);
        let cpu = ratio(Report::cpu_s_per_gb);
        check(
            &mut lines,
            cpu <= 1.0 / 3.0,
            format!("CPU per GB onair/peer {cpu:.3} ≤ 0.333"),
        );
        lines.push(format!(
            "- ratio onair/peer, RSS per viewer: {:.3}",
            ratio(Report::rss_per_viewer_kb)
        ));
        lines.push(format!(
            "- ratio onair/peer, end-to-end latency p99: {:.3}",
            ratio(|r| r.e2e_ms.p99)
        ));
    }
    if let Some(ladder) = ladder {
        let ratio = |f| paired_ratio(ladder, onair, f);
        let cpu = ratio(Report::cpu_s_per_gb);
        check(
            &mut lines,
            cpu <= 1.10,
            format!("CPU per GB, three renditions against one, {cpu:.3} ≤ 1.10"),
        );
        let lost = m(|r| r.lost_total as f64, ladder);
        let failed = m(|r| r.failed as f64, ladder);
        check(
            &mut lines,
            lost == 0.0 && failed == 0.0,
            format!(
                "three renditions: every viewer received every frame (lost {lost}, failed \
                 viewers {failed})"
            ),
        );
        lines.push(format!(
            "- ratio three renditions/one, RSS per viewer: {:.3}",
            ratio(Report::rss_per_viewer_kb)
        ));
    }
    format!("\n### Targets (onair, medians)\n\n{}\n", lines.join("\n"))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let targets_list: Vec<Target> = args
        .servers
        .iter()
        .map(|s| match s.as_str() {
            "onair" => Ok(Target::Onair),
            "onair-ladder" => Ok(Target::OnairLadder),
            "onair-ladder-source" => Ok(Target::OnairLadderSource),
            "nms" | "node-media-server" => Ok(Target::Nms),
            other => Err(format!(
                "unknown server {other:?} (onair, onair-ladder, onair-ladder-source, nms)"
            )),
        })
        .collect::<Result<_, _>>()?;
    let work = load::work_dir();
    let onair_bin = args
        .onair_bin
        .clone()
        .unwrap_or_else(|| load::target_dir().join("release/onair"));
    if !onair_bin.exists() {
        return Err(format!("{} not found: `make bench` builds it", onair_bin.display()).into());
    }
    let nms_app = if targets_list.contains(&Target::Nms) {
        eprintln!("bench: node-media-server {} ...", load::nms::VERSION);
        Some(load::nms::install(&work.join("nms")).await?)
    } else {
        None
    };
    let env = Env { onair_bin, nms_app };
    eprintln!("bench: encoding the clip (once) ...");
    let clip = Arc::new(Clip::prepare(&work, ClipSpec::default()).await?);
    let plan = Plan {
        viewers: args.viewers,
        burst: args.burst,
        burst_window: Duration::from_millis(args.burst_ms),
        ramp_per_sec: args.ramp_per_sec,
        settle: Duration::from_secs(args.settle_secs),
        window: Duration::from_secs(args.window_secs),
    };
    println!(
        "# onair fan-out benchmark\n\n{} viewers ({} in a {} ms burst), {} s window, clip {}x{}p{} at {} kbit/s, {} run(s)",
        plan.viewers,
        plan.burst,
        args.burst_ms,
        args.window_secs,
        clip.spec.width,
        clip.spec.height,
        clip.spec.fps,
        clip.kbps(),
        args.runs
    );
    let names: Vec<String> = targets_list.iter().map(|t| t.name().to_string()).collect();
    let mut all: Vec<Vec<Report>> = vec![Vec::new(); targets_list.len()];
    for run in 1..=args.runs {
        for (i, t) in targets_list.iter().enumerate() {
            eprintln!("bench: run {run}/{}: {} ...", args.runs, t.name());
            let r = load::run(*t, &plan, clip.clone(), &env).await?;
            if !r.errors.is_empty() {
                eprintln!("bench: {} viewers failed, e.g. {:?}", r.failed, r.errors);
            }
            all[i].push(r);
        }
        let this: Vec<&[Report]> = all.iter().map(|v| &v[v.len() - 1..]).collect();
        println!("{}", table(&format!("Run {run}"), &names, &this));
    }
    let every: Vec<&[Report]> = all.iter().map(Vec::as_slice).collect();
    println!(
        "{}",
        table(&format!("Median of {} runs", args.runs), &names, &every)
    );
    let onair = targets_list.iter().position(|t| *t == Target::Onair);
    let peer = targets_list.iter().position(|t| *t == Target::Nms);
    let ladder = targets_list.iter().position(|t| *t == Target::OnairLadder);
    if let Some(l) = ladder {
        for (run, r) in all[l].iter().enumerate() {
            let rs: Vec<String> = r
                .renditions
                .iter()
                .map(|x| {
                    format!(
                        "{} ({}p, {} kbit/s): {} viewers",
                        x.name, x.height, x.bitrate_kbps, x.viewers
                    )
                })
                .collect();
            println!("Three renditions, run {}: {}", run + 1, rs.join("; "));
        }
    }
    if let Some(o) = onair {
        println!(
            "{}",
            targets(
                &all[o],
                ladder.map(|l| all[l].as_slice()),
                peer.map(|p| all[p].as_slice())
            )
        );
        for (run, r) in all[o].iter().enumerate() {
            if let Some(d) = &r.dashboard {
                println!(
                    "Dashboard feed at {} viewers, run {}: first snapshot {:.1} ms after the \
                     request, snapshot {} B (50 viewer rows), history {} B; viewers counted: \
                     feed {}, /api/streams {}",
                    r.viewers,
                    run + 1,
                    d.first_snapshot_ms,
                    d.snapshot_bytes,
                    d.history_bytes,
                    d.viewers_feed,
                    d.viewers_api
                );
            }
        }
    }
    let mut hls = None;
    if args.hls_clients > 0 && onair.is_some() {
        eprintln!("bench: LL-HLS, {} clients ...", args.hls_clients);
        let r = load::hls::run(
            &env,
            clip.clone(),
            args.hls_clients,
            Duration::from_secs(args.hls_window_secs),
        )
        .await?;
        println!(
            "\n### LL-HLS: {} clients polling with blocking reload, {:.0} s window\n\n\
             | metric | onair |\n|---|---:|\n\
             | server CPU, % of one core | {:.1} |\n\
             | server CPU per client, % of one core | {:.3} |\n\
             | parts received per client per second | {:.2} |\n\
             | playlists served | {} |\n\
             | part availability (ready → client has it) p50, ms | {:.2} |\n\
             | part availability p99, ms | {:.2} |\n\
             | part availability max, ms | {:.2} |\n\
             | failed requests | {} |\n",
            r.clients,
            r.window_s,
            100.0 * r.cpu_s / r.window_s,
            r.cpu_pct_per_client,
            r.parts_per_client_s,
            r.playlists,
            r.availability_ms.p50,
            r.availability_ms.p99,
            r.availability_ms.max,
            r.failed,
        );
        if !r.errors.is_empty() {
            eprintln!("bench: HLS errors, e.g. {:?}", r.errors);
        }
        hls = Some(r);
    }
    let mut abr = None;
    if args.abr && onair.is_some() {
        eprintln!("bench: ABR over a shaped link ...");
        let r = load::abr::run(&env.onair_bin, &work.join("abr")).await?;
        println!("{}", load::abr::table(&r));
        abr = Some(r);
    }
    let mut ladder_costs = None;
    if args.ladder_secs > 0 && onair.is_some() {
        eprintln!("bench: the ladder's CPU per rung ...");
        let window = Duration::from_secs(args.ladder_secs);
        let r = load::ladder::run(&env.onair_bin, &work.join("ladder"), window).await?;
        println!("{}", load::ladder::table(&r, window));
        ladder_costs = Some(r);
    }
    if let Some(path) = &args.json {
        let out = serde_json::json!({
            "fanout": all, "hls": hls, "abr": abr, "ladder": ladder_costs
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
