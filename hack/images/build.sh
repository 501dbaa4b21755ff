#!/usr/bin/env bash
# make images: builds the Dockerfile's two targets daemonless with buildah, tagged
#   localhost/finetune-operator:dev  (target operator)
#   localhost/finetune-trainer:dev   (target trainer)
# (the tags are tests/harness/images.py's; podman/buildah always run with hack/images/containers.conf).
#
# Bases: the Dockerfile's defaults (python slim, nvidia/cuda, ghcr.io/astral-sh/uv) are used when they are
# in local storage or can be pulled. Where no registry answers, local stand-ins are built once and passed
# as --build-arg PYTHON_IMAGE/CUDA_IMAGE/UV_IMAGE (the Dockerfile stays the one `docker build` uses):
#   localhost/finetune-standin-python:bookworm  debootstrap minbase bookworm + python3 (3.11), python3-venv,
#                                               ca-certificates; stands in for both python slim and CUDA
#                                               (the CUDA base adds nothing the trainer needs without a GPU)
#   localhost/finetune-standin-uv:<version>     FROM scratch + /uv /uvx out of the uv wheel from PyPI
# Each stand-in carries a label with the hash of its recipe and is rebuilt only when that changes.
#
# Build-time only (bind mounts of buildah bud, never committed to a layer):
#   - the host's uv cache (`$VENV/bin/uv cache dir`, filled by `make venv` with the same wheels) at
#     /root/.cache/uv, where the Dockerfile's RUN --mount=type=cache points, so torch and the stack are
#     copied out of the host's cache instead of downloaded;
#   - where the host trusts extra CAs (/usr/local/share/ca-certificates: TLS re-signed on the way out),
#     the host's CA bundle over /etc/ssl/certs/ca-certificates.crt and a uv.toml with system-certs at
#     /etc/uv, so uv inside the build trusts what the host trusts. Nothing of it stays in the images.
#
# Each target is skipped when a stamp (.tools/images/stamps/<target>) holds the hash of its inputs
# (Dockerfile, .dockerignore, pyproject.toml, README.md, the four source rooms, this script, the bases'
# image ids) and the tag still points at the image id the stamp recorded: a warm run takes seconds.
# A rebuilt target's previous image is removed (no dangling images are left behind).
#
# Environment: IMAGES_TARGETS ("operator trainer"), IMAGES_BASES (auto|standin|published; default auto),
# IMAGES_FORCE=1 (ignore stamps), IMAGES_WORK (stand-in work dirs and stamps; .tools/images), VENV (.venv).
# Logs: .tools/logs/images*.log.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

export CONTAINERS_CONF="$here/containers.conf"
WORK="${IMAGES_WORK:-$root/.tools/images}"
LOGS="$root/.tools/logs"
STAMPS="$WORK/stamps"
VENV="${VENV:-$root/.venv}"
TARGETS="${IMAGES_TARGETS:-operator trainer}"
BASES="${IMAGES_BASES:-auto}"
mkdir -p "$WORK" "$LOGS" "$STAMPS"
LOG="$LOGS/images.log"
# One build at a time on this checkout (two `make images` would race on the tags and stamps).
exec 9>"$WORK/lock"
flock 9

log() { printf '[images %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG" >&2; }
die() { log "FAILED: $*"; exit 1; }
# Runs "$@" with its output appended to the log file $1; on failure shows the log's tail.
logged() {
  local file="$1"; shift
  if ! "$@" >>"$file" 2>&1; then
    echo "---- last lines of $file:" >&2
    tail -n 40 "$file" >&2
    die "$* (log: $file)"
  fi
}

# ---- packages ----------------------------------------------------------------------------------------
# Debian bookworm's podman 4.3 / buildah 1.28 / runc (crun 1.8 fails on these machines: containers.conf).
PACKAGES="podman buildah runc debootstrap containernetworking-plugins golang-github-containers-common uidmap fuse-overlayfs catatonit"
ensure_packages() {
  local missing=0 cmd
  for cmd in podman buildah runc debootstrap; do command -v "$cmd" >/dev/null || missing=1; done
  [[ $missing == 0 ]] && return 0
  command -v apt-get >/dev/null || die "podman/buildah/runc/debootstrap missing and no apt-get: install $PACKAGES"
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"
  log "installing $PACKAGES (apt-get, log $LOGS/images-apt.log)"
  logged "$LOGS/images-apt.log" $sudo apt-get update
  logged "$LOGS/images-apt.log" $sudo env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends $PACKAGES
}

# ---- bases -------------------------------------------------------------------------------------------
# The Dockerfile owns the published bases and the pins (ARG defaults).
dockerfile_arg() { sed -n "s/^ARG $1=//p" Dockerfile | head -n 1; }
PUBLISHED_PYTHON="$(dockerfile_arg PYTHON_IMAGE)"
PUBLISHED_CUDA="$(dockerfile_arg CUDA_IMAGE)"
PUBLISHED_UV="$(dockerfile_arg UV_IMAGE)"
UV_VERSION="${PUBLISHED_UV##*:}"
PYTHON_VERSION="$(dockerfile_arg PYTHON_VERSION)"
[[ -n $PUBLISHED_PYTHON && -n $PUBLISHED_CUDA && -n $UV_VERSION && -n $PYTHON_VERSION ]] \
  || die "could not read the ARG defaults PYTHON_IMAGE/CUDA_IMAGE/UV_IMAGE/PYTHON_VERSION from Dockerfile"
STANDIN_PYTHON="localhost/finetune-standin-python:bookworm"
STANDIN_UV="localhost/finetune-standin-uv:$UV_VERSION"
STANDIN_LABEL="dev.finetune.standin.recipe"
OPERATOR_BUILD_STAGE="localhost/finetune-operator-build:dev"  # the operator's build stage (layer cache)

image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
# A published base is usable when it is in local storage or a pull succeeds (fails in well under a
# second where no registry resolves).
have_published() {
  [[ -n "$(image_id "$1")" ]] && return 0
  [[ $BASES == standin ]] && return 1
  timeout 600 podman pull -q "$1" >>"$LOGS/images-pull.log" 2>&1
}
standin_current() { # <tag> <recipe hash>
  [[ "$(podman image inspect --format "{{index .Config.Labels \"$STANDIN_LABEL\"}}" "$1" 2>/dev/null)" == "$2" ]]
}
# Previous images of our tags that were in use (a container, a child image) when replaced: retried by
# the next run, so that no untagged image of ours stays behind.
STALE="$WORK/stale-images"
replace_image() { # <tag> <old id>: removes the old image if the tag moved away from it
  local old="$2"
  [[ -n $old && "$(image_id "$1")" != "$old" ]] || return 0
  if ! podman rmi "$old" >>"$LOG" 2>&1; then
    log "note: previous image ${old:0:12} of $1 is still in use: kept, removed by a later make images"
    printf '%s\n' "$old" >>"$STALE"
  fi
}
remove_stale_images() {
  [[ -s $STALE ]] || return 0
  local id left=()
  while read -r id; do
    [[ -n "$(image_id "$id")" ]] || continue
    if [[ -n "$(podman image inspect --format '{{join .RepoTags " "}}' "$id" 2>/dev/null)" ]]; then continue; fi
    podman rmi "$id" >>"$LOG" 2>&1 || left+=("$id")
  done <"$STALE"
  printf '%s\n' "${left[@]}" | grep . >"$STALE.new" || true
  mv "$STALE.new" "$STALE"
}

debian_mirror() {
  local m
  m="$(sed -n 's/^URIs:[[:space:]]*\(\S*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)"
  [[ -n $m ]] || m="$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\(\S*\/debian\)\/\?[[:space:]]\+bookworm[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n 1)"
  printf '%s\n' "${m:-http://deb.debian.org/debian}"
}

build_standin_python() {
  local mirror suite=bookworm include="python3,python3-venv,ca-certificates" recipe rootfs old start
  mirror="$(debian_mirror)"
  recipe="$(printf 'r1 %s minbase %s %s' "$suite" "$include" "$mirror" | sha256sum | cut -c1-16)"
  if standin_current "$STANDIN_PYTHON" "$recipe"; then log "$STANDIN_PYTHON up to date"; return 0; fi
  start=$SECONDS
  log "building $STANDIN_PYTHON: debootstrap $suite from $mirror (log $LOGS/images-standin.log)"
  rootfs="$WORK/rootfs-python"
  rm -rf "$rootfs"
  mkdir -p "$WORK/debootstrap-cache"
  logged "$LOGS/images-standin.log" debootstrap --variant=minbase --include="$include" \
    --cache-dir="$WORK/debootstrap-cache" "$suite" "$rootfs" "$mirror"
  # Nothing of this machine in the base: apt lists, the build host's resolv.conf/hostname.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
  : >"$rootfs/etc/resolv.conf"
  rm -f "$rootfs/etc/hostname"
  [[ -x "$rootfs/usr/bin/python$PYTHON_VERSION" ]] || die "the stand-in has no python$PYTHON_VERSION"
  old="$(image_id "$STANDIN_PYTHON")"
  logged "$LOGS/images-standin.log" bash -c 'tar -C "$1" --numeric-owner -c . | podman import \
      --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      --change "ENV LANG=C.UTF-8" --change "CMD [\"python3\"]" \
      --change "LABEL $2=$3" - "$4"' _ "$rootfs" "$STANDIN_LABEL" "$recipe" "$STANDIN_PYTHON"
  rm -rf "$rootfs"
  replace_image "$STANDIN_PYTHON" "$old"
  log "$STANDIN_PYTHON built in $((SECONDS - start)) s"
}

build_standin_uv() {
  local recipe dir wheel old start pip
  recipe="$(printf 'r1 uv==%s musllinux_1_1_x86_64' "$UV_VERSION" | sha256sum | cut -c1-16)"
  if standin_current "$STANDIN_UV" "$recipe"; then log "$STANDIN_UV up to date"; return 0; fi
  start=$SECONDS
  log "building $STANDIN_UV from the uv==$UV_VERSION wheel (static musl build, as in the published image)"
  dir="$WORK/uv-standin"
  rm -rf "$dir"
  mkdir -p "$dir/wheel" "$dir/root"
  pip="$VENV/bin/pip"
  [[ -x $pip ]] || pip="python3 -m pip"
  logged "$LOGS/images-standin.log" $pip download --no-deps --only-binary=:all: \
    --platform musllinux_1_1_x86_64 --python-version 3.11 "uv==$UV_VERSION" -d "$dir/wheel"
  wheel="$(ls "$dir"/wheel/uv-"$UV_VERSION"-*.whl)"
  logged "$LOGS/images-standin.log" python3 - "$wheel" "$dir/root" "$UV_VERSION" <<'EOF'
import sys, zipfile, pathlib
wheel, out, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    for name in ("uv", "uvx"):
        target = out / name
        target.write_bytes(z.read(f"uv-{version}.data/scripts/{name}"))
        target.chmod(0o755)
EOF
  old="$(image_id "$STANDIN_UV")"
  logged "$LOGS/images-standin.log" bash -c 'tar -C "$1" --numeric-owner --owner=0 --group=0 -c uv uvx \
      | podman import --change "LABEL $2=$3" - "$4"' _ "$dir/root" "$STANDIN_LABEL" "$recipe" "$STANDIN_UV"
  rm -rf "$dir"
  replace_image "$STANDIN_UV" "$old"
  log "$STANDIN_UV built in $((SECONDS - start)) s"
}

resolve_bases() {
  case "$BASES" in auto|standin|published) ;; *) die "IMAGES_BASES must be auto, standin or published" ;; esac
  local need_standin_python=0
  if [[ $BASES != standin ]] && have_published "$PUBLISHED_PYTHON"; then PYTHON_IMAGE="$PUBLISHED_PYTHON"
  else need_standin_python=1; PYTHON_IMAGE="$STANDIN_PYTHON"; fi
  if [[ $TARGETS == *trainer* ]]; then
    if [[ $BASES != standin ]] && have_published "$PUBLISHED_CUDA"; then CUDA_IMAGE="$PUBLISHED_CUDA"
    else need_standin_python=1; CUDA_IMAGE="$STANDIN_PYTHON"; fi
  else
    CUDA_IMAGE="$PUBLISHED_CUDA"
  fi
  if [[ $BASES != standin ]] && have_published "$PUBLISHED_UV"; then UV_IMAGE="$PUBLISHED_UV"
  else UV_IMAGE="$STANDIN_UV"; build_standin_uv; fi
  [[ $BASES == published && ($need_standin_python == 1 || $UV_IMAGE != "$PUBLISHED_UV") ]] \
    && die "IMAGES_BASES=published but a published base could not be pulled (log $LOGS/images-pull.log)"
  [[ $need_standin_python == 0 ]] || build_standin_python
  log "bases: PYTHON_IMAGE=$PYTHON_IMAGE CUDA_IMAGE=$CUDA_IMAGE UV_IMAGE=$UV_IMAGE"
}

# ---- build-time mounts ---------------------------------------------------------------------------------
MOUNTS=()
build_mounts() {
  local cache
  if [[ -x "$VENV/bin/uv" ]]; then
    cache="$("$VENV/bin/uv" cache dir)"
    mkdir -p "$cache"
    MOUNTS+=(-v "$cache:/root/.cache/uv")
    log "uv cache: $cache (host, shared with the venv)"
  else
    log "no $VENV/bin/uv: building without the host's uv cache (run make venv first for a fast build)"
  fi
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    local bundle ca_conf="$WORK/build-ca"
    bundle="$(readlink -f /etc/ssl/certs/ca-certificates.crt)"
    [[ -f $bundle ]] || die "the host trusts extra CAs but has no /etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$ca_conf"
    printf '# build-time only (hack/images/build.sh): trust the CA bundle mounted from the host\nsystem-certs = true\n' \
      >"$ca_conf/uv.toml"
    MOUNTS+=(-v "$bundle:/etc/ssl/certs/ca-certificates.crt:ro" -v "$ca_conf:/etc/uv:ro")
    log "the host trusts extra CAs: its CA bundle is mounted into the build steps (not committed)"
  fi
}

# ---- targets -------------------------------------------------------------------------------------------
inputs_hash() { # <target>
  {
    printf '%s\n' "$1" "$PYTHON_IMAGE $(image_id "$PYTHON_IMAGE")" "$UV_IMAGE $(image_id "$UV_IMAGE")"
    [[ $1 != trainer ]] || printf '%s\n' "$CUDA_IMAGE $(image_id "$CUDA_IMAGE")"
    find Dockerfile .dockerignore pyproject.toml README.md "$here/build.sh" api cli operator trainer -type f \
      -not -path '*/__pycache__/*' -not -name '*.pyc' -not -path '*.egg-info/*' -print0 \
      | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}

bud() { # <target> <tag> <log>: one buildah build of a Dockerfile target
  logged "$3" nice buildah bud --isolation chroot --layers \
    --target "$1" -t "$2" -f Dockerfile \
    --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg "CUDA_IMAGE=$CUDA_IMAGE" --build-arg "UV_IMAGE=$UV_IMAGE" \
    "${MOUNTS[@]}" .
}

build_target() { # <target> <tag>
  local target="$1" tag="$2" hash stamp old old_stage start log="$LOGS/images-$1.log"
  hash="$(inputs_hash "$target")"
  stamp="$STAMPS/$target"
  old="$(image_id "$tag")"
  if [[ ${IMAGES_FORCE:-0} != 1 && -f $stamp && -n $old && "$(cat "$stamp")" == "$hash $old" ]]; then
    log "$tag up to date"
    return 0
  fi
  start=$SECONDS
  log "building $tag (target $target, log $log)"
  printf '\n==== %s %s\n' "$(date -u +%FT%TZ)" "$tag" >>"$log"
  if [[ $target == operator ]]; then
    # The build stage gets a tag of its own: buildah would leave it as a dangling image after each change.
    old_stage="$(image_id "$OPERATOR_BUILD_STAGE")"
    bud operator-build "$OPERATOR_BUILD_STAGE" "$log"
    replace_image "$OPERATOR_BUILD_STAGE" "$old_stage"
  fi
  bud "$target" "$tag" "$log"
  replace_image "$tag" "$old"
  printf '%s %s\n' "$hash" "$(image_id "$tag")" >"$stamp"
  log "$tag built in $((SECONDS - start)) s, $(podman image inspect --format '{{.Size}}' "$tag") bytes"
}

main() {
  local start=$SECONDS target
  ensure_packages
  remove_stale_images
  resolve_bases
  build_mounts
  for target in $TARGETS; do
    case "$target" in
      operator) build_target operator localhost/finetune-operator:dev ;;
      trainer) build_target trainer localhost/finetune-trainer:dev ;;
      *) die "unknown target $target (IMAGES_TARGETS: operator trainer)" ;;
    esac
  done
  log "make images done in $((SECONDS - start)) s"
}

main "$@"
