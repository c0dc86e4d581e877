"""The command line as users run it: `accelerate launch train/launch.py` imports the host itself, loads the
stand-in SD1.5 checkpoint through the host's checkpoint loader, trains Inv-Adapter for two steps in bf16 mixed
precision on the CPU, and writes an EAA file that fits that checkpoint."""
import json
import os
import subprocess
import sys

from fixtures_train import write_folder

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def test_accelerate_launch_trains_from_a_checkpoint_file(checkpoint, base_dir, tmp_path):
    import comfy.sd
    from comfyui_likeness.core.layout import attention_layout
    from comfyui_likeness.weights.eaa import check_eaa_for_model, load_eaa

    ckpt = os.path.join(base_dir, "models", "checkpoints", checkpoint)
    data = write_folder(str(tmp_path / "data"), ("a", "b"), per=1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", os.path.join(REPO, "train", "launch.py"),
           "--method", "inv_adapter", "--checkpoint", ckpt, "--data", data, "--output-dir", str(out),
           "--max-steps", "2", "--batch-size", "1", "--mixed-precision", "bf16",
           "--set", "resolution=64", "--set", "checkpoint_every=0", "--set", "options.reference_size=64",
           "--set", "options.inversion_steps=2", "--set", "options.face_backend=none", "--set", "options.s_c=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and os.path.isfile(summary["file"])
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["loss"] == log[-1]["loss"]
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "bf16"
    adapter = load_eaa(summary["file"])
    model = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]
    check_eaa_for_model(adapter.spec, attention_layout(model))   # trained for exactly this checkpoint
