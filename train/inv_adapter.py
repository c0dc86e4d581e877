"""Inv-Adapter trainer (Xing et al. 2024, §3.3, §4.1; docs/methods/inv-adapter.md) on the pack's EAA modules.

Objective: L = E||eps - eps_theta(Z_t, C, Z_t^p, C_inv, t)||^2 where Z_t is the noised latent of the full
image, C = C_inv = the image's caption, and Z_t^p the DDIM-inversion latent of its face crop at the same t.
Only the Embedded Attention Adapter is trained (self K'/V', cross token aggregation + K'/V'), sigma_I = 1.

Per image, the face crop is inverted once (samplers/inversion.ddim_invert_trajectory, CFG 1, the caption as
prompt, `inversion_steps` DDIM steps) and the trajectory is cached as a safetensors file (fp16 latents: about
1.6 MB per image at 512 px and 50 steps). A training sample takes t on that grid, so Z_t^p is exact: the frozen UNet runs on Z_t^p with
C_inv and the attention inputs of every block are captured (attention/reference_features.FeatureCapture);
then the UNet runs on Z_t with the EAA contributions of attention/inv_adapter.py fed those features.
AdamW lr 1e-4, weight decay 1e-2 (the paper; batch 4 on each of 16 V100 for a week).
"""
import collections
import hashlib
import logging
import os

import torch

from ..attention.dispatcher import add_contribution
from ..attention.inv_adapter import EAAContribution, reference_conditioning
from ..core.layout import attention_layout, weights_digest
from ..attention.reference_features import FeatureCapture
from ..encoders.embedded_attention_adapter import EAASpec, EmbeddedAttentionAdapter
from .data import ImageDataset
from .diffusion import (add_noise, check_trainable_model, denoise, encode_images, eps_from_denoised, eps_loss, fresh,
                        size_conditioning_y)
from .face_data import face_dataset
from .method import MethodTrainer
from .prompt import CaptionEncoder

log = logging.getLogger("likeness.train")

DEFAULT_CAPTION = "a photo of a face"   # when an image has no caption (the paper captions every image)


class BatchCapture(FeatureCapture):
    """The reference branch's capture patch (attn1_patch / attn2_patch: the normalised hidden states a block feeds
    its attention) keeping every row: a training batch holds one reference per sample, where inference keeps
    the first row only."""

    def __call__(self, n, context, value, extra_options):
        block = extra_options.get("block")
        if block is not None:
            key = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
            self.store[(self.site, key)] = n.detach()
        return n, context, value


class TrainingFeatures:
    """The reference features of the current batch, handed to the EAA contributions (the inference provider's
    lookup() contract, attention/reference_features.ReferenceProvider)."""

    def __init__(self):
        self.current = None

    def lookup(self, extra_options, site, key):
        if self.current is None:
            raise RuntimeError("Inv-Adapter trainer: no reference features were set for this step")
        return self.current[(site, tuple(key))]

    def __deepcopy__(self, memo):
        return self


class InvAdapterStep(torch.nn.Module):
    def __init__(self, adapter: EmbeddedAttentionAdapter, trainer):
        super().__init__()
        self.adapter = adapter
        self._trainer = [trainer]

    def forward(self, b: dict) -> dict:
        tr = self._trainer[0]
        tr.features.current = b["features"]
        try:
            extra = {} if b.get("y") is None else {"y": b["y"]}
            denoised = denoise(tr.train_patcher, b["x_t"], b["sigma"], b["context"], **extra)
        finally:
            tr.features.current = None
        loss = eps_loss(eps_from_denoised(b["x_t"], b["sigma"], denoised), b["noise"])
        return {"loss": loss, "logs": {}}


class InvAdapterTrainer(MethodTrainer):
    """options: reference_size (512), s_c (256), sides (["self", "cross"]), inversion_steps (50), scheduler
    ("ddim_uniform"), default_caption, cache_dir (inversion trajectories; output_dir/cache/inversion),
    memory_cache (64 trajectories), and the face-crop options of train/face_data.face_dataset (face_backend
    'insightface' by default, face_factor 1.0: Inv-Adapter's square face box)."""

    name = "inv_adapter"
    file_name = "inv_adapter_eaa.safetensors"
    default_learning_rate = 1e-4

    def __init__(self, base, options, records, config):
        super().__init__(base, options)
        base.require("clip", "vae", method="Inv-Adapter training")
        check_trainable_model(base.model)
        self.records, self.config = records, config
        self.reference_size = int(self.option("reference_size", 512))
        self.steps = int(self.option("inversion_steps", 50))
        self.scheduler = self.option("scheduler", "ddim_uniform")
        self.sides = tuple(self.option("sides", ["self", "cross"]))
        if self.reference_size % 8 or self.reference_size < 64:
            raise ValueError(f"reference_size must be a multiple of 8, at least 64 (got {self.reference_size})")
        if self.steps < 1:
            raise ValueError(f"inversion_steps must be at least 1 (got {self.steps})")
        # Trajectories live on disk (fp16, ~1.6 MB per image at 512 px and 50 steps) with a small memory cache.
        self.trajectories = collections.OrderedDict()
        self.memory_cache = int(self.option("memory_cache", 64))
        self.cache_dir = self.option("cache_dir", os.path.join(config.output_dir, "cache", "inversion"))

    def setup(self):
        self.freeze_base()
        layout = attention_layout(self.base.model)
        latent = self.reference_size // 8
        spec = EAASpec.for_layout(layout, (latent, latent), int(self.option("s_c", 256)), self.sides)
        self.adapter = EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu")
        self.adapter.init_from_model(self.base.model, layout).requires_grad_(True)
        self.features = TrainingFeatures()
        self.train_patcher = self.base.model.clone()
        for site in layout.sites:
            layer = self.adapter.layer(site.key)
            if "self" in self.sides:
                add_contribution(self.train_patcher, "attn1", site.key,
                                 EAAContribution(self.features, "attn1", site.key, layer.self_k, layer.self_v,
                                                 combine="per_row"))
            if "cross" in self.sides:
                add_contribution(self.train_patcher, "attn2", site.key,
                                 EAAContribution(self.features, "attn2", site.key, layer.cross_k, layer.cross_v,
                                                 aggregate=layer.aggregate_tokens, combine="per_row"))
        self.captions = CaptionEncoder(self.base.clip)
        self.module = InvAdapterStep(self.adapter, self)
        self.digest = weights_digest(self.base.model)
        return self

    def dataset(self):
        c = self.config
        base = ImageDataset(self.records, c.resolution, c.crop, c.flip, self.option("default_caption", DEFAULT_CAPTION),
                            c.seed)
        return face_dataset(base, {"face_factor": 1.0, **self.options}, self.reference_size,
                            os.path.join(c.output_dir, "cache", "faces"))

    def caption_of(self, index: int) -> str:
        captions = self.records[index].captions
        return captions[0] if captions else self.option("default_caption", DEFAULT_CAPTION)

    # --- the reference branch -------------------------------------------------------------------------------
    def _cache_file(self, index: int, caption: str) -> str | None:
        if not self.cache_dir:
            return None
        r = self.records[index]
        st = os.stat(r.path)
        key = f"{os.path.abspath(r.path)}|{st.st_size}|{int(st.st_mtime)}|{self.steps}|{self.scheduler}|" \
              f"{self.reference_size}|{caption}|{self.digest}|{self.options.get('face_factor', 1.0)}"
        os.makedirs(self.cache_dir, exist_ok=True)
        return os.path.join(self.cache_dir, hashlib.sha1(key.encode()).hexdigest()[:20] + ".safetensors")

    def trajectory(self, index: int, face: torch.Tensor, caption: str):
        """(sigmas (T+1,), latents (T+1, C, h, w)) of the face crop's inversion, computed once per image."""
        from safetensors.torch import load_file, save_file

        from ..samplers.inversion import ddim_invert_trajectory

        if index in self.trajectories:
            self.trajectories.move_to_end(index)
            return self.trajectories[index]
        path = self._cache_file(index, caption)
        if path and os.path.isfile(path):
            data = load_file(path)
            found = (data["sigmas"].float(), data["latents"].float())
        else:
            with torch.no_grad():
                raw = self.base.vae.encode(face[None, ..., :3].float())
                context, pooled = self.captions.with_pooled([caption])
                cond = reference_conditioning(self.base.model, context, pooled, self.reference_size)
                traj = ddim_invert_trajectory(self.base.model, cond, {"samples": raw}, self.steps, self.scheduler)
            found = (traj.sigmas.float().cpu(), traj.latents[:, 0].float().cpu())
            if path:
                tmp = f"{path}.{os.getpid()}.tmp"   # processes may write the same image's file
                save_file({"sigmas": found[0].contiguous(), "latents": found[1].half().contiguous()}, tmp)
                os.replace(tmp, path)
        self.trajectories[index] = found
        while len(self.trajectories) > max(1, self.memory_cache):
            self.trajectories.popitem(last=False)
        return found

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        images, faces = fresh(batch["image"]).float(), fresh(batch["face"]).float()
        indices = [int(i) for i in batch["index"]]
        captions = [self.caption_of(i) for i in indices]
        trajectories = [self.trajectory(i, faces[n], captions[n]) for n, i in enumerate(indices)]
        self.before_step()  # an inversion ran the base model: load the training patcher again
        device = self.train_patcher.load_device
        with torch.no_grad():
            x0 = encode_images(self.base.vae, self.train_patcher, images)
            k = [int(torch.randint(1, tr[0].shape[0], (1,), generator=generator)) for tr in trajectories]
            sigma = torch.stack([tr[0][i] for tr, i in zip(trajectories, k)]).float()
            reference = torch.stack([tr[1][i] for tr, i in zip(trajectories, k)])
            noise = torch.randn(x0.shape, generator=generator)
            x_t = add_noise(self.train_patcher, x0.cpu(), sigma, noise)
            context, pooled = self.captions.with_pooled(captions)
            y = size_conditioning_y(self.train_patcher, pooled, images.shape[1], images.shape[2])
            y_ref = size_conditioning_y(self.train_patcher, pooled, self.reference_size, self.reference_size)
            features = self.reference_features(reference.to(device), sigma.to(device), context.to(device),
                                               None if y_ref is None else y_ref.to(device))
        return {"x_t": x_t.to(device), "sigma": sigma.to(device), "noise": noise.to(device),
                "context": context.to(device), "y": None if y is None else y.to(device), "features": features}

    def reference_features(self, latents, sigma, caption, y=None) -> dict:
        """The frozen UNet (no EAA) on Z_t^p with C_inv (and the reference branch's y): {(site, key): (B, tokens,
        width)}."""
        store = {}
        patches = {"attn1_patch": [BatchCapture("attn1", store)], "attn2_patch": [BatchCapture("attn2", store)]}
        extra = {} if y is None else {"y": y}
        self.train_patcher.model.apply_model(latents, sigma, c_crossattn=caption, transformer_options={"patches": patches},
                                             **extra)
        return store

    # --- outputs --------------------------------------------------------------------------------------------
    def export(self, directory: str, module=None) -> str:
        from ..weights.eaa import save_eaa

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, self.file_name)
        save_eaa(path, (module or self.module).adapter, origin="trained", extra={"training": self.hyperparameters()})
        return path

    def hyperparameters(self) -> dict:
        return {"method": "Inv-Adapter (docs/methods/inv-adapter.md)", "base_model": self.base.name,
                "inversion_steps": self.steps, "scheduler": self.scheduler, "reference_size": self.reference_size,
                "sides": list(self.sides)}

    def sample_images(self, module=None, steps: int = 30):
        """Inv-Adapter Extract -> Inv-Adapter Apply (with the current EAA) -> KSampler, on the first image."""
        import comfy.sample
        import nodes

        from ..attention.inv_adapter import apply_inv_adapter, extract_inv_features

        item = self.dataset()[0]
        caption = self.caption_of(0)
        cond = nodes.CLIPTextEncode().encode(self.base.clip, caption)[0]
        features = extract_inv_features(self.base.model, self.base.vae, item["face"][None], cond, steps,
                                        "ddim_uniform", self.reference_size)
        model = apply_inv_adapter(self.base.model, features, adapter=(module or self.module).adapter, weight=1.0)
        negative = nodes.CLIPTextEncode().encode(self.base.clip, "")[0]
        size = self.config.resolution // 8
        latent = torch.zeros(1, self.base.model.model.latent_format.latent_channels, size, size)
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), steps, 5.0, "euler", "ddim_uniform",
                                      cond, negative, latent, seed=0, disable_pbar=True)
        return self.base.vae.decode(samples)
