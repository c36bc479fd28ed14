//! An AudioSpecificConfig, and the ADTS header built from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::codec::aac::AudioSpecificConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(asc) = AudioSpecificConfig::parse(data) {
        let _ = asc.codec();
        let _ = asc.channels();
        for len in [0, 1, 7, 8191, 8192, usize::MAX] {
            let _ = asc.adts_header(len);
        }
    }
});
