#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine:
# the project with its test extras, and the real SIP peers the interop tests drive.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1; then
  need=()
  command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
  command -v sipsak >/dev/null 2>&1 || need+=(sipsak)
  command -v baresip >/dev/null 2>&1 || need+=(baresip-core)
  command -v linphonec >/dev/null 2>&1 || need+=(linphone-cli)
  command -v svcrack >/dev/null 2>&1 || need+=(sipvicious)
  command -v sngrep >/dev/null 2>&1 || need+=(sngrep)  # reads the --hep stream in the tests
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
