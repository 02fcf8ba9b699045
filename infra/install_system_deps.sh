#!/usr/bin/env bash
# Installs the Debian packages the project needs, only when they are missing.
# Open3D's Python wheel links against libusb-1.0 even in its CPU build.
# With --with-browser (the test command), also headless Chromium and its WebDriver, which render
# the HTML run report in the browser test.
set -euo pipefail
missing=()
ldconfig_bin=$(command -v ldconfig || echo /sbin/ldconfig)
"$ldconfig_bin" -p 2>/dev/null | grep -q 'libusb-1.0.so.0' || missing+=(libusb-1.0-0)
if [ "${1:-}" = "--with-browser" ]; then
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "Installing system packages: ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "Need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  sudo_cmd=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
  || { "${sudo_cmd[@]}" apt-get update -q >/dev/null && "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}"; }
