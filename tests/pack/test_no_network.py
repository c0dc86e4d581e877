"""No network at run time, shown: the server with the pack runs every shipped workflow inside a network
namespace with only loopback up (unshare -n), and neither Python code (audit hook) nor native code (strace
of every thread and child) tries to reach any address but 127.0.0.1.

The lookups that used to happen every 5-10 s during prompts were onnxruntime's own usage telemetry (its Linux
wheel resolves a Microsoft event collector while a session exists; the pack's insightface backend holds
sessions). The pack's face package sets ORT_DISABLE_TELEMETRY=1 before onnxruntime is first imported; the
second test shows the lookups with onnxruntime alone and none once the pack's face package is loaded."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
LOOPBACK_NAMES = ("127.", "::1", "localhost", "0.0.0.0")


def netns_prefix() -> list:
    """The command prefix that runs a program in a fresh network namespace with loopback up, or a skip."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"'{tool}' is not installed, so no network namespace can be made here")
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"network namespaces are not permitted here (unshare -n: {probe.stderr.strip()})")
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def strace_or_skip_reason():
    return None if shutil.which("strace") else "strace is not installed (scripts/setup_host.sh installs it as root)"


def outside_connects(strace_text: str) -> list:
    """connect() calls to an IPv4/IPv6 address that is not loopback (AF_UNIX and netlink are local)."""
    found = []
    for line in strace_text.splitlines():
        if "connect(" not in line or not re.search(r"AF_INET6?\b", line):
            continue
        if re.search(r'inet_addr\("127\.|inet_pton\(AF_INET6, "::1"|inet_pton\(AF_INET6, "::ffff:127\.', line):
            continue
        found.append(line.strip())
    return found


def audit_events(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_shipped_workflows_run_with_the_network_cut(workflow_assets, base_dir, tmp_path, free_memory):
    prefix = netns_prefix()
    free_memory()
    result = tmp_path / "result.json"
    cmd = [*prefix, sys.executable, os.path.join(SUPPORT, "netns_run.py"), base_dir, str(result)]
    skip_strace = strace_or_skip_reason()
    if not skip_strace:
        cmd += ["--strace", str(tmp_path / "strace.txt")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0 and result.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(result.read_text())
    failed = {k: v for k, v in report["results"].items() if v != "success"}
    assert len(report["results"]) >= 3 and not failed, json.dumps(failed, indent=1)[:4000] + report["server_log"]

    events = audit_events(report["audit_log"])
    assert events and events[0]["event"] == "socket.getaddrinfo", "the audit hook recorded nothing"
    outside = [e for e in events if not any(n in e["address"] for n in LOOPBACK_NAMES)]
    assert not outside, json.dumps(outside[:5], indent=1)

    if skip_strace:
        pytest.skip(f"workflows ran with the network cut and Python made no outside lookup; {skip_strace}")
    trace = (tmp_path / "strace.txt").read_text()
    assert re.search(r'connect\(.*inet_addr\("127\.0\.0\.1"\)', trace), "strace saw not even the launcher's own connect"
    native = outside_connects(trace)
    assert not native, "connect() to outside addresses during the run:\n" + "\n".join(native[:10])


def test_onnxruntime_telemetry_is_off_once_the_pack_is_loaded(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    reason = strace_or_skip_reason()
    if reason:
        pytest.skip(reason)
    prefix = netns_prefix()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}

    def lookups(*args):
        log = tmp_path / f"strace{len(args)}.txt"
        run = subprocess.run([*prefix, "strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(log), sys.executable,
                              os.path.join(SUPPORT, "ort_session_probe.py"), *args, "12"],
                             capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        return outside_connects(log.read_text())

    if not lookups():
        pytest.skip("this onnxruntime makes no network lookups of its own: nothing to turn off")
    assert lookups("--with-pack") == [], "onnxruntime still looks up a host after the pack's face package loaded"
