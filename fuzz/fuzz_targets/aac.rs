//! An AudioSpecificConfig, the ADTS header built from it, and ADTS frames as a TS PES carries
//! them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::codec::aac::{AudioSpecificConfig, split_adts};

fuzz_target!(|data: &[u8]| {
    if let Ok(asc) = AudioSpecificConfig::parse(data) {
        let _ = asc.codec();
        let _ = asc.channels();
        for len in [0, 1, 7, 8191, 8192, usize::MAX] {
            let _ = asc.adts_header(len);
        }
        assert_eq!(AudioSpecificConfig::parse(&asc.to_bytes()), Ok(asc));
    }
    let mut total = 0;
    for frame in split_adts(data) {
        let Ok((header, raw)) = frame else {
            break;
        };
        assert_eq!(raw.len() + header.header_length(), header.aac_frame_length);
        assert_eq!(
            AudioSpecificConfig::parse(&header.audio_specific_config()),
            Ok(header.config)
        );
        total += header.aac_frame_length;
    }
    assert!(total <= data.len());
});
