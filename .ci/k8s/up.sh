#!/usr/bin/env bash
# Start the single-node cluster (building it first when the cache is empty) and wait until the
# node is Ready and the default service account exists. Idempotent: when the cluster already
# runs, says so and changes nothing. Last line: "cluster: started" or "cluster: already running".
# Kubeconfig (cluster admin): $K8S_STATE/pki/admin.kubeconfig.  Stop with down.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
[ "$(id -u)" == 0 ] || k8s_unavailable "needs root (kubelet, iptables, cgroups)"
mkdir -p "$K8S_STATE/run" "$K8S_STATE/logs"
already_running() {  # running (perhaps busy: wait rather than restart it under its users)
  k8s_wait_for 180 "apiserver ready" k8s_kubectl get --raw /readyz || exit 1
  k8s_wait_for 180 "node $K8S_NODE_NAME Ready" k8s_node_ready || exit 1
  k8s_log "cluster: already running"; exit 0
}
k8s_alive && already_running
"$HERE/build.sh"
exec 8>"$K8S_STATE/.up.lock"
flock 8   # a second up.sh waits for the first, then finds the cluster running
k8s_alive && already_running
if ls "$K8S_STATE"/run/*.pid >/dev/null 2>&1; then
  k8s_log "leftovers of an earlier cluster: tearing them down first"
  "$HERE/down.sh"
fi
docker info >/dev/null 2>&1 || k8s_unavailable "the Docker engine does not answer (the kubelet runs pods on it)"
"$HERE/pki.sh"
rm -f "$K8S_STATE/run/started-by-fixture"   # written by a fixture after this says "started"
PKI=$K8S_STATE/pki; D=$K8S_STATE/data; L=$K8S_STATE/logs; R=$K8S_STATE/run
mkdir -p "$D"

# pause image: a static binary FROM scratch (no registry needed)
if ! docker image inspect "$K8S_PAUSE_IMAGE" >/dev/null 2>&1; then
  k8s_pause_binary
  ctx=$(mktemp -d); cp "$K8S_BIN/pause" "$ctx/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$ctx/Dockerfile"
  docker build -q -t "$K8S_PAUSE_IMAGE" "$ctx" >/dev/null 2>&1; rm -rf "$ctx"
  k8s_log "pause image $K8S_PAUSE_IMAGE built"
fi

# CNI: one bridge, host-local addresses, a default route via the bridge (Service IPs are
# DNAT-ed on this node), no masquerade: pods reach this node and each other, nothing beyond
mkdir -p "$K8S_STATE/cni/net.d"
cat > "$K8S_STATE/cni/net.d/10-kernel-sandbox.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "kernel-sandbox-test", "plugins": [
  {"type": "bridge", "bridge": "$K8S_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$K8S_POD_CIDR", "gateway": "$K8S_POD_GATEWAY"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$D/cni-ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
# Docker sets FORWARD's policy to DROP: let pod-to-pod traffic (bridge netfilter) through,
# nothing else, from a chain of our own that down.sh removes.
modprobe br_netfilter 2>/dev/null || true
iptables -N KS-K8S-FORWARD 2>/dev/null || iptables -F KS-K8S-FORWARD
iptables -A KS-K8S-FORWARD -s "$K8S_POD_CIDR" -d "$K8S_POD_CIDR" -j ACCEPT
iptables -C FORWARD -j KS-K8S-FORWARD 2>/dev/null || iptables -I FORWARD 1 -j KS-K8S-FORWARD

start() {  # name binary args...: a session of its own, so a test run's Ctrl-C does not reach it
  local name=$1; shift
  setsid nohup "$@" > "$L/$name.log" 2>&1 < /dev/null 8>&- & echo $! > "$R/$name.pid"  # 8: the lock
}
wait_for() { k8s_wait_for "$@" || exit 1; }
start etcd "$K8S_ROOT/usr/bin/etcd" --data-dir "$D/etcd" --name default \
  --listen-client-urls "http://127.0.0.1:$K8S_ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$K8S_ETCD_PORT" \
  --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
  --initial-cluster default=http://127.0.0.1:23800 --listen-metrics-urls http://127.0.0.1:23810
wait_for 60 "etcd healthy" env ETCDCTL_API=3 "$K8S_ROOT/usr/bin/etcdctl" --endpoints "http://127.0.0.1:$K8S_ETCD_PORT" endpoint health
start apiserver "$K8S_BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$K8S_ETCD_PORT" \
  --secure-port "$K8S_API_PORT" --advertise-address "$K8S_NODE_IP" \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" --client-ca-file "$PKI/ca.crt" \
  --kubelet-client-certificate "$PKI/kubelet-client.crt" --kubelet-client-key "$PKI/kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP \
  --token-auth-file "$PKI/tokens.csv" --anonymous-auth=false --authorization-mode Node,RBAC \
  --service-cluster-ip-range "$K8S_SERVICE_CIDR" \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --enable-admission-plugins NodeRestriction --allow-privileged=false
wait_for 120 "apiserver ready" k8s_kubectl get --raw /readyz
start kcm "$K8S_BIN/kube-controller-manager" --kubeconfig "$PKI/kcm.kubeconfig" \
  --authentication-kubeconfig "$PKI/kcm.kubeconfig" --authorization-kubeconfig "$PKI/kcm.kubeconfig" \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --use-service-account-credentials=true --leader-elect=false --controllers '*,-nodeipam' \
  --bind-address 127.0.0.1 --port 0
start sched "$K8S_BIN/kube-scheduler" --kubeconfig "$PKI/sched.kubeconfig" \
  --authentication-kubeconfig "$PKI/sched.kubeconfig" --authorization-kubeconfig "$PKI/sched.kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --port 0
start kubelet "$K8S_BIN/kubelet" --kubeconfig "$PKI/kubelet.kubeconfig" \
  --hostname-override "$K8S_NODE_NAME" --node-ip "$K8S_NODE_IP" --address "$K8S_NODE_IP" \
  --anonymous-auth=false --client-ca-file "$PKI/ca.crt" --authentication-token-webhook --authorization-mode Webhook \
  --read-only-port 0 --healthz-bind-address 127.0.0.1 \
  --root-dir "$D/kubelet" --cert-dir "$D/kubelet-pki" --experimental-dockershim-root-directory "$D/dockershim" \
  --container-runtime docker --cgroup-driver cgroupfs --pod-infra-container-image "$K8S_PAUSE_IMAGE" \
  --network-plugin cni --cni-bin-dir "$K8S_ROOT/usr/lib/cni" --cni-conf-dir "$K8S_STATE/cni/net.d" --cni-cache-dir "$D/cni-cache" \
  --fail-swap-on=false --cluster-dns 10.96.0.10 --cluster-domain cluster.local \
  --eviction-hard 'memory.available<100Mi' --image-gc-high-threshold 100 --image-gc-low-threshold 99 --oom-score-adj 0 \
  --register-node=true --max-pods 110 --pod-max-pids 256
start proxy "$K8S_BIN/kube-proxy" --kubeconfig "$PKI/proxy.kubeconfig" --hostname-override "$K8S_NODE_NAME" \
  --cluster-cidr "$K8S_POD_CIDR" --proxy-mode iptables --oom-score-adj 0 --conntrack-max-per-core 0 \
  --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256
wait_for 180 "node $K8S_NODE_NAME Ready" k8s_node_ready
wait_for 60 "default service account exists" k8s_kubectl -n default get serviceaccount default
# gVisor for `runtimeClassName: gvisor` (the untrusted profile): the patched dockershim runs a
# pod whose RuntimeClass handler is `runsc-kube` under Docker's runtime of that name (build.sh;
# setup.sh registers it: runsc in the pod's network namespace)
if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc-kube"'; then
  k8s_kubectl apply -f - >/dev/null <<'YAML'
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: gvisor
handler: runsc-kube
YAML
  k8s_log "RuntimeClass gvisor (handler runsc-kube)"
fi
k8s_log "kubeconfig: $K8S_ADMIN_KUBECONFIG"
k8s_log "cluster: started"
