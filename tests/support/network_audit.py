"""Launch ComfyUI's main.py with a Python audit hook that records every name lookup and socket connect.

    python network_audit.py LOG_PATH main.py [server arguments...]

Each event is one JSON line in LOG_PATH: the event name, its address arguments, the thread, seconds since
start, and the innermost frames of the Python stack that caused it (to name the library responsible)."""
import json
import os
import runpy
import sys
import threading
import time
import traceback

EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
          "socket.getnameinfo", "socket.connect", "socket.sendto"}
T0 = time.time()


def _address(event, args):
    if event == "socket.connect":
        return repr(args[1])
    if event == "socket.sendto":
        return repr(args[1])
    return repr(args[:2])


def main():
    log_path, script, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    log = open(log_path, "a", buffering=1)
    lock = threading.Lock()
    busy = threading.local()

    def hook(event, args):
        if event not in EVENTS or getattr(busy, "on", False):
            return
        busy.on = True
        try:
            frames = [f"{os.path.relpath(f.filename) if not f.filename.startswith('<') else f.filename}:{f.lineno} {f.name}"
                      for f in traceback.extract_stack()[:-1]][-14:]
            with lock:
                log.write(json.dumps({"event": event, "address": _address(event, args),
                                      "thread": threading.current_thread().name,
                                      "t": round(time.time() - T0, 3), "stack": frames}) + "\n")
        finally:
            busy.on = False

    sys.addaudithook(hook)
    import socket
    # a first lookup and connect on loopback, so a reader of this log (and of an strace log) can tell it was live
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        socket.create_connection(listener.getsockname()).close()
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
