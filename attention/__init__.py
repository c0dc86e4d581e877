"""Attention patches: the stackable dispatcher (one replace patch per attention site) and the per-method
contributions that register on it: Inv-Adapter (reference features in self- and cross-attention), PhotoVerse
(LoRA + visual tokens, gamma/sigma fusion) and the Taming Encoder (gated decoupled cross-attention).
Each module's apply_* function clones a MODEL and returns the patched clone. See docs/architecture.md.
"""
