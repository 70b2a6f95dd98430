//! The budget state file (`state.json`) as the agent reads it back at start: parsed, its windows
//! restored where they fit a budget and then used; and, unreadable, what salvage makes of it.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tally_agent::budget::{salvage, state::State, window::Window};
use tally_agent::config::{policy::Budget, Config};

const POLICY: &str = r#"
[[budget]]
name = "sliding"
resource = "cpu_seconds"
limit = 10.0
window = "1h"

[[budget]]
name = "calendar"
resource = "cpu_seconds"
limit = 10.0
period = "day"

[[budget]]
name = "level"
resource = "gpu_memory_bytes"
limit = 10.0
"#;

static BUDGETS: LazyLock<Vec<Budget>> =
    LazyLock::new(
        || match Config::parse_policy(POLICY, std::path::Path::new("policy.toml")) {
            Ok(file) => file.budget,
            Err(e) => panic!("the fixed policy is valid: {e}"),
        },
    );

fuzz_target!(|data: &[u8]| {
    let budgets = &*BUDGETS;
    let _ = salvage::undos(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(state) = State::parse(text, std::path::Path::new("state.json")) else {
        return;
    };
    for saved in &state.windows {
        for budget in budgets {
            if !saved.window.fits(budget) {
                continue;
            }
            let mut window: Window = saved.window.clone();
            let _ = window.usage(state.saved_at);
            window.add(state.saved_at, 1.0);
            let _ = window.usage(state.saved_at + 1.0);
        }
    }
});
