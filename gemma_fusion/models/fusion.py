"""FusionModel: soft tokens from projectors spliced into a frozen decoder-only LM.

The model never imports Lightning. It accepts the batch keys of transformers'
`Gemma4UnifiedForConditionalGeneration` and returns an object with `.loss` and `.logits`. With labels,
the LM head runs only at target positions (a 262,144-token vocabulary makes full-sequence logits the
largest tensor of a step), so `.logits` is [num_targets, V]; with `labels=None` it is [B, S, V].
"""
from __future__ import annotations


from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemma_fusion.core.batch import AUDIO, IGNORE_INDEX, IMAGE, LOADER_KEYS, PROCESSOR_KEYS, SpecialTokens
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.backbone import Backbone, LoadedBackbone, load_backbone
from gemma_fusion.models.projectors.base import AudioProjector, VisionProjector
from gemma_fusion.models.projectors.build import NATIVE, build_projector

IGNORED_BATCH_KEYS = {*LOADER_KEYS, *PROCESSOR_KEYS}


@dataclass
class FusionOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    num_targets: int = 0


def block_ids_from(is_block: torch.Tensor) -> torch.Tensor:
    """[B, S] bool -> [B, S] long: each contiguous run of True gets its own id, other positions -1."""
    prev = F.pad(is_block[:, :-1], (1, 0), value=False)
    ids = (is_block & ~prev).long().cumsum(1) - 1
    return torch.where(is_block, ids, torch.full_like(ids, -1))


def pixels_to_unit(pixel_values: torch.Tensor) -> torch.Tensor:
    """uint8 pixel values -> float32 in [0, 1]: the very op of transformers' rescale (`x * (1/255)`)."""
    return pixel_values.to(torch.float32) * (1 / 255)


class FusionModel(nn.Module):
    """Frozen backbone + trainable projectors (+ optional LoRA inside the backbone).

    Args:
        backbone: the split, frozen language model.
        tokens: special token ids (markers and placeholders).
        vision: a VisionProjector, `(pixel_values [N, P, patch_dim], position_ids [N, P, 2]) -> [N, P, H]`, or None.
        audio: an AudioProjector, `(frames [N, T, frame_dim], mask [N, T]) -> [N, T, H]`, or None.
        bidirectional_image: image tokens attend to each other in both directions (Gemma 4).
        bidirectional_audio: the same inside each audio clip.
        tokenizer: kept for convenience (sequence building, decoding); not used in forward.
    The projectors implement their modality's contract (gemma_fusion/models/projectors/base.py) with out_dim = H;
    forward calls them as modules (not `soft_tokens`), so that a wrapper around one (FSDP) sees the call.
    """

    def __init__(
        self,
        backbone: Backbone,
        tokens: SpecialTokens,
        vision: VisionProjector | None = None,
        audio: AudioProjector | None = None,
        bidirectional_image: bool = True,
        bidirectional_audio: bool = False,
        tokenizer=None,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokens = tokens
        self.vision = vision
        self.audio = audio
        self.bidirectional_image = bidirectional_image
        self.bidirectional_audio = bidirectional_audio
        self.tokenizer = tokenizer
        # Run a projector on a dummy token when its modality is absent from a batch (training only), so every
        # process runs the same modules every step: FSDP's per-module collectives must match across ranks.
        self.run_idle_projectors = False
        for name, proj, contract in (("vision", vision, VisionProjector), ("audio", audio, AudioProjector)):
            if proj is None:
                continue
            if not isinstance(proj, contract):
                raise UserError(
                    f"The {name} projector {type(proj).__name__} does not implement the {name} projector contract; "
                    f"subclass gemma_fusion.models.projectors.{contract.__name__} (see docs/PROJECTORS.md)."
                )
            if proj.out_dim != backbone.hidden_size:
                raise UserError(
                    f"The {name} projector outputs width {proj.out_dim} but the backbone's hidden size is "
                    f"{backbone.hidden_size}; set its out_dim to {backbone.hidden_size}."
                )

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", **kwargs) -> "FusionModel":
        """Load a Gemma 4 unified checkpoint (or any causal LM, without projectors) from a local directory, with
        transformers' semantics (its embedders, its attention rules). A quantised or non-native export of
        `python -m gemma_fusion.export` loads with `gemma_fusion.export.load_export` instead. `kwargs`: see
        `from_loaded`."""
        return cls.from_loaded(load_backbone(path, dtype=dtype), **kwargs)

    @classmethod
    def from_loaded(cls, loaded: LoadedBackbone, vision: Mapping | None | str = "native",
                    audio: Mapping | None | str = "native", *, bidirectional_image: bool | None = None,
                    bidirectional_audio: bool = False, init_from_checkpoint: bool = True,
                    saved: bool = False) -> "FusionModel":
        """The one place a FusionModel is assembled: a split transformers model (`backbone.load_backbone` /
        `split_full_model`) plus a projector per modality.

        `vision` / `audio`: a projector config node (`configs/model/vision/*.yaml`: `_target_` and arguments;
        `null` arguments take the checkpoint's values), None for no projector, or "native": the checkpoint's own
        embedder with its weights (Gemma 4 unified), none for a checkpoint without one. `init_from_checkpoint`:
        False leaves every projector at its random init (its weights come from elsewhere, e.g. an export). `saved`: the
        projector configs are those of a run trained already (`build.filled_nulls`).
        `bidirectional_image` None: the checkpoint's own attention rule.
        """
        mm, hidden = loaded.multimodal, loaded.backbone.hidden_size
        parts = {}
        for name, node, args, state in (("vision", vision, mm.vision, mm.vision_state),
                                        ("audio", audio, mm.audio, mm.audio_state)):
            native = isinstance(node, str) and node == "native"
            if native:  # the checkpoint's own design and arguments, if it has an embedder
                node = {**NATIVE[name], **args} if state is not None else None
            projector = build_projector(node, hidden, args, state if init_from_checkpoint else None, name, saved)
            if native and projector is not None:
                projector = projector.to(loaded.backbone.dtype)  # the checkpoint's embedder in the checkpoint's dtype
            parts[name] = projector
        return cls(loaded.backbone, loaded.tokens, parts["vision"], parts["audio"],
                   bidirectional_image=loaded.bidirectional_image if bidirectional_image is None else bidirectional_image,
                   bidirectional_audio=bidirectional_audio, tokenizer=loaded.tokenizer)

    def train(self, mode: bool = True) -> "FusionModel":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout stays off; only adapter dropout follows `mode`
        for name, module in self.backbone.named_modules():
            if name.endswith("lora_dropout"):
                module.train(mode)
        return self

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with soft tokens scattered into the placeholders -> (embeds [B, S, H], block_ids [B, S])."""
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids)
            mm_token_type_ids[input_ids == self.tokens.image_token] = IMAGE
            mm_token_type_ids[input_ids == self.tokens.audio_token] = AUDIO
        image_slots, audio_slots = mm_token_type_ids == IMAGE, mm_token_type_ids == AUDIO
        embeds = self.backbone.embed(input_ids.masked_fill(image_slots | audio_slots, self.tokens.pad))
        if pixel_values is not None and pixel_values.numel():
            if self.vision is None:
                raise ValueError("The batch has images but the model has no vision projector (model/vision=none).")
            if not pixel_values.is_floating_point():  # uint8 from our loader: the processor's rescale, done here
                pixel_values = pixels_to_unit(pixel_values)
            feats = self.vision(pixel_values, image_position_ids)  # N, P, H (the module: FSDP may wrap it)
            feats = feats[(image_position_ids != -1).all(-1)]  # valid patches only: sum(P_i), H
            embeds = _scatter(embeds, image_slots, feats, "image")
        else:
            embeds = self._run_idle(self.vision, embeds)
        if input_features is not None and input_features.numel():
            if self.audio is None:
                raise ValueError("The batch has audio but the model has no audio projector (model/audio=none).")
            feats = self.audio(input_features, input_features_mask)  # N, T, H (AudioProjector drops an unused mask)
            if input_features_mask is not None:
                feats = feats[input_features_mask.bool()]  # valid frames only: sum(T_i), H
            embeds = _scatter(embeds, audio_slots, feats.reshape(-1, feats.shape[-1]), "audio")
        else:
            embeds = self._run_idle(self.audio, embeds)
        is_block = torch.zeros_like(image_slots)
        if self.bidirectional_image:
            is_block |= image_slots
        if self.bidirectional_audio:
            is_block |= audio_slots
        return embeds, block_ids_from(is_block)

    def _run_idle(self, projector: VisionProjector | AudioProjector | None, embeds: torch.Tensor) -> torch.Tensor:
        """With `run_idle_projectors` (training): a projector whose modality the batch lacks runs on a dummy
        token, with zero weight in the result, in the same order as always (FSDP: the same collectives)."""
        if projector is None or not (self.run_idle_projectors and self.training and torch.is_grad_enabled()):
            return embeds
        return embeds + 0.0 * projector(*projector.idle_inputs(embeds.device)).sum().to(embeds.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        **extra,
    ) -> FusionOutput:
        """Causal-LM loss on the target tokens (labels != -100, shifted by one) and their logits.

        `segment_ids` [B, S] (with `position_ids` restarting per sample): rows packed with several
        samples, attention confined to each. Keys transformers' processor adds that the model does not
        use (`token_type_ids`, `num_soft_tokens_per_image`) and our loader's `meta` / `stats` / `position` are ignored;
        any other keyword is a mistake and raises.
        """
        unknown = set(extra) - IGNORED_BATCH_KEYS
        if unknown:
            raise TypeError(f"FusionModel.forward got unexpected batch keys {sorted(unknown)}; it takes input_ids, "
                            "attention_mask, pixel_values, image_position_ids, input_features, input_features_mask, "
                            "labels, position_ids, mm_token_type_ids and segment_ids.")
        embeds, block_ids = self.embed_inputs(
            input_ids, pixel_values, image_position_ids, input_features, input_features_mask, mm_token_type_ids
        )
        hidden = self.backbone(embeds, attention_mask, position_ids, block_ids, segment_ids)  # B, S, H
        if labels is None:
            return FusionOutput(loss=None, logits=self.backbone.logits(hidden))
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX
        logits = self.backbone.logits(hidden[:, :-1][selected]).float()  # num_targets, V
        n = int(selected.sum())
        loss = F.cross_entropy(logits, targets[selected]) if n else hidden.sum() * 0.0
        return FusionOutput(loss=loss, logits=logits, num_targets=n)


def _scatter(embeds: torch.Tensor, slots: torch.Tensor, feats: torch.Tensor, what: str) -> torch.Tensor:
    if int(slots.sum()) != feats.shape[0]:
        raise ValueError(
            f"The batch has {int(slots.sum())} {what} placeholder tokens but the {what} inputs give "
            f"{feats.shape[0]} soft tokens; build input_ids with the same preprocessing settings as the model."
        )
    embeds = embeds.clone()
    embeds[slots] = feats.to(embeds.dtype)
    return embeds
