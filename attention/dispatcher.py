"""One stackable replace patch per attention site (docs/architecture.md).

The host keeps one replace patch per (attn1|attn2, block key): the last writer wins. This pack instead puts one
AttentionDispatcher on each site it touches. A dispatcher holds an ordered tuple of Contributions; each has its
own weight, sigma window and optional spatial mask, and may be limited to the conditional or unconditional
rows. Methods (Inv-Adapter, PhotoVerse, Taming Encoder) register contributions; they stack with each other and
with another pack's replace patch that was already on the site, which the dispatcher calls for the base output.

Contract of a contribution (see Contribution):
  compute(call) gets an AttentionCall: projected q, k, v of the block (B', T, heads*dim_head), extra_options,
  the cond/uncond layout of the batch, the current sigma, the block's token grid, the running output
  (call.current) and, if the contribution asked for them, the block's pre-projection inputs (hidden states,
  context). It returns either an additive term (replaces = False): out += w * mask * term, or a replacement
  output (replaces = True): out += w * mask * (new - out). Outputs are before to_out, as the host expects.

Rules kept here: copy-on-write registration on a clone (never mutate the upstream MODEL), deepcopy on
ModelPatcher.clone() copies the tuple of contributions but not their tensors, dtype and device come from q,
inactive contributions leave the output bit-identical to the unpatched model.
"""
import logging
import math

import torch

from ..core.keys import UNCOND_INDICES_KEY

log = logging.getLogger("likeness")

SITES = ("attn1", "attn2")
INPUTS_KEY = "likeness_attention_inputs"
CFG_UNCOND_INDICES = frozenset({1})
APPLY_TO = ("all", "cond", "uncond")


def host_attention(q, k, v, heads, extra_options, mask=None):
    """The host's attention as CrossAttention.forward calls it (backend, precision and override included)."""
    import comfy.ldm.modules.attention as attn  # the backend is chosen at import time: read it at call time

    precision = extra_options.get("attn_precision")
    if mask is None:
        return attn.optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)
    return attn.optimized_attention_masked(q, k, v, heads, mask, attn_precision=precision,
                                           transformer_options=extra_options)


_last_sigma = [None, None]  # (the sigmas tensor of the current model call, its value as a float)


def current_sigma(extra_options):
    """The sigma of this model call (the host's un-batched 'sigmas'). Every block of one call passes the same
    tensor, so its value is read once per call: one device sync per model call, not one per attention."""
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return None
    if torch.is_tensor(sigmas):
        if _last_sigma[0] is sigmas:
            return _last_sigma[1]
        value = float(sigmas.reshape(-1)[0])
        _last_sigma[0], _last_sigma[1] = sigmas, value
        return value
    return float(sigmas[0])


class AttentionCall:
    """Everything a contribution may use for one attention call of one block."""

    def __init__(self, site, key, q, k, v, extra_options):
        self.site, self.key, self.q, self.k, self.v = site, key, q, k, v
        self.extra_options = extra_options
        self.heads = int(extra_options.get("n_heads") or 1)
        self.dim_head = int(extra_options.get("dim_head") or q.shape[-1] // self.heads)
        self.cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
        self.sigma = current_sigma(extra_options)
        self.current = None  # the running output, set by the dispatcher before each contribution

    @property
    def inputs(self):
        """(hidden states, context, value) before projection, or None unless a contribution asked for them."""
        return self.extra_options.get(INPUTS_KEY, {}).get(self.site)

    @property
    def uncond_indices(self):
        return frozenset(self.extra_options.get(UNCOND_INDICES_KEY, CFG_UNCOND_INDICES))

    def row_kinds(self) -> list:
        """'cond' or 'uncond' for each row of q, read from the host's cond_or_uncond (chunked by its length)."""
        chunks = len(self.cond_or_uncond)
        per = self.q.shape[0] // chunks if self.q.shape[0] % chunks == 0 else self.q.shape[0]
        kinds = ["uncond" if c in self.uncond_indices else "cond" for c in self.cond_or_uncond]
        if per == self.q.shape[0]:  # batch not divisible: treat the whole batch as the first chunk's kind
            return [kinds[0]] * self.q.shape[0]
        return [kinds[i // per] for i in range(self.q.shape[0])]

    @property
    def chunk_batch(self) -> int:
        """Rows per cond/uncond chunk (the latent batch size)."""
        chunks = len(self.cond_or_uncond)
        return self.q.shape[0] // chunks if self.q.shape[0] % chunks == 0 else self.q.shape[0]

    @property
    def token_grid(self) -> tuple:
        """(h, w) of this block's tokens; from the host's activations_shape, else from the latent's aspect."""
        shape = self.extra_options.get("activations_shape")
        tokens = self.q.shape[1]
        if shape is not None and int(shape[-2]) * int(shape[-1]) == tokens:
            return int(shape[-2]), int(shape[-1])
        original = self.extra_options.get("original_shape")
        if original is not None:
            h0, w0 = int(original[-2]), int(original[-1])
            for f in (1, 2, 4, 8, 16, 32, 64):
                h, w = math.ceil(h0 / f), math.ceil(w0 / f)
                if h * w == tokens:
                    return h, w
        side = int(round(math.sqrt(tokens)))
        return (side, tokens // side) if side * (tokens // side) == tokens else (1, tokens)

    def attention(self, q, k, v, mask=None):
        """The host's attention with this call's head split, precision and options. k, v with batch 1 are
        broadcast over the rows of q."""
        if k.shape[0] != q.shape[0]:
            k = k.expand(q.shape[0], *k.shape[1:])
            v = v.expand(q.shape[0], *v.shape[1:])
        return host_attention(q, k, v, self.heads, self.extra_options, mask)


class Contribution:
    """Base class of what a method adds at one attention site. Subclasses implement compute(call).

    weight:      scale of the term (0 leaves the site bit-identical to the unpatched model)
    sigma_start / sigma_end: the window (sigma_start >= sigma_end) in which the contribution is active
    mask:        optional MASK (batch, H, W) over the image; resized to each block's token grid
    apply_to:    "all", "cond" or "uncond" rows of the batch
    Contributions are immutable once registered; ModelPatcher.clone() shares them (deepcopy returns self).
    """

    replaces = False      # compute() returns a new output instead of an additive term
    needs_inputs = False  # compute() reads call.inputs (the block's pre-projection hidden states and context)

    def __init__(self, weight=1.0, sigma_start=math.inf, sigma_end=0.0, mask=None, apply_to="all"):
        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO} (got {apply_to!r})")
        if sigma_start < sigma_end:
            raise ValueError(f"the sigma window is empty: start {sigma_start} < end {sigma_end}")
        self.weight = float(weight)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.mask = mask
        self.apply_to = apply_to

    def compute(self, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    def models(self) -> list:
        """ModelPatchers holding this contribution's weights; the host loads them with the UNet."""
        return []

    def is_active(self, sigma) -> bool:
        if self.weight == 0.0:
            return False
        if sigma is None:  # a call outside a sampler: only an unrestricted window applies
            return math.isinf(self.sigma_start) and self.sigma_end <= 0.0
        return self.sigma_end <= sigma <= self.sigma_start

    def __deepcopy__(self, memo):
        return self


def _token_mask(mask, call: AttentionCall, dtype, device):
    """A (rows or 1, tokens, 1) multiplier from a (batch, H, W) mask."""
    if mask.ndim == 2:
        mask = mask[None]
    h, w = call.token_grid
    m = mask[:, None].to(device=device, dtype=torch.float32)
    m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    m = m.reshape(m.shape[0], h * w, 1).to(dtype)
    if m.shape[0] == 1:
        return m
    per = call.chunk_batch
    if m.shape[0] != per:
        log.warning("Likeness: the attention mask has %d images for a batch of %d; using the first", m.shape[0], per)
        return m[:1]
    return m.repeat(call.q.shape[0] // per, 1, 1)  # one copy per cond/uncond chunk


def _row_scale(apply_to, call: AttentionCall, dtype, device):
    """None when every row takes part, False when none does, else a (rows, 1, 1) 0/1 tensor."""
    if apply_to == "all":
        return None
    kinds = call.row_kinds()
    keep = [k == apply_to for k in kinds]
    if all(keep):
        return None
    if not any(keep):
        return False
    return torch.tensor(keep, dtype=dtype, device=device)[:, None, None]


class AttentionDispatcher:
    """The replace patch of one (site, key). Callable as the host expects: (q, k, v, extra_options) -> out."""

    def __init__(self, site, key, contributions=(), previous=None):
        self.site, self.key = site, tuple(key)
        self.contributions = tuple(contributions)
        self.previous = previous  # another pack's replace patch that was here first; it gives the base output

    def with_contribution(self, contribution):
        return AttentionDispatcher(self.site, self.key, self.contributions + (contribution,), self.previous)

    def base(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return host_attention(q, k, v, int(extra_options["n_heads"]), extra_options)

    def __call__(self, q, k, v, extra_options):
        out = self.base(q, k, v, extra_options)
        sigma = current_sigma(extra_options)
        active = [c for c in self.contributions if c.is_active(sigma)]
        if not active:
            return out
        call = AttentionCall(self.site, self.key, q, k, v, extra_options)
        for c in active:
            rows = _row_scale(c.apply_to, call, out.dtype, out.device)
            if rows is False:
                continue
            call.current = out
            term = c.compute(call).to(out.dtype)
            if c.replaces:
                term = term - out
            scale = c.weight
            if c.mask is not None:
                scale = _token_mask(c.mask, call, out.dtype, out.device) * scale
            if rows is not None:
                scale = rows * scale
            out = out + term * scale
        return out

    # The host calls to() on replace patches when it loads the model (device, then dtype) and stores the
    # result. Contributions move their tensors to q's device and dtype when they run, so nothing moves here.
    def to(self, device_or_dtype):
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self

    def models(self):
        out = []
        if self.previous is not None and hasattr(self.previous, "models"):
            out += list(self.previous.models())
        for c in self.contributions:
            out += [m for m in c.models() if all(m is not o for o in out)]
        return out

    def __deepcopy__(self, memo):
        import copy

        # A clone gets its own dispatcher (so registering on it never touches the original) sharing the
        # contributions; another pack's patch is copied the way the host would have copied it.
        previous = copy.deepcopy(self.previous, memo) if self.previous is not None else None
        return AttentionDispatcher(self.site, self.key, self.contributions, previous)

    def __repr__(self):
        return f"AttentionDispatcher({self.site}, {self.key}, {len(self.contributions)} contributions)"


class InputRecorder:
    """An attn1_patch / attn2_patch that hands the block's pre-projection inputs to the replace patch of the same
    block (both receive the same extra_options dict). Registered once per site, only when a contribution asks."""

    def __init__(self, site):
        self.site = site

    def __call__(self, n, context, value, extra_options):
        extra_options[INPUTS_KEY] = {**extra_options.get(INPUTS_KEY, {}), self.site: (n, context, value)}
        return n, context, value

    def __deepcopy__(self, memo):
        return self


def add_contribution(model_patcher, site: str, key, contribution: Contribution):
    """Register a contribution on a ModelPatcher the caller owns (a clone). Copy-on-write: the dispatcher of the
    patcher this one was cloned from is never changed."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES} (got {site!r})")
    key = tuple(key)
    if len(key) != 3:
        raise ValueError(f"a site key is (block, number, transformer index); got {key!r}")
    existing = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get(site, {})
    current = existing.get(key)
    if isinstance(current, AttentionDispatcher):
        new = current.with_contribution(contribution)
    else:
        # The host looks up the 3-tuple first, then the 2-tuple: a patch another pack put on either runs below us.
        previous = current if current is not None else existing.get(key[:2])
        new = AttentionDispatcher(site, key, (contribution,), previous)
    model_patcher.set_model_patch_replace(new, site, key[0], key[1], key[2])
    if contribution.needs_inputs:
        _ensure_input_recorder(model_patcher, site)
    return new


def _ensure_input_recorder(model_patcher, site):
    patches = model_patcher.model_options["transformer_options"].get("patches", {}).get(f"{site}_patch", [])
    if any(isinstance(p, InputRecorder) and p.site == site for p in patches):
        return
    if site == "attn1":
        model_patcher.set_model_attn1_patch(InputRecorder(site))
    else:
        model_patcher.set_model_attn2_patch(InputRecorder(site))


def dispatchers(model_patcher, site=None) -> dict:
    """{(site, key): AttentionDispatcher} registered on a ModelPatcher."""
    out = {}
    replace = model_patcher.model_options["transformer_options"].get("patches_replace", {})
    for s in (SITES if site is None else (site,)):
        for key, patch in replace.get(s, {}).items():
            if isinstance(patch, AttentionDispatcher):
                out[(s, key)] = patch
    return out
