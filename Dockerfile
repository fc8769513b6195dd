# Root filesystem of the pyvol managed plugin: scripts/build-plugin.sh builds this image and
# exports it into build/rootfs. Works on any Debian-based image with python3 (>= 3.11) and venv.
# Builds with the classic builder as well as BuildKit (no heredocs, no cache mounts).
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

# Optional extra Debian packages for the plugin (space separated), e.g. "rsync xfsprogs".
ARG APT_PACKAGES=""
RUN if [ -n "$APT_PACKAGES" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $APT_PACKAGES \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# The image backend formats, grows and checks ext4 file systems in image files: mkfs.ext4,
# resize2fs and e2fsck (e2fsprogs). Debian minbase has them up to bookworm (so the debootstrap
# fallback of scripts/build-plugin.sh needs no network here); trixie, the base of
# python:3.12-slim since 2025, dropped e2fsprogs from minbase, so install it only when missing.
RUN for t in mkfs.ext4 resize2fs e2fsck; do command -v $t >/dev/null || missing=1; done; \
    if [ -n "${missing:-}" ]; then \
      apt-get update && apt-get install -y --no-install-recommends e2fsprogs \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && command -v mkfs.ext4 && command -v resize2fs && command -v e2fsck

# Volumes made with -o fs=xfs need mkfs.xfs and xfs_growfs (xfsprogs), which no slim or minbase
# image has. Best effort: a build without a reachable mirror still succeeds, and such volumes
# then fail to create with "mkfs.xfs is missing: install xfsprogs".
RUN for t in mkfs.xfs xfs_growfs; do command -v $t >/dev/null || missing=1; done; \
    if [ -n "${missing:-}" ]; then \
      { apt-get update && apt-get install -y --no-install-recommends xfsprogs; } \
        || echo "warning: xfsprogs not installed: -o fs=xfs volumes cannot be created" >&2; \
      rm -rf /var/lib/apt/lists/*; \
    fi

# dockerd requires /run/docker/plugins in a plugin's rootfs; /data and /mnt/pyvol are the
# mount points of config.json.
RUN mkdir -p /run/docker/plugins /data /mnt/pyvol && python3 -m venv /opt/pyvol

# Dependencies in a layer of their own, read from pyproject.toml so they are listed once: a
# code change reuses it. The build backend is downloaded here too, so the last step is offline.
# PIP_CERT: trust the image's CA bundle (which may carry a site CA), not only pip's own.
COPY pyproject.toml /src/
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi \
    && /opt/pyvol/bin/python -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb")); \
open("/src/requirements.txt", "w").write("\n".join(p["project"]["dependencies"]) + "\n"); \
open("/src/build-requirements.txt", "w").write("\n".join(p["build-system"]["requires"]) + "\n")' \
    && /opt/pyvol/bin/pip install --no-cache-dir --disable-pip-version-check -r /src/requirements.txt \
    && /opt/pyvol/bin/pip download --no-cache-dir --disable-pip-version-check -q \
       --dest /src/wheels -r /src/build-requirements.txt

COPY plugin/ /src/plugin/
COPY backends/ /src/backends/
COPY snapshots/ /src/snapshots/
COPY s3sync/ /src/s3sync/
RUN /opt/pyvol/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps \
      --no-index --find-links /src/wheels /src \
    && rm -rf /src \
    && test -x /opt/pyvol/bin/pyvol
