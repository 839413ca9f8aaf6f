#!/usr/bin/env bash
# Stop the cluster and remove everything it made on the host: pods (k8s_* containers on the
# Docker engine), component processes (by recorded PID), iptables chains (KUBE-*, CNI-*,
# KS-K8S-*, KS-NETPOL-*), the bridge, kubepods cgroups, kubelet mounts and the cluster's data.
# Keeps the binaries cache and the pki. Idempotent.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
R=$K8S_STATE/run; D=$K8S_STATE/data
if k8s_pid_alive apiserver && k8s_kubectl get --raw /readyz >/dev/null 2>&1; then
  # pods first, so the kubelet tears down their sandboxes and networks itself
  k8s_kubectl delete pods --all-namespaces --all --grace-period=1 --wait=true --timeout=60s >/dev/null 2>&1 \
    && k8s_log "pods deleted"
fi
for n in proxy kubelet sched kcm apiserver etcd; do
  [ -f "$R/$n.pid" ] || continue
  p=$(cat "$R/$n.pid")
  if kill "$p" 2>/dev/null; then
    for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null && k8s_log "$n ($p) killed"
    k8s_log "$n ($p) stopped"
  fi
  rm -f "$R/$n.pid"
done
ids=$(docker ps -aq --filter 'name=^/k8s_' 2>/dev/null)
[ -n "$ids" ] && docker rm -f $ids >/dev/null && k8s_log "removed $(echo $ids | wc -w) k8s_ containers"
for t in filter nat mangle; do
  iptables-save -t $t | grep -E '^-A .* -j (KUBE-|CNI-|KS-K8S-|KS-NETPOL-)' | sed 's/^-A/-D/' \
    | while read -r r; do eval iptables -t $t $r; done
  for c in $(iptables-save -t $t | grep -oE '^:(KUBE-|CNI-|KS-K8S-|KS-NETPOL-)[^ ]+' | tr -d ':'); do iptables -t $t -F "$c"; done
  for c in $(iptables-save -t $t | grep -oE '^:(KUBE-|CNI-|KS-K8S-|KS-NETPOL-)[^ ]+' | tr -d ':'); do iptables -t $t -X "$c"; done
done
ip link del "$K8S_BRIDGE" 2>/dev/null && k8s_log "bridge $K8S_BRIDGE deleted"
for s in /sys/fs/cgroup/*/kubepods; do [ -d "$s" ] && find "$s" -depth -type d -exec rmdir {} \; 2>/dev/null; done
for m in $(awk '{print $2}' /proc/mounts | grep "^$D/kubelet" | sort -r); do umount "$m" 2>/dev/null || umount -l "$m"; done
rm -rf "$D"
rm -f "$R/started-by-fixture"   # tests/support/kube.py: the next cluster is not a fixture's
# directories the 1.20 kubelet makes at fixed paths
rm -rf /var/lib/kubelet/device-plugins /var/log/pods/* /var/log/containers/*k8s* 2>/dev/null
rmdir /var/lib/kubelet /var/log/pods /var/log/containers 2>/dev/null
left=$(iptables-save | grep -cE '^:(KUBE|CNI|KS-K8S|KS-NETPOL)-')
k8s_log "cluster down (iptables chains left: $left)"
