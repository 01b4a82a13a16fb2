#!/usr/bin/env bash
# `make image`: build harvester's container image with whatever this machine has.
#
#   builder: Docker when a Docker engine answers, else buildah (Debian's package; no daemon)
#   base:    the registry's python:3.11-slim when it can be pulled, else a base assembled from
#            Debian bookworm packages (debootstrap: python3, pip, venv, CA certificates)
#
# Either way the same Dockerfile builds it (its PYTHON_IMAGE argument names the base), so the
# image has the same layout, user and entrypoint. Environment:
#   IMAGE=harvester:dev        the tag to build
#   HARVESTER_IMAGE_BASE=...   skip the base choice and use this image as the base
#   HARVESTER_IMAGE_CACHE=...  where the debootstrapped tree is kept between builds
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-harvester:dev}
CACHE=${HARVESTER_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/harvester-image}
REGISTRY_BASE=python:3.11-slim
DEBIAN_BASE=localhost/harvester-python-base:bookworm
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE=${HARVESTER_IMAGE_SOURCE:-https://github.com/harvester-dev/harvester}
CREATED=$(git log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)

say() { printf 'make image: %s\n' "$*" >&2; }

if command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then
    builder=docker
elif command -v buildah >/dev/null; then
    builder=buildah
    # chroot isolation needs no user namespaces or container runtime: it works inside CI
    # sandboxes and unprivileged containers where the default (OCI) isolation does not.
    export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
else
    say "neither a Docker engine nor buildah is available (Debian: apt-get install buildah)"
    exit 2
fi

have_image() {
    if [ "$builder" = docker ]; then docker image inspect "$1" >/dev/null 2>&1
    else buildah inspect --type image "$1" >/dev/null 2>&1; fi
}

# A base assembled from Debian packages: what python:3.11-slim gives the Dockerfile (python,
# pip, groupadd/useradd, CA certificates), from this machine's configured Debian mirror.
debian_base() {
    have_image "$DEBIAN_BASE" && return 0
    command -v debootstrap >/dev/null || {
        say "no registry base and no debootstrap (Debian: apt-get install debootstrap)"
        exit 2
    }
    local rootfs="$CACHE/rootfs" mirror
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    mirror=${mirror:-http://deb.debian.org/debian}
    if [ ! -x "$rootfs/usr/bin/python3" ]; then
        say "assembling a Debian bookworm base in $rootfs (about a minute)"
        rm -rf "$rootfs" && mkdir -p "$rootfs"
        debootstrap --variant=minbase \
            --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
            bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    fi
    # This machine reaches the package registries only through its own CA bundle (a proxy
    # may re-sign TLS), so pip inside the build needs the same bundle.
    [ -f /etc/ssl/certs/ca-certificates.crt ] \
        && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    if [ "$builder" = docker ]; then
        tar -C "$rootfs" -c . | docker import \
            -c 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' -c 'CMD ["python3"]' - "$DEBIAN_BASE" >/dev/null
    else
        local ctr
        ctr=$(buildah from scratch)
        buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
        # Debian marks its Python "externally managed" (PEP 668); the image is a single
        # application, so pip may install into it as it does into python:3.11-slim.
        buildah config --env PIP_BREAK_SYSTEM_PACKAGES=1 --cmd python3 "$ctr"
        buildah commit --quiet "$ctr" "$DEBIAN_BASE" >/dev/null
        buildah rm "$ctr" >/dev/null
    fi
}

if [ -n "${HARVESTER_IMAGE_BASE:-}" ]; then
    base=$HARVESTER_IMAGE_BASE
elif have_image "$REGISTRY_BASE" || timeout 30 "$builder" pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
    base=$REGISTRY_BASE
else
    say "$REGISTRY_BASE cannot be pulled here; using a base built from Debian packages"
    debian_base
    base=$DEBIAN_BASE
fi

say "building $IMAGE with $builder from $base"
args=(--build-arg "PYTHON_IMAGE=$base" --build-arg "VERSION=$VERSION"
      --build-arg "REVISION=$REVISION" --build-arg "SOURCE=$SOURCE"
      --build-arg "CREATED=$CREATED" -t "$IMAGE" .)
if [ "$builder" = docker ]; then
    DOCKER_BUILDKIT=1 docker build "${args[@]}"
else
    # No --layers: buildah 1.28 cannot bind-mount a stage that came whole from its layer
    # cache (RUN --mount=...,from=builder finds no /wheels), so a second build of the same
    # source failed. Each build starts from the (cached) base instead.
    buildah build --pull=never --format docker "${args[@]}"
fi
say "built $IMAGE"
