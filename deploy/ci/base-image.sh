#!/usr/bin/env bash
# Builds a stand-in for the python:3.11-slim image with debootstrap, because no image registry can be reached
# here, and writes it as a tarball for `docker import - python:3.11-slim`. Debian 12's python3 is 3.11, as in
# the real image; python3-venv is there because the Dockerfile makes a venv (the real image has it built in).
# usage: deploy/ci/base-image.sh OUT.tar        (root; needs debootstrap; about 1-2 minutes)
# The Debian mirror is the one this machine's apt already uses (override: DEBIAN_MIRROR=URL).
set -euo pipefail
out=${1:?usage: $0 OUT.tar}
[ "$(id -u)" = 0 ] || { echo "$0: must run as root (debootstrap, chroot)" >&2; exit 1; }

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    # deb822 "URIs:" lines or one-line "deb URL suite ..." entries; the first Debian archive that is not security.
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -n -E 's/^URIs:[[:space:]]*([^[:space:]]+).*/\1/p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
        | grep -E '/debian/?$' | head -n 1 || true)
fi
[ -n "$mirror" ] || { echo "$0: no Debian mirror in /etc/apt/sources*; set DEBIAN_MIRROR" >&2; exit 1; }

root=$(mktemp -d /var/tmp/textgen-base.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT
debootstrap --variant=minbase --include=python3-minimal,ca-certificates bookworm "$root" "$mirror" >/dev/null
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    python3 python3-pip python3-venv >/dev/null
# The host's CA bundle: pip inside image builds must trust whatever this machine's PyPI traffic trusts.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# The real image's Python is not Debian-managed; the stand-in should not refuse a system pip install either.
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" --numeric-owner -cf "$out.part" .
mv "$out.part" "$out"
