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
from ..attention.layout import parse_site_name, site_name
from ..attention.reference_features import InvFeatures
from .safetensors_file import WeightFileError, load_file, register_format, save_file

FORMAT = "likeness.inv_features"
VERSION = 1
WHAT = "Inv-Adapter features file"
register_format(FORMAT, WHAT)


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
