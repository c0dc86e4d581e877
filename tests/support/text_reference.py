"""An independent computation of a CLIP text encoding with vectors written at a slot, straight through the text
model's own layers (no tokenizer pipeline, no prompt injection): the reference the Likeness Prompt tests compare
against, for SD1.x (one encoder) and SDXL (clip_l + clip_g, pooled clip_g output)."""
import torch


def token_ids(tokenizer, text):
    """Token ids of `text` without the start and end tokens."""
    return tokenizer.tokenizer(text)["input_ids"][tokenizer.tokens_start:-1]


def encode_with_slot(encoder, tokenizer, before: str, after: str, vectors=None, space="token", length=77):
    """One encoder (a host SDClipModel): [start] before [slot] after [end] [pad...]; the slot holds `vectors`
    ((n, width); token space: like token embeddings; hidden space: the whole input embedding) or nothing.
    Returns (hidden states as the host's layer settings select them (1, length, width), pooled output (1, w))."""
    tm = encoder.transformer.text_model
    table = tm.embeddings.token_embedding.weight.detach().float()
    pos = tm.embeddings.position_embedding.weight.detach().float()
    start, end = tokenizer.start_token, tokenizer.end_token
    pad = tokenizer.pad_token
    head = [start] + token_ids(tokenizer, before)
    tail = token_ids(tokenizer, after) + [end]
    n = 0 if vectors is None else vectors.shape[0]
    ids = head + [0] * n + tail
    eos = len(ids) - 1
    ids = ids + [pad] * (length - len(ids))
    x = table[torch.tensor(ids)].clone()
    if n:
        x[len(head):len(head) + n] = vectors.float() - (pos[len(head):len(head) + n] if space == "hidden" else 0.0)
    x = (x + pos[:length])[None]
    mask = torch.full((length, length), -torch.finfo(x.dtype).max).triu_(1)
    from comfy.ldm.modules.attention import optimized_attention_for_device

    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    layers = tm.encoder.layers
    keep = encoder.layer_idx if encoder.layer == "hidden" else len(layers) - 1
    keep = keep if keep >= 0 else len(layers) + keep
    hidden = None
    with torch.no_grad():
        for i, layer in enumerate(layers):
            x = layer(x, mask, attention)
            if i == keep:
                hidden = x.clone()
        final = tm.final_layer_norm(x)
        if encoder.layer == "last" or encoder.layer_norm_hidden_state:
            hidden = tm.final_layer_norm(hidden) if encoder.layer != "last" else final
        pooled = final[:, eos]
        if encoder.return_projected_pooled:
            pooled = encoder.transformer.text_projection(pooled)
    return hidden.float(), pooled.float()


def sdxl_encode_with_slot(clip, before, after, vectors_by_width=None, space="token"):
    """SDXL: (context = clip_l ++ clip_g hidden states, pooled clip_g output)."""
    outs = {}
    for key in ("l", "g"):
        enc = getattr(clip.cond_stage_model, f"clip_{key}")
        tok = getattr(clip.tokenizer, f"clip_{key}")
        width = enc.transformer.get_input_embeddings().weight.shape[-1]
        vec = None if vectors_by_width is None else vectors_by_width[width]
        outs[key] = encode_with_slot(enc, tok, before, after, vec, space)
    return torch.cat([outs["l"][0], outs["g"][0]], -1), outs["g"][1]
