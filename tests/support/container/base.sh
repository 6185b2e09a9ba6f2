#!/usr/bin/env bash
# A local stand-in for the Dockerfile's python:3.11-slim-bookworm base, for `podman build --from`:
# Debian bookworm from debootstrap (Docker Hub is not reachable where the tests run), Python 3.11 from
# Debian.  Like the real base, it trusts only Debian's CA bundle: a TLS-intercepting proxy's CA reaches
# the build as the Dockerfile's `extra_ca` secret.
# Built once and kept in podman's storage under $BASE_TAG; a second run returns at once.
set -euo pipefail
BASE_TAG=${BASE_TAG:-localhost/agentd-test-base:bookworm-1}
PODMAN=(podman --runtime /usr/sbin/runc)
if "${PODMAN[@]}" image exists "$BASE_TAG"; then
    echo "$BASE_TAG"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
tar -C "$work/rootfs" -c . | "${PODMAN[@]}" import - localhost/agentd-test-debootstrap:bookworm >/dev/null
cat >"$work/Containerfile" <<'CONTAINERFILE'
FROM localhost/agentd-test-debootstrap:bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python && ln -s /usr/bin/pip3 /usr/local/bin/pip
ENV PIP_BREAK_SYSTEM_PACKAGES=1 LANG=C.UTF-8
CMD ["python3"]
CONTAINERFILE
"${PODMAN[@]}" build --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 --network host \
    -t "$BASE_TAG" -f "$work/Containerfile" "$work" >"$work/build.log" 2>&1 \
    || { tail -20 "$work/build.log" >&2; exit 1; }
"${PODMAN[@]}" rmi localhost/agentd-test-debootstrap:bookworm >/dev/null
echo "$BASE_TAG"
