"""Training state without pickle: the optimizer / scheduler / RNG files, checkpoints, and resume through the
shared accelerate loop (an interrupted run continued from its checkpoint ends exactly where an uninterrupted one
does). The loop is driven by a small regression trainer here so the machinery is tested on its own; the method
tests run the same loop on the real trainers."""
import json
import os

import numpy as np
import pytest
import torch

from fixtures_train import one_thread, train_lib  # noqa: F401


class Base:
    model = clip = vae = clip_vision = None
    name = "none"


def toy_trainer_class(pack):
    from comfyui_likeness.train.method import MethodTrainer
    from comfyui_likeness.weights.safetensors_file import save_file

    class Regression(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(5)
            self.x = torch.randn(24, 6, generator=g)
            self.y = self.x @ torch.randn(6, 2, generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "y": self.y[i], "index": i}

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

        def forward(self, b):
            pred = self.net(b["x"] + 0.01 * b["noise"])
            return {"loss": torch.nn.functional.mse_loss(pred, b["y"]), "logs": {"seen": float(b["index"].float().mean())}}

    class Toy(MethodTrainer):
        name = "toy"
        file_name = "toy.safetensors"

        def setup(self):
            self.module = Step()
            return self

        def dataset(self):
            return Regression()

        def prepare_batch(self, batch, generator):
            return {**batch, "noise": torch.randn(batch["x"].shape, generator=generator)}

        def export(self, directory, module=None):
            path = os.path.join(directory, self.file_name)
            save_file(path, {k: v for k, v in (module or self.module).state_dict().items()}, "toy", 1)
            return path

        def sample_images(self, module=None, steps=30):
            return torch.rand(2, 8, 8, 3)

    return Toy


def run(pack, out_dir, **kw):
    from accelerate.state import AcceleratorState, GradientState
    from comfyui_likeness.train.config import TrainConfig
    from comfyui_likeness.train.loop import train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    settings = dict(output_dir=str(out_dir), max_steps=4, batch_size=3, gradient_accumulation_steps=2,
                    learning_rate=0.05, checkpoint_every=2, log_every=1, cpu=True, seed=3, max_grad_norm=1.0,
                    lr_warmup_steps=2)
    settings.update(kw)
    trainer = toy_trainer_class(pack)(Base())
    result = train(trainer, TrainConfig(**settings))
    return result, {k: v.detach().clone() for k, v in result["module"].state_dict().items()}


def test_optimizer_state_round_trip_without_pickle(train_lib, tmp_path):
    o = train_lib["optim"]
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    data = [torch.randn(5, 4) for _ in range(6)]

    def step(n, o_, s_, x):
        o_.zero_grad()
        n(x).pow(2).mean().backward()
        o_.step()
        s_.step()

    for x in data[:3]:
        step(net, opt, sched, x)
    path = str(tmp_path / "opt.safetensors")
    o.save_optimizer(path, opt, sched)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        assert f.read(1) == b"{" and header_len > 0   # a safetensors header, not a pickle
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=0.1, betas=(0.8, 0.95))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    o.load_optimizer(path, opt2, sched2)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and sched2.get_last_lr() == sched.get_last_lr()
    for x in data[3:]:
        step(net, opt, sched, x)
        step(twin, opt2, sched2, x)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # an optimizer of another shape is refused in plain words
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="another trainer configuration"):
        o.load_optimizer(path, other)
    with pytest.raises(ValueError, match="does not exist"):
        o.load_optimizer(str(tmp_path / "missing.safetensors"), opt2)
    o.save_rng(str(tmp_path / "rng.safetensors"))
    with pytest.raises(ValueError, match="is a random-number state file, not an optimizer state file"):
        o.load_optimizer(str(tmp_path / "rng.safetensors"), opt2)


def test_rng_state_round_trip(train_lib, tmp_path):
    o = train_lib["optim"]
    g = torch.Generator().manual_seed(9)
    torch.manual_seed(4)
    path = str(tmp_path / "rng.safetensors")
    o.save_rng(path, {"noise": g})
    want = (torch.rand(3), torch.rand(3, generator=g))
    torch.manual_seed(123)
    g.manual_seed(0)
    o.load_rng(path, {"noise": g})
    assert torch.equal(torch.rand(3), want[0]) and torch.equal(torch.rand(3, generator=g), want[1])


def test_loop_checkpoints_resume_logs_and_samples(pack, tmp_path):
    full, want = run(pack, tmp_path / "full", sample_every=2)
    assert full["step"] == 4 and all(np.isfinite(full["losses"]))
    root = tmp_path / "full"
    # safetensors and JSON only: nothing anyone would have to unpickle
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert files and all(f.endswith((".safetensors", ".json", ".jsonl", ".png")) for f in files), files
    ck = root / "checkpoints" / "step_000004"
    assert sorted(os.listdir(ck)) == ["optimizer.safetensors", "rng_rank0.safetensors", "state.json",
                                      "toy.safetensors", "trainable.safetensors"]
    assert json.loads((ck / "state.json").read_text())["step"] == 4
    log = [json.loads(line) for line in (root / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("loss" in r and "lr" in r for r in log)
    assert log[0]["lr"] < log[1]["lr"]  # warm-up
    assert os.path.isfile(root / "samples" / "step_000002.png") and os.path.isfile(root / "toy.safetensors")

    # interrupted after 2 steps, then resumed from the latest checkpoint: the same weights as the full run
    run(pack, tmp_path / "split", max_steps=2)
    resumed, got = run(pack, tmp_path / "split", max_steps=4, resume="latest")
    assert resumed["step"] == 4
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=1e-6)


def test_bad_settings_are_named(pack, tmp_path):
    from comfyui_likeness.train.config import TrainConfig

    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8").validate()
    with pytest.raises(ValueError, match="unknown training settings: lr"):
        TrainConfig.from_dict({"lr": 1})
    cfg = TrainConfig().with_overrides(["max_steps=7", "options.omega=0.25", "method=taming"])
    assert cfg.max_steps == 7 and cfg.options == {"omega": 0.25} and cfg.method == "taming"
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        run(pack, tmp_path / "x", resume=str(tmp_path / "nowhere"))
