"""Command line of the trainers (run through train/launch.py, which imports the host first):

    accelerate launch train/launch.py --method promptnet --config promptnet.json [--set max_steps=100 ...]

Methods: promptnet (ProFusion pre-training), promptnet_finetune (ProFusion test-time fine-tuning), inv_adapter,
taming, photoverse. --overfit-check N trains N steps on one fixed batch and prints the losses (a quick test that
the gradient path works) instead of training.
"""
import argparse
import json
import logging
import os

log = logging.getLogger("likeness.train")


def build_trainer(config, base):
    """The method's trainer for a config and loaded base models."""
    from .data import scan_images

    method, o = config.method, dict(config.options)

    def records():
        if not config.data:
            raise ValueError(f"the {method} trainer needs data: set 'data' to an image folder")
        return scan_images(config.data, config.layout, config.identities or None)

    if method == "promptnet":
        from .profusion import PromptNetPretrainer
        return PromptNetPretrainer(base, o, records(), config.resolution, config.crop, config.flip, config.seed)
    if method == "promptnet_finetune":
        import torch

        from ..weights.promptnet_file import load_promptnet
        from .data import load_image, square_resize
        from .profusion import PromptNetFineTuner, make_views

        if not o.get("promptnet"):
            raise ValueError("promptnet_finetune needs options.promptnet: the PromptNet file to fine-tune")
        net, meta = load_promptnet(o["promptnet"])
        images = [load_image(r.path) for r in records()]
        size = 8 * net.latent_size
        if len(images) == 1:
            views = make_views(images[0], int(o.get("views", 31)), size, config.seed, bool(o.get("box_mask", True)),
                               outpainter=outpainter_from_options(o, base))
        else:
            views = torch.stack([square_resize(im, size)[0] for im in images])
        return PromptNetFineTuner(base, net, meta, views, o, config.seed)
    if method == "inv_adapter":
        from .inv_adapter import InvAdapterTrainer
        return InvAdapterTrainer(base, o, records(), config)
    if method == "taming":
        from .taming import TamingTrainer
        return TamingTrainer(base, o, records(), config)
    if method == "photoverse":
        from .photoverse import PhotoVerseTrainer
        return PhotoVerseTrainer(base, o, records(), config)
    raise ValueError(f"unknown method {method!r}: one of promptnet, promptnet_finetune, inv_adapter, taming, photoverse")


def outpainter_from_options(o: dict, base):
    """options.inpaint_checkpoint (an inpainting checkpoint, e.g. SD-2-inpainting) -> the outpainter of ProFusion's
    augmentation, with that checkpoint's own text encoder and VAE; none given -> None (mean-colour fill)."""
    path = o.get("inpaint_checkpoint")
    if not path:
        return None
    from .base_models import load_base_models
    from .outpaint import PROMPT, Outpainter

    inpaint = load_base_models(path)
    outpainter = Outpainter(inpaint.model, inpaint.clip, inpaint.vae, int(o.get("outpaint_steps", 50)),
                            o.get("outpaint_prompt", PROMPT.format(subject=o.get("outpaint_subject", "person"))))
    outpainter.check(base.model.model.model_config.unet_config.get("context_dim"))
    return outpainter


def base_unet_dtype(config):
    """float32 when the run trains the UNet's own weights (AdamW on fp16 weights loses the updates), else None
    (the host's choice)."""
    if config.method == "taming":
        import torch

        from .taming import trains_whole_unet
        return torch.float32 if trains_whole_unet(config.options) else None
    return None


def parse(argv):
    from .config import TrainConfig

    p = argparse.ArgumentParser(prog="train/launch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file with the run's settings")
    p.add_argument("--method")
    p.add_argument("--output-dir")
    p.add_argument("--checkpoint", help="base model .safetensors")
    p.add_argument("--clip-vision", help="CLIP vision .safetensors")
    p.add_argument("--data", help="image folder")
    p.add_argument("--layout", choices=("folder", "ffhq", "celebahq"))
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    p.add_argument("--resume", help="'latest' or a checkpoint directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting; options.KEY for the method")
    p.add_argument("--overfit-check", type=int, default=0, metavar="N")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    for name in ("method", "output_dir", "checkpoint", "clip_vision", "data", "layout", "max_steps", "batch_size",
                 "learning_rate", "mixed_precision", "resume"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.cpu:
        config.cpu = True
    config = config.with_overrides(args.set)
    if not config.method:
        p.error("--method (or 'method' in the config) is required")
    if not config.checkpoint:
        p.error("--checkpoint (or 'checkpoint' in the config) is required: the base model to train on")
    return config, args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, args = parse(argv)
    from .base_models import load_base_models
    from .loop import overfit_losses, train

    base = load_base_models(config.checkpoint, config.clip_vision or None, base_unet_dtype(config))
    trainer = build_trainer(config, base)
    try:
        if args.overfit_check:
            from .data import collate

            trainer.setup()
            ds = trainer.dataset()
            batch = collate([ds[i] for i in range(min(len(ds), config.batch_size))])
            from .loop import learning_rate

            losses = overfit_losses(trainer, batch, args.overfit_check, learning_rate(trainer, config), config.seed)
            print(json.dumps({"method": config.method, "losses": losses}))
            return 0 if losses[-1] < losses[0] and all(map(lambda v: v == v, losses)) else 1
        result = train(trainer, config)
        if result["export"]:
            print(json.dumps({"method": config.method, "steps": result["step"], "file": os.path.abspath(result["export"])}))
    finally:
        trainer.close()
    return 0
