"""Trainable torch modules, shared unchanged by the nodes and the trainers: PhotoVerse's adapters (paper MLPs
and ELITE's mapper), the Embedded Attention Adapter and its token aggregation, ProFusion's PromptNet, the Taming
Encoder's projection and added K/V. No host patching happens here. See docs/architecture.md.
"""
