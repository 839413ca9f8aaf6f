#!/usr/bin/env bash
# Fetch and build the cluster's binaries into $K8S_CACHE, once per machine: does nothing when
# the binaries for this source version and recipe revision are there.
#   1. Debian debs (go 1.19, etcd, CNI plugins, kubectl) extracted into $K8S_CACHE/root
#      (nothing installed system-wide)
#   2. bookworm's `kubernetes` source package through a private apt config with deb-src
#      (the system's apt sources are left alone)
#   3. go build (GOPATH mode) of the five server commands, with two kubelet constants patched
#      (no CAP_SYS_RESOURCE here: negative oom_score_adj fails), dockershim taught RuntimeClass
#      handlers (dockershim-runtime-handler.patch: a handler names a Docker runtime such as
#      runsc, so `runtimeClassName: gvisor` pods run under gVisor) and openapi generated
# Usage: build.sh [--force]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
[[ "${1:-}" == "--force" ]] && rm -f "$K8S_BIN/.complete"
if k8s_built; then k8s_log "binaries cached in $K8S_BIN (no build)"; exit 0; fi
mkdir -p "$K8S_CACHE"
exec 9>"$K8S_CACHE/.build.lock"
flock 9   # a concurrent build (CI background + a test fixture) waits for the first
if k8s_built; then k8s_log "binaries built by a concurrent run: $K8S_BIN"; exit 0; fi

# --- private apt config: the machine's own mirrors, plus deb-src ---------------------------
APT=$K8S_CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/etc" "$K8S_CACHE/src" "$K8S_CACHE/debs"
: > "$APT/etc/sources.list"
shopt -s nullglob
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  if [[ $f == *.sources ]]; then
    python3 - "$f" >> "$APT/etc/sources.list" <<'PY'
import sys
for block in open(sys.argv[1]).read().split("\n\n"):
    fields = {}
    for line in block.splitlines():
        if ":" in line and not line.startswith(("#", " ")):
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    if "deb" not in fields.get("Types", "").split() or fields.get("Enabled", "yes") == "no":
        continue
    signed = fields.get("Signed-By", "")
    opt = f"[signed-by={signed}] " if signed.startswith("/") else ""
    for uri in fields.get("URIs", "").split():
        for suite in fields.get("Suites", "").split():
            for kind in ("deb", "deb-src"):
                print(f"{kind} {opt}{uri} {suite} {fields.get('Components', 'main')}")
PY
  else
    grep -E '^deb ' "$f" | sed 'p;s/^deb /deb-src /' >> "$APT/etc/sources.list"
  fi
done
[ -s "$APT/etc/sources.list" ] || k8s_unavailable "no apt sources found in /etc/apt to derive deb-src from"
APTOPTS=(-o "Dir::Etc::SourceList=$APT/etc/sources.list" -o "Dir::Etc::SourceParts=-"
         -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache::Archives=$APT/archives"
         -o "Dir::Cache=$APT" -o "APT::Sandbox::User=root" -q)
k8s_log "apt update (private lists with deb-src, $(grep -c . "$APT/etc/sources.list") lines)"
apt-get "${APTOPTS[@]}" update >"$K8S_CACHE/apt-update.log" 2>&1 \
  || { tail -5 "$K8S_CACHE/apt-update.log"; k8s_unavailable "apt-get update failed (deb-src reachable?)"; }
if ! apt-cache "${APTOPTS[@]}" showsrc "$K8S_SRC_PACKAGE" 2>/dev/null | grep -q "^Version: .*$K8S_SRC_VERSION"; then
  grep -E '^(W|E|Err):' "$K8S_CACHE/apt-update.log" | tail -5 >&2
  k8s_unavailable "no deb-src for $K8S_SRC_PACKAGE $K8S_SRC_VERSION from this machine's apt mirrors"
fi

# --- 1. debs ----------------------------------------------------------------------------------
k8s_log "downloading debs: $K8S_DEBS"
(cd "$K8S_CACHE/debs" && apt-get "${APTOPTS[@]}" download $K8S_DEBS >/dev/null) \
  || k8s_unavailable "apt-get download $K8S_DEBS failed"
# extracted aside, then swapped in: a running cluster uses etcd and the CNI plugins from here
rm -rf "$K8S_ROOT.tmp"; mkdir -p "$K8S_ROOT.tmp"
for d in "$K8S_CACHE"/debs/*.deb; do dpkg -x "$d" "$K8S_ROOT.tmp"; done
rm -rf "$K8S_ROOT.old"; [ -d "$K8S_ROOT" ] && mv "$K8S_ROOT" "$K8S_ROOT.old"
mv "$K8S_ROOT.tmp" "$K8S_ROOT"; rm -rf "$K8S_ROOT.old"
GOROOT_DIR=$K8S_ROOT/usr/lib/go-1.19
[ -x "$GOROOT_DIR/bin/go" ] || k8s_die "go 1.19 missing after extracting debs"
k8s_log "debs extracted into $K8S_ROOT ($(du -sh "$K8S_ROOT" | cut -f1))"

# --- 2. source ----------------------------------------------------------------------------------
ORIG=$K8S_CACHE/src/${K8S_SRC_PACKAGE}_${K8S_SRC_VERSION}.orig.tar.gz
if [ ! -f "$ORIG" ]; then
  k8s_log "downloading source package $K8S_SRC_PACKAGE (deb-src)"
  (cd "$K8S_CACHE/src" && apt-get "${APTOPTS[@]}" source --download-only "$K8S_SRC_PACKAGE" >/dev/null) \
    || k8s_unavailable "apt-get source $K8S_SRC_PACKAGE failed: no deb-src reachable"
  [ -f "$ORIG" ] || k8s_die "expected $ORIG; got: $(ls "$K8S_CACHE/src")"
fi

# --- 3. build ------------------------------------------------------------------------------------
W=$K8S_CACHE/work; rm -rf "$W/kubernetes-1.20.2" "$W/gopath"; mkdir -p "$W/gopath/src/k8s.io" "$W/tools"
export GOROOT=$GOROOT_DIR PATH=$GOROOT_DIR/bin:$PATH GOPATH=$W/gopath GOCACHE=$K8S_CACHE/gocache GO111MODULE=off GOPROXY=off GOFLAGS=
k8s_log "unpacking $(basename "$ORIG")"
tar xzf "$ORIG" -C "$W"
ln -sfn "$W/kubernetes-1.20.2" "$W/gopath/src/k8s.io/kubernetes"
cd "$W/gopath/src/k8s.io/kubernetes"
git apply -p1 "$HERE/dockershim-runtime-handler.patch" \
  || k8s_die "dockershim-runtime-handler.patch did not apply"
sed -i 's/^\tdefaultSandboxOOMAdj int = -998/\tdefaultSandboxOOMAdj int = 0/' pkg/kubelet/dockershim/docker_sandbox.go
sed -i 's/^\tguaranteedOOMScoreAdj int = -997/\tguaranteedOOMScoreAdj int = 0/' pkg/kubelet/qos/policy.go
grep -q 'defaultSandboxOOMAdj int = 0' pkg/kubelet/dockershim/docker_sandbox.go || k8s_die "OOM patch did not apply"
grep -q 'guaranteedOOMScoreAdj int = 0' pkg/kubelet/qos/policy.go || k8s_die "OOM patch did not apply"
k8s_log "generating openapi definitions"
go build -o "$W/tools/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
DIRS=$(grep -Rl --include='*.go' '+k8s:openapi-gen=' pkg/apis vendor/k8s.io/ | grep -v _test.go | xargs -n1 dirname | sort -u \
  | grep -v -e code-generator -e sample-apiserver -e kube-openapi/ | sed 's#^#k8s.io/kubernetes/#' | paste -sd, -)
"$W/tools/openapi-gen" -i "$DIRS" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$W/openapi-violations.report"
P=k8s.io/kubernetes/vendor; V=$K8S_VERSION
LDF="-s -w -X $P/k8s.io/component-base/version.gitVersion=$V -X $P/k8s.io/component-base/version.gitMajor=1 -X $P/k8s.io/component-base/version.gitMinor=20 -X $P/k8s.io/component-base/version.gitTreeState=clean -X $P/k8s.io/client-go/pkg/version.gitVersion=$V -X $P/k8s.io/client-go/pkg/version.gitMajor=1 -X $P/k8s.io/client-go/pkg/version.gitMinor=20"
k8s_log "go build -p $(nproc) $K8S_SERVER_CMDS (several minutes)"
mkdir -p "$K8S_BIN.tmp"
go build -p "$(nproc)" -ldflags "$LDF" -o "$K8S_BIN.tmp/" $(for c in $K8S_SERVER_CMDS; do echo ./cmd/$c; done)
rm -rf "$K8S_BIN"; mv "$K8S_BIN.tmp" "$K8S_BIN"
k8s_pause_binary
touch "$K8S_BIN/.complete"
cd /; rm -rf "$W"   # the source tree (1.5 GB unpacked); GOCACHE stays for a --force rebuild
k8s_log "built: $(cd "$K8S_BIN" && ls | paste -sd' ') ($(du -sh "$K8S_BIN" | cut -f1))"
