"""One stackable replace patch per attention site (docs/architecture.md, docs/stacking.md).

The host keeps one replace patch per (attn1|attn2, block key) and looks up the 3-tuple key (block, number,
transformer index) before the 2-tuple (block, number): the last writer wins. This pack instead puts one
AttentionDispatcher on the 3-tuple key of each site it touches. A dispatcher holds an ordered tuple of
Contributions; each has its own weight, sigma window and optional spatial mask, and may be limited to the
conditional or unconditional rows. Methods (Inv-Adapter, PhotoVerse, Taming Encoder) register contributions; they
stack with each other in registration order.

Other packs' patches give the base output and the contributions apply on top, whichever was applied first: a
replace patch already on the site (3- or 2-tuple key) is called for the base; one put on the 2-tuple key later,
or one that overwrote a dispatcher, is linked in per model call by a DIFFUSION_MODEL wrapper (relinked_options);
callbacks added through .add(callback, **kwargs), the convention of IPAdapter_plus, InstantID and PuLID_ComfyUI,
run after the base as those packs run them.

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
import threading

import torch

from ..core.keys import UNCOND_INDICES_KEY

log = logging.getLogger("likeness")

SITES = ("attn1", "attn2")
INPUTS_KEY = "likeness_attention_inputs"
CFG_UNCOND_INDICES = frozenset({1})
APPLY_TO = ("all", "cond", "uncond")
REGISTRY_KEY = "likeness_dispatchers"  # transformer_options: {(site, key): the dispatcher registered there}
RELINK_KEY = "likeness_relink_sites"
NO_SIGMA = 999999999.9  # the sigma the add() convention assumes for a call without one


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
    """The replace patch of one (site, key). Callable as the host expects: (q, k, v, extra_options) -> out.

    out = base, then the callbacks other packs added through add(), then the contributions, in order. The base is
    another pack's replace patch when one is on the site (`previous`), else the host's attention. When `previous`
    overwrote a dispatcher of ours (`displaced`) without calling it, the displaced dispatcher's terms are applied
    to its output too, so they are not lost to the host's last-writer-wins rule.
    """

    def __init__(self, site, key, contributions=(), previous=None, *, previous_is_block=False, callbacks=(),
                 displaced=None):
        self.site, self.key = site, tuple(key)
        self.contributions = tuple(contributions)
        self.previous = previous                    # another pack's replace patch: it gives the base output
        self.previous_is_block = previous_is_block  # `previous` sits on the 2-tuple (block, number) key
        self.callbacks = tuple(callbacks)           # (callback, kwargs) that other packs added through add()
        self.displaced = displaced                  # the dispatcher of ours that `previous` replaced at this key

    def _variant(self, **changes):
        fields = dict(contributions=self.contributions, previous=self.previous,
                      previous_is_block=self.previous_is_block, callbacks=self.callbacks, displaced=self.displaced)
        fields.update(changes)
        return AttentionDispatcher(self.site, self.key, **fields)

    def with_contribution(self, contribution):
        return self._variant(contributions=self.contributions + (contribution,))

    # --- the convention of IPAdapter_plus, InstantID and PuLID_ComfyUI (docs/stacking.md) -----------------------
    # Their registration calls .add(callback, **kwargs) on whatever object holds the key already; the callback
    # returns a term added to the running output when sigma_end <= sigma <= sigma_start. The object at the key is
    # the one in the MODEL clone that pack made, so adding in place changes no other model.
    def add(self, callback, **kwargs):
        self.callbacks = self.callbacks + ((callback, kwargs),)

    def set_new_condition(self, *args, **kwargs):
        raise RuntimeError(
            f"Another node tried to extend the Likeness attention patch at {self.site} {self.key} with "
            "set_new_condition(), a call only its own patch class understands (older IPAdapter / InstantID "
            "versions). Apply that node before the Likeness node, or update that pack (current versions use add()).")

    def base(self, q, k, v, extra_options):
        if self.previous is None:
            return host_attention(q, k, v, int(extra_options["n_heads"]), extra_options)
        if self.displaced is None:
            return self.previous(q, k, v, extra_options)
        out, called_us = _call_overwriter(self.site, self.key, self.previous, q, k, v, extra_options)
        return out if called_us else self.displaced.apply_all_terms(out, q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        _note_dispatcher_call(self.site, self.key)
        return self.apply_terms(self.base(q, k, v, extra_options), q, k, v, extra_options)

    def apply_all_terms(self, out, q, k, v, extra_options):
        """The terms of this dispatcher and of the ones it displaced, on an output another patch computed."""
        if self.displaced is not None:
            out = self.displaced.apply_all_terms(out, q, k, v, extra_options)
        return self.apply_terms(out, q, k, v, extra_options)

    def apply_terms(self, out, q, k, v, extra_options):
        sigma = current_sigma(extra_options)
        for callback, kwargs in self.callbacks:
            at = NO_SIGMA if sigma is None else sigma
            if kwargs.get("sigma_end", -math.inf) <= at <= kwargs.get("sigma_start", math.inf):
                term = callback(out, q, k, v, extra_options, **kwargs)
                if torch.is_tensor(term):  # the convention returns 0 for "nothing here" (weight 0, layer off)
                    out = out + term.to(out.dtype)
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
        if self.displaced is not None:
            self.displaced.to(device_or_dtype)
        return self

    def models(self):
        out = []

        def keep(models):
            for m in models:
                if all(m is not o for o in out):
                    out.append(m)

        if self.previous is not None and hasattr(self.previous, "models"):
            keep(self.previous.models())
        if self.displaced is not None:
            keep(self.displaced.models())
        for c in self.contributions:
            keep(c.models())
        return out

    def __deepcopy__(self, memo):
        import copy

        # A clone gets its own dispatcher (so registering on it never touches the original) sharing the
        # contributions and the added callbacks; another pack's patch is copied the way the host would have.
        previous = copy.deepcopy(self.previous, memo) if self.previous is not None else None
        displaced = copy.deepcopy(self.displaced, memo) if self.displaced is not None else None
        return self._variant(previous=previous, displaced=displaced)

    def __repr__(self):
        return (f"AttentionDispatcher({self.site}, {self.key}, {len(self.contributions)} contributions, "
                f"{len(self.callbacks)} added callbacks, base {'host' if self.previous is None else 'another patch'})")


# A patch that overwrote a dispatcher of ours may itself call that dispatcher (a pack that chains the patch it
# found, as this one does). Then the dispatcher's terms are already in its output and must not be applied twice.
# While such a patch runs, a flag per (site, key) records whether a dispatcher of that site was called.
_overwriter_calls = threading.local()


def _flags(site, key) -> list:
    stacks = getattr(_overwriter_calls, "stacks", None)
    if stacks is None:
        stacks = _overwriter_calls.stacks = {}
    return stacks.setdefault((site, key), [])


def _call_overwriter(site, key, patch, q, k, v, extra_options):
    flags = _flags(site, key)
    flags.append(False)
    try:
        out = patch(q, k, v, extra_options)
    finally:
        called_us = flags.pop()
    return out, called_us


def _note_dispatcher_call(site, key):
    flags = getattr(_overwriter_calls, "stacks", {}).get((site, key))
    if flags:
        flags[-1] = True


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
    options = model_patcher.model_options["transformer_options"]
    at_site = options.get("patches_replace", {}).get(site, {})
    current = at_site.get(key)
    if isinstance(current, AttentionDispatcher):
        new = current.with_contribution(contribution)
    elif current is not None:
        # Another pack's patch on the 3-tuple key: it was there first, or it replaced a dispatcher of ours (which
        # keeps applying its terms on top of it). Either way it gives the base output.
        ours = options.get(REGISTRY_KEY, {}).get((site, key))
        new = AttentionDispatcher(site, key, (contribution,), current, displaced=ours)
    else:
        # The host uses the 2-tuple key only where no 3-tuple patch exists: a patch there runs below us.
        block = at_site.get(key[:2])
        new = AttentionDispatcher(site, key, (contribution,), block, previous_is_block=block is not None)
    model_patcher.set_model_patch_replace(new, site, key[0], key[1], key[2])
    options = model_patcher.model_options["transformer_options"]
    options[REGISTRY_KEY] = {**options.get(REGISTRY_KEY, {}), (site, key): new}
    _ensure_relinker(model_patcher)
    if contribution.needs_inputs:
        _ensure_input_recorder(model_patcher, site)
    return new


# --- patches other packs register after ours -------------------------------------------------------------------
# Registration time cannot see them, so a DIFFUSION_MODEL wrapper looks once per model call and hands them to the
# dispatchers for that call only (the model's own options are never changed):
#   - a patch on the 2-tuple key of a site where our dispatcher has no base of its own (IPAdapter_plus on SD1.5,
#     the perturbed pass of PAG), which the host would never call because our 3-tuple key wins;
#   - a patch that overwrote our dispatcher at the 3-tuple key (SAG on the middle block's self-attention): it
#     becomes the base, and the displaced dispatcher's terms still apply.

def relinked_options(transformer_options: dict) -> dict:
    """transformer_options for one model call, with every later patch linked to the dispatchers (see above)."""
    registry = transformer_options.get(REGISTRY_KEY)
    if not registry:
        return transformer_options
    replace = transformer_options.get("patches_replace", {})
    linked = {}
    for (site, key), ours in registry.items():
        at_site = replace.get(site, {})
        current = at_site.get(key)
        if current is None:
            continue  # the patches were removed on purpose (e.g. a reference branch runs the bare UNet)
        if not isinstance(current, AttentionDispatcher):
            linked[(site, key)] = AttentionDispatcher(site, key, (), current, displaced=ours)
        elif current.previous is None or current.previous_is_block:
            block = at_site.get(key[:2])
            if block is not None and block is not current.previous and not isinstance(block, AttentionDispatcher):
                linked[(site, key)] = current._variant(previous=block, previous_is_block=True)
    if not linked:
        return transformer_options
    replace = {site: dict(patches) for site, patches in replace.items()}
    for (site, key), dispatcher in linked.items():
        replace[site][key] = dispatcher
    return {**transformer_options, "patches_replace": replace}


def relink_sites(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
    """DIFFUSION_MODEL wrapper (around the UNet's forward) that applies relinked_options to each model call."""
    return executor(x, timesteps, context, y, control, relinked_options(transformer_options), **kwargs)


def _ensure_relinker(model_patcher):
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    if not model_patcher.get_wrappers(kind, RELINK_KEY):
        model_patcher.add_wrapper_with_key(kind, RELINK_KEY, relink_sites)


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
