"""Keys the pack's layers share in the host's transformer_options, so that no layer imports another just for a name."""

# A guider whose conds are not CFGGuider's [positive, negative] may publish which cond_or_uncond indices are
# unconditional under this key of transformer_options (for example {0} when the negative comes first). The
# attention dispatcher reads it to tell cond rows from uncond rows.
UNCOND_INDICES_KEY = "likeness_uncond_indices"
