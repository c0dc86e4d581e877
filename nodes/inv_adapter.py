"""Inv-Adapter nodes: extract the reference branch by DDIM inversion, apply the Embedded Attention Adapter,
save/load the extracted features, load EAA adapter files."""
import logging
import os

import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io, ui

from ..attention.inv_adapter import apply_inv_adapter, extract_inv_features
from ..folders import safetensors_files
from ..weights.eaa import load_eaa
from ..weights.inv_features_file import load_inv_features, save_inv_features

log = logging.getLogger("likeness")

InvFeatures = io.Custom("LIKENESS_INV_FEATURES")
EAAAdapter = io.Custom("LIKENESS_EAA")
CATEGORY = "Likeness/inv_adapter"
FEATURES_FOLDER = "likeness_concepts"
ADAPTER_FOLDER = "likeness"
STORE_OPTIONS = {"per-step features": "all", "self-attention features": "self", "trajectory only": "none"}
COMBINE_OPTIONS = ["concat", "average", "norm average"]
SPEED_OPTIONS = {"exact": "exact", "fast (pooled reference at the largest grid)": "fast"}
APPLY_TO = {"cond and uncond": "all", "cond only": "cond"}


class LikenessInvAdapterExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessInvAdapterExtract",
            display_name="Inv-Adapter Extract (Likeness)",
            category=CATEGORY,
            description=("DDIM-inverts the face photos (CFG 1, the caption as prompt) with the model you will sample "
                         "with, and keeps what Inv-Adapter needs to give reference features at any sigma. A batch of "
                         "images is several photos of one person. 'per-step features' stores the attention inputs at "
                         "every step (fastest sampling; SD1.5 at 512: 44 MiB per step and photo, SDXL at 1024: 400 "
                         "MiB); 'self-attention features' stores half of that, all that Apply without an adapter "
                         "reads; 'trajectory only' stores the latents and re-runs the reference branch during "
                         "sampling (small; one extra batch-1 UNet pass per step). Steps whose features do not fit in "
                         "memory_gb run the reference branch live."),
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Image.Input("image", tooltip="the face crop (Face Crop node); a batch = several photos of one "
                                                "person; non-square images are centre-cropped"),
                io.Conditioning.Input("caption", tooltip="the caption of the face crop (e.g. 'a photo of a face')"),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="inversion steps; use the sampler's steps and scheduler so every step hits the cache"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="ddim_uniform"),
                io.Int.Input("size", default=512, min=64, max=2048, step=8,
                             tooltip="the reference is resized to size x size (512 for SD1.5; an EAA adapter fixes it)"),
                io.Combo.Input("store", options=list(STORE_OPTIONS), default="per-step features"),
                io.Float.Input("memory_gb", default=4.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               tooltip="most memory (CPU RAM, fp16) the stored features may take; steps beyond it run "
                                       "the reference branch live. 0 = no limit"),
            ],
            outputs=[InvFeatures.Output(display_name="inv_features")],
        )

    @classmethod
    def execute(cls, model, vae, image, caption, steps, scheduler, size, store, memory_gb=4.0) -> io.NodeOutput:
        callback = latent_preview.prepare_callback(model, steps)
        features = extract_inv_features(model, vae, image, caption, steps, scheduler, size, store=STORE_OPTIONS[store],
                                        memory_gb=memory_gb, callback=callback,
                                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        return io.NodeOutput(features)


class LikenessInvAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessInvAdapterApply",
            display_name="Inv-Adapter Apply (Likeness)",
            category=CATEGORY,
            description=("Adds sigma_I * Attn(Q, K'F, V'F) of the reference features to every transformer block. "
                         "Without an adapter (training-free): self-attention only, K'/V' = the layer's own "
                         "projections. With an EAA adapter: its K'/V' on the self side and token aggregation + K'/V' "
                         "on the cross side. Several photos: 'combine' joins their reference tokens. 'speed' fast "
                         "pools the reference 2x2 at the largest-grid blocks (about 4x less extra attention there)."),
            inputs=[
                io.Model.Input("model"),
                InvFeatures.Input("inv_features"),
                io.Float.Input("weight", default=0.8, min=0.0, max=3.0, step=0.01,
                               tooltip="sigma_I: scale of the injected attention (paper: 0.6-1.0; 0 = off)"),
                io.Boolean.Input("self_attention", default=True),
                io.Boolean.Input("cross_attention", default=True, tooltip="needs an EAA adapter with a cross side"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="cond and uncond",
                               tooltip="inject into the unconditional pass too (default), so CFG does not amplify identity"),
                EAAAdapter.Input("adapter", optional=True),
                io.Mask.Input("attn_mask", optional=True, tooltip="where in the image the identity is injected"),
                io.Combo.Input("combine", options=COMBINE_OPTIONS, default="concat", optional=True,
                               tooltip="several photos: concat = attend to every photo's tokens; average / norm average "
                                       "= one token set (the cost of one photo)"),
                io.Combo.Input("speed", options=list(SPEED_OPTIONS), default="exact", optional=True,
                               tooltip="exact = the paper's formula; fast = reference tokens pooled 2x2 at the "
                                       "largest-grid blocks (opt-in approximation, see the docs for its deviation)"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, inv_features, weight, self_attention, cross_attention, start_percent, end_percent,
                apply_to, adapter=None, attn_mask=None, combine="concat", speed="exact") -> io.NodeOutput:
        patched = apply_inv_adapter(model, inv_features, adapter=adapter, weight=weight,
                                    self_attention=self_attention, cross_attention=cross_attention,
                                    start_percent=start_percent, end_percent=end_percent, mask=attn_mask,
                                    apply_to=APPLY_TO[apply_to], combine=combine, speed=SPEED_OPTIONS[speed])
        return io.NodeOutput(patched)


class LikenessInvFeaturesSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessInvFeaturesSave",
            display_name="Save Inv-Adapter Features (Likeness)",
            category=CATEGORY,
            description="Writes INV_FEATURES to models/likeness/concepts as safetensors, tied to the model they came from.",
            is_output_node=True,
            inputs=[
                InvFeatures.Input("inv_features"),
                io.String.Input("filename_prefix", default="inv_adapter/face"),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, inv_features, filename_prefix) -> io.NodeOutput:
        root = folder_paths.get_folder_paths(FEATURES_FOLDER)[0]
        os.makedirs(root, exist_ok=True)
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{filename}_{counter:05}.safetensors")
        save_inv_features(path, inv_features)
        rel = os.path.relpath(path, root)
        log.info("Likeness: saved Inv-Adapter features to %s", path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {rel} ({inv_features.nbytes() / 2**20:.1f} MiB)"))


class LikenessInvFeaturesLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessInvFeaturesLoad",
            display_name="Load Inv-Adapter Features (Likeness)",
            category=CATEGORY,
            description="Reads INV_FEATURES saved by Save Inv-Adapter Features (models/likeness/concepts).",
            inputs=[io.Combo.Input("features_name", options=safetensors_files(FEATURES_FOLDER))],
            outputs=[InvFeatures.Output(display_name="inv_features")],
        )

    @classmethod
    def execute(cls, features_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FEATURES_FOLDER, features_name)
        if path is None:
            raise ValueError(f"features_name: '{features_name}' is not in {', '.join(folder_paths.get_folder_paths(FEATURES_FOLDER))}")
        return io.NodeOutput(load_inv_features(path))


class LikenessEAALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessEAALoader",
            display_name="Load Inv-Adapter EAA (Likeness)",
            category=CATEGORY,
            description="Loads Embedded Attention Adapter weights (models/likeness, safetensors) for Inv-Adapter Apply.",
            inputs=[io.Combo.Input("adapter_name", options=safetensors_files(ADAPTER_FOLDER))],
            outputs=[EAAAdapter.Output(display_name="adapter")],
        )

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(ADAPTER_FOLDER, adapter_name)
        if path is None:
            raise ValueError(f"adapter_name: '{adapter_name}' is not in {', '.join(folder_paths.get_folder_paths(ADAPTER_FOLDER))}")
        return io.NodeOutput(load_eaa(path))


NODES = [LikenessInvAdapterExtract, LikenessInvAdapterApply, LikenessInvFeaturesSave, LikenessInvFeaturesLoad,
         LikenessEAALoader]
