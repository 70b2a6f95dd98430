//! The agent's TOML configuration: validation reports errors, never panics, and what it
//! accepts is what the agent's accessors rely on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            // Validation guarantees these.
            assert!(config.listen_addr().is_ok(), "{text:?}");
            let _ = config.tick_interval();
            let _ = config.grace_period();
            let _ = config.hostname();
            let _ = config.node_name();
            let _ = config.network.ranges();
        }
        Err(errors) => {
            let _ = errors.to_string();
        }
    }
});
