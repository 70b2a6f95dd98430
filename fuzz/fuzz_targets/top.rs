//! `tally top`: the HTTP body (chunked or not) of an agent's `/metrics`, parsed, turned into
//! rows and rates, and rendered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_agent::top;

fuzz_target!(|data: &[u8]| {
    let _ = top::dechunk(data);
    let text = String::from_utf8_lossy(data);
    let series = top::parse(&text);
    let rows = top::rows(&series);
    let rates = top::rates(&rows, &rows, 1.0);
    let _ = top::render(&rates, 20, "fuzz");
});
