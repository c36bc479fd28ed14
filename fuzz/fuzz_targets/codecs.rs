//! The codec configurations Enhanced RTMP carries besides avcC: hvcC (with its SPS), av1C (with
//! its sequence header OBU) and vpcC, each alone and through `VideoConfig`, and a VP9
//! keyframe's header. Nothing may panic, and what parses must describe a picture a decoder
//! could take.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::codec::{
    VideoCodec, VideoConfig, av1::Av1Info, hevc, hevc::HevcInfo, vp9, vp9::Vp9Info,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = HevcInfo::parse(data) {
        assert!(info.codec.starts_with("hvc1."));
        assert!(info.width > 0 && info.height > 0);
        assert!(matches!(info.length_size, 1 | 2 | 4));
    }
    let _ = hevc::sps_dimensions(data);
    if let Ok(info) = Av1Info::parse(data) {
        assert!(info.codec.starts_with("av01."));
        assert!(info.width > 0 && info.height > 0);
    }
    if let Ok(info) = Vp9Info::parse(data) {
        assert!(matches!(info.bit_depth, 8 | 10 | 12));
    }
    if let Some((w, h)) = vp9::keyframe_size(data) {
        assert!(w > 0 && h > 0);
    }
    for codec in VideoCodec::ALL {
        if let Ok(mut config) = VideoConfig::parse(codec, data) {
            assert_eq!(
                VideoCodec::of_codec_string(&config.codec_string),
                Some(codec)
            );
            // A VP9 record has no size; the "keyframe" here is the same bytes.
            if config.complete_from_keyframe(data) {
                assert!(config.width > 0 && config.height > 0);
            }
        }
    }
});
