#!/usr/bin/env bash
# Builds the Debian package from a release build: target/debian/tally_<version>-1_<arch>.deb
# (cargo-deb; the package's contents are `[package.metadata.deb]` in agent/Cargo.toml).
# Extra arguments go to cargo-deb (`--output DIR`, `--no-build` to package an existing
# target/release/tally, `--fast`).
#
# Install it with `dpkg -i target/debian/tally_*.deb`: the unit is enabled and started, the
# configuration is /etc/tally/tally.toml. This directory is also cargo-deb's
# `maintainer-scripts`: cargo-deb generates the systemd scripts and merges them into postrm
# (which removes the state directory on purge) at its #DEBHELPER# line.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Pinned: the package layout and maintainer scripts are this version's.
CARGO_DEB_VERSION=3.8.0

dev/deps   # libsystemd-dev, to link sd_notify
if [[ "$(cargo deb --version 2>/dev/null)" != "cargo-deb ${CARGO_DEB_VERSION}" ]]; then
  cargo install cargo-deb --version "${CARGO_DEB_VERSION}" --locked
fi
cargo deb --locked -p tally-agent "$@"
