#!/usr/bin/env bash
# Build the pyvol managed plugin and create it in the local engine.
#
# Usage: scripts/build-plugin.sh [--enable]
#   PLUGIN_NAME  plugin name, may carry a registry and tag (default pyvol; e.g. 127.0.0.1:5000/pyvol:dev)
#   BASE_IMAGE   Debian-based image with python3 >= 3.11 and venv (default python:3.12-slim)
#   APT_PACKAGES extra Debian packages for the plugin's rootfs (default none)
#
# Steps: docker build of the Dockerfile, docker export of it into build/rootfs, config.json
# copied to build/, any plugin of the same name force-removed, docker plugin create.
# --enable then creates the data directory on the host (config.json's mount "data") and runs
# docker plugin enable. If BASE_IMAGE is neither local nor pullable (no Docker Hub), falls back
# to pyvol-test/python:bookworm, built by scripts/provision.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PLUGIN_NAME=${PLUGIN_NAME:-pyvol}
BASE_IMAGE=${BASE_IMAGE:-python:3.12-slim}
APT_PACKAGES=${APT_PACKAGES:-}
FALLBACK_IMAGE=pyvol-test/python:bookworm
ROOTFS_IMAGE=pyvol-plugin-rootfs:latest
BUILD_DIR=build
enable=false
case ${1:-} in
  --enable) enable=true ;;
  "") ;;
  *) echo "usage: $0 [--enable]" >&2; exit 2 ;;
esac

say() { printf 'build-plugin: %s\n' "$*"; }

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  if ! pull_error=$(docker pull -q "$BASE_IMAGE" 2>&1 >/dev/null); then
    say "note: $BASE_IMAGE is not local and cannot be pulled ($(tail -n 1 <<<"$pull_error"));" \
      "using $FALLBACK_IMAGE instead"
    docker image inspect "$FALLBACK_IMAGE" >/dev/null 2>&1 || scripts/provision.sh images
    BASE_IMAGE=$FALLBACK_IMAGE
  fi
fi

say "building $ROOTFS_IMAGE FROM $BASE_IMAGE"
docker build --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg APT_PACKAGES="$APT_PACKAGES" \
  -t "$ROOTFS_IMAGE" .

say "exporting it into $BUILD_DIR/rootfs"
rm -rf "$BUILD_DIR/rootfs"
mkdir -p "$BUILD_DIR/rootfs"
cid=$(docker create "$ROOTFS_IMAGE" /opt/pyvol/bin/pyvol)
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true' EXIT
docker export "$cid" | tar -C "$BUILD_DIR/rootfs" -x
docker rm "$cid" >/dev/null
# config.json's "linux" section asks for what the plugin uses, checked with a throwaway plugin
# (dockerd 20.10, runc 1.1): CAP_SYS_ADMIN for mount(2), both the bind mounts that hand volumes
# to containers and the image backend's ext4 mounts, and for the loop ioctls; allowAllDevices
# because the image backend opens /dev/loop-control (c 10:237) and /dev/loopN (b 7:N), whose
# minor is only known at run time (LOOP_CTL_GET_FREE adds a new one when all are busy).
# linux.devices cannot do that: each entry becomes an exact major:minor rule for a node that
# exists when the plugin starts, so a /dev/loopN added later fails to open with EPERM, and
# config.json has no "b 7:* rwm" rule. The plugin mknods the nodes in its own /dev (a tmpfs)
# with CAP_MKNOD, which every plugin has by default.
cp config.json "$BUILD_DIR/config.json"

if docker plugin inspect "$PLUGIN_NAME" >/dev/null 2>&1; then
  say "removing the existing plugin $PLUGIN_NAME"
  docker plugin rm -f "$PLUGIN_NAME" >/dev/null
fi
say "creating plugin $PLUGIN_NAME"
docker plugin create "$PLUGIN_NAME" "$BUILD_DIR" >/dev/null

if $enable; then
  # A bind mount's source must exist on the host: neither dockerd nor runc creates it.
  data_dir=$(python3 -c 'import json, sys
print(next(m["source"] for m in json.load(open(sys.argv[1]))["mounts"] if m["name"] == "data"))' config.json)
  mkdir -p "$data_dir"
  docker plugin enable "$PLUGIN_NAME" >/dev/null
  say "enabled plugin $PLUGIN_NAME (data in $data_dir)"
fi
