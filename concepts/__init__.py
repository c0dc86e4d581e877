"""LIKENESS_CONCEPT, the pack's one type for "who or what goes where the placeholder is": the type itself
(concept.py), its sources (text and textual-inversion files, PhotoVerse words, ProFusion's PromptNet), prompt
injection into the host's CLIP (prompt_injection.py) and the saved concept files. See docs/architecture.md.
"""
