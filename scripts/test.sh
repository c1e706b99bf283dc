#!/usr/bin/env bash
# The project's test command (README.md). Builds the binaries the end-to-end
# tests start, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace --all-targets --no-fail-fast "$@"
