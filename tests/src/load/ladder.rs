//! What the ladder costs on this machine, per rung: onair with one ladder at a time, a live
//! 720p30 publish (ffmpeg, x264 2500 kbit/s, 1 s GOP, AAC: the ABR scenario's source), no
//! viewers; the ladder's ffmpeg (the server's child process) is measured from /proc over a
//! window after it has warmed up. One rung alone, the other alone, and both: the difference
//! between the sum of the singles and the pair is what the rungs share (reading and decoding
//! the source once).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::{BoxError, Profile, Publisher, Server};

const STREAM: &str = "ladder";

/// The ladders measured: (config value, the rungs' heights with the source's, highest first).
pub const LADDERS: &[(&str, &[u64])] = &[
    (r#"["480p"]"#, &[720, 480]),
    (
        r#"[{ name = "240p", height = 240, video_kbps = 300 }]"#,
        &[720, 240],
    ),
    (
        r#"["480p", { name = "240p", height = 240, video_kbps = 300 }]"#,
        &[720, 480, 240],
    ),
];

/// Left to the ladder before measuring (its encoders' start, the first GOPs).
const WARM_UP: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Serialize)]
pub struct LadderCost {
    /// The `ladder =` value.
    pub ladder: String,
    /// The ladder's ffmpeg, % of one core over the window.
    pub cpu_pct: f64,
    /// Each rung as the API measured it at the window's end.
    pub rungs: Vec<super::RenditionLoad>,
    /// ffmpeg's own `speed=` at the window's end.
    pub speed: Option<f64>,
}

pub async fn run(
    onair_bin: &Path,
    work: &Path,
    window: Duration,
) -> Result<Vec<LadderCost>, BoxError> {
    std::fs::create_dir_all(work)?;
    let mut out = Vec::new();
    for (i, &(ladder, heights)) in LADDERS.iter().enumerate() {
        let config = work.join(format!("ladder-{i}.toml"));
        std::fs::write(&config, format!("[streams.\"*\"]\nladder = {ladder}\n"))?;
        let mut server = Server::start_bin(
            onair_bin,
            &["--config", &config.to_string_lossy()],
            &[("ONAIR_LOG", "info")],
        )
        .await;
        let _publisher = Publisher::start(&server.rtmp_url(STREAM), Profile::hd_ladder_source());
        super::abr::wait_for_heights(&server, STREAM, heights).await?;
        tokio::time::sleep(WARM_UP).await;
        let children = super::abr::children(server.pid());
        if children.is_empty() {
            return Err(format!("no ladder process under the server for {ladder}").into());
        }
        let cpu = || -> f64 {
            children
                .iter()
                .filter_map(|p| super::cpu_seconds(*p).ok())
                .sum()
        };
        let cpu0 = cpu();
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let cpu_pct = 100.0 * (cpu() - cpu0) / t0.elapsed().as_secs_f64();
        let detail: Value = server.api(&format!("/api/streams/{STREAM}")).await;
        let rungs = super::renditions_of(&detail)
            .into_iter()
            .filter(|r| r.name != "source")
            .collect();
        out.push(LadderCost {
            ladder: ladder.to_string(),
            cpu_pct,
            rungs,
            speed: detail["transcoder"]["speed"].as_f64(),
        });
        let _ = server.terminate().await;
    }
    Ok(out)
}

/// The costs as a markdown table, with the share the rungs have in common.
pub fn table(costs: &[LadderCost], window: Duration) -> String {
    let mut out = format!(
        "\n### The ladder's CPU per rung (720p30 source at 2500 kbit/s, {} s each, no viewers)\n\n\
         | ladder | ffmpeg CPU, % of one core | rungs measured, kbit/s | ffmpeg speed |\n\
         |---|---:|---|---:|\n",
        window.as_secs()
    );
    for c in costs {
        let rungs: Vec<String> = c
            .rungs
            .iter()
            .map(|r| format!("{} {}", r.name, r.bitrate_kbps))
            .collect();
        out += &format!(
            "| `{}` | {:.1} | {} | {} |\n",
            c.ladder,
            c.cpu_pct,
            rungs.join(", "),
            c.speed.map_or("–".into(), |s| format!("{s:.2}")),
        );
    }
    if let [a, b, both] = costs {
        out += &format!(
            "\nShared by the rungs (reading and decoding the source once): {:.1} % of one core \
             (the two singles' sum less the pair); each rung's own encode on top of that: \
             {:.1} % and {:.1} %.\n",
            a.cpu_pct + b.cpu_pct - both.cpu_pct,
            both.cpu_pct - b.cpu_pct,
            both.cpu_pct - a.cpu_pct,
        );
    }
    out
}
