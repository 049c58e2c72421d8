#!/usr/bin/env bash
# Set up everything clusterfs needs on a Debian 12 host (as root), then run one job:
#   tools/run.sh demo [DIR]   the main job: `clusterfs demo`
#   tools/run.sh test [ARGS]  ruff, mypy and the whole test suite (ARGS go to pytest)
#   tools/run.sh setup        set up only
# Idempotent: packages already present are not installed again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv qemu-utils libnbd-bin
              nbdkit fio iproute2 qemu-block-extra libiscsi-bin tgt)
VENV=.venv

install_apt_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "setup: installing ${missing[*]}" >&2
        apt-get update -qq
        # tgt would start a system tgtd on port 3260 when installed: the benchmark runs its
        # own, so no service may start (policy-rc.d, as Debian's container images have it).
        local policy=/usr/sbin/policy-rc.d made_policy="" status=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || status=$?
        if [ -n "$made_policy" ]; then rm -f "$policy"; fi
        return "$status"
    fi
}

install_venv() {
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # The stamp makes a second run fast; it is invalidated by a change of setup.cfg.
    local stamp="$VENV/.installed-$(sha1sum setup.cfg | cut -c1-12)"
    if [ ! -e "$stamp" ]; then
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q -e '.[test]'
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

job=${1:-setup}
shift || true
install_apt_packages
install_venv
modprobe fuse 2>/dev/null || true

case "$job" in
    setup) ;;
    demo) exec "$VENV/bin/clusterfs" demo "$@" ;;
    test)
        "$VENV/bin/ruff" check .
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *) echo "usage: tools/run.sh demo|test|setup" >&2; exit 2 ;;
esac
