//! R4 of docs/reliability.md, short: while a stream plays, every port gets garbage, oversize
//! headers and slowloris, one address opens a thousand idle sockets, and another floods the
//! LL-HLS packager with blocking requests. `make soak` runs the same at full size against the
//! release binary.

use std::sync::Arc;
use std::time::Duration;

use onair_tests::load::source::{Clip, ClipSpec};
use onair_tests::soak::{Live, attack};
use onair_tests::{free_port, onair_bin, require_tool};

#[tokio::test]
async fn a_stream_plays_on_while_every_port_is_attacked() {
    require_tool("ffmpeg");
    let spec = ClipSpec {
        width: 640,
        height: 360,
        video_kbps: 500,
        ..ClipSpec::default()
    };
    let clip = Arc::new(
        Clip::prepare(&onair_tests::load::work_dir(), spec)
            .await
            .expect("encode the clip"),
    );
    let tcp = [(); attack::TCP_LISTENERS].map(|_| free_port().expect("a free port"));
    let mut live = Live::start(&onair_bin(), &attack::config(tcp), &[], clip)
        .await
        .expect("a live stream");
    let plan = attack::Plan {
        viewers: 20,
        idle_sockets: 1000,
        held_hls: 200,
        per_port: 2,
        window: Duration::from_secs(24),
    };
    let r = attack::r4(&mut live, tcp, &plan)
        .await
        .expect("R4 ran (another address was served meanwhile)");
    live.stop().await;
    eprintln!("{r:#?}");
    assert!(r.server_up, "the server went down");
    assert_eq!(r.seen.failed, 0, "viewers failed: {:?}", r.seen.errors);
    assert_eq!(r.seen.lost_total, 0, "viewers lost frames");
    assert_eq!(r.seen.skips, 0, "viewers were skipped ahead");
    assert!(r.seen.frames_min > 0);
    // The default cap of 256 connections in their handshake per address.
    assert_eq!(
        r.idle_closed_at_once,
        1000 - 256,
        "idle sockets closed at accept"
    );
    for a in &r.attacks {
        assert!(
            a.ended_by_server > 0,
            "the server ended no connection of {a:?}"
        );
        assert_eq!(a.outlasted, 0, "connections outlasted every timeout: {a:?}");
    }
    assert!(r.hls_200 > 0, "no held LL-HLS request was answered");
    assert_eq!(
        r.hls_other, 0,
        "held LL-HLS requests got something else than 200 or 503"
    );
    assert_eq!(
        r.hls_refused, 0,
        "held LL-HLS requests refused under the per-address cap"
    );
    assert!(
        r.refusals
            .iter()
            .any(|l| l.contains("reason=\"max_handshakes_per_address\"")),
        "refusals not counted: {:?}",
        r.refusals
    );
    // Bounded: everything the attacks held costs less than this, and it is given back.
    let grew = r.rss_max.saturating_sub(r.rss_before);
    assert!(grew < 100 << 20, "RSS grew {grew} bytes under attack");
}
