"""Sampling: sigma helpers, DDIM inversion, and ProFusion's Fusion Sampling (the guider, the sampler function
and its closed-form algebra, and KSampler (Fusion) as a function). See docs/methods/fusion-sampling.md.
"""
