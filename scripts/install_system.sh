#!/usr/bin/env bash
# System packages the tests use: headless Chromium for page screenshots (HTML pages, the demo).
# Skipped when present; needs root (CI and the dev machines run as root).
set -euo pipefail
# Colour emoji font: the demo's ✨/⭐ glyphs render in screenshots (optional).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! dpkg -s fonts-noto-color-emoji >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null 2>&1 || true
fi
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] installing Debian chromium for headless screenshot tests"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[install] chromium not found and cannot be installed here: browser tests will be skipped"
  fi
fi
