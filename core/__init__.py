"""The bottom layer: what every other layer may use and nothing here imports from the pack.

layout.py reads a loaded model's attention sites (block keys, widths, heads, token grids) and fingerprints it;
keys.py names the transformer_options entries that several layers share. See docs/architecture.md.
"""
