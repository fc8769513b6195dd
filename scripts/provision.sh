#!/usr/bin/env bash
# Provision a Debian 12 machine for pyvol's tests: Debian packages, a running Docker engine,
# the test images pyvol-test/busybox:latest and pyvol-test/python:bookworm, and a local
# registry on 127.0.0.1:5000.
#
# Usage: scripts/provision.sh [all | packages | engine | images | registry]...   (default: all)
#
# Idempotent: each step first checks and only does work when something is missing, so a
# re-run on a provisioned machine takes about a second. Without root or apt-get it only
# checks and says what is missing. Prints one line per step; exits non-zero on failure.
#
# Environment: PYVOL_CACHE (default ~/.cache/pyvol) holds the debootstrap tarball, logs and
# the registry config; PYVOL_DEBIAN_MIRROR overrides the mirror read from the apt sources.
set -euo pipefail

PACKAGES=(docker.io docker-registry busybox-static debootstrap docker-compose xfsprogs btrfs-progs rsync)
CACHE=${PYVOL_CACHE:-$HOME/.cache/pyvol}
BUSYBOX_IMAGE=pyvol-test/busybox:latest
PYTHON_IMAGE=pyvol-test/python:bookworm
PYTHON_TARBALL=$CACHE/bookworm-minbase-python3.tar
REGISTRY_ADDR=127.0.0.1:5000
DOCKERD_LOG=/var/log/pyvol-dockerd.log
PATH=$PATH:/usr/sbin:/sbin

say() { printf 'provision: %-8s %s\n' "$1" "$2"; }
die() { printf 'provision: ERROR: %s\n' "$*" >&2; exit 1; }
took() { printf '(%ss)' "$((SECONDS - $1))"; }
can_install() { [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; }
# The last lines of a log, indented, for error messages.
log_tail() { tail -n "${2:-15}" "$1" 2>/dev/null | sed 's/^/    /' >&2 || true; }

step_packages() {
  local t0=$SECONDS missing=() p
  if ! command -v dpkg-query >/dev/null; then
    for p in docker dockerd docker-registry busybox debootstrap; do
      command -v "$p" >/dev/null || missing+=("$p")
    done
    ((${#missing[@]} == 0)) || die "not a Debian system and missing commands: ${missing[*]}"
    say packages "no dpkg; the needed commands are present"
    return
  fi
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' ok installed$' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    say packages "all ${#PACKAGES[@]} present $(took "$t0")"
    return
  fi
  can_install || die "missing Debian packages: ${missing[*]}. Run as root on a Debian system:" \
    "apt-get update && apt-get install -y ${missing[*]}"
  mkdir -p "$CACHE"
  local log=$CACHE/apt.log
  if ! { apt-get update -q && apt-get install -y -q "${missing[@]}"; } >"$log" 2>&1 </dev/null; then
    log_tail "$log"
    die "apt-get could not install: ${missing[*]} (full log: $log)"
  fi
  say packages "installed ${missing[*]} $(took "$t0")"
}

step_engine() {
  local t0=$SECONDS
  if docker info >/dev/null 2>&1; then
    say engine "running, server $(docker version --format '{{.Server.Version}}' 2>/dev/null) $(took "$t0")"
    return
  fi
  command -v docker >/dev/null || die "no docker client (Debian package docker.io)"
  command -v dockerd >/dev/null || die "docker info fails and there is no dockerd to start (Debian package docker.io)"
  [[ $EUID -eq 0 ]] || die "docker info fails and only root can start dockerd: $(docker info 2>&1 | tail -n 1)"
  local pid
  if pid=$(pidof -s dockerd); then
    say engine "dockerd (pid $pid) is running but not answering yet; waiting"
  else
    # dockerd needs the cgroup hierarchies; cgroupfs-mount (recommended by docker.io) mounts them.
    if ! mountpoint -q /sys/fs/cgroup && command -v cgroupfs-mount >/dev/null; then
      cgroupfs-mount
    fi
    # No dockerd runs, so a pid file is stale (left by a killed one); dockerd refuses to start
    # while the pid in it is alive, which a reused pid or a not yet reaped zombie can be.
    rm -f /var/run/docker.pid
    # From /: a daemon must not hold this checkout (or any directory that may go) as its cwd.
    (cd / && exec nohup setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null) &
    pid=$!
  fi
  local i
  for ((i = 0; i < 60; i++)); do
    if docker info >/dev/null 2>&1; then
      say engine "started dockerd (pid $pid, log $DOCKERD_LOG) $(took "$t0")"
      return
    fi
    kill -0 "$pid" 2>/dev/null || { log_tail "$DOCKERD_LOG"; die "dockerd exited; see $DOCKERD_LOG"; }
    sleep 1
  done
  log_tail "$DOCKERD_LOG"
  die "dockerd (pid $pid) did not answer docker info within 60 s; see $DOCKERD_LOG"
}

# Temporary directories, removed on exit. debootstrap mounts /proc and /sys inside its target,
# so unmount first and never let rm cross into another file system.
TMPDIRS=()
cleanup() {
  local d m
  for d in "${TMPDIRS[@]}"; do
    for m in dev/pts proc sys; do
      mountpoint -q "$d/$m" 2>/dev/null && umount -R "$d/$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$d"
  done
}
trap cleanup EXIT

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

build_busybox_image() {
  local t0=$SECONDS bb=/bin/busybox
  if have_image "$BUSYBOX_IMAGE"; then
    say images "$BUSYBOX_IMAGE present"
    return
  fi
  [[ -x $bb ]] || die "$bb is missing (Debian package busybox-static)"
  ! ldd "$bb" >/dev/null 2>&1 || die "$bb is dynamically linked: install busybox-static"
  local dir
  dir=$(mktemp -d /tmp/pyvol-busybox.XXXXXX)
  TMPDIRS+=("$dir")
  mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev}
  chmod 1777 "$dir/tmp"
  cp "$bb" "$dir/bin/busybox"
  chroot "$dir" /bin/busybox --install -s
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    >"$dir/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$dir/etc/group"
  tar -C "$dir" --numeric-owner -c . |
    docker import --change 'CMD ["sh"]' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - "$BUSYBOX_IMAGE" >/dev/null
  say images "built $BUSYBOX_IMAGE $(took "$t0")"
}

# The Debian mirror of the host's apt sources (deb822 .sources or one-line .list), for bookworm.
debian_mirror() {
  if [[ -n ${PYVOL_DEBIAN_MIRROR:-} ]]; then
    echo "$PYVOL_DEBIAN_MIRROR"
    return
  fi
  local m="" f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    m=$(awk 'BEGIN { RS = "" }
      /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t\n]|$)/ && !/(^|\n)Enabled:[ \t]*no/ {
        if (match($0, /URIs:[ \t]*[^ \t\n]+/)) {
          u = substr($0, RSTART, RLENGTH); sub(/^URIs:[ \t]*/, "", u); print u; exit
        }
      }' "$f")
    [[ -z $m ]] || break
  done
  if [[ -z $m ]]; then
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '$1 == "deb" && / bookworm( |$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }')
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

build_python_image() {
  local t0=$SECONDS
  if have_image "$PYTHON_IMAGE"; then
    say images "$PYTHON_IMAGE present"
    return
  fi
  [[ $EUID -eq 0 ]] || die "building $PYTHON_IMAGE needs root (debootstrap, chroot)"
  command -v debootstrap >/dev/null || die "no debootstrap (Debian package debootstrap)"
  mkdir -p "$CACHE"
  local dir how
  dir=$(mktemp -d /var/tmp/pyvol-rootfs.XXXXXX)
  TMPDIRS+=("$dir")
  if [[ -s $PYTHON_TARBALL ]]; then
    how="from cached $PYTHON_TARBALL"
    tar -C "$dir" --numeric-owner -xpf "$PYTHON_TARBALL"
  else
    local mirror log=$CACHE/debootstrap.log
    mirror=$(debian_mirror)
    how="debootstrap from $mirror"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$dir" "$mirror" >"$log" 2>&1 </dev/null; then
      log_tail "$log"
      die "debootstrap failed (full log: $log)"
    fi
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb "$dir"/var/log/*.log
    tar -C "$dir" --numeric-owner -cf "$PYTHON_TARBALL.tmp" .
    mv "$PYTHON_TARBALL.tmp" "$PYTHON_TARBALL"
  fi
  # The host's CA bundle, so that pip inside containers trusts what the host trusts. It is
  # added at import time (not cached) and also kept as a local CA, so that a later
  # update-ca-certificates inside an image built on this one keeps it.
  install -m 0644 /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt \
    "$dir/usr/local/share/ca-certificates/pyvol-host-bundle.crt"
  tar -C "$dir" --numeric-owner -c . |
    docker import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - "$PYTHON_IMAGE" >/dev/null
  say images "built $PYTHON_IMAGE, $how $(took "$t0")"
}

step_images() {
  docker info >/dev/null 2>&1 || die "no Docker engine answering: run scripts/provision.sh engine first"
  build_busybox_image
  build_python_image
}

registry_up() { curl -fsS -o /dev/null --max-time 5 "http://$REGISTRY_ADDR/v2/" 2>/dev/null; }

step_registry() {
  local t0=$SECONDS
  if registry_up; then
    say registry "answering on $REGISTRY_ADDR"
    return
  fi
  command -v docker-registry >/dev/null || die "no registry on $REGISTRY_ADDR and no docker-registry to start (Debian package docker-registry)"
  mkdir -p "$CACHE"
  local storage config=$CACHE/registry.yml log=$CACHE/registry.log pidfile pid
  storage=$(mktemp -d /tmp/pyvol-registry.XXXXXX)
  cat >"$config" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $storage
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
EOF
  nohup setsid docker-registry serve "$config" >>"$log" 2>&1 </dev/null &
  pid=$!
  pidfile=/run/pyvol-registry.pid
  { echo "$pid" >"$pidfile"; } 2>/dev/null || { pidfile=$CACHE/registry.pid; echo "$pid" >"$pidfile"; }
  local i
  for ((i = 0; i < 50; i++)); do
    if registry_up; then
      say registry "started docker-registry on $REGISTRY_ADDR (pid $pid in $pidfile, storage $storage) $(took "$t0")"
      return
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  log_tail "$log"
  die "docker-registry did not answer on http://$REGISTRY_ADDR/v2/ (log: $log)"
}

main() {
  local steps=("$@") s
  ((${#steps[@]})) || steps=(all)
  for s in "${steps[@]}"; do
    case $s in
      all) step_packages; step_engine; step_images; step_registry ;;
      packages | engine | images | registry) "step_$s" ;;
      *) die "unknown step '$s' (all, packages, engine, images, registry)" ;;
    esac
  done
}

export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a
main "$@"
