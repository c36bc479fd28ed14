//! `make bench` in small (10 viewers, 5 s), so the load tool itself is tested on every run:
//! the same code path against onair and against node-media-server, and every number it reports
//! checked against what the publisher actually sent.

use std::sync::Arc;
use std::time::Duration;

use onair_tests::load::{self, Env, Plan, Report, Target, source::Clip, source::ClipSpec};

fn check(r: &Report, plan: &Plan, clip: &Clip) {
    let who = &r.server;
    assert_eq!(r.viewers, plan.viewers, "{who}");
    assert_eq!(r.failed, 0, "{who}: viewers failed: {:?}", r.errors);
    assert_eq!(r.key_first, 1.0, "{who}: every viewer starts on a keyframe");
    assert_eq!(r.ttff_ms.n, plan.burst, "{who}: every burst viewer timed");
    // The pacer publishes fps frames per second; every viewer gets every one, stamped.
    let expected = plan.window.as_secs_f64() * f64::from(clip.spec.fps);
    let published = r.frames_published as f64;
    assert!(
        (published - expected).abs() <= expected * 0.1,
        "{who}: {published} frames published in the window, expected about {expected}"
    );
    assert_eq!(r.lost_total, 0, "{who}: frames lost");
    assert_eq!(r.unstamped, 0, "{who}: frames without the SEI stamp");
    assert!(
        r.frames_min + 2 >= r.frames_published,
        "{who}: a viewer got only {} of {} frames",
        r.frames_min,
        r.frames_published
    );
    assert!(
        r.e2e_ms.n as f64 >= plan.viewers as f64 * expected * 0.9,
        "{who}: {} latency samples",
        r.e2e_ms.n
    );
    assert!(
        r.e2e_ms.p50 > 0.0 && r.e2e_ms.p99 < 500.0,
        "{who}: implausible end-to-end latency {:?}",
        r.e2e_ms
    );
    // Bytes: viewers × the clip's bitrate × the window, within the window's edge effects; over
    // several renditions, each one's viewers × the bitrate the server measured for it.
    let kbit_s: f64 = if r.renditions.is_empty() {
        plan.viewers as f64 * clip.kbps() as f64
    } else {
        r.renditions
            .iter()
            .map(|x| x.viewers as f64 * x.bitrate_kbps as f64)
            .sum()
    };
    let want = kbit_s * 1000.0 / 8.0 * r.window_s;
    let got = r.bytes as f64;
    assert!(
        (got - want).abs() <= want * 0.35,
        "{who}: viewers received {got} bytes, expected about {want}"
    );
    assert!(r.cpu_s > 0.0, "{who}: server CPU was measured");
    assert!(
        r.rss_idle > 0 && r.rss_full > 0,
        "{who}: server RSS was measured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_tool_measures_onair_with_one_and_three_renditions_and_node_media_server() {
    let work = load::work_dir();
    let nms_app = load::nms::install(&work.join("nms"))
        .await
        .expect("node-media-server from npm (scripts/setup.sh installs node and npm)");
    let clip = Arc::new(
        Clip::prepare(&work, ClipSpec::default())
            .await
            .expect("encode the benchmark clip"),
    );
    let env = Env {
        onair_bin: onair_tests::onair_bin(),
        nms_app: Some(nms_app),
    };
    let plan = Plan {
        viewers: 10,
        burst: 5,
        burst_window: Duration::from_millis(200),
        ramp_per_sec: 50,
        settle: Duration::from_secs(1),
        window: Duration::from_secs(5),
    };
    let onair = load::run(Target::Onair, &plan, clip.clone(), &env)
        .await
        .expect("onair run");
    check(&onair, &plan, &clip);
    let d = onair
        .delivery_ms
        .expect("onair reports its own delivery latency");
    assert_eq!(d.n, onair.e2e_ms.n, "one delivery sample per frame");
    assert!(
        d.p50 <= onair.e2e_ms.p50,
        "server ingest comes after the publisher's stamp: {d:?} vs {:?}",
        onair.e2e_ms
    );

    // Three renditions: the viewers split over the source and two rungs the ladder's ffmpeg
    // makes, every frame of every rendition reaching its viewers with the publisher's stamp.
    let ladder = load::run(Target::OnairLadder, &plan, clip.clone(), &env)
        .await
        .expect("onair run with a ladder");
    check(&ladder, &plan, &clip);
    let mut heights: Vec<u64> = ladder.renditions.iter().map(|x| x.height).collect();
    heights.sort_unstable();
    assert_eq!(heights, [240, 480, 720], "{:?}", ladder.renditions);
    let split: Vec<u64> = ladder.renditions.iter().map(|x| x.viewers).collect();
    assert!(
        split.iter().all(|&n| n >= 3) && split.iter().sum::<u64>() == plan.viewers as u64,
        "viewers split over the renditions: {:?}",
        ladder.renditions
    );
    assert!(
        ladder.ladder_cpu_s.is_some_and(|c| c > 0.0),
        "the ladder's ffmpeg CPU was measured: {:?}",
        ladder.ladder_cpu_s
    );

    let nms = load::run(Target::Nms, &plan, clip.clone(), &env)
        .await
        .expect("node-media-server run");
    check(&nms, &plan, &clip);
    assert!(nms.delivery_ms.is_none(), "WS-FLV carries no ingest time");
}
