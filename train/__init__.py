"""Trainers, one per method, on the host's own model classes and the pack's own modules (docs/training.md).

  launch.py        entry script for `accelerate launch` (imports the host, then cli.py)
  cli.py           command line and the method registry
  config.py        a run's settings
  data.py          image folders (captions, identities; folder / FFHQ / CelebA-HQ layouts)
  face_data.py     face crops, masks and landmarks through faces/
  base_models.py   the frozen base models (the host's checkpoint and CLIP-vision loaders)
  diffusion.py     the eps objective through BaseModel.apply_model; freezing; inference-mode tensors
  prompt.py        prompts with learned vectors (the Likeness Prompt path) and caption conditionings
  method.py        what a trainer provides to the loops
  loop.py          the accelerate loop: DDP, mixed precision, accumulation, logs, samples, checkpoints, resume
  local.py         the single-process loop of the fine-tuning node
  checkpoint.py, optim_state.py   checkpoints and optimizer/RNG state in safetensors + JSON (no pickle)
  profusion.py, inv_adapter.py, taming.py, photoverse.py   the method trainers
Only launch.py runs without the host; accelerate is imported by loop.py alone, so the pack loads without it.
"""
