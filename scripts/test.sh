#!/usr/bin/env bash
# The test command: installs what the tests need, checks formatting and lints, builds the guest
# images the VM tests boot (the busybox test template, the Debian 12 agent template, and the
# whole-disk Debian image the template import is tested with), and runs every test (unit,
# integration, and the end-to-end tests that boot real QEMU VMs).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

# Formatting and lints gate the run before any test does. rustup's minimal profile has neither
# rustfmt nor clippy: add them when rustup can, else say exactly what is missing.
for component in rustfmt:fmt clippy:clippy; do
  if ! cargo "${component#*:}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      rustup component add "${component%%:*}" || true
    fi
    if ! cargo "${component#*:}" --version >/dev/null 2>&1; then
      echo "test.sh: \`cargo ${component#*:}\` is not available: install the ${component%%:*} component" \
        "(rustup component add ${component%%:*})" >&2
      exit 1
    fi
  fi
done
cargo fmt --check
cargo clippy --all-targets -- -D warnings

cargo build --all-targets
if [ -x scripts/build-guest-image.sh ]; then
  export AGENTLAB_TEST_IMAGES="${AGENTLAB_TEST_IMAGES:-$PWD/target/guest-image/images}"
  AGENTLAB_DATA_DIR="$(dirname "$AGENTLAB_TEST_IMAGES")" \
    scripts/build-guest-image.sh --runner target/debug/agentlab-runner
  # The Debian 12 template (tests/debian_template.rs), next to it in images/debian-12/, and the
  # whole-disk image (a stock cloud image look-alike: partition table, GRUB, its own kernel and
  # initramfs) in disk-images/. Both come from one mmdebstrap run when both are out of date
  # (build-disk-image.sh runs its own when only the disk image is). mmdebstrap needs root.
  export AGENTLAB_TEST_DEBIAN_IMAGES="${AGENTLAB_TEST_DEBIAN_IMAGES:-$AGENTLAB_TEST_IMAGES}"
  export AGENTLAB_TEST_DISK_IMAGE="${AGENTLAB_TEST_DISK_IMAGE:-$(dirname "$AGENTLAB_TEST_IMAGES")/disk-images/debian-12-disk.qcow2}"
  debian_build=(env AGENTLAB_DATA_DIR="$(dirname "$AGENTLAB_TEST_DEBIAN_IMAGES")"
    scripts/build-guest-image.sh --distro debian --runner target/debug/agentlab-runner
    --disk-image "$AGENTLAB_TEST_DISK_IMAGE")
  if [ "$(id -u)" -ne 0 ]; then
    debian_build=(sudo "${debian_build[@]}")
  fi
  "${debian_build[@]}"
fi
cargo test --all-targets -- --test-threads="${AGENTLAB_TEST_THREADS:-2}"
