# Shared settings for the .ci/k8s scripts (sourced, not run).
# A single-node Kubernetes v1.20.2 for the tests: built from Debian bookworm's `kubernetes`
# source package (the only Kubernetes source these machines can reach), Debian's etcd, CNI
# plugins and kubectl, the kubelet on the local Docker engine through dockershim.
#
#   KS_K8S_CACHE  binaries, keyed by source version + recipe revision; reused by every run
#                 on the machine (default /var/cache/kernel-sandbox/k8s)
#   KS_K8S_STATE  one running cluster: pki, data, logs, pids (default /var/lib/kernel-sandbox/k8s)
K8S_SRC_PACKAGE=kubernetes
K8S_SRC_VERSION=1.20.5+really1.20.2   # upstream part of the bookworm version; the orig tarball holds v1.20.2
K8S_VERSION=v1.20.2
K8S_RECIPE_REV=2     # bump when the build (patches, flags) changes: a new cache key
K8S_CACHE=${KS_K8S_CACHE:-/var/cache/kernel-sandbox/k8s}
K8S_STATE=${KS_K8S_STATE:-/var/lib/kernel-sandbox/k8s}
K8S_KEY="${K8S_SRC_VERSION}-r${K8S_RECIPE_REV}"
K8S_BIN=$K8S_CACHE/bin/$K8S_KEY          # kube-apiserver kube-controller-manager ... (+ .complete)
K8S_ROOT=$K8S_CACHE/root                 # Debian debs extracted (go, etcd, cni, kubectl)
K8S_DEBS="golang-1.19-go golang-1.19-src etcd-server etcd-client containernetworking-plugins kubernetes-client"
K8S_SERVER_CMDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
K8S_POD_CIDR=${KS_K8S_POD_CIDR:-10.244.0.0/24}
K8S_POD_GATEWAY=${KS_K8S_POD_GATEWAY:-10.244.0.1}
K8S_SERVICE_CIDR=10.96.0.0/16
K8S_BRIDGE=kci0
K8S_API_PORT=${KS_K8S_API_PORT:-6443}
K8S_ETCD_PORT=23790
K8S_PAUSE_IMAGE=kernel-sandbox/k8s-pause:3.4.1
# the node address: the default route's interface (kubelet, apiserver advertise, cert SAN)
_k8s_dev=$(ip -4 route show default 2>/dev/null | awk '{for(i=1;i<NF;i++) if($i=="dev"){print $(i+1); exit}}')
K8S_NODE_IP=${KS_K8S_NODE_IP:-$(ip -4 -o addr show dev "${_k8s_dev:-eth0}" 2>/dev/null | awk '{sub("/.*","",$4); print $4; exit}')}
K8S_NODE_IP=${K8S_NODE_IP:-$(hostname -I | awk '{print $1}')}
K8S_NODE_NAME=$(hostname | tr 'A-Z_' 'a-z-')
export PATH=$K8S_BIN:$K8S_ROOT/usr/bin:$PATH

export _K8S_T0=${_K8S_T0:-$(date +%s.%N)}  # one clock for a script and those it calls
k8s_log() { printf '[k8s %6.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$_K8S_T0" 'BEGIN{print a-b}')" "$*"; }
k8s_die() { printf '[k8s] ERROR: %s\n' "$*" >&2; exit 1; }
# exit 3: this machine cannot build or run the cluster (tests/support/kube.py: unavailable())
k8s_unavailable() { printf '[k8s] UNAVAILABLE: %s\n' "$*" >&2; exit 3; }
k8s_built() { [ -f "$K8S_BIN/.complete" ]; }
K8S_ADMIN_KUBECONFIG=$K8S_STATE/pki/admin.kubeconfig
k8s_kubectl() { kubectl --kubeconfig "$K8S_ADMIN_KUBECONFIG" --request-timeout 10s "$@"; }
k8s_pid_alive() { [ -f "$K8S_STATE/run/$1.pid" ] && kill -0 "$(cat "$K8S_STATE/run/$1.pid")" 2>/dev/null; }
k8s_node_ready() {
  k8s_kubectl get node "$K8S_NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}
k8s_alive() {  # every component's process alive
  local c; for c in etcd apiserver kcm sched kubelet proxy; do k8s_pid_alive $c || return 1; done
}
k8s_running() { k8s_alive && k8s_kubectl get --raw /readyz >/dev/null 2>&1 && k8s_node_ready; }
k8s_wait_for() {  # seconds description command...: poll until the command succeeds
  local limit=$1 what=$2; shift 2; local end=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then
      k8s_log "timed out after ${limit}s waiting for: $what"
      tail -n 15 "$K8S_STATE"/logs/*.log >&2 2>/dev/null; return 1
    fi
    sleep 0.3
  done
  k8s_log "$what"
}
k8s_pause_binary() {  # $K8S_BIN/pause: the pod sandbox's PID 1 (sleeps, reaps, exits on TERM)
  [ -x "$K8S_BIN/pause" ] && return 0
  local tmp; tmp=$(mktemp -d)
  cat > "$tmp/pause.go" <<'GO'
// The infrastructure container of a pod: holds its namespaces; as PID 1 it reaps orphans
// and exits on SIGINT/SIGTERM (what Kubernetes' build/pause/linux/pause.c does).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
  (cd "$tmp" && CGO_ENABLED=0 GOROOT=$K8S_ROOT/usr/lib/go-1.19 GOPATH=$tmp/gopath GOCACHE=$K8S_CACHE/gocache \
     GO111MODULE=off "$K8S_ROOT/usr/lib/go-1.19/bin/go" build -ldflags "-s -w" -o "$K8S_BIN/pause" pause.go)
  rm -rf "$tmp"
}
