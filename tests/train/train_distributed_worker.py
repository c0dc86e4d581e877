"""One process of the 2-process CPU (gloo) run that tests/train/test_train_distributed.py starts with `accelerate launch`:
the real ProFusion pre-training loop on micro models. Writes this rank's trainable weights before and after
training, and the data indices and losses it saw.

    accelerate launch --multi_gpu --num_processes 2 tests/train/train_distributed_worker.py OUT_DIR DATA_DIR
"""
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(REPO, "tests", "support"), os.path.join(REPO, "scripts")]


def main(out_dir: str, data_dir: str, steps: int = 3):
    import host_harness as harness

    harness.import_host(tempfile.mkdtemp(prefix="likeness_dist_"))
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import save_file

    import micro as m
    from comfyui_likeness.train.base_models import BaseModels
    from comfyui_likeness.train.checkpoint import trainable_state
    from comfyui_likeness.train.config import TrainConfig
    from comfyui_likeness.train.data import scan_images
    from comfyui_likeness.train.loop import train
    from comfyui_likeness.train.profusion import PromptNetPretrainer

    base = BaseModels(m.micro_model(), m.micro_clip(), m.micro_vae(), m.micro_clip_vision(), "micro")
    trainer = PromptNetPretrainer(base, {"region_channels": 8}, scan_images(data_dir), resolution=64)
    seen, initial = [], {}
    setup, prepare = trainer.setup, trainer.prepare_batch

    def setup_spy():
        out = setup()
        initial.update(trainable_state(trainer.module))
        return out

    def prepare_spy(batch, generator):
        seen.extend(int(i) for i in batch["index"])
        return prepare(batch, generator)

    trainer.setup, trainer.prepare_batch = setup_spy, prepare_spy
    config = TrainConfig(output_dir=os.path.join(out_dir, "run"), resolution=64, batch_size=1, max_steps=steps,
                         learning_rate=1e-3, checkpoint_every=0, log_every=1, seed=7)
    result = train(trainer, config)
    acc = result["accelerator"]
    rank = acc.process_index
    final = trainable_state(acc.unwrap_model(result["module"]))
    save_file(final, os.path.join(out_dir, f"final_rank{rank}.safetensors"))
    save_file(initial, os.path.join(out_dir, f"initial_rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": acc.num_processes, "backend": str(acc.state.backend),
                   "distributed_type": str(acc.distributed_type), "seen": seen, "losses": result["losses"]}, f)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
