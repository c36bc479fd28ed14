//! LL-HLS media playlists, written by hand: m3u8-rs has none of the low-latency tags (PART,
//! PRELOAD-HINT, SERVER-CONTROL, SKIP).

use std::fmt::Write as _;

use super::segmenter::Segmenter;

/// What a playlist request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Variant {
    /// `_HLS_skip=YES`: a delta update, with the oldest segments replaced by EXT-X-SKIP.
    pub skip: bool,
}

/// How far back from the end segments may be skipped in a delta update: six target durations,
/// the least the spec allows.
pub fn skip_until_s(s: &Segmenter) -> f64 {
    6.0 * s.target_duration() as f64
}

/// One rendition in a multivariant playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantStream {
    /// Its media playlist, relative to the multivariant one.
    pub uri: String,
    /// Peak and average segment bitrate, bit/s.
    pub bandwidth: u64,
    pub average_bandwidth: u64,
    pub resolution: Option<(u16, u16)>,
    /// RFC 6381, comma-separated.
    pub codecs: String,
    pub fps: Option<f64>,
}

/// The multivariant playlist: one `EXT-X-STREAM-INF` per rendition, in the order given.
pub fn multivariant(variants: &[VariantStream]) -> String {
    let mut out = String::from("#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for v in variants {
        let _ = write!(
            out,
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={}",
            v.bandwidth, v.average_bandwidth
        );
        if let Some((w, h)) = v.resolution {
            let _ = write!(out, ",RESOLUTION={w}x{h}");
        }
        if !v.codecs.is_empty() {
            let _ = write!(out, ",CODECS=\"{}\"", v.codecs);
        }
        if let Some(fps) = v.fps {
            let _ = write!(out, ",FRAME-RATE={fps:.3}");
        }
        let _ = writeln!(out, "\n{}", v.uri);
    }
    out
}

/// The media playlist. `prefix` goes before every URI (the packager's epoch directory), and
/// `suffix` after it (`?token=...` where play needs a token, else empty).
pub fn media_playlist(s: &Segmenter, prefix: &str, suffix: &str, variant: Variant) -> String {
    let td = s.target_duration();
    let part_target = s.part_target_s();
    let segments: Vec<&super::segmenter::Segment> = s.listed().collect();
    let mut out = String::with_capacity(4096);
    let first_msn = segments.first().map_or(s.counters().next_msn, |g| g.msn);
    let _ = write!(
        out,
        "#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-TARGETDURATION:{td}\n\
         #EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={:.3},CAN-SKIP-UNTIL={:.1}\n\
         #EXT-X-PART-INF:PART-TARGET={part_target:.3}\n\
         #EXT-X-MEDIA-SEQUENCE:{first_msn}\n#EXT-X-DISCONTINUITY-SEQUENCE:{}\n",
        3.0 * part_target,
        skip_until_s(s),
        s.listed_discontinuity_seq(),
    );

    // Segments older than CAN-SKIP-UNTIL from the end may be skipped; parts are listed for the
    // last three target durations only (older ones are in their whole segments).
    let total: f64 = segments.iter().map(|g| g.duration_s).sum();
    let mut skipped = 0;
    if variant.skip {
        let mut start = 0.0;
        for g in &segments {
            if !g.complete || total - start <= skip_until_s(s) || g.discontinuity {
                break;
            }
            start += g.duration_s;
            skipped += 1;
        }
        if skipped > 0 {
            let _ = writeln!(out, "#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}");
        }
    }
    let parts_from = {
        let mut from_end = 0.0;
        let mut i = segments.len();
        while i > 0 && from_end < 3.0 * td as f64 {
            i -= 1;
            from_end += segments[i].duration_s;
        }
        i
    };
    // The first segment listed carries its EXT-X-MAP even after a SKIP.
    let mut map = None;
    for (i, g) in segments.iter().enumerate().skip(skipped) {
        if g.discontinuity {
            out.push_str("#EXT-X-DISCONTINUITY\n");
        }
        if map != Some(g.init_id) {
            let _ = writeln!(
                out,
                "#EXT-X-MAP:URI=\"{prefix}init{}.mp4{suffix}\"",
                g.init_id
            );
            map = Some(g.init_id);
        }
        let _ = writeln!(
            out,
            "#EXT-X-PROGRAM-DATE-TIME:{}",
            iso8601(g.program_date_ms)
        );
        if i >= parts_from || !g.complete {
            for p in &g.parts {
                let _ = write!(
                    out,
                    "#EXT-X-PART:DURATION={:.5},URI=\"{prefix}p{}.m4s{suffix}\"",
                    p.duration_s, p.seq
                );
                out.push_str(if p.independent {
                    ",INDEPENDENT=YES\n"
                } else {
                    "\n"
                });
            }
        }
        if g.complete {
            let _ = write!(
                out,
                "#EXTINF:{:.5},\n{prefix}s{}.m4s{suffix}\n",
                g.duration_s, g.msn
            );
        }
    }
    if s.init().is_some() {
        let _ = writeln!(
            out,
            "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{prefix}p{}.m4s{suffix}\"",
            s.next_part_seq()
        );
    }
    out
}

/// Unix milliseconds as ISO 8601 UTC with milliseconds.
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multivariant_playlist_lists_each_rendition_with_its_attributes() {
        let text = multivariant(&[
            VariantStream {
                uri: "source/index.m3u8".into(),
                bandwidth: 3_000_000,
                average_bandwidth: 2_600_000,
                resolution: Some((1280, 720)),
                codecs: "avc1.64001f,mp4a.40.2".into(),
                fps: Some(30.0),
            },
            VariantStream {
                uri: "240p/index.m3u8".into(),
                bandwidth: 500_000,
                average_bandwidth: 430_000,
                resolution: None,
                codecs: String::new(),
                fps: None,
            },
        ]);
        assert_eq!(
            text,
            "#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n\
             #EXT-X-STREAM-INF:BANDWIDTH=3000000,AVERAGE-BANDWIDTH=2600000,RESOLUTION=1280x720,\
             CODECS=\"avc1.64001f,mp4a.40.2\",FRAME-RATE=30.000\nsource/index.m3u8\n\
             #EXT-X-STREAM-INF:BANDWIDTH=500000,AVERAGE-BANDWIDTH=430000\n240p/index.m3u8\n"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso8601(1_795_223_845_500), "2026-11-21T01:17:25.500Z");
    }
}
