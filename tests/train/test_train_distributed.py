"""Gradients are synchronised across processes: `accelerate launch` runs the ProFusion pre-training loop on 2 CPU
processes (gloo); each reads different samples, yet after several steps both hold identical weights, which
differ from the start (the all-reduced update was applied everywhere)."""
import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from fixtures_train import write_folder

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_keep_identical_weights(tmp_path, pack):
    data = write_folder(str(tmp_path / "data"), ("a", "b"), per=2)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
           os.path.join(HERE, "train_distributed_worker.py"), str(out), data]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2] and all("MULTI_CPU" in i["distributed_type"] for i in info)
    assert all(i["backend"] == "gloo" for i in info)
    assert info[0]["seen"] != info[1]["seen"]                    # each process trained on its own shard
    assert len(info[0]["losses"]) == 3 and info[0]["losses"] == info[1]["losses"]  # the logged loss is all-reduced
    finals = [load_file(str(out / f"final_rank{r}.safetensors")) for r in (0, 1)]
    initial = load_file(str(out / "initial_rank0.safetensors"))
    assert finals[0].keys() == finals[1].keys() == initial.keys() and len(initial) > 50
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), f"{k} differs between the processes"
    moved = [k for k in initial if not torch.equal(initial[k], finals[0][k])]
    assert len(moved) > len(initial) // 2, "training did not change the weights"
    assert (out / "run" / "promptnet.safetensors").is_file()     # written once, by the main process
