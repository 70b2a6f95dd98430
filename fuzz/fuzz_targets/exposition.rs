//! What an inference server answers: the exposition text parsed with every engine's mapping and
//! converted to readings, which must be finite, non-negative and a KV ratio within 0..=1.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_agent::inference::{engines, exposition};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = exposition::parse(&text, |_| true);
    for engine in engines::ENGINES {
        let Ok(samples) = exposition::parse(&text, |n| engine.wants(n)) else {
            continue;
        };
        for (_, r) in engine.convert(&samples, "fuzz") {
            let values = r.tokens.iter().flatten().chain(r.requests.values());
            let values = values.chain(r.kv_capacity.iter()).chain(r.prefix_hits.iter());
            for v in values {
                assert!(*v >= 0.0 && !v.is_nan(), "{v}");
            }
            assert!(r.kv_usage.is_none_or(|u| (0.0..=1.0).contains(&u)));
        }
    }
});
