"""Greedy generation without a KV cache: re-runs the full sequence each step (correct, simple; short targets)."""
from __future__ import annotations

import torch

from gemma_fusion.models.fusion import FusionModel


@torch.no_grad()
def greedy_generate(model: FusionModel, batch: dict, max_new_tokens: int = 16) -> list[list[int]]:
    """Continue each right-padded prompt of `batch` (built with target=None) until eos; returns new token ids.

    Each row grows at its own end; under causal attention the padding after a row's end never affects it.
    """
    ids = batch["input_ids"].clone()  # generated tokens are written in place; the caller's batch stays as it was
    lengths = batch["attention_mask"].sum(1)
    types = batch["mm_token_type_ids"]
    media = {k: batch[k] for k in ("pixel_values", "image_position_ids", "input_features", "input_features_mask")
             if k in batch}
    rows = torch.arange(ids.shape[0])
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    for _ in range(max_new_tokens):
        width = int(lengths.max()) + 1
        if ids.shape[1] < width:
            ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=model.tokens.pad)
            types = torch.nn.functional.pad(types, (0, width - types.shape[1]))
        embeds, block_ids = model.embed_inputs(ids, mm_token_type_ids=types, **media)
        hidden = model.backbone(embeds, None, None, block_ids)
        next_ids = model.backbone.logits(hidden[rows, lengths - 1]).argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            tok = int(next_ids[i])
            if tok == model.tokens.eos:
                done[i] = True
            else:
                out[i].append(tok)
        ids[rows[~done], lengths[~done]] = next_ids[~done]
        lengths = lengths + (~done).long()
        if done.all():
            break
    return out
