"""Text generation from a FusionModel: KV-cached (the default) or full re-computation, greedy or sampled.

Prompts arrive right-padded, as the collator builds them (`target=None`). The cached path lays them out
left-padded, so every row's next token lands in the same (last) column: the prompt (text and soft tokens,
with the image / audio blocks' bidirectional mask of `Backbone.forward`) is prefilled into a transformers
`DynamicCache`, then each step feeds only the new token. Each row keeps its own positions (0 at its first
real token) and a 2-D mask hides the padding columns, so a row's result does not depend on its neighbours.
Left padding keeps the distance between any two real tokens equal to their distance in cache columns,
which is what sliding-window layers measure.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache

from gemma_fusion.models.fusion import FusionModel

MEDIA_KEYS = ("pixel_values", "image_position_ids", "input_features", "input_features_mask")


class CachedDecoder:
    """Prefill once (`start`), then one token per `step` from the KV cache; both return next-token logits [B, V]."""

    def __init__(self, model: FusionModel, batch: dict):
        self.model = model
        self.batch = batch

    def start(self) -> torch.Tensor:
        valid = self.batch["attention_mask"].bool()
        lengths = valid.sum(1)
        cols = torch.arange(valid.shape[1], device=valid.device)
        if not torch.equal(valid, cols < lengths[:, None]):
            raise ValueError("generation expects right-padded prompts (attention_mask 1...1 0...0 per row).")
        width = int(lengths.max())  # prompt_only batches keep the columns of their cut targets: drop them
        cols = cols[:width]
        embeds, block_ids = self.model.embed_inputs(
            self.batch["input_ids"][:, :width], mm_token_type_ids=self.batch["mm_token_type_ids"][:, :width],
            **{k: self.batch[k] for k in MEDIA_KEYS if k in self.batch})
        shift = (width - lengths)[:, None]  # B, 1: left padding of each row
        source = (cols - shift) % width  # B, S: right-padded column shown in each left-padded column
        embeds = embeds.gather(1, source[..., None].expand_as(embeds))  # B, S, H
        left_valid = cols >= shift  # B, S
        block_ids = block_ids.gather(1, source).masked_fill(~left_valid, -1)
        positions = (cols - shift).clamp(min=0)  # B, S
        self.mask = left_valid.long()
        self.next_position = lengths[:, None]  # B, 1
        self.cache = DynamicCache(config=self.model.backbone.text_config)
        hidden = self.model.backbone(embeds, self.mask, positions, block_ids, cache=self.cache)
        return self.model.backbone.logits(hidden[:, -1])

    def step(self, next_ids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Feed `next_ids` [B] (finished rows too: their results are ignored)."""
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        embeds = self.model.backbone.embed(next_ids[:, None])  # B, 1, H
        hidden = self.model.backbone(embeds, self.mask, self.next_position, cache=self.cache)
        self.next_position = self.next_position + 1
        return self.model.backbone.logits(hidden[:, -1])


class FullDecoder:
    """No cache: every step re-runs the whole sequence, each row growing at its own end. Under causal attention
    the padding after a row's end never affects it. The reference the cached path is tested against."""

    def __init__(self, model: FusionModel, batch: dict):
        self.model = model
        self.ids = batch["input_ids"].clone()  # generated tokens are written in place; the caller's batch stays
        self.types = batch["mm_token_type_ids"]
        self.lengths = batch["attention_mask"].sum(1)
        self.media = {k: batch[k] for k in MEDIA_KEYS if k in batch}
        self.rows = torch.arange(self.ids.shape[0], device=self.ids.device)

    def start(self) -> torch.Tensor:
        width = int(self.lengths.max()) + 1
        if self.ids.shape[1] < width:
            self.ids = torch.nn.functional.pad(self.ids, (0, width - self.ids.shape[1]), value=self.model.tokens.pad)
            self.types = torch.nn.functional.pad(self.types, (0, width - self.types.shape[1]))
        embeds, block_ids = self.model.embed_inputs(self.ids, mm_token_type_ids=self.types, **self.media)
        hidden = self.model.backbone(embeds, None, None, block_ids)
        return self.model.backbone.logits(hidden[self.rows, self.lengths - 1])

    def step(self, next_ids: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        self.ids[self.rows[alive], self.lengths[alive]] = next_ids[alive]
        self.lengths = self.lengths + alive.long()
        return self.start()


def pick(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids: argmax when `temperature` is 0, else a sample from the tempered
    distribution cut to the `top_k` most likely tokens (0 = all) and to the smallest set holding `top_p` of it."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_generate(
    model: FusionModel,
    batch: dict,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Continue each right-padded prompt of `batch`; yields per step (tokens [B], new [B] bool), where `new`
    marks the rows that got a token (not eos, not finished before). A row stops at eos; all stop after
    `max_new_tokens`. Sampling draws from a `torch.Generator` seeded with `seed` on the batch's device."""
    device = batch["input_ids"].device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    decoder = (CachedDecoder if use_cache else FullDecoder)(model, batch)
    done = torch.zeros(batch["input_ids"].shape[0], dtype=torch.bool, device=device)
    logits = decoder.start()
    for step in range(max_new_tokens):
        next_ids = pick(logits, temperature, top_k, top_p, generator)
        is_eos = next_ids == model.tokens.eos
        new = ~done & ~is_eos
        done = done | is_eos
        yield next_ids, new
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = decoder.step(next_ids.masked_fill(done, model.tokens.pad), ~done)


def generate(model: FusionModel, batch: dict, max_new_tokens: int = 16, **options) -> list[list[int]]:
    """The new token ids of each row (eos excluded); `options` as in `stream_generate`."""
    out: list[list[int]] = [[] for _ in range(batch["input_ids"].shape[0])]
    for next_ids, new in stream_generate(model, batch, max_new_tokens, **options):
        for i in new.nonzero().flatten().tolist():
            out[i].append(int(next_ids[i]))
    return out


def greedy_generate(model: FusionModel, batch: dict, max_new_tokens: int = 16,
                    use_cache: bool = True) -> list[list[int]]:
    """Greedy continuation of each right-padded prompt of `batch` (built with target=None) until eos."""
    return generate(model, batch, max_new_tokens, use_cache=use_cache)
