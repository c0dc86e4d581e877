"""Concept sources for this issue (text, textual-inversion file) and the Likeness Prompt node."""
import folder_paths
from comfy_api.latest import io

from ..concepts.concept import LikenessConcept
from ..concepts.embedding_files import load_embedding_concept
from ..concepts.prompt_injection import encode_likeness_prompt

Concept = io.Custom("LIKENESS_CONCEPT")
CATEGORY = "Likeness/concepts"


def _embedding_files():
    return sorted(f for f in folder_paths.get_filename_list("embeddings") if f.lower().endswith((".safetensors", ".sft")))


class LikenessConceptText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessConceptText",
            display_name="Likeness Concept (Text)",
            category=CATEGORY,
            description="A concept written as words; its tokens replace the placeholder of a Likeness Prompt.",
            inputs=[io.String.Input("text", default="a woman with red hair", multiline=False)],
            outputs=[Concept.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        return io.NodeOutput(LikenessConcept(text=text, source="text"))


class LikenessConceptEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessConceptEmbedding",
            display_name="Likeness Concept (Embedding File)",
            category=CATEGORY,
            description="A textual-inversion embedding from models/embeddings (safetensors) as a concept.",
            inputs=[io.Combo.Input("embedding", options=_embedding_files())],
            outputs=[Concept.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, embedding) -> io.NodeOutput:
        path = folder_paths.get_full_path("embeddings", embedding)
        if path is None:
            raise ValueError(f"embedding '{embedding}' is not in the embeddings folder ({', '.join(folder_paths.get_folder_paths('embeddings'))})")
        return io.NodeOutput(load_embedding_concept(path))


class LikenessPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessPrompt",
            display_name="Likeness Prompt",
            category=CATEGORY,
            description=("Encodes a prompt with a concept at its placeholder. fused: concept rows scaled by gamma "
                         "(ProFusion's fusion condition); concept: gamma 1; context: the class word instead of the "
                         "placeholder; conditioning: the fused one, for ordinary samplers (gamma acts as strength)."),
            inputs=[
                io.Clip.Input("clip"),
                Concept.Input("concept"),
                io.String.Input("text", multiline=True, default="a photo of holder wearing a superhero costume"),
                io.String.Input("placeholder", default="holder", tooltip="the word in the text that the concept replaces"),
                io.String.Input("class_word", default="person", tooltip="replaces the placeholder in the context conditioning"),
                io.Float.Input("gamma", default=0.7, min=0.0, max=2.0, step=0.05,
                               tooltip="scale of the concept rows in the fused conditioning (ProFusion: 0.6-0.8)"),
            ],
            outputs=[
                io.Conditioning.Output(display_name="fused"),
                io.Conditioning.Output(display_name="concept"),
                io.Conditioning.Output(display_name="context"),
                io.Conditioning.Output(display_name="conditioning"),
            ],
        )

    @classmethod
    def execute(cls, clip, concept, text, placeholder, class_word, gamma) -> io.NodeOutput:
        fused, concept_cond, context = encode_likeness_prompt(clip, text, concept, placeholder, class_word, gamma)
        return io.NodeOutput(fused, concept_cond, context, fused)


NODES = [LikenessConceptText, LikenessConceptEmbedding, LikenessPrompt]
