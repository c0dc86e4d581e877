"""ProFusion's PromptNet: load a PromptNet file and turn reference photos into a concept that follows x_t."""
import hashlib
import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..concepts.promptnet_reference import ENCODINGS, encode_reference
from ..concepts.promptnet_source import COMBINE_MODES, MIXTURE, PromptNetSource, parse_weights
from ..folders import safetensors_files
from ..weights.promptnet_diffusers import load_any_promptnet, promptnet_choices
from ..weights.promptnet_file import check_fits

PromptNetType = io.Custom("LIKENESS_PROMPTNET")
Concept = io.Custom("LIKENESS_CONCEPT")
CATEGORY = "Likeness/profusion"


class PromptNetModel:
    """A loaded PromptNet: the module in its own ModelPatcher (the host loads/offloads it) and its metadata."""

    def __init__(self, net, meta, name):
        self.patcher = comfy.model_patcher.ModelPatcher(net, load_device=comfy.model_management.get_torch_device(),
                                                        offload_device=comfy.model_management.unet_offload_device())
        self.meta, self.name = meta, name


class LikenessPromptNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessPromptNetLoader",
            display_name="PromptNet Loader (ProFusion)",
            category=CATEGORY,
            description=("Loads a PromptNet from models/likeness: a file of this pack, or ProFusion's own download "
                         "(its promptnet folder with config.json and diffusion_pytorch_model.bin or .safetensors), "
                         "converted on first load and cached beside it."),
            inputs=[io.Combo.Input("promptnet_name", options=promptnet_choices(
                folder_paths.get_folder_paths("likeness"), safetensors_files("likeness")))],
            outputs=[PromptNetType.Output(display_name="promptnet")],
        )

    @classmethod
    def execute(cls, promptnet_name) -> io.NodeOutput:
        path = folder_paths.get_full_path("likeness", promptnet_name)
        if path is None:
            raise ValueError(f"'{promptnet_name}' is not in the likeness model folder ({', '.join(folder_paths.get_folder_paths('likeness'))})")
        net, meta = load_any_promptnet(path, promptnet_name)
        return io.NodeOutput(PromptNetModel(net, meta, promptnet_name))


class LikenessPromptNetConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessPromptNetConcept",
            display_name="PromptNet Concept (ProFusion)",
            category=CATEGORY,
            description=("S* from one or several reference photos with PromptNet. With the Fusion Guider / KSampler "
                         "(Fusion), S* is recomputed from the current noisy latent at every model evaluation, as in "
                         "ProFusion; other samplers get S* computed once from the photos."),
            inputs=[
                PromptNetType.Input("promptnet"),
                io.ClipVision.Input("clip_vision", tooltip="ProFusion used OpenCLIP ViT-H/14"),
                io.Vae.Input("vae"),
                io.Model.Input("model", tooltip="the model you sample with (for the latent scale and the check)"),
                io.Image.Input("image", tooltip="the reference photo, or a batch of photos of one subject (a face "
                                                "crop for the FFHQ PromptNet)"),
                io.String.Input("weights", default="1.0", optional=True,
                                tooltip="one weight per photo, separated by commas (one number: every photo). "
                                        "ProFusion's extra_ref_image_scales are w_concept x these weights"),
                io.Combo.Input("combine", options=list(COMBINE_MODES), default=MIXTURE, optional=True,
                               tooltip="mixture: ProFusion's weighted mixture of each photo's guided prediction "
                                       "(one condition per photo); average: one S*, the weighted mean (cheaper)"),
                io.Combo.Input("reference_encoding", options=list(ENCODINGS), default="pack", optional=True,
                               tooltip="pack: centre crop and the VAE's mean latent; official: ProFusion's pipeline, "
                                       "resized without a crop and a latent sampled from the VAE (fixed seed)"),
            ],
            outputs=[Concept.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, promptnet, clip_vision, vae, model, image, weights="1.0", combine=MIXTURE,
                reference_encoding="pack") -> io.NodeOutput:
        if not isinstance(promptnet, PromptNetModel):
            raise ValueError("the promptnet input must come from 'PromptNet Loader (ProFusion)'")
        if image.ndim != 4 or image.shape[0] < 1:
            raise ValueError("the image input must be an IMAGE batch of one or more reference photos")
        photo_weights = parse_weights(weights, int(image.shape[0]))
        tokens, reference = encode_reference(image, clip_vision, vae, int(promptnet.meta.get("latent_size", 64)),
                                             reference_encoding)
        check_fits(promptnet.meta, context_dim=model.model.model_config.unet_config.get("context_dim"),
                   vision_width=int(tokens.shape[-1]), name=f"PromptNet '{promptnet.name}'")
        source = PromptNetSource(promptnet.patcher, tokens, reference, promptnet.meta, photo_weights, combine)
        digest = hashlib.sha1(image.float().cpu().numpy().tobytes() + repr(photo_weights).encode()
                              + reference_encoding.encode()).hexdigest()[:10]
        return io.NodeOutput(source.static_concept(model, f"promptnet:{os.path.splitext(promptnet.name)[0]}:{digest}"))


NODES = [LikenessPromptNetLoader, LikenessPromptNetConcept]
