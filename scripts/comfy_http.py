"""Drive a real ComfyUI server over HTTP on 127.0.0.1: start it, queue API-format prompts, fetch images, stop it.

Used by the README's main job (scripts/run_workflow.py) and the end-to-end tests. Standard library only.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI process with its own base directory (models, custom_nodes, input, output, user)."""

    def __init__(self, comfy_dir: str, base_dir: str, python: str = sys.executable, port: int | None = None,
                 extra_args: tuple = (), prefix: tuple = (), launcher: tuple = ()):
        """prefix: a command the server runs under (e.g. strace); launcher: a script (and its arguments) that
        python runs instead of main.py directly, with main.py and the server's arguments after it."""
        self.comfy_dir, self.base_dir, self.python = comfy_dir, base_dir, python
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.prefix, self.launcher = list(prefix), list(launcher)
        self.proc = None
        self.log_path = os.path.join(base_dir, "server.log")

    def start(self, timeout: float = 180.0):
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        cmd = [*self.prefix, self.python, *self.launcher, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *self.extra_args]
        if not _has_cuda(self.python):
            cmd.append("--cpu")
        self._log = open(self.log_path, "w")
        # Its own process group, so stop() also ends what a prefix (strace) or launcher started under it.
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up (code {self.proc.returncode}); log: {self.log_path}\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s; log: {self.log_path}")

    def stop(self):
        """Stop the server by its PID: its process group (the server, and a prefix's tracer with its tracees)."""
        if self.proc is not None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
            deadline = time.time() + 20
            while self._group_alive() and time.time() < deadline:   # a tracer exits before its tracee
                time.sleep(0.1)
            if self._group_alive():
                self._signal_group(signal.SIGKILL)
        if getattr(self, "_log", None):
            self._log.close()

    def _signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def post_json(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict) -> str:
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        if status != 200:
            raise RuntimeError(f"the server rejected the prompt ({status}): {json.dumps(body)[:3000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            msgs = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            raise RuntimeError(f"the prompt failed: {json.dumps(msgs)[:3000]}")
        return entry

    def images(self, entry: dict) -> list[tuple[str, bytes]]:
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]})
                out.append((img["filename"], self.get("/view?" + q)))
        return out


def _has_cuda(python: str) -> bool:
    p = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return p.stdout.strip() == "True"
