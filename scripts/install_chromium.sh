#!/usr/bin/env bash
# Debian's chromium for the web page tests (tests/frontends/test_web.py drives it through Playwright), plus a CJK font so
# screenshots of the Chinese sample data show text rather than boxes. Needs root and apt; safe to run again.
set -euo pipefail
PACKAGES=(chromium fonts-wqy-zenhei)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "installing ${missing[*]} needs root: sudo $0" >&2
  exit 2
fi
if ! command -v apt-get >/dev/null; then
  echo "no apt-get here: install ${missing[*]} with this system's package manager" >&2
  exit 3
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q -o DPkg::Lock::Timeout=120 "${missing[@]}"; }
# A fresh container has no package lists (or stale ones): update and try again when the first try fails.
install || { apt-get update -q -o DPkg::Lock::Timeout=120 && install; }
