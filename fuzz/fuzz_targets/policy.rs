//! A policy file (`enforcement.policy_file`): budgets and prices, and what the engine derives
//! from an accepted budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_agent::budget::window::Window;
use tally_agent::config::{policy, Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse_policy(text, std::path::Path::new("policy.toml")) {
        Ok(file) => {
            for budget in &file.budget {
                let mut window = Window::for_budget(budget);
                assert!(window.fits(budget));
                window.add(1.7e9, 1.0);
                let _ = window.usage(1.7e9);
                let _ = policy::rate(budget);
                let _ = policy::actuator_target(budget);
            }
        }
        Err(errors) => {
            let _ = errors.to_string();
        }
    }
});
