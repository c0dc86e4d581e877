"""INV_FEATURES as a safetensors file (Save / Load Inv-Adapter Features).

Keys (version 2; N = number of reference photos):
    sigmas   (T+1,)             the inversion grid, ascending from 0
    latents  (T+1, N, C, h, w)  each photo's inversion trajectory
    eps      (T+1, N, C, h, w)  the noise estimate used from each point
    caption  (1, L, context)    C_inv, the caption conditioning of the reference branch
    y        (1, adm)           the reference branch's vector conditioning (SDXL: pooled caption + reference size);
                                absent for models without one
    features.<k>.<attn1|attn2>.<site>  (N, tokens, width)  reference-branch attention inputs at grid point k
                                (k in 1..T; every point, a memory-budgeted subset of points, or none; one or both
                                attention sites, the same set at every stored point; site e.g. input_1_0)
Metadata: likeness_format "likeness.inv_features", version 2, fingerprint (architecture + weight digest of the
model the features came from: Apply refuses other models), info (steps, scheduler, size, store, photos).
Version 1 files (one photo, latents (T+1, C, h, w), every point) still load.
"""
import uuid
from dataclasses import dataclass, field

import torch

from ..core.layout import parse_site_name, site_name
from .safetensors_file import WeightFileError, load_file, register_format, save_file

FORMAT = "likeness.inv_features"
VERSION = 2
READS = (1, 2)
WHAT = "Inv-Adapter features file"
register_format(FORMAT, WHAT)
SIGMA_RTOL = 1e-4  # a sigma within this relative distance of a grid point is that point


@dataclass
class InvFeatures:
    """The INV_FEATURES value. Tensors live on the CPU; features (if any) per grid point index k >= 1."""
    fingerprint: dict
    sigmas: torch.Tensor           # (T+1,) ascending, sigmas[0] = 0
    latents: torch.Tensor          # (T+1, N, C, h, w) Z^p of each photo, in the model's latent space
    eps: torch.Tensor              # (T+1, N, C, h, w) the eps the inversion stepped with from each point
    caption: torch.Tensor          # (1, L, context) C_inv
    y: torch.Tensor | None = None  # (1, adm) the reference branch's vector conditioning, or None
    features: dict | None = None   # {k: {(site, key): (N, tokens, width)}}
    info: dict = field(default_factory=dict)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __deepcopy__(self, memo):
        return self  # immutable once built; never copy the (large) feature tensors

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def photos(self) -> int:
        return int(self.latents.shape[1])

    @property
    def reference_latent(self) -> tuple:
        return int(self.latents.shape[-2]), int(self.latents.shape[-1])

    @property
    def cached(self) -> bool:
        return bool(self.features)

    def stored_keys(self) -> frozenset:
        """The (site, key) pairs stored at every stored point (empty without features)."""
        if not self.features:
            return frozenset()
        return frozenset(next(iter(self.features.values())))

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.sigmas, self.latents, self.eps, self.caption))
        if self.y is not None:
            total += self.y.numel() * self.y.element_size()
        for per_point in (self.features or {}).values():
            total += sum(t.numel() * t.element_size() for t in per_point.values())
        return total

    def feature_bytes_per_step(self) -> int:
        if not self.features:
            return 0
        first = next(iter(self.features.values()))
        return sum(t.numel() * t.element_size() for t in first.values())

    def point_index(self, sigma: float):
        """Index of the grid point at sigma (relative tolerance), or None."""
        diffs = (self.sigmas.double() - float(sigma)).abs()
        k = int(torch.argmin(diffs))
        return k if diffs[k] <= SIGMA_RTOL * max(1.0, abs(float(sigma))) else None

    def stored_at(self, sigma: float, keys=None):
        """The stored features of the grid point at sigma when they hold every key asked for, else None."""
        if not self.features:
            return None
        k = self.point_index(sigma)
        per_point = self.features.get(k) if k is not None else None
        if per_point is None or (keys is not None and not set(keys) <= set(per_point)):
            return None
        return per_point

    def latent_at(self, sigma: float) -> torch.Tensor:
        """Z^p(sigma) of every photo (N, C, h, w): the inversion's own Euler step from the grid point just below
        sigma, Z_i + (sigma - sigma_i) eps_i.

        The inversion went from Z_i to Z_{i+1} with exactly this step, so this is the trajectory itself
        (piecewise linear in sigma) and equals the stored latent at every grid point. Above the top point it
        extrapolates with the eps evaluated there.
        """
        s = self.sigmas.double()
        sigma = float(sigma)
        k = self.point_index(sigma)
        if k is not None:
            return self.latents[k]
        i = int(torch.searchsorted(s, torch.tensor([sigma], dtype=torch.float64), right=True)[0]) - 1
        i = min(max(i, 0), self.steps)
        return self.latents[i] + (sigma - float(s[i])) * self.eps[i]

    def check_model(self, fingerprint: dict):
        """Features belong to the model they were extracted with: anything else is a clear error."""
        mine, theirs = self.fingerprint.get("architecture"), fingerprint.get("architecture")
        if mine != theirs:
            raise ValueError(
                f"these Inv-Adapter features were extracted with {self.fingerprint.get('describe', 'another model')} "
                f"but the model here is {fingerprint.get('describe', 'different')}: run Inv-Adapter Extract with this "
                "model")
        if self.fingerprint.get("weights") != fingerprint.get("weights"):
            raise ValueError(
                "these Inv-Adapter features were extracted with a different checkpoint of the same architecture "
                f"({self.fingerprint.get('describe', '')}; weights {self.fingerprint.get('weights')} vs "
                f"{fingerprint.get('weights')}): run Inv-Adapter Extract with the model you sample with")


def save_inv_features(path: str, features: InvFeatures) -> str:
    tensors = {"sigmas": features.sigmas, "latents": features.latents, "eps": features.eps, "caption": features.caption}
    if features.y is not None:
        tensors["y"] = features.y
    for k, per_point in (features.features or {}).items():
        for (site, key), t in per_point.items():
            tensors[f"features.{int(k)}.{site}.{site_name(key)}"] = t
    meta = {"method": "inv_adapter", "fingerprint": features.fingerprint, "info": features.info}
    return save_file(path, tensors, FORMAT, VERSION, meta)


def _damaged(name, what):
    return WeightFileError(f"'{name}' {what}; the file is damaged")


def load_inv_features(path: str) -> InvFeatures:
    tensors, meta = load_file(path, FORMAT, READS, WHAT)
    name = path.rsplit("/", 1)[-1]
    for k in ("sigmas", "latents", "eps", "caption"):
        if k not in tensors:
            raise _damaged(name, f"has no '{k}' tensor")
    fingerprint = meta.get("fingerprint")
    if not isinstance(fingerprint, dict) or "architecture" not in fingerprint:
        raise _damaged(name, "does not record which model it came from")
    sigmas, latents, eps, caption = (tensors[k] for k in ("sigmas", "latents", "eps", "caption"))
    if latents.ndim == 4:  # version 1: one photo
        latents, eps = latents[:, None], (eps[:, None] if eps.ndim == 4 else eps)
    points = sigmas.shape[0]
    if sigmas.ndim != 1 or points < 2 or latents.ndim != 5 or latents.shape[0] != points or eps.shape != latents.shape \
            or caption.ndim != 3:
        raise _damaged(name, f"has inconsistent shapes (sigmas {list(sigmas.shape)}, latents {list(latents.shape)}, "
                             f"eps {list(eps.shape)}, caption {list(caption.shape)})")
    photos = latents.shape[1]
    y = tensors.get("y")
    if y is not None and (y.ndim != 2 or y.shape[0] != 1):
        raise _damaged(name, f"has a 'y' tensor of shape {list(y.shape)} (expected (1, width))")
    features = {}
    for key, t in tensors.items():
        if not key.startswith("features."):
            continue
        try:
            _, k, site, sname = key.split(".", 3)
            features.setdefault(int(k), {})[(site, parse_site_name(sname))] = t
        except ValueError as e:
            raise _damaged(name, f"has an unreadable tensor name '{key}'") from e
        if t.ndim != 3 or t.shape[0] != photos:
            raise _damaged(name, f"has features '{key}' of shape {list(t.shape)} for {photos} photos")
    if features:
        if not set(features) <= set(range(1, points)) or len({frozenset(v) for v in features.values()}) != 1:
            raise _damaged(name, "holds features for grid points or blocks that do not fit its trajectory")
        if meta.get("likeness_format_version") == "1" and set(features) != set(range(1, points)):
            raise _damaged(name, "holds features for only part of the trajectory")
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return InvFeatures(fingerprint=fingerprint, sigmas=sigmas.float(), latents=latents.float(), eps=eps.float(),
                       caption=caption.float(), y=None if y is None else y.float(), features=features or None,
                       info=info)
