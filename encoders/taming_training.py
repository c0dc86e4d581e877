"""Training-time choice of the object embedding (Taming Encoder §3.3-3.4; docs/methods/taming-encoder.md).

Per sample of a mixed batch:
- general-domain sample (no subject identity): always the null embedding phi (object-embedding dropping, eq. 4;
  the encoder's null_embedding(): the projection of the fixed phi, or the learned tokens);
- domain sample: with probability omega the embedding of ANOTHER image of the same subject (cross-reference
  regularisation, z = (x, o_bar, t)), otherwise the embedding of its own masked image (z = (x, o, t)).
  A sample without another image (unlabelled sets) keeps its own; the pack's choice is to pass a strongly augmented
  view of the same image as the "other" one in that case, which the trainer decides.
The tokens come out of the same TamingEncoder that inference uses, with autograd intact.
"""
import torch

OWN, CROSS, NULL = 0, 1, 2
CHOICE_NAMES = {OWN: "own", CROSS: "cross-reference", NULL: "null"}
DEFAULT_OMEGA = 0.5  # not given by the paper; 0.5 for identity-labelled data


def _bool_rows(x, batch, name):
    t = torch.as_tensor(x, dtype=torch.bool)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must have one flag per sample ({batch}); got shape {tuple(t.shape)}")
    return t


def cross_reference_choice(is_domain, has_other, omega: float = DEFAULT_OMEGA, generator=None) -> torch.Tensor:
    """(batch,) codes OWN / CROSS / NULL. is_domain, has_other: bools per sample (or one bool for all)."""
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega must be a probability in [0, 1] (got {omega})")
    is_domain = torch.as_tensor(is_domain, dtype=torch.bool)
    batch = int(is_domain.numel()) if is_domain.ndim else int(torch.as_tensor(has_other).numel())
    is_domain = _bool_rows(is_domain, batch, "is_domain")
    has_other = _bool_rows(has_other, batch, "has_other")
    p = torch.rand(batch, generator=generator)
    cross = has_other & (p < omega)
    choice = torch.full((batch,), OWN, dtype=torch.long)
    choice[cross] = CROSS
    choice[~is_domain] = NULL
    return choice


def training_object_tokens(encoder, choice: torch.Tensor, own_features=None, other_features=None,
                           null=None) -> torch.Tensor:
    """Object tokens (batch, N, context) for a batch: projection of the own or the other image's CLIP tokens,
    or the null embedding, per choice. Only rows that need it are projected; gradients reach the projection and
    the null embedding. null: the encoder's null_embedding(1), when the caller has it already."""
    choice = torch.as_tensor(choice, dtype=torch.long)
    batch = choice.shape[0]
    needs = choice != NULL
    rows = []
    for i in range(batch):
        code = int(choice[i])
        if code == NULL:
            continue
        source = own_features if code == OWN else other_features
        if source is None:
            raise ValueError(f"sample {i} was assigned the {CHOICE_NAMES[code]} embedding but no such CLIP features "
                             "were given")
        if source.shape[0] != batch:
            raise ValueError(f"the {CHOICE_NAMES[code]} features have {source.shape[0]} samples for a batch of {batch}")
        rows.append(source[i])
    null = encoder.null_embedding(1) if null is None else null
    out = null.expand(batch, -1, -1)
    if rows:
        tokens = encoder.project(torch.stack(rows))
        index = torch.nonzero(needs).reshape(-1)
        out = out.to(tokens.dtype).clone()
        out = out.index_copy(0, index.to(out.device), tokens)
    return out
