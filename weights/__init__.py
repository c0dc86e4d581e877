"""File formats of what the pack reads and writes, all safetensors with metadata: adapter files (EAA, PhotoVerse,
Taming, PromptNet), saved identities (Inv-Adapter features, object embeddings), and the shared container checks
(safetensors_file.py). Loading validates keys and shapes and names a mismatch in plain words.
"""
