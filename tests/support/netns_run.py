"""Run every shipped workflow on a real ComfyUI server from inside a network namespace (the test's driver).

    python netns_run.py BASE_DIR RESULT_JSON [--strace STRACE_LOG]

Started by tests/pack/test_no_network.py under `unshare -n` with only the loopback interface up, so the server
and this client talk over 127.0.0.1 and nothing else can be reached. The server runs under network_audit.py
(every Python name lookup and connect, with its stack) and, with --strace, under strace (every connect() of
every thread and child, native libraries included). Writes {workflow: "success" | error text} and the logs'
paths to RESULT_JSON."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(os.path.dirname(HERE)), "scripts")]
import host_harness as harness  # noqa: E402
import workflow_tools as wt  # noqa: E402
from comfy_http import ComfyServer  # noqa: E402


def main():
    base_dir, result_path = sys.argv[1], sys.argv[2]
    strace_log = sys.argv[sys.argv.index("--strace") + 1] if "--strace" in sys.argv else None
    audit_log = os.path.join(os.path.dirname(result_path), "network_audit.jsonl")
    prefix = ("strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", strace_log) if strace_log else ()
    server = ComfyServer(harness.comfy_dir(), base_dir, python=sys.executable, prefix=prefix,
                         launcher=(os.path.join(HERE, "network_audit.py"), audit_log))
    results = {}
    with server:
        for path in wt.api_workflows():
            name = os.path.splitext(os.path.basename(path))[0]
            try:
                entry = server.run(wt.shrink(wt.load(path)))
                results[name] = "success" if server.images(entry) else "no image"
            except Exception as e:   # recorded, the next workflow still runs
                results[name] = f"{type(e).__name__}: {e}"[:2000]
    with open(result_path, "w") as f:
        json.dump({"results": results, "audit_log": audit_log, "strace_log": strace_log,
                   "server_log": server.log_tail(6000)}, f)


if __name__ == "__main__":
    main()
