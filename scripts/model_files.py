"""The model files shipped workflows may name: the public files users have, the pack's own adapter files, and
files users make themselves. One table, read by the workflow builder (the loaders' `properties.models` download
metadata and the Notes in the graphs), docs/workflows.md, scripts/run_workflow.py and the tests (which place a
stand-in under every name here and refuse a workflow that names a file missing from this table).

A file with a `url` is public: its loader node gets the frontend's model metadata (name, url, directory), from
which the frontend offers the download. A file without one gets a Note in the graph that says what it is and how
to make or get it (`how`).
"""
from dataclasses import dataclass

MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf")


@dataclass(frozen=True)
class ModelFile:
    name: str          # the file name as the workflow names it (the combo value)
    directory: str     # the folder under ComfyUI/models/ it goes in
    what: str          # one line: what the file is
    url: str = ""      # where to download it (public files only)
    how: str = ""      # how to get or make it, for files without a url (Markdown, shown in the graph's Note)
    family: str = ""   # the base-model family a checkpoint is (sd15, sd2, sdxl), or the CLIP vision tower (vitl, vith)


_HF = "https://huggingface.co"
_TRAIN = "accelerate launch train/launch.py --method {method} --config {method}.json"


def _trained(method: str, section: str) -> str:
    return (f"No public weights exist yet. Train it with the pack's trainer, from the pack's folder:\n\n"
            f"`{_TRAIN.format(method=method)}`\n\n(see docs/training.md, *{section}*), then copy the file it "
            f"writes into `ComfyUI/models/likeness/`.")


FILES = [
    # Base checkpoints (models/checkpoints)
    ModelFile("v1-5-pruned-emaonly-fp16.safetensors", "checkpoints", "Stable Diffusion 1.5 (the base every SD1.5 "
              "adapter of the pack is made for)",
              url=f"{_HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors"
                  "?download=true", family="sd15"),
    ModelFile("v2-1_512-ema-pruned.safetensors", "checkpoints", "Stable Diffusion 2.1-base, 512 px (the base "
              "ProFusion's published PromptNet was trained on)",
              url=f"{_HF}/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.safetensors",
              family="sd2"),
    ModelFile("sd_xl_base_1.0.safetensors", "checkpoints", "Stable Diffusion XL base 1.0",
              url=f"{_HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"
                  "?download=true", family="sdxl"),
    # CLIP vision towers (models/clip_vision)
    ModelFile("clip-vit-large-patch14.safetensors", "clip_vision", "OpenAI CLIP ViT-L/14 vision tower (224 px), the "
              "image encoder of SD1.5's family; PhotoVerse and the Taming Encoder use it",
              url=f"{_HF}/openai/clip-vit-large-patch14/resolve/main/model.safetensors", family="vitl"),
    ModelFile("clip_vision_h.safetensors", "clip_vision", "OpenCLIP ViT-H/14 vision tower (laion2B), the image "
              "encoder ProFusion's PromptNet uses",
              url=f"{_HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/clip_vision/"
                  "clip_vision_h.safetensors", family="vith"),
    # ControlNet (models/controlnet)
    ModelFile("control_v11p_sd15_canny_fp16.safetensors", "controlnet", "ControlNet 1.1 canny for SD1.5 (fp16)",
              url=f"{_HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                  "control_v11p_sd15_canny_fp16.safetensors"),
    # Face analysis (models/insightface/models/<pack>): a folder of ONNX files, not one downloadable file
    ModelFile("antelopev2", "insightface/models", "insightface's antelopev2 face pack (SCRFD detector, glintr100 "
              "ArcFace): the one InstantID and PuLID use",
              how="A folder of five `.onnx` files (`scrfd_10g_bnkps.onnx`, `glintr100.onnx`, `1k3d68.onnx`, "
                  "`2d106det.onnx`, `genderage.onnx`) in `ComfyUI/models/insightface/models/antelopev2/`. It comes "
                  "as `antelopev2.zip` (the same file InstantID and PuLID users install); unzip it so the `.onnx` "
                  "files sit directly in that folder, not one folder deeper. Needs `pip install insightface "
                  "onnxruntime`. Without it, pick a no-download backend on the Face Analysis Loader."),
    # The pack's own adapter files (models/likeness): no public weights
    ModelFile("photoverse_sd15.safetensors", "likeness", "PhotoVerse adapter for SD1.5 with CLIP ViT-L/14: image "
              "and text mappers, visual cross-attention K/V and the UNet LoRA (PhotoVerse §3)",
              how=_trained("photoverse", "PhotoVerse")),
    ModelFile("inv_adapter_eaa_sd15.safetensors", "likeness", "Inv-Adapter Embedded Attention Adapter for SD1.5: the "
              "self- and cross-attention K'/V' and the token aggregation (Inv-Adapter §3.3)",
              how=_trained("inv_adapter", "Inv-Adapter") + " The training-free mode of Inv-Adapter Apply needs no file."),
    ModelFile("taming_encoder_sd15_vitl14.safetensors", "likeness", "Taming Encoder adapter for SD1.5 with CLIP "
              "ViT-L/14: the object-embedding resampler and the gated cross-attention (Taming Encoder §3)",
              how=_trained("taming", "Taming Encoder")),
    ModelFile("photoverse_sdxl.safetensors", "likeness", "PhotoVerse adapter for SDXL with OpenCLIP ViT-H/14: "
              "words for clip_l and clip_g, visual cross-attention K/V at 2048 and the UNet LoRA (PhotoVerse §3)",
              how=_trained("photoverse", "PhotoVerse") + " Set the base model to SDXL base 1.0 and the CLIP vision "
                  "to ViT-H/14 (docs/training.md, *SDXL*)."),
    ModelFile("taming_encoder_sdxl_vith14.safetensors", "likeness", "Taming Encoder adapter for SDXL with OpenCLIP "
              "ViT-H/14: the object-embedding resampler and the gated cross-attention (Taming Encoder §3)",
              how=_trained("taming", "Taming Encoder") + " Set the base model to SDXL base 1.0 and the CLIP vision "
                  "to ViT-H/14 (docs/training.md, *SDXL*)."),
    ModelFile("global_mapper.pt", "likeness/elite", "ELITE's published global mapper (Wei et al. 2023, SD1.4 "
              "training): the words and the text K/V of every cross-attention, read as a PhotoVerse adapter",
              how="Download `global_mapper.pt` (and `local_mapper.pt`) from the links in the README of "
                  "csyxwei/ELITE on GitHub and put them in `ComfyUI/models/likeness/elite/`. They are PyTorch "
                  "files: the pack reads them with the host's weights-only loader and converts them once to "
                  "safetensors (docs/methods/photoverse.md, *ELITE's published weights*)."),
    ModelFile("local_mapper.pt", "likeness/elite", "ELITE's published local mapper: per-patch visual tokens, the "
              "visual branch of the converted adapter",
              how="From the same download as `global_mapper.pt` (csyxwei/ELITE), into "
                  "`ComfyUI/models/likeness/elite/`. Optional: pick none in the loader for the text branch only."),
    ModelFile("profusion_ffhq/promptnet/diffusion_pytorch_model.bin", "likeness", "ProFusion's published "
              "PromptNet (FFHQ, SD2-base, OpenCLIP ViT-H/14; ProFusion App. B), in ProFusion's own diffusers layout",
              how="ProFusion (drboog/ProFusion on GitHub) publishes one checkpoint, for SD2-base, trained on FFHQ; "
                  "its README links the download. Put its `promptnet/` folder (config.json and "
                  "diffusion_pytorch_model.bin) at `ComfyUI/models/likeness/profusion_ffhq/promptnet/`. The "
                  "PromptNet Loader reads it with the host's weights-only loader and caches a safetensors copy "
                  "beside it (docs/methods/promptnet.md, *Weights*). Or train your own with `"
                  + _TRAIN.format(method="promptnet") + "` (docs/training.md). The weights inherit SD2's licence "
                  "and FFHQ's non-commercial terms."),
    # Files the user makes (models/embeddings)
    ModelFile("subject_embedding.safetensors", "embeddings", "a textual-inversion embedding of your subject for SD1.5 "
              "(768-wide vectors), safetensors",
              how="Your own subject, learned with any textual-inversion trainer (for example the diffusers "
                  "textual_inversion example), saved as `.safetensors` into `ComfyUI/models/embeddings/` and "
                  "renamed to this name or picked in the node. The pack reads the A1111 / ComfyUI (`emb_params`), "
                  "SDXL (`clip_l` + `clip_g`) and diffusers (one vector per token) layouts."),
    ModelFile("subject_embedding_sdxl.safetensors", "embeddings", "a textual-inversion embedding of your subject for "
              "SDXL (`clip_l` 768-wide and `clip_g` 1280-wide vectors), safetensors",
              how="Your own subject, learned with an SDXL textual-inversion trainer (for example the diffusers "
                  "textual_inversion_sdxl example), saved as `.safetensors` with a `clip_l` and a `clip_g` tensor "
                  "into `ComfyUI/models/embeddings/`, renamed to this name or picked in the node."),
]
CATALOG = {f.name: f for f in FILES}


def looks_like_model_file(value) -> bool:
    return isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS)


def files_named(prompt: dict) -> list[tuple[str, str, str]]:
    """(node id, input name, value) for every widget value of an API prompt that names a model file: a catalog
    name, or any value ending in a model file extension (those must then be added to the catalog)."""
    out = []
    for nid, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and (value in CATALOG or looks_like_model_file(value)):
                out.append((nid, name, value))
    return out


def frontend_metadata(model: ModelFile) -> dict:
    """The entry ComfyUI's frontend reads from a loader node's properties.models to offer a download."""
    return {"name": model.name, "url": model.url, "directory": model.directory}


def note_text(model: ModelFile) -> str:
    """The Note placed next to the loader of a file that has no download link."""
    return f"### {model.name}\n\n{model.what[0].upper() + model.what[1:]}.\n\n{model.how}"


def checkpoint_family(prompt: dict) -> str | None:
    """The family (sd15, sd2, sdxl) of the first catalog checkpoint a prompt names."""
    for _, _, value in files_named(prompt):
        model = CATALOG.get(value)
        if model and model.directory == "checkpoints":
            return model.family
    return None
