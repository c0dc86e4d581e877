"""Taming Encoder trainer (Jia et al. 2023, §3.3-3.4, §4, §5; docs/methods/taming-encoder.md) on the
pack's modules.

The object embedding o = f_o(x * m) is the frozen CLIP vision tower on the background-removed subject
(encoders/taming_object.encode_object: the inference preprocessing). Per sample of a mixed batch
(encoders/taming_training.py):
  domain-specific sample (a subject with an identity): with probability omega the embedding of ANOTHER image of
  the same identity (cross-reference regularisation, eq. 3), otherwise its own;
  general-domain sample: always the null embedding phi (object-embedding dropping, eq. 4). phi is fixed by
  default (all-zero CLIP tokens through the trained projection); null_embedding "learned" trains free tokens;
and the fraction of domain samples is r (0.3, §5 Fig. 9). The general-domain set is required: r = 1 loses text
control (Fig. 9), so without options.general_data the trainer stops unless options.domain_only is true.
What is trained (§3.4 "Whole-Network Tuning", §4 "the entire network except the object encoder"): by default
the whole UNet together with the added attention (gates starting at 0) and the projection; train_unet false
trains only the adapter (Fig. 7: keeps text control, loses identity). The whole UNet keeps float32 master
weights (the command line loads it so); the tuned UNet is written next to the adapter. The loss is the
eps-MSE; captions get 10 % text dropout. The paper gives no learning rate: 1e-4 for the adapter,
1e-5 for the UNet. SDXL: the UNet's `y` comes from the pooled caption output and the image size.
"""
import logging
import os
import random

import torch

from ..core.layout import attention_layout, weights_digest
from ..attention.taming import attach_for_training
from ..encoders.taming_encoder import NULL_MODES, TamingEncoder, TamingSpec, VisionSpec
from ..encoders.taming_training import DEFAULT_OMEGA, NULL, cross_reference_choice, training_object_tokens
from .data import ImageDataset, scan_images
from .diffusion import add_noise, check_trainable_model, denoise, encode_images, eps_from_denoised, eps_loss, fresh
from .diffusion import sample_timesteps, sigmas_for, size_conditioning_y
from .face_data import face_dataset
from .method import MethodTrainer
from .prompt import CaptionEncoder

log = logging.getLogger("likeness.train")

DOMAIN_RATIO = 0.3      # r (Taming Encoder §5, Fig. 9)
TEXT_DROPOUT = 0.1      # the pack's choice
TRAIN_UNET = True       # §3.4 Whole-Network Tuning
NULL_EMBEDDING = "fixed"  # eq. 4
UNET_LEARNING_RATE = 1e-5  # not given by the paper: 10x below the adapter's


def trains_whole_unet(options: dict) -> bool:
    """Whether a Taming run trains the UNet's own weights (then the base UNet is loaded in float32)."""
    return bool(dict(options or {}).get("train_unet", TRAIN_UNET))


def check_general_data(options: dict):
    """The paper mixes a general-domain set in (r = 0.3); training on domain data alone (r = 1) loses text control
    (Fig. 9), so it takes an explicit domain_only: true."""
    options = dict(options or {})
    general, domain_only = options.get("general_data", ""), bool(options.get("domain_only", False))
    if general and domain_only:
        raise ValueError("options.general_data and options.domain_only exclude each other: domain_only trains on "
                         "the domain set alone (r = 1)")
    if not general and not domain_only:
        raise ValueError(
            "the Taming Encoder trainer needs general-domain data: set options.general_data to a folder of captioned "
            "images (any text-image set; each image with a sidecar .txt caption). The paper mixes a fraction r = 0.3 "
            "of domain images with general ones; with domain data alone (r = 1) the model loses text control "
            "(Taming Encoder (Jia et al. 2023) Fig. 9). To train on domain data alone anyway, set options.domain_only to true")
    return general, domain_only


def _state_digest(state: dict) -> str:
    """core.layout.weights_digest of a UNet state dict (what the host sees once it has loaded the saved file)."""
    import types

    view = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=types.SimpleNamespace(
        state_dict=lambda: state)))
    return weights_digest(view)


class MixedDataset(torch.utils.data.Dataset):
    """Domain-specific items with probability `ratio`, general-domain items otherwise (deterministic per
    (seed, epoch, index)); every item carries "is_domain" and the same keys."""

    def __init__(self, domain, general=None, ratio: float = DOMAIN_RATIO, seed: int = 0):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"domain_ratio must be in (0, 1] (got {ratio})")
        self.domain, self.general, self.ratio, self.seed, self.epoch = domain, general, float(ratio), int(seed), 0
        if general is None:
            self.ratio = 1.0   # domain data alone (the trainer only builds this with options.domain_only)

    def __len__(self):
        return len(self.domain) if self.general is None else len(self.domain) + len(self.general)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        for ds in (self.domain, self.general):
            if ds is not None and hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, int(index), 7919)) & 0xFFFFFFFF)  # ints: same hash in every process
        if self.general is None or rng.random() < self.ratio:
            item = self.domain[rng.randrange(len(self.domain)) if self.general is not None else index]
            return {**item, "is_domain": True}
        item = self.general[rng.randrange(len(self.general))]
        size = self.domain_face_size()
        return {**item, "face": torch.zeros(size, size, 3), "face_mask": torch.zeros(size, size), "face_found": False,
                "image_kps": torch.full((5, 2), float("nan")), "other": -1, "identity": -1, "is_domain": False}

    def domain_face_size(self) -> int:
        return int(getattr(self.domain, "size", 224))


class TamingStep(torch.nn.Module):
    def __init__(self, encoder: TamingEncoder, trainer, unet=None):
        super().__init__()
        self.encoder = encoder
        if unet is not None:
            self.unet = unet     # trained too: a submodule, so DDP synchronises its gradients
        self._trainer = [trainer]

    def forward(self, b: dict) -> dict:
        tr = self._trainer[0]
        null = self.encoder.null_embedding(1)
        tokens = training_object_tokens(self.encoder, b["choice"], b["own"], b["other"], null=null)
        tr.source.set(tokens, null)
        conds = {} if b.get("y") is None else {"y": b["y"]}
        denoised = denoise(tr.train_patcher, b["x_t"], b["sigma"], b["context"], **conds)
        loss = eps_loss(eps_from_denoised(b["x_t"], b["sigma"], denoised), b["noise"])
        return {"loss": loss, "logs": {"null_fraction": float((b["choice"] == NULL).float().mean())}}


class TamingTrainer(MethodTrainer):
    """options: queries (16), depth (4), omega (0.5), domain_ratio (0.3), general_data (a folder of general
    images with captions; required unless domain_only), general_layout, domain_only (false), general_caption
    (caption of general images without one, default ""), text_dropout (0.1), train_unet (true: the whole UNet;
    false: the adapter only), unet_learning_rate (1e-5), null_embedding ('fixed' | 'learned'), background
    ('black'), the face-crop options of train/face_data.face_dataset (the subject crop and mask; face_backend
    'none' encodes the whole image) and default_caption (domain images without a caption)."""

    name = "taming"
    file_name = "taming_encoder.safetensors"
    default_learning_rate = 1e-4

    def __init__(self, base, options, records, config):
        super().__init__(base, options)
        base.require("clip", "vae", "clip_vision", method="Taming Encoder training")
        check_trainable_model(base.model)
        self.records, self.config = records, config
        self.general_data, self.domain_only = check_general_data(self.options)
        self.omega = float(self.option("omega", DEFAULT_OMEGA))
        self.train_unet = trains_whole_unet(self.options)
        self.null_mode = str(self.option("null_embedding", NULL_EMBEDDING))
        if self.null_mode not in NULL_MODES:
            raise ValueError(f"options.null_embedding must be one of {', '.join(NULL_MODES)} (got {self.null_mode!r})")
        if self.train_unet:
            dtypes = sorted({str(p.dtype).replace("torch.", "") for p in base.model.model.diffusion_model.parameters()})
            if dtypes != ["float32"]:
                raise ValueError(
                    f"whole-UNet training (options.train_unet, the paper's setting) keeps float32 master weights, "
                    f"but the UNet is loaded as {', '.join(dtypes)}: load the checkpoint in float32 (the command line "
                    "does this for the Taming trainer) or set options.train_unet to false to train the adapter only")
        self.text_dropout = float(self.option("text_dropout", TEXT_DROPOUT))
        self.find_unused_parameters = True  # a batch without domain samples leaves the projection unused
        self._domain = None

    def setup(self):
        self.freeze_base()
        layout = attention_layout(self.base.model)
        vision = VisionSpec.of_clip_vision(self.base.clip_vision)
        spec = TamingSpec.for_layout(layout, vision, queries=int(self.option("queries", 16)),
                                     depth=int(self.option("depth", 4)), null=self.null_mode)
        self.encoder = TamingEncoder(spec, dtype=torch.float32, device="cpu")
        self.encoder.init_from_model(self.base.model, layout, seed=self.config.seed).requires_grad_(True)
        self.train_patcher, self.source = attach_for_training(self.base.model, self.encoder)
        unet = None
        if self.train_unet:
            unet = self.base.model.model.diffusion_model
            unet.requires_grad_(True)   # the frozen() context restores the flags when the trainer closes
            log.info("Likeness Taming trainer: training the whole UNet in place with the adapter (the paper's "
                     "setting); the tuned UNet is exported next to the adapter (taming_unet.safetensors)")
        else:
            log.info("Likeness Taming trainer: training the added attention and the projection only (train_unet "
                     "false); the paper reports that this keeps text control but loses identity (Fig. 7)")
        if self.domain_only:
            log.warning("Likeness Taming trainer: domain_only: training on domain data alone (r = 1), which the "
                        "paper reports loses text control (Fig. 9)")
        self.captions = CaptionEncoder(self.base.clip)
        self.module = TamingStep(self.encoder, self, unet)
        return self

    def param_groups(self, learning_rate: float) -> list:
        groups = [{"params": [p for p in self.encoder.parameters() if p.requires_grad], "lr": learning_rate}]
        if self.train_unet:
            groups.append({"params": [p for p in self.module.unet.parameters() if p.requires_grad],
                           "lr": float(self.option("unet_learning_rate", UNET_LEARNING_RATE))})
        return groups

    def domain_dataset(self):
        if self._domain is None:
            c = self.config
            base = ImageDataset(self.records, c.resolution, c.crop, c.flip, self.option("default_caption", ""), c.seed)
            self._domain = face_dataset(base, self.options, self.base.clip_vision.image_size,
                                        os.path.join(c.output_dir, "cache", "faces"))
        return self._domain

    def dataset(self):
        c = self.config
        general = None
        if self.general_data:
            records = scan_images(self.general_data, self.option("general_layout", "folder"))
            uncaptioned = sum(1 for r in records if not r.captions)
            if uncaptioned:
                log.warning("Likeness Taming trainer: %d of %d general-domain images have no caption (they are "
                            "trained with %r); the general set is what keeps text control, so caption it",
                            uncaptioned, len(records), self.option("general_caption", ""))
            general = ImageDataset(records, c.resolution, c.crop, c.flip, self.option("general_caption", ""), c.seed + 1)
        return MixedDataset(self.domain_dataset(), general, float(self.option("domain_ratio", DOMAIN_RATIO)), c.seed)

    def object_features(self, faces: torch.Tensor, masks: torch.Tensor, use_mask: torch.Tensor) -> torch.Tensor:
        """CLIP-vision tokens of the background-removed subjects, as Taming Encode computes them."""
        from ..encoders.taming_object import encode_object

        rows = []
        for face, mask, masked in zip(faces, masks, use_mask):
            m = mask[None] if bool(masked) and float(mask.max()) > 1e-3 else None
            crop = "subject box" if m is not None else "pad to square"
            rows.append(encode_object(self.base.clip_vision, face[None], m, self.option("background", "black"),
                                      crop).features)
        return torch.cat(rows)

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        images = fresh(batch["image"]).float()
        n = images.shape[0]
        is_domain = torch.as_tensor(batch["is_domain"], dtype=torch.bool).reshape(n)
        others = torch.as_tensor(batch["other"]).reshape(n)
        has_other = is_domain & (others >= 0)
        choice = cross_reference_choice(is_domain, has_other, self.omega, generator)
        device = self.train_patcher.load_device
        with torch.no_grad():
            faces, masks = fresh(batch["face"]).float(), fresh(batch["face_mask"]).float()
            masked = torch.as_tensor(batch.get("face_found", [False] * n)).reshape(n) | (masks.flatten(1).amax(1) > 0)
            own = self.object_features(faces, masks, masked) if bool(is_domain.any()) else None
            other = None
            if bool((choice == 1).any()):
                domain = self.domain_dataset()
                items = [domain[int(j)] if int(j) >= 0 else None for j in others]
                other_faces = torch.stack([it["face"] if it is not None else faces[i] for i, it in enumerate(items)])
                other_masks = torch.stack([it["face_mask"] if it is not None else masks[i] for i, it in enumerate(items)])
                other = self.object_features(other_faces, other_masks, torch.ones(n, dtype=torch.bool))
            captions = [("" if torch.rand(1, generator=generator).item() < self.text_dropout else c)
                        for c in batch["caption"]]
            x0 = encode_images(self.base.vae, self.train_patcher, images)
            t = sample_timesteps(n, generator)
            sigma = sigmas_for(self.train_patcher, t)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = add_noise(self.train_patcher, x0.cpu(), sigma, noise)
            context, pooled = self.captions.with_pooled(captions)
            y = size_conditioning_y(self.train_patcher, pooled, images.shape[1], images.shape[2])
        to = (lambda x: None if x is None else x.to(device))
        return {"x_t": x_t.to(device), "sigma": sigma.to(device), "noise": noise.to(device),
                "context": context.to(device), "y": to(y), "choice": choice, "own": to(own), "other": to(other)}

    def export(self, directory: str, module=None) -> str:
        from ..weights.taming_file import save_taming

        module = module or self.module
        os.makedirs(directory, exist_ok=True)
        extra = {"training": self.hyperparameters()}
        if self.train_unet:
            from safetensors.torch import save_file

            unet_path = os.path.join(directory, "taming_unet.safetensors")
            state = {k: v.detach().to("cpu", torch.float16).contiguous()
                     for k, v in self.base.model.model.diffusion_model.state_dict().items()}
            save_file(state, unet_path + ".tmp", metadata={"likeness_format": "likeness.taming_unet",
                                                           "note": "the UNet tuned with the Taming Encoder adapter; "
                                                                   "load it with Load Diffusion Model"})
            os.replace(unet_path + ".tmp", unet_path)
            extra["tuned_unet_digest"] = _state_digest(state)   # of the fp16 weights the loader will read
        path = os.path.join(directory, self.file_name)
        save_taming(path, module.encoder, origin="trained", extra=extra)
        return path

    def hyperparameters(self) -> dict:
        return {"method": "Taming Encoder (docs/methods/taming-encoder.md)", "base_model": self.base.name, "omega": self.omega,
                "domain_ratio": 1.0 if self.domain_only else float(self.option("domain_ratio", DOMAIN_RATIO)),
                "domain_only": self.domain_only, "text_dropout": self.text_dropout, "train_unet": self.train_unet,
                "null_embedding": self.null_mode}

    def sample_images(self, module=None, steps: int = 30):
        """Taming Encode -> Taming Encoder Apply (current weights) -> KSampler, on the first domain image."""
        import comfy.sample
        import nodes

        from ..attention.taming import apply_taming_encoder
        from ..encoders.taming_object import encode_object
        from ..weights.taming_file import TamingAdapter

        item = self.domain_dataset()[0]
        mask = item["face_mask"][None] if float(item["face_mask"].max()) > 1e-3 else None
        embedding = encode_object(self.base.clip_vision, item["face"][None], mask,
                                  crop="subject box" if mask is not None else "pad to square")
        adapter = TamingAdapter((module or self.module).encoder, "training")
        model = apply_taming_encoder(self.base.model, adapter, embedding, weight=1.0)
        caption = item["caption"] or self.option("default_caption", "") or "a photo of a person"
        positive = nodes.CLIPTextEncode().encode(self.base.clip, caption)[0]
        negative = nodes.CLIPTextEncode().encode(self.base.clip, "")[0]
        size = self.config.resolution // 8
        latent = torch.zeros(1, attention_layout(self.base.model).latent_channels, size, size)
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), steps, 5.0, "euler", "ddim_uniform",
                                      positive, negative, latent, seed=0, disable_pbar=True)
        return self.base.vae.decode(samples)
