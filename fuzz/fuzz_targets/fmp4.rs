//! The fMP4 muxer the player and the HLS packager share: arbitrary tracks and samples in, and
//! whatever it writes, mp4-atom's parser reads (the codec configurations are real ones: they
//! are written verbatim, so their own validity is not the muxer's).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mp4_atom::Decode as _;
use onair_protocol::codec::VideoCodec;
use onair_protocol::fmp4::{self, Codec, Run, Sample, Track};

/// A real x264 avcC (High, level 3.1, 1280x720), as in fmp4.rs's tests.
const AVCC: &[u8] = &[
    1, 100, 0, 31, 0xff, 0xe1, 0, 28, 103, 100, 0, 31, 172, 217, 128, 80, 5, 187, 1, 106, 2, 2, 2,
    128, 0, 0, 3, 0, 128, 0, 0, 30, 7, 140, 24, 205, 1, 0, 5, 104, 233, 123, 44, 139,
];
/// AAC-LC, 44.1 kHz, stereo.
const ASC: &[u8] = &[0x12, 0x10];

#[derive(Arbitrary, Debug)]
struct Input {
    tracks: Vec<TrackIn>,
    runs: Vec<RunIn>,
    sequence: u32,
}

#[derive(Arbitrary, Debug)]
struct TrackIn {
    id: u32,
    timescale: u32,
    video: bool,
    width: u16,
    height: u16,
    sample_rate: u32,
    channels: u8,
}

#[derive(Arbitrary, Debug)]
struct RunIn {
    track_id: u32,
    base_dts: u64,
    /// (duration, size, cts, keyframe): sizes small, so that the mdat stays small.
    samples: Vec<(u32, u8, i32, bool)>,
}

fuzz_target!(|input: Input| {
    let tracks: Vec<Track<'_>> = input
        .tracks
        .iter()
        .take(4)
        .map(|t| Track {
            id: t.id,
            timescale: t.timescale,
            codec: if t.video {
                Codec::Video {
                    codec: VideoCodec::Avc,
                    width: t.width,
                    height: t.height,
                    config: AVCC,
                }
            } else {
                Codec::Aac {
                    sample_rate: t.sample_rate,
                    channels: t.channels,
                    asc: ASC,
                }
            },
        })
        .collect();
    if let Ok(init) = fmp4::init_segment(&tracks) {
        let mut buf = init.as_slice();
        mp4_atom::Ftyp::decode(&mut buf).expect("ftyp");
        mp4_atom::Moov::decode(&mut buf).expect("moov");
        assert!(buf.is_empty(), "{} bytes after moov", buf.len());
    }

    let samples: Vec<Vec<Sample>> = input
        .runs
        .iter()
        .take(4)
        .map(|r| {
            r.samples
                .iter()
                .take(256)
                .map(|&(duration, size, cts, keyframe)| Sample {
                    duration,
                    size: u32::from(size),
                    cts,
                    keyframe,
                })
                .collect()
        })
        .collect();
    let runs: Vec<Run<'_>> = input
        .runs
        .iter()
        .zip(&samples)
        .map(|(r, s)| Run {
            track_id: r.track_id,
            base_dts: r.base_dts,
            samples: s,
        })
        .collect();
    let mut out = Vec::new();
    if fmp4::write_fragment_header(&mut out, input.sequence, &runs).is_ok() {
        assert_eq!(out.len(), fmp4::fragment_header_len(&runs));
        let body: usize = samples.iter().flatten().map(|s| s.size as usize).sum();
        out.resize(out.len() + body, 0xAB);
        let mut buf = out.as_slice();
        let moof = mp4_atom::Moof::decode(&mut buf).expect("moof");
        let mdat = mp4_atom::Mdat::decode(&mut buf).expect("mdat");
        assert!(buf.is_empty());
        assert_eq!(mdat.data.len(), body);
        assert_eq!(moof.traf.len(), runs.len());
    } else {
        assert!(out.is_empty(), "nothing appended on error");
    }
});
