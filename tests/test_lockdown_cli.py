"""``kernel-sandbox lockdown enable|disable|status`` and what ``doctor`` reports about a
server config; the last test enables lockdown with the command alone and checks a real
server then starts ``python3`` in a sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.leaks import Scope
from support.lockdown import SANDBOXED_FACTS, kernel_facts
from support.servers import jupyter_server
from traitlets.config import Config

from kernel_sandbox.cli import main
from kernel_sandbox.lockdown.report import exposed_by_root, server_findings

EXT = "kernel_sandbox.lockdown"


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Jupyter config directory of this test's own (``--user`` writes there)."""
    directory = tmp_path / "jupyter-config"
    directory.mkdir()
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(directory))
    return directory


def test_enable_disable_status(config_dir: Path) -> None:
    written = config_dir / "jupyter_server_config.d" / f"{EXT}.json"
    assert main(["lockdown", "status"]) == 1
    assert main(["lockdown", "enable", "--user"]) == 0
    assert json.loads(written.read_text())["ServerApp"]["jpserver_extensions"] == {EXT: True}
    assert main(["lockdown", "status"]) == 0
    assert main(["lockdown", "disable", "--user"]) == 0
    assert json.loads(written.read_text())["ServerApp"]["jpserver_extensions"] == {EXT: False}
    assert main(["lockdown", "status"]) == 1


def test_enable_says_when_another_file_overrides_it(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    override = {"ServerApp": {"jpserver_extensions": {EXT: False}}}
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(override))
    assert main(["lockdown", "enable", "--user"]) == 1
    assert "another config file overrides" in capsys.readouterr().err


def test_scopes_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lockdown", "enable", "--user", "--system"]) == 2


def findings(config: Config, extensions: dict[str, bool]) -> dict[str, tuple[str, str]]:
    found = server_findings(config, ["python3-sandbox"], ["python3"], extensions)
    return {name: (status, detail) for name, status, detail, _fix in found}


def test_report_open_server() -> None:
    found = findings(Config(), {"jupyter_server_terminals": True, "jupyter_scheduler": True})
    assert found["lockdown"][0] == "warn"
    assert "python3" in found["unsandboxed kernelspecs"][1]
    assert "host shell" in found["terminals"][1]
    assert found["extension jupyter_scheduler"][0] == "warn"
    assert found["contents API"][0] == "warn"


def test_report_locked_server(tmp_path: Path) -> None:
    config = Config({"ServerApp": {"root_dir": str(tmp_path)}})
    found = findings(config, {EXT: True, "jupyter_server_terminals": True})
    assert found["lockdown"][0] == "ok"
    assert "mapped to python3-sandbox" in found["lockdown"][1]
    assert found["unsandboxed kernelspecs"][0] == "ok"
    assert found["terminals"] == (
        "ok",
        "sandboxed (each shell in a container under python3-sandbox's policy)",
    )
    assert found["contents API"][0] == "ok"
    config.SandboxLockdown.map_to = "missing"
    config.SandboxLockdown.on_unsandboxed = "refuse"
    assert findings(config, {EXT: True})["lockdown"][0] == "fail"
    config.ServerApp.allow_external_kernels = True
    assert findings(config, {EXT: True})["foreign kernels"][0] == "fail"


def test_root_holding_jupyter_config_is_reported(config_dir: Path) -> None:
    root = config_dir.parent
    assert str(config_dir) in exposed_by_root(str(root))
    config = Config({"ServerApp": {"root_dir": str(root)}})
    status, detail = findings(config, {EXT: True})["contents API"]
    assert status == "warn" and str(config_dir) in detail


@pytest.mark.integration
def test_enable_locks_down_a_real_server(
    config_dir: Path, tmp_path: Path, kernel_image: str, leak_check: Scope
) -> None:
    assert main(["lockdown", "enable", "--user"]) == 0
    root = tmp_path / "root"
    root.mkdir()
    with jupyter_server(root, tmp_path / "server.log") as server:
        leak_check.pids.add(server.process.pid)
        kernel = server.api("POST", "/api/kernels", json={"name": "python3"}).json()
        try:
            assert kernel["name"] == "python3-sandbox"
            assert kernel_facts(server, kernel["id"]) == SANDBOXED_FACTS
        finally:
            server.api("DELETE", f"/api/kernels/{kernel['id']}")
