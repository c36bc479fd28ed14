//! MPEG-TS: the demuxer SRT ingest feeds, given the input in two pushes split at the first
//! byte's value, must give what one push of it gives, keep within its PES bounds, and hand out
//! ADTS that splits without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::codec::aac::split_adts;
use onair_protocol::ts::{MAX_AUDIO_PES, MAX_VIDEO_PES, TsDemuxer, TsStreamType};

fuzz_target!(|data: &[u8]| {
    let split = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let (head, tail) = data.split_at(split);

    let mut two = TsDemuxer::new();
    let mut frames = Vec::new();
    let failed = two.push(head, &mut frames).is_err() | two.push(tail, &mut frames).is_err();
    two.finish(&mut frames);

    let mut one = TsDemuxer::new();
    let mut once = Vec::new();
    assert_eq!(one.push(data, &mut once).is_err(), failed);
    one.finish(&mut once);
    assert_eq!(frames, once, "the chunking changed the frames");
    assert_eq!(two.stats(), one.stats());

    for f in &frames {
        assert!(f.pts < 1 << 33 && f.dts < 1 << 33);
        assert!(!f.data.is_empty());
        match f.stream {
            TsStreamType::H264 | TsStreamType::Hevc => assert!(f.data.len() <= MAX_VIDEO_PES),
            TsStreamType::Aac => {
                assert!(f.data.len() <= MAX_AUDIO_PES);
                for frame in split_adts(&f.data) {
                    if let Ok((header, raw)) = frame {
                        assert_eq!(raw.len() + header.header_length(), header.aac_frame_length);
                    }
                }
            }
        }
    }
    let stats = one.stats();
    assert_eq!(stats.skipped_bytes + stats.packets * 188, data.len() as u64);
});
