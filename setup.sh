#!/usr/bin/env bash
# One command for a fresh Linux machine: Docker engine (if none answers), kernel-sandbox,
# the base and kernel images, the python3-sandbox kernelspec, then the demo notebook
# executed in a sandboxed kernel.  Run as root (or with sudo).
#
#   sudo bash setup.sh            # everything, then run notebooks/demo.ipynb
#   sudo bash setup.sh --no-demo  # everything but the demo (what CI uses)
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-python3}
RUN_DEMO=1
[[ "${1:-}" == "--no-demo" ]] && RUN_DEMO=0

step() { printf '\n== %s\n' "$*"; }
apt_updated=0
apt_install() {
  if [[ $apt_updated == 0 ]]; then apt-get update -q; apt_updated=1; fi
  apt-get install -y -q "$@"
}

step "Python packages (kernel-sandbox and test tools)"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"

# --- browser for tests/test_browser.py (JupyterLab driven by Playwright) --------------------
# Debian's chromium: Playwright cannot download its own browsers here and is pointed at
# /usr/bin/chromium instead (never run `playwright install`).
step "Chromium (headless browser for the JupyterLab test)"
command -v chromium >/dev/null || apt_install chromium
# --- end of browser block --------------------------------------------------------------------

# tests/test_hub*.py: JupyterHub's configurable-http-proxy comes from npm (the hub fixture
# installs it into ~/.cache/kernel-sandbox-chp when it is not on PATH)
step "Node and npm (configurable-http-proxy for the JupyterHub tests)"
command -v npm >/dev/null || apt_install nodejs npm

step "gVisor (runsc) registered as an OCI runtime"
command -v runsc >/dev/null || apt_install runsc
# --network=none: no network stack inside (required on these hosts);
# --host-uds=all: the kernel creates its ipc sockets and reaches host sockets (data broker).
"$PYTHON" - <<'PY'
import json, os
path = "/etc/docker/daemon.json"
config = json.load(open(path)) if os.path.exists(path) else {}
wanted = {
    "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--host-uds=all"]},
    # Kubernetes pods of the test cluster (.ci/k8s, RuntimeClass gvisor): the kernel joins its
    # pod's network namespace, where gVisor passes socket calls to the host kernel (its own
    # netstack does not start here); everything else stays gVisor's
    "runsc-kube": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host"]},
}
if any(config.get("runtimes", {}).get(name) != args for name, args in wanted.items()):
    config.setdefault("runtimes", {}).update(wanted)
    os.makedirs("/etc/docker", exist_ok=True)
    json.dump(config, open(path, "w"), indent=2)
    print(f"registered runsc and runsc-kube in {path}")
PY

# curl: the egress tests lend the host's curl to a kernel to show it obeys the proxy
command -v curl >/dev/null || apt_install curl

step "Docker engine"
if docker info >/dev/null 2>&1; then
  echo "a Docker engine answers"
  if ! docker info --format '{{json .Runtimes}}' | grep -q '"runsc-kube"'; then
    echo "reloading the engine's configuration (SIGHUP) to pick up runsc and runsc-kube"
    pkill -HUP -x dockerd || true
    sleep 2
  fi
else
  command -v dockerd >/dev/null || apt_install docker.io
  echo "starting dockerd (log: /tmp/dockerd.log)"
  nohup dockerd >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /tmp/dockerd.log; echo "dockerd did not start"; exit 1; }
fi
docker info --format 'engine {{.ServerVersion}}, runtimes: {{range $k, $v := .Runtimes}}{{$k}} {{end}}'

step "Base image (kernel-sandbox/base:bookworm, built from the apt mirror; no registry)"
command -v debootstrap >/dev/null || apt_install debootstrap
kernel-sandbox image base

# numpy, pandas, pyarrow, matplotlib, ipywidgets (binder/requirements.txt): about 120 MB of
# wheels to fetch and a minute or two to build; `--minimal` builds kernel-sandbox/python:minimal
# (ipykernel and fsspec only) instead.
step "Kernel image (kernel-sandbox/python:latest, the analyst's stack)"
kernel-sandbox image build --base kernel-sandbox/base:bookworm

step "Kernelspec python3-sandbox"
kernel-sandbox install --sys-prefix
jupyter kernelspec list

if [[ $RUN_DEMO == 1 ]]; then
  step "Demo: notebooks/demo.ipynb in a sandboxed kernel"
  jupyter execute --kernel_name python3-sandbox --output demo-executed notebooks/demo.ipynb
  echo "executed notebook written to notebooks/demo-executed.ipynb"
fi
