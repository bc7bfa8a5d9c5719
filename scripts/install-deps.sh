#!/usr/bin/env bash
# Installs what AgentLab needs to build, run real VMs and run its tests on Debian 12: QEMU, the
# guest image's ingredients, and (if missing) a Rust toolchain. Safe to rerun: it installs only
# what is missing.
set -euo pipefail

packages=(
  qemu-system-x86 qemu-utils qemu-guest-agent busybox-static linux-image-amd64
  dosfstools mtools socat git cpio e2fsprogs ca-certificates curl gcc libc6-dev pkg-config
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "install-deps: cargo is in ~/.cargo/bin; add it to PATH (source ~/.cargo/env)" >&2
  else
    # Debian 12's own rustc is too old for the dependencies; rustup installs a current one.
    echo "install-deps: installing Rust with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi
echo "install-deps: ok" >&2
