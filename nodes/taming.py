"""Taming Encoder nodes: encode the masked subject with CLIP vision, load the adapter, apply the added
cross-attention, save/load object embeddings."""
from comfy_api.latest import io

from ..attention.taming import COMBINES, UNCOND_MODES, apply_taming_encoder
from ..encoders.taming_object import BACKGROUNDS, CROPS, encode_object
from ..folders import ADAPTERS, IDENTITIES
from ..weights.taming_embeds_file import load_object_embeds, save_object_embeds
from ..weights.taming_file import load_taming
from .files import file_input, file_loader_node, load_file, save_node

ObjectEmbeds = io.Custom("LIKENESS_OBJECT_EMBEDS")
TamingAdapter = io.Custom("LIKENESS_TAMING")
CATEGORY = "Likeness/taming"
ADAPTER_FOLDER = ADAPTERS
EMBEDS_FOLDER = IDENTITIES


class LikenessTamingEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTamingEncode",
            display_name="Taming Encode (Likeness)",
            category=CATEGORY,
            description=("The Taming Encoder's object embedding: the frozen CLIP vision model on the subject with its "
                         "background removed (x * mask). Works for objects, pets and faces. Several images of one "
                         "subject give one embedding per image (Apply averages, norm-averages or concatenates "
                         "them); chain Encode nodes through add_to for photos of different sizes."),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="the CLIP vision model the adapter was trained with"),
                io.Image.Input("image", tooltip="photo(s) of the subject"),
                io.Mask.Input("mask", optional=True,
                              tooltip="white = subject (mask editor, Face Crop's mask, a segmenter); without it the "
                                      "whole image is encoded"),
                io.Combo.Input("background", options=list(BACKGROUNDS), default="black",
                               tooltip="colour that replaces the background (the paper removes it)"),
                io.Combo.Input("crop", options=list(CROPS), default=CROPS[0],
                               tooltip="subject box: a square around the mask; pad to square: the whole image "
                                       "letterboxed; center: the centred square"),
                io.Float.Input("margin", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="space around the subject box, as a fraction of its side"),
                ObjectEmbeds.Input("add_to", optional=True,
                                   tooltip="object embeds of other photos of the subject (another Encode or Load "
                                           "Object Embeds): these photos are added after them"),
            ],
            outputs=[ObjectEmbeds.Output(display_name="object_embeds"),
                     io.Image.Output(display_name="subject", tooltip="what the CLIP vision model saw")],
        )

    @classmethod
    def execute(cls, clip_vision, image, background, crop, margin, mask=None, add_to=None) -> io.NodeOutput:
        from ..encoders.taming_object import ObjectEmbedding

        if add_to is not None and not isinstance(add_to, ObjectEmbedding):
            raise ValueError("add_to must come from Taming Encode or Load Object Embeds (Likeness)")
        embedding = encode_object(clip_vision, image, mask, background, crop, margin)
        if add_to is not None:
            embedding = add_to.appended(embedding)
        return io.NodeOutput(embedding, embedding.subject)


LikenessTamingLoader = file_loader_node(
    "LikenessTamingLoader", "Load Taming Encoder (Likeness)", CATEGORY,
    "Loads Taming Encoder weights (projection, added K/V and gates, null embedding) from models/likeness "
    "(safetensors). No trained weights are published: train them with the pack's trainer.",
    "adapter_name", ADAPTER_FOLDER, TamingAdapter, "taming", load_taming)


class LikenessTamingApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessTamingApply",
            display_name="Taming Encoder Apply (Likeness)",
            category=CATEGORY,
            description=("Adds the Taming Encoder's cross-attention to the subject's tokens in every attn2 block: "
                         "out = text attention + weight * tanh(gate) * Attn(Q, K_o, V_o). The unconditional pass "
                         "attends to the null embedding, as in training. Stacks with the other Likeness "
                         "methods and, in either order, with IPAdapter, InstantID, PuLID, SAG and PAG "
                         "(docs/stacking.md)."),
            inputs=[
                io.Model.Input("model"),
                TamingAdapter.Input("taming"),
                ObjectEmbeds.Input("object_embeds"),
                io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.01,
                               tooltip="scale of the added attention (0 = the model unchanged)"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Combo.Input("uncond", options=list(UNCOND_MODES), default="null embedding",
                               tooltip="what the negative pass attends to: the null embedding the adapter was "
                                       "trained with (its 'no subject'), or nothing (the adapter is off for that pass)"),
                io.Combo.Input("combine", options=list(COMBINES), default="average",
                               tooltip="several subject photos: average their tokens; norm average (the mean, "
                                       "rescaled to the photos' mean token length); or concat (attend to all)"),
                io.Mask.Input("attn_mask", optional=True, tooltip="where in the image the subject is injected"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, taming, object_embeds, weight, start_percent, end_percent, uncond, combine,
                attn_mask=None) -> io.NodeOutput:
        return io.NodeOutput(apply_taming_encoder(model, taming, object_embeds, weight, start_percent, end_percent,
                                                  attn_mask, uncond, combine))


def _save_object_embeds(path, object_embeds):
    from ..encoders.taming_object import ObjectEmbedding

    if not isinstance(object_embeds, ObjectEmbedding):
        raise ValueError("object_embeds must come from Taming Encode or Load Object Embeds (Likeness)")
    save_object_embeds(path, object_embeds)


LikenessObjectEmbedsSave = save_node(
    "LikenessObjectEmbedsSave", "Save Object Embeds (Likeness)", CATEGORY,
    "Writes a Taming Encoder object embedding to models/likeness_identities as a new numbered safetensors file "
    "(never over an earlier one).",
    ObjectEmbeds, "object_embeds", "taming/subject", _save_object_embeds, "the object embedding",
    lambda embeds: embeds.describe())


class LikenessObjectEmbedsLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessObjectEmbedsLoad",
            display_name="Load Object Embeds (Likeness)",
            category=CATEGORY,
            description="Reads an object embedding saved by Save Object Embeds (models/likeness_identities).",
            inputs=[file_input("embeds_name", EMBEDS_FOLDER)],
            outputs=[ObjectEmbeds.Output(display_name="object_embeds"),
                     io.Image.Output(display_name="subject", tooltip="what the CLIP vision model saw")],
        )

    @classmethod
    def execute(cls, embeds_name) -> io.NodeOutput:
        import torch

        embedding = load_file(EMBEDS_FOLDER, embeds_name, "embeds_name", load_object_embeds)
        subject = embedding.subject
        if subject is None:
            subject = torch.zeros(embedding.images, 64, 64, 3)
        return io.NodeOutput(embedding, subject)


NODES = [LikenessTamingEncode, LikenessTamingLoader, LikenessTamingApply, LikenessObjectEmbedsSave,
         LikenessObjectEmbedsLoad]
