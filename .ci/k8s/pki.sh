#!/usr/bin/env bash
# Certificates and credentials for one cluster in $K8S_STATE/pki: a CA (30 days), the
# apiserver's serving cert (SANs: service IP, loopback, this node's address and name), the
# apiserver's client cert for the kubelet (exec, logs), the service-account key pair, and a
# static token + kubeconfig per component. Kept when still valid for this node; otherwise made anew.
set -euo pipefail
. "$(dirname "$0")/common.sh"
PKI=$K8S_STATE/pki
STAMP="node=$K8S_NODE_NAME ip=$K8S_NODE_IP port=$K8S_API_PORT"
if [ -f "$PKI/.complete" ] && [ "$(cat "$PKI/.complete")" == "$STAMP" ] \
   && openssl x509 -checkend 86400 -noout -in "$PKI/apiserver.crt" >/dev/null; then
  k8s_log "pki current ($STAMP)"; exit 0
fi
rm -rf "$PKI"; mkdir -p "$PKI"; chmod 700 "$PKI"; cd "$PKI"
exec 3>pki.log
openssl genrsa -out ca.key 2048 2>&3
openssl req -x509 -new -key ca.key -subj /CN=kernel-sandbox-test-ca -days 30 -out ca.crt
sign() {  # name subject extensions
  openssl genrsa -out "$1.key" 2048 2>&3
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  printf '[ext]\n%s\n' "$3" > "$1.cnf"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile "$1.cnf" -extensions ext -out "$1.crt" 2>&3
}
sign apiserver /CN=kube-apiserver "subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:$K8S_NODE_NAME,IP:127.0.0.1,IP:10.96.0.1,IP:$K8S_NODE_IP
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
sign kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
openssl genrsa -out sa.key 2048 2>&3; openssl rsa -in sa.key -pubout -out sa.pub 2>&3
K8S_PKI=$PKI K8S_NODE_NAME=$K8S_NODE_NAME K8S_API_PORT=$K8S_API_PORT python3 - <<'PY'
import os, secrets
pki, node, port = os.environ["K8S_PKI"], os.environ["K8S_NODE_NAME"], os.environ["K8S_API_PORT"]
users = [("admin", "kernel-sandbox-admin", "system:masters"),
         ("kcm", "system:kube-controller-manager", ""), ("sched", "system:kube-scheduler", ""),
         ("kubelet", f"system:node:{node}", "system:nodes"), ("proxy", "system:kube-proxy", "")]
lines = []
for short, user, group in users:
    token = secrets.token_hex(16)
    lines.append(f"{token},{user},{user}" + (f',"{group}"' if group else ""))
    path = f"{pki}/{short}.kubeconfig"
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: kernel-sandbox-test
  cluster: {{server: 'https://127.0.0.1:{port}', certificate-authority: {pki}/ca.crt}}
users:
- name: {short}
  user: {{token: {token}}}
contexts:
- name: kernel-sandbox-test
  context: {{cluster: kernel-sandbox-test, user: {short}}}
current-context: kernel-sandbox-test
""")
with open(os.open(f"{pki}/tokens.csv", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
    f.write("\n".join(lines) + "\n")
PY
chmod 600 ./*.key
rm -f ./*.csr ./*.cnf
openssl verify -CAfile ca.crt apiserver.crt kubelet-client.crt >&3
echo "$STAMP" > .complete
k8s_log "pki made in $PKI ($STAMP)"
