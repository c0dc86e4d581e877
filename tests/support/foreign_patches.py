"""Stand-ins for other packs' attention patches, written from what those packs do (docs/stacking.md), so the
stacking tests run everywhere; tests/attention/test_stacking_other_packs.py also runs the real
ComfyUI_IPAdapter_plus when a copy of it is available (tests/support/fixtures_ipadapter.py).

The adding convention (IPAdapter_plus, InstantID, PuLID_ComfyUI): one replace object per attn2 key (the 2-tuple
(block, number) key on SD1.5, the 3-tuple key with the transformer index on SDXL) computes the plain attention
itself and adds the term of every callback registered on it whose sigma window holds the call's sigma (a call
without sigmas counts as sigma 999999999.9); a callback gets the running output and returns a term, or the number
0 for "nothing here". Registration copies transformer_options, puts a new object on a free key and calls
.add(callback, **kwargs) on whatever object already holds a taken key (in place: that object belongs to the
clone the node made).

Two callbacks of that shape: image_tokens_term (IPAdapter's: the rows of each cond/uncond chunk attend to their
own image tokens through per-site K/V projections) and orthogonal_term (PuLID's "ortho": that term minus its
projection on the running output, so it also shows which output a callback was given).
"""
import zlib

import torch

NO_SIGMA = 999999999.9


class AddingReplacePatch:
    def __init__(self, callback, **kwargs):
        self.entries = [(callback, kwargs)]

    def add(self, callback, **kwargs):
        self.entries.append((callback, kwargs))

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"].reshape(-1)[0]) if "sigmas" in extra_options else NO_SIGMA
        for callback, kwargs in self.entries:
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def register_adding_patch(model_patcher, attn_key, callback, **kwargs):
    options = dict(model_patcher.model_options["transformer_options"])
    replace = dict(options.get("patches_replace", {}))
    at_site = dict(replace.get("attn2", {}))
    if attn_key in at_site:
        at_site[attn_key].add(callback, **kwargs)  # as the packs do: on the holder, whatever its class
        return
    at_site[attn_key] = AddingReplacePatch(callback, **kwargs)
    replace["attn2"] = at_site
    options["patches_replace"] = replace
    model_patcher.model_options["transformer_options"] = options


def _projection(seed, key, rows, cols):
    g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(repr(tuple(key)).encode()))
    return torch.randn(rows, cols, generator=g) * cols ** -0.5


def image_tokens_term(out, q, k, v, extra_options, key=(), cond=None, uncond=None, weight=1.0, seed=0, **kwargs):
    from comfy.ldm.modules.attention import optimized_attention

    if weight == 0:
        return 0
    inner = q.shape[-1]
    wk = _projection(seed, key, inner, cond.shape[-1]).to(q)
    wv = _projection(seed + 1, key, inner, cond.shape[-1]).to(q)
    order = extra_options["cond_or_uncond"]
    per = q.shape[0] // len(order)
    tokens = torch.cat([(cond, uncond)[i].to(q).expand(per, -1, -1) for i in order])
    return optimized_attention(q, tokens @ wk.T, tokens @ wv.T, extra_options["n_heads"]) * weight


def orthogonal_term(out, q, k, v, extra_options, **kwargs):
    term = image_tokens_term(out, q, k, v, extra_options, **kwargs)
    if not torch.is_tensor(term):
        return term
    o, t = out.float(), term.float()
    along = (o * t).sum(dim=-2, keepdim=True) / (o * o).sum(dim=-2, keepdim=True) * o
    return (t - along).to(q.dtype)


def apply_adding_pack(model, keys, weight=1.0, seed=0, tokens=4, width=24, callback=image_tokens_term,
                      sigma_start=float("inf"), sigma_end=0.0):
    """A clone of model with one stand-in 'image prompt' on every key in keys (the node of such a pack)."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(1, tokens, width, generator=g), torch.zeros(1, tokens, width)
    m = model.clone()
    for key in keys:
        register_adding_patch(m, tuple(key), callback, key=tuple(key), cond=cond, uncond=uncond, weight=weight,
                              seed=seed, sigma_start=sigma_start, sigma_end=sigma_end)
    return m


def block_keys(layout):
    """The 2-tuple keys of a layout's blocks (the SD1.5 convention: one key for every transformer of a block)."""
    return sorted({key[:2] for key in layout.keys})


class RecordingAttention:
    """A plain replace function as the host's own nodes set it (last writer wins): the host's attention, counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        self.calls += 1
        return optimized_attention(q, k, v, extra_options["n_heads"])

    def __deepcopy__(self, memo):
        return self


class ChainingPatch:
    """A replace patch that wraps the patch it found on its key and adds a constant to its output (what a pack
    that chains, like this one, does when it is applied second)."""

    def __init__(self, inner, shift=0.05):
        self.inner, self.shift = inner, shift

    def __call__(self, q, k, v, extra_options):
        return self.inner(q, k, v, extra_options) + self.shift

    def __deepcopy__(self, memo):
        return self


class StandInPack:
    """A node of an adding-convention pack on a layout: block keys on SD1.5, every transformer's key on SDXL."""

    name = "stand-in"

    def __init__(self, layout, family):
        self.keys = block_keys(layout) if family == "sd15" else list(layout.keys)

    def apply(self, model, weight, seed=0):
        return apply_adding_pack(model, self.keys, weight=weight, seed=seed)

    def second(self, model):
        """Another node of such a pack, PuLID-like: its term depends on the running output it is given."""
        return apply_adding_pack(model, self.keys, weight=0.7, seed=5, callback=orthogonal_term)
