#!/usr/bin/env bash
# make tools: builds the test cluster's tools from Go modules into .tools/bin (git-ignored).
#
#   kube-apiserver kube-controller-manager kube-scheduler kubectl  (k8s.io/kubernetes, wrapper module hack/tools/k8s)
#   etcd                                                           (go.etcd.io/etcd/server/v3, wrapper module hack/tools/etcd)
#   kwok kwokctl                                                   (sigs.k8s.io/kwok)
#   minio                                                          (github.com/minio/minio)
#   helm                                                           (helm.sh/helm/v3)
#   prometheus promtool                                            (github.com/prometheus/prometheus)
#   kueue (+ its CRDs and webhook manifests in .tools/share/kueue)  (sigs.k8s.io/kueue)
#   kube-score                                                     (github.com/zegl/kube-score)
#
# Versions are pinned in hack/tools/versions.env. Each group writes .tools/stamps/<group> holding what
# it was built from (version and Go version); a group whose binaries exist and whose stamp matches
# is skipped, so a warm run takes about a second. Only the Go module proxy is needed.
#
# Environment: TOOLS_JOBS (parallel build lanes, default 2), TOOLS_FORCE=1 (rebuild everything),
# TOOLS_DIR (default .tools).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

TOOLS="${TOOLS_DIR:-$root/.tools}"   # TOOLS_DIR: build elsewhere (the tests read .tools/bin, or FINETUNE_TOOLS_BIN)
BIN="$TOOLS/bin"
STAMPS="$TOOLS/stamps"
LOGS="$TOOLS/logs"
mkdir -p "$BIN" "$STAMPS" "$LOGS"

command -v go >/dev/null || { echo "make tools: 'go' (1.26+) is not on PATH" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0
GOVER="$(go env GOVERSION)"
case "$GOVER" in go1.2[6-9]*|go1.[3-9]*) ;; *) echo "make tools: need Go 1.26+, found $GOVER" >&2; exit 1 ;; esac

# Build fingerprint shared by every group: what a binary depends on besides its own version.
RECIPE="$GOVER $(go env GOOS)/$(go env GOARCH) r1"

# ---- groups ---------------------------------------------------------------------------------------
# Each group: <name>_bins (binaries it produces), <name>_stamp (fingerprint), build_<name> <outdir>.

k8s_bins="kube-apiserver kube-controller-manager kube-scheduler kubectl"
k8s_stamp="k8s.io/kubernetes $KUBERNETES_VERSION $RECIPE"
build_k8s() {
  local out="$1" v="$KUBERNETES_VERSION" minor major date
  if ! grep -qE "^[[:space:]]*k8s.io/kubernetes $v( |$)" "$here/k8s/go.mod"; then
    echo "hack/tools/k8s/go.mod is not for $v: regenerating it (commit hack/tools/k8s/go.mod and go.sum)"
    bash "$here/gen-modules.sh" k8s
  fi
  major="${v#v}"; major="${major%%.*}"
  minor="${v#v*.}"; minor="${minor%%.*}"
  # The release's publication time from the proxy keeps the binary reproducible.
  date="$(cd "$here/k8s" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  (cd "$here/k8s" && GOFLAGS="-mod=mod -buildvcs=false" go build -trimpath -tags selinux,notest \
     -ldflags "$ld" -o "$out/" \
     k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
     k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
}

etcd_bins="etcd"
etcd_stamp="go.etcd.io/etcd/server/v3 $ETCD_VERSION $RECIPE"
build_etcd() {
  local out="$1"
  if ! grep -qE "^[[:space:]]*go.etcd.io/etcd/server/v3 $ETCD_VERSION( |$)" "$here/etcd/go.mod"; then
    echo "hack/tools/etcd/go.mod is not for $ETCD_VERSION: regenerating it (commit hack/tools/etcd/go.mod and go.sum)"
    bash "$here/gen-modules.sh" etcd
  fi
  (cd "$here/etcd" && GOFLAGS="-mod=mod -buildvcs=false" go build -trimpath -ldflags "-s -w" \
     -o "$out/etcd" go.etcd.io/etcd/server/v3)
}

# go install pkg@version: these modules have no replace directives.
install_at() { # <outdir> <ldflags> <pkg@version>...
  local out="$1" ld="$2"; shift 2
  (cd "$TOOLS" && GOBIN="$out" GOFLAGS="-buildvcs=false" go install -trimpath -ldflags "$ld" "$@")
}

kwok_bins="kwok kwokctl"
kwok_stamp="sigs.k8s.io/kwok $KWOK_VERSION kube=$KUBERNETES_VERSION $RECIPE"
build_kwok() {
  local c=sigs.k8s.io/kwok/pkg/consts
  install_at "$1" "-s -w -X $c.Version=${KWOK_VERSION#v} -X $c.KubeVersion=${KUBERNETES_VERSION#v}" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
}

minio_bins="minio"
minio_stamp="github.com/minio/minio $MINIO_VERSION $RECIPE"
build_minio() {
  # A pseudo-version vX-YYYYMMDDhhmmss-commit carries the commit's time and id: report them as
  # MinIO's release scripts would (Version is RFC 3339, ReleaseTag RELEASE.<time>).
  local ts="${MINIO_VERSION#*-}" commit="${MINIO_VERSION##*-}" t tag c=github.com/minio/minio/cmd
  ts="${ts%%-*}"
  t="${ts:0:4}-${ts:4:2}-${ts:6:2}T${ts:8:2}:${ts:10:2}:${ts:12:2}Z"
  tag="RELEASE.${t//:/-}"
  install_at "$1" "-s -w -X $c.Version=$t -X $c.ReleaseTag=$tag -X $c.CommitID=$commit -X $c.ShortCommitID=$commit -X $c.CopyrightYear=${ts:0:4}" \
    "github.com/minio/minio@$MINIO_VERSION"
}

helm_bins="helm"
helm_stamp="helm.sh/helm/v3 $HELM_VERSION $RECIPE"
build_helm() {
  # helm's Makefile sets the default Kubernetes version (used by `helm template`) from its client-go.
  local gomod kv major minor h=helm.sh/helm/v3
  gomod="$(cd "$TOOLS" && go mod download -json "$h@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  kv="$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod")"   # v0.37.0
  major=1; minor="${kv#v0.}"; minor="${minor%%.*}"
  install_at "$1" "-s -w -X $h/internal/version.version=$HELM_VERSION -X $h/internal/version.gitTreeState=clean \
-X $h/pkg/lint/rules.k8sVersionMajor=$major -X $h/pkg/lint/rules.k8sVersionMinor=$minor \
-X $h/pkg/chartutil.k8sVersionMajor=$major -X $h/pkg/chartutil.k8sVersionMinor=$minor" \
    "$h/cmd/helm@$HELM_VERSION"
}

prometheus_bins="prometheus promtool"
prometheus_stamp="github.com/prometheus/prometheus $PROMETHEUS_VERSION tags=remove_all_sd,netgo $RECIPE"
build_prometheus() {
  # The module's v0.3XX.Y tags are Prometheus 3.XX.Y. Built without the web UI assets (no
  # `builtinassets` tag: the UI answers "not built"; the HTTP API works) and with only the file and
  # http service discovery (`remove_all_sd`: no cloud SDKs or client-go to compile); the tests write
  # file_sd targets.
  local v="$PROMETHEUS_VERSION" m p c=github.com/prometheus/common/version
  m="${v#v0.}"; p="${m#*.}"; m="${m%%.*}"   # v0.316.0 -> 316, 0 -> 3.16.0
  local ver="3.$((10#$m - 300)).$p"
  (cd "$TOOLS" && GOBIN="$1" GOFLAGS="-buildvcs=false" go install -trimpath -tags remove_all_sd,netgo \
     -ldflags "-s -w -X $c.Version=$ver -X $c.Branch=HEAD -X $c.BuildUser=make-tools" \
     "github.com/prometheus/prometheus/cmd/prometheus@$v" "github.com/prometheus/prometheus/cmd/promtool@$v")
}

kueue_bins="kueue"
kueue_stamp="sigs.k8s.io/kueue $KUEUE_VERSION $RECIPE"
build_kueue() {
  # No replace directives in its go.mod: `go install` of the controller manager (cmd/kueue) with
  # upstream's version ldflag. The test fixture also needs the CRDs and webhook configurations of
  # the same release: copied from the module into .tools/share/kueue. (`set -e` does not apply in
  # here, run_group calls this in an `if`: hence the `|| return`.)
  local v="$KUEUE_VERSION" p=sigs.k8s.io/kueue dir share="$TOOLS/share/kueue"
  install_at "$1" "-s -w -X $p/pkg/version.GitVersion=$v" "$p/cmd/kueue@$v" || return
  dir="$(cd "$TOOLS" && go mod download -json "$p@$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$dir/config/components/crd/bases" ]] || { echo "no CRDs in the module of $p@$v ($dir)"; return 1; }
  rm -rf "$share" && mkdir -p "$share/crds" || return
  cp "$dir"/config/components/crd/bases/*.yaml "$share/crds/" || return
  cp "$dir/config/components/webhook/manifests.yaml" "$share/webhooks.yaml" || return
  chmod -R u+w "$share" && printf '%s\n' "$v" >"$share/VERSION"
}

# A linter of the rendered chart (tests/chart/test_chart_lint.py). kube-linter's module
# (golang.stackrox.io/kube-linter) is not served by the Go module proxy this project builds from;
# kube-score checks the same kind of thing (security context, probes, resources, PDBs,
# anti-affinity, NetworkPolicies) and is.
kubescore_bins="kube-score"
kubescore_stamp="github.com/zegl/kube-score $KUBE_SCORE_VERSION $RECIPE"
build_kubescore() {
  install_at "$1" "-s -w -X main.version=${KUBE_SCORE_VERSION#v} -X main.commit=none -X main.date=none" \
    "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION"
}

# ---- driver ---------------------------------------------------------------------------------------
up_to_date() { # <group>
  local g="$1" bins stamp b
  [[ "${TOOLS_FORCE:-0}" == 1 ]] && return 1
  bins="${g}_bins"; stamp="${g}_stamp"
  [[ -f "$STAMPS/$g" && "$(cat "$STAMPS/$g")" == "${!stamp}" ]] || return 1
  for b in ${!bins}; do [[ -x "$BIN/$b" ]] || return 1; done
}

run_group() { # <group>: builds into a scratch dir, then moves the binaries in and writes the stamp.
  local g="$1" bins stamp tmp b start
  bins="${g}_bins"; stamp="${g}_stamp"
  tmp="$TOOLS/tmp/$g"; rm -rf "$tmp"; mkdir -p "$tmp"
  start=$SECONDS
  echo "make tools: building $g (${!stamp}) -> $BIN, log $LOGS/$g.log"
  if ! "build_$g" "$tmp" >"$LOGS/$g.log" 2>&1; then
    echo "make tools: building $g FAILED; last lines of $LOGS/$g.log:" >&2
    tail -n 40 "$LOGS/$g.log" >&2
    return 1
  fi
  for b in ${!bins}; do
    [[ -x "$tmp/$b" ]] || { echo "make tools: $g did not produce $b" >&2; return 1; }
    mv -f "$tmp/$b" "$BIN/$b"
  done
  rm -rf "$tmp"
  printf '%s\n' "${!stamp}" >"$STAMPS/$g"
  echo "make tools: built $g in $((SECONDS - start))s"
}

# Heaviest first: the control plane is the long pole; the others share the second lane.
todo=()
for g in k8s minio prometheus kueue etcd helm kwok kubescore; do
  if up_to_date "$g"; then echo "make tools: $g is up to date"; else todo+=("$g"); fi
done
[[ ${#todo[@]} -eq 0 ]] && exit 0

jobs_n="${TOOLS_JOBS:-2}"
start=$SECONDS
lane() { local g; for g in "$@"; do run_group "$g" || return 1; done; }
pids=() lanes=()
for ((i = 0; i < jobs_n; i++)); do lanes+=(""); done
# Round-robin is wrong for one huge group; put k8s alone in lane 0 and the rest in the other lanes.
i=0
for g in "${todo[@]}"; do
  if [[ "$g" == k8s || $jobs_n -eq 1 ]]; then lanes[0]+=" $g"
  else lanes[$((1 + i % (jobs_n - 1)))]+=" $g"; i=$((i + 1)); fi
done
for l in "${lanes[@]}"; do
  [[ -n "${l// }" ]] || continue
  # shellcheck disable=SC2086
  lane $l & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
[[ $rc -eq 0 ]] || { echo "make tools: failed (see $LOGS/)" >&2; exit 1; }
echo "make tools: done in $((SECONDS - start))s"
