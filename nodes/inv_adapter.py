"""Inv-Adapter nodes: extract the reference branch by DDIM inversion, apply the Embedded Attention Adapter,
save/load the extracted features, load EAA adapter files."""
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..attention.inv_adapter import apply_inv_adapter, extract_inv_features
from ..folders import ADAPTERS, IDENTITIES
from ..weights.eaa import load_eaa
from ..weights.inv_features_file import load_inv_features, save_inv_features
from .files import file_loader_node, save_node

InvFeatures = io.Custom("LIKENESS_INV_FEATURES")
EAAAdapter = io.Custom("LIKENESS_EAA")
CATEGORY = "Likeness/inv_adapter"
FEATURES_FOLDER = IDENTITIES
ADAPTER_FOLDER = ADAPTERS
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


LikenessInvFeaturesSave = save_node(
    "LikenessInvFeaturesSave", "Save Inv-Adapter Features (Likeness)", CATEGORY,
    "Writes INV_FEATURES to models/likeness_identities as a new numbered safetensors file (never over an earlier "
    "one), tied to the model they came from.",
    InvFeatures, "inv_features", "inv_adapter/face", save_inv_features, "Inv-Adapter features",
    lambda features: f"{features.nbytes() / 2**20:.1f} MiB")


LikenessInvFeaturesLoad = file_loader_node(
    "LikenessInvFeaturesLoad", "Load Inv-Adapter Features (Likeness)", CATEGORY,
    "Reads INV_FEATURES saved by Save Inv-Adapter Features (models/likeness_identities).",
    "features_name", FEATURES_FOLDER, InvFeatures, "inv_features", load_inv_features)


LikenessEAALoader = file_loader_node(
    "LikenessEAALoader", "Load Inv-Adapter EAA (Likeness)", CATEGORY,
    "Loads Embedded Attention Adapter weights (models/likeness, safetensors) for Inv-Adapter Apply.",
    "adapter_name", ADAPTER_FOLDER, EAAAdapter, "adapter", load_eaa)


NODES = [LikenessInvAdapterExtract, LikenessInvAdapterApply, LikenessInvFeaturesSave, LikenessInvFeaturesLoad,
         LikenessEAALoader]
