"""PhotoVerse nodes: load an adapter (or ELITE's published weights), encode face photos into a concept, apply the
adapter to a model, save/load concepts. The words of the concept go into the prompt through Likeness Prompt."""
import logging
import os

import folder_paths
from comfy_api.latest import io

from ..attention.photoverse import MAX_SCALE, apply_photoverse
from ..concepts.combine import COMBINE_MODES
from ..concepts.photoverse_concept import VISUAL_TOKEN_MODES, clip_vision_signature, encode_photoverse_concept
from ..folders import ADAPTERS, IDENTITIES
from ..weights.elite_convert import WHAT_IT_IS as ELITE_WHAT, convert_elite
from ..weights.photoverse import load_photoverse
from ..concepts.photoverse_concept_file import concept_nbytes, load_photoverse_concept, save_photoverse_concept
from .files import file_loader_node, save_node

Adapter = io.Custom("LIKENESS_PHOTOVERSE")
Concept = io.Custom("LIKENESS_CONCEPT")
CATEGORY = "Likeness/photoverse"
ADAPTER_FOLDER = ADAPTERS
CONCEPT_FOLDER = IDENTITIES
ELITE_FOLDER = "likeness_elite"
NO_LOCAL = "none (text branch only)"

log = logging.getLogger("likeness")


def _full_path(folder, name, what):
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{what}: '{name}' is not in {', '.join(folder_paths.get_folder_paths(folder))}")
    return path


LikenessPhotoVerseLoader = file_loader_node(
    "LikenessPhotoVerseLoader", "Load PhotoVerse Adapter (Likeness)", CATEGORY,
    "Loads a PhotoVerse adapter (models/likeness, safetensors): text and image adapters, LoRA and visual K/V of "
    "every cross-attention block. PhotoVerse's authors published no weights: train one with the pack's trainer, "
    "or use ELITE's published weights (Load ELITE Weights).",
    "adapter_name", ADAPTER_FOLDER, Adapter, "adapter", load_photoverse)


class LikenessPhotoVerseEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessPhotoVerseEncode",
            display_name="PhotoVerse Encode (Likeness)",
            category=CATEGORY,
            description=("Turns face photos into a concept: pseudo-words S1..Sm for the prompt (Likeness Prompt) "
                         "and visual tokens for PhotoVerse Apply. Give it the face crop (Face Crop, size 224) and its "
                         "face mask; a batch is several photos of one person, joined by `combine`."),
            inputs=[
                Adapter.Input("adapter"),
                io.ClipVision.Input("clip_vision", tooltip="the CLIP vision the adapter was trained with (ViT-L/14 for SD1.5)"),
                io.Image.Input("image", tooltip="the face crop (Face Crop node: image)"),
                io.Int.Input("words", default=1, min=1, max=5,
                             tooltip="m: pseudo-words kept in the prompt (paper: 1 at inference, 5 in training)"),
                io.Combo.Input("visual_tokens", options=list(VISUAL_TOKEN_MODES), default="all",
                               tooltip="visual tokens for the visual branch: all (one per CLIP layer) or the first"),
                io.Combo.Input("combine", options=list(COMBINE_MODES), default="average", optional=True,
                               tooltip="several photos: average (mean), concat (every photo's words and tokens), "
                                       "norm_average (mean direction, mean length); one photo is used as it is"),
                io.Mask.Input("mask", optional=True, tooltip="face mask of the crop (Face Crop: mask); non-face pixels are zeroed"),
            ],
            outputs=[Concept.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, adapter, clip_vision, image, words, visual_tokens, combine="average", mask=None) -> io.NodeOutput:
        return io.NodeOutput(encode_photoverse_concept(adapter, clip_vision, image, mask, words, visual_tokens, combine))


class LikenessEliteLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessEliteLoader",
            display_name="Load ELITE Weights (Likeness)",
            category=CATEGORY,
            description=(f"Loads {ELITE_WHAT}, as the PhotoVerse adapter it maps onto: the global mapper gives the "
                         "words and replaces every cross-attention's to_k/to_v for the text, the local mapper (optional) "
                         "is the visual branch. Put global_mapper.pt / local_mapper.pt in models/likeness/elite; they "
                         "are read with the safe weights-only loader and converted once to safetensors "
                         "(models/likeness/elite/converted). For SD1.x models; it encodes objects, not faces."),
            inputs=[
                io.Model.Input("model", tooltip="the SD1.x model the weights are used with (its block layout)"),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-L/14, the image encoder ELITE was trained with"),
                io.Combo.Input("global_mapper", options=folder_paths.get_filename_list(ELITE_FOLDER),
                               tooltip="ELITE's global_mapper.pt"),
                io.Combo.Input("local_mapper", options=[NO_LOCAL] + folder_paths.get_filename_list(ELITE_FOLDER),
                               default=NO_LOCAL, tooltip="ELITE's local_mapper.pt (the visual branch), or none"),
            ],
            outputs=[Adapter.Output(display_name="adapter")],
        )

    @classmethod
    def execute(cls, model, clip_vision, global_mapper, local_mapper) -> io.NodeOutput:
        global_path = _full_path(ELITE_FOLDER, global_mapper, "global_mapper")
        local_path = None if local_mapper == NO_LOCAL else _full_path(ELITE_FOLDER, local_mapper, "local_mapper")
        cache = os.path.join(folder_paths.get_folder_paths(ELITE_FOLDER)[0], "converted")
        path = convert_elite(global_path, local_path, model, clip_vision_signature(clip_vision), cache)
        return io.NodeOutput(load_photoverse(path))


class LikenessPhotoVerseApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessPhotoVerseApply",
            display_name="PhotoVerse Apply (Likeness)",
            category=CATEGORY,
            description=("Adds PhotoVerse to a model: the text-branch weights of every cross-attention (the LoRA on "
                         "to_q/to_k/to_v, or ELITE's to_k/to_v; strength alpha) and the visual branch, fused as "
                         "O = text_scale * text + visual_scale * visual. Put the same concept into the prompt with "
                         "Likeness Prompt."),
            inputs=[
                io.Model.Input("model"),
                Adapter.Input("adapter"),
                Concept.Input("concept", tooltip="from PhotoVerse Encode or Load PhotoVerse Concept (same adapter)"),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=MAX_SCALE, step=0.01,
                               tooltip="alpha: scale of the text-branch weight change (the LoRA deltas, or ELITE's "
                                       "to_k/to_v: W + alpha (W' - W)); paper: 1; 0 = off"),
                io.Float.Input("text_scale", default=1.0, min=0.0, max=MAX_SCALE, step=0.01,
                               tooltip="gamma_T: scale of the text cross-attention (paper: 1)"),
                io.Float.Input("visual_scale", default=1.0, min=0.0, max=MAX_SCALE, step=0.01,
                               tooltip="sigma_V: scale of the visual cross-attention (paper: 1; 0 = text branch only)"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="the fused attention starts here (the LoRA is on throughout)"),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Mask.Input("attn_mask", optional=True, tooltip="where in the image the identity is injected"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, adapter, concept, lora_strength, text_scale, visual_scale, start_percent, end_percent,
                attn_mask=None) -> io.NodeOutput:
        return io.NodeOutput(apply_photoverse(model, adapter, concept, lora_strength, text_scale, visual_scale,
                                              start_percent, end_percent, attn_mask))


LikenessPhotoVerseConceptSave = save_node(
    "LikenessPhotoVerseConceptSave", "Save PhotoVerse Concept (Likeness)", CATEGORY,
    "Writes a PhotoVerse concept to models/likeness_identities as a new numbered safetensors file (never over an "
    "earlier one), to reuse the identity.",
    Concept, "concept", "photoverse/face", save_photoverse_concept, "the PhotoVerse concept",
    lambda concept: f"{concept_nbytes(concept) / 1024:.1f} KiB")


LikenessPhotoVerseConceptLoad = file_loader_node(
    "LikenessPhotoVerseConceptLoad", "Load PhotoVerse Concept (Likeness)", CATEGORY,
    "Reads a concept saved by Save PhotoVerse Concept (models/likeness_identities).",
    "concept_name", CONCEPT_FOLDER, Concept, "concept", load_photoverse_concept)


NODES = [LikenessPhotoVerseLoader, LikenessEliteLoader, LikenessPhotoVerseEncode, LikenessPhotoVerseApply,
         LikenessPhotoVerseConceptSave, LikenessPhotoVerseConceptLoad]
