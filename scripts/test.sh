#!/usr/bin/env bash
# The test command: installs what the tests need, builds the guest image the VM tests boot, and
# runs every test (unit, integration, and the end-to-end tests that boot real QEMU VMs).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

cargo build --all-targets
if [ -x scripts/build-guest-image.sh ]; then
  export AGENTLAB_TEST_IMAGES="${AGENTLAB_TEST_IMAGES:-$PWD/target/guest-image/images}"
  AGENTLAB_DATA_DIR="$(dirname "$AGENTLAB_TEST_IMAGES")" \
    scripts/build-guest-image.sh --runner target/debug/agentlab-runner
fi
cargo test --all-targets -- --test-threads="${AGENTLAB_TEST_THREADS:-2}"
