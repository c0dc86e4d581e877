"""Sigma helpers, DDIM inversion and Fusion Sampling (guider + sampler function)."""
