"""INV_FEATURES as a safetensors file (Save / Load Inv-Adapter Features).

Keys:
    sigmas   (T+1,)          the inversion grid, ascending from 0
    latents  (T+1, C, h, w)  the reference's inversion trajectory
    eps      (T+1, C, h, w)  the noise estimate used from each point
    caption  (1, L, context) C_inv, the caption conditioning of the reference branch
    features.<k>.<attn1|attn2>.<site>  (1, tokens, width)  reference-branch attention inputs at grid point k
                             (cache mode only; k = 1..T; site e.g. input_1_0)
Metadata: likeness_format "likeness.inv_features", version 1, fingerprint (architecture + weight digest of the
model the features came from: Apply refuses other models), info (steps, scheduler, size, cached).
"""
import uuid
from dataclasses import dataclass, field

import torch

from ..core.layout import parse_site_name, site_name
from .safetensors_file import WeightFileError, load_file, register_format, save_file

FORMAT = "likeness.inv_features"
VERSION = 1
WHAT = "Inv-Adapter features file"
register_format(FORMAT, WHAT)
SIGMA_RTOL = 1e-4  # a sigma within this relative distance of a grid point is that point


@dataclass
class InvFeatures:
    """The INV_FEATURES value. Tensors live on the CPU; features (if any) per grid point index k >= 1."""
    fingerprint: dict
    sigmas: torch.Tensor           # (T+1,) ascending, sigmas[0] = 0
    latents: torch.Tensor          # (T+1, C, h, w) Z^p at each sigma, in the model's latent space (process_latent_in)
    eps: torch.Tensor              # (T+1, C, h, w) the eps the inversion stepped with from each point
    caption: torch.Tensor          # (1, L, context) C_inv
    features: dict | None = None   # {k: {(site, key): (1, tokens, width)}}
    info: dict = field(default_factory=dict)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __deepcopy__(self, memo):
        return self  # immutable once built; never copy the (large) feature tensors

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def reference_latent(self) -> tuple:
        return int(self.latents.shape[-2]), int(self.latents.shape[-1])

    @property
    def cached(self) -> bool:
        return bool(self.features)

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.sigmas, self.latents, self.eps, self.caption))
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

    def latent_at(self, sigma: float) -> torch.Tensor:
        """Z^p(sigma): the inversion's own Euler step from the grid point just below sigma, Z_i + (sigma-sigma_i) eps_i.

        The inversion went from Z_i to Z_{i+1} with exactly this step, so this is the trajectory itself
        (piecewise linear in sigma) and equals the stored latent at every grid point. Above the top point it
        extrapolates with the eps evaluated there.
        """
        s = self.sigmas.double()
        sigma = float(sigma)
        i = int(torch.searchsorted(s, torch.tensor([sigma], dtype=torch.float64), right=True)[0]) - 1
        i = min(max(i, 0), self.steps)
        k = self.point_index(sigma)
        if k is not None:
            return self.latents[k:k + 1]
        return self.latents[i:i + 1] + (sigma - float(s[i])) * self.eps[i:i + 1]

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
    for k, per_point in (features.features or {}).items():
        for (site, key), t in per_point.items():
            tensors[f"features.{int(k)}.{site}.{site_name(key)}"] = t
    meta = {"method": "inv_adapter", "fingerprint": features.fingerprint, "info": features.info}
    return save_file(path, tensors, FORMAT, VERSION, meta)


def load_inv_features(path: str) -> InvFeatures:
    tensors, meta = load_file(path, FORMAT, (VERSION,), WHAT)
    name = path.rsplit("/", 1)[-1]
    for k in ("sigmas", "latents", "eps", "caption"):
        if k not in tensors:
            raise WeightFileError(f"'{name}' has no '{k}' tensor; the file is damaged")
    fingerprint = meta.get("fingerprint")
    if not isinstance(fingerprint, dict) or "architecture" not in fingerprint:
        raise WeightFileError(f"'{name}' does not record which model it came from; the file is damaged")
    sigmas, latents, eps, caption = (tensors[k] for k in ("sigmas", "latents", "eps", "caption"))
    points = sigmas.shape[0]
    if sigmas.ndim != 1 or points < 2 or latents.ndim != 4 or latents.shape[0] != points or eps.shape != latents.shape \
            or caption.ndim != 3:
        raise WeightFileError(
            f"'{name}' has inconsistent shapes (sigmas {list(sigmas.shape)}, latents {list(latents.shape)}, "
            f"eps {list(eps.shape)}, caption {list(caption.shape)}); the file is damaged")
    features = {}
    for key, t in tensors.items():
        if not key.startswith("features."):
            continue
        try:
            _, k, site, sname = key.split(".", 3)
            features.setdefault(int(k), {})[(site, parse_site_name(sname))] = t
        except ValueError as e:
            raise WeightFileError(f"'{name}' has an unreadable tensor name '{key}'; the file is damaged") from e
    if features:
        expected = set(range(1, points))
        sets = {frozenset(v) for v in features.values()}
        if set(features) != expected or len(sets) != 1:
            raise WeightFileError(f"'{name}' holds features for only part of the trajectory; the file is damaged")
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return InvFeatures(fingerprint=fingerprint, sigmas=sigmas.float(), latents=latents.float(), eps=eps.float(),
                       caption=caption.float(), features=features or None, info=info)
