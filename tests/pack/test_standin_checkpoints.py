"""The stand-in checkpoints load through the host's own checkpoint loader as the family they stand in for, with
every text-encoder weight present (so CheckpointLoaderSimple graphs behave as they do with the public files)."""
import logging
import os

import pytest
import torch


@pytest.mark.parametrize("family,config,context,pooled", [("sd2", "SD20", 1024, 1024), ("sdxl", "SDXL", 2048, 1280)])
def test_standin_loads_as_its_family(request, base_dir, family, config, context, pooled, caplog):
    import comfy.sd

    name = request.getfixturevalue(f"checkpoint_{family}")
    path = os.path.join(base_dir, "models", "checkpoints", name)
    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path)
    assert type(model.model.model_config).__name__ == config
    assert not [r for r in caplog.records if "missing" in r.getMessage()], "the stand-in lacks weights the loader expects"
    cond, pool = clip.encode_from_tokens(clip.tokenize("a photo of a person"), return_pooled=True)
    assert cond.shape[-1] == context and pool.shape[-1] == pooled and torch.isfinite(cond).all()
    assert vae is not None
