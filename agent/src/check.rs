//! `tally check`: the node readiness report (being written).
