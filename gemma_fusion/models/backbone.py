"""The frozen language model: loading from a local directory and a split embed / decode / head API.

Any decoder-only causal LM that transformers can load from safetensors works. A Gemma 4 unified
checkpoint (`model_type: gemma4_unified`) is first-class: its text model becomes the backbone and its
`embed_vision` / `embed_audio` weights are handed to the projectors.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Gemma4UnifiedForConditionalGeneration
from transformers.masking_utils import create_masks_for_generate, packed_sequence_mask_function
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gemma_fusion.core.batch import SpecialTokens
from gemma_fusion.core.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class MultimodalSpec:
    """What the checkpoint says about its own embedders (Gemma 4 unified only); empty otherwise."""

    vision: dict = field(default_factory=dict)
    audio: dict = field(default_factory=dict)
    vision_state: dict | None = None
    audio_state: dict | None = None


class Backbone(nn.Module):
    """A decoder-only LM split into `embed` -> `forward` (hidden states) -> `logits`.

    Splitting lets the FusionModel insert soft tokens between embedding and decoding, and compute the
    LM head only at target positions; with a `cache` it is also the decoding step of generation.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, text_config, model_type: str,
                 placeholder_ids: tuple[int, ...] = ()):
        super().__init__()
        self.decoder = decoder
        self.lm_head = lm_head
        self.text_config = text_config
        self.model_type = model_type
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.placeholder_ids = tuple(placeholder_ids)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [B, S, H] embeddings (with the model's own embedding scale).

        `placeholder_ids` (Gemma 4's image, audio and video tokens) embed as pad wherever they stand, as in
        transformers: soft tokens replace them afterwards, and one that generation produces has none to get.
        """
        if self.placeholder_ids:
            placeholders = torch.tensor(self.placeholder_ids, device=input_ids.device)
            input_ids = input_ids.masked_fill(torch.isin(input_ids, placeholders), self.text_config.pad_token_id)
        return self.decoder.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        block_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """[B, S, H] embeddings -> [B, S, H] final hidden states.

        `block_ids` [B, S] marks groups of positions that attend to each other bidirectionally
        (-1 = ordinary causal text), exactly as transformers' `block_sequence_ids`. `segment_ids`
        [B, S] numbers the samples packed into a row: attention stays inside each (transformers'
        `packed_sequence_mask_function`); pass `position_ids` that restart per sample with it.
        `cache` (generation): a transformers `DynamicCache(config=backbone.text_config)` that these S positions
        extend, empty for the prefill; `attention_mask` [B, cached + S] then marks padding columns with 0 and
        `position_ids` [B, S] holds each row's own positions (`block_ids` only in the prefill).
        """
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        mask = attention_mask
        has_blocks = block_ids is not None and bool((block_ids >= 0).any())
        if has_blocks or segment_ids is not None or cache is not None:
            mask = create_masks_for_generate(  # sized against the cache before this call appends to it
                config=self.text_config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                block_sequence_ids=block_ids if has_blocks else None,
                and_mask_function=None if segment_ids is None else packed_sequence_mask_function(segment_ids),
            )
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache,
                           use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states -> [..., V] logits, with the model's final soft-cap."""
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class LoadedBackbone:
    backbone: Backbone
    tokenizer: object
    tokens: SpecialTokens
    multimodal: MultimodalSpec
    bidirectional_image: bool


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def has_tokenizer(path: Path) -> bool:
    """`path` holds tokenizer files (whether transformers can read them is `AutoTokenizer`'s own check)."""
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def no_tokenizer_error(path: Path, needed_by: str = "turning text into tokens and back (training, evaluation, "
                       "generation)") -> UserError:
    return UserError(f"backbone.path={path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                     f"{needed_by} needs them: save the model's tokenizer there, e.g. "
                     f"AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{path}').")


class NoTokenizer:
    """The tokenizer of a Gemma 4 unified checkpoint saved without one (`save_pretrained` of the model alone): the
    model builds and runs from its config's special token ids; any use of the tokenizer raises one sentence."""

    def __init__(self, path: Path):
        self.path = path

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy and pickle probe for dunders: answer as a plain object does
            raise AttributeError(name)
        raise no_tokenizer_error(self.path)

    def __call__(self, *args, **kwargs):
        raise no_tokenizer_error(self.path)


def check_backbone_dir(path: Path, text: bool = False) -> None:
    """`path` holds a transformers checkpoint gemma_fusion can load: a directory with config.json and safetensors
    weights (read nothing else: a start-up check, before any model is built). `text`: the caller turns text into
    tokens (training), so the directory must hold tokenizer files too."""
    if not path.is_dir():
        raise UserError(
            f"backbone.path={path} does not exist or is not a directory; pass a local directory holding a "
            "transformers checkpoint (config.json + *.safetensors + tokenizer files)."
        )
    if not (path / "config.json").is_file():
        raise UserError(f"backbone.path={path} has no config.json; it is not a transformers checkpoint directory.")
    if not any(path.glob("*.safetensors")):
        raise UserError(
            f"backbone.path={path} holds no *.safetensors weights; gemma_fusion loads weights only from safetensors "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)`)."
        )
    if text and not has_tokenizer(path):
        raise no_tokenizer_error(path)


def _read_config(path: Path, trust_remote_code: bool = False, revision: str | None = None):
    check_backbone_dir(path)
    raw = json.loads((path / "config.json").read_text())
    model_type = raw.get("model_type")
    known = model_type == "gemma4_unified" or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if raw.get("auto_map") and not known and not trust_remote_code:
        raise UserError(
            f"backbone.path={path} ships its own Python code for model_type '{model_type}' (auto_map in config.json), "
            "which gemma_fusion does not run unless asked: review it, then pass backbone.trust_remote_code=true "
            "with backbone.revision pinning it."
        )
    if trust_remote_code:
        check_code_pin(path, revision)
    elif not known:
        raise UserError(
            f"backbone.path={path} has model_type '{model_type}', which is not a decoder-only causal LM that "
            "transformers knows; use a causal LM checkpoint (for example a Gemma 4 unified or Llama directory)."
        )
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), model_type


def remote_code_options(backbone_cfg) -> dict:
    """`trust_remote_code` and `revision` from a `backbone` config node (absent in older run configs: off)."""
    return {"trust_remote_code": bool(backbone_cfg.get("trust_remote_code")), "revision": backbone_cfg.get("revision")}


def check_remote_code_consent(cfg, where: str, trusted: bool) -> None:
    """A run's saved config (perhaps someone else's) cannot by itself make gemma_fusion run a checkpoint's own
    Python code: the user who loads the run says so again."""
    if cfg.backbone.get("trust_remote_code") and not trusted:
        raise UserError(f"{where} uses a backbone that runs its own Python code ({cfg.backbone.path}, pinned "
                        f"{cfg.backbone.get('revision')}); it loads only when you pass trust_remote_code=true to "
                        "eval.py, gemma_fusion.infer or gemma_fusion.export.")


def code_digest(path: Path) -> str:
    """sha256 over the names and bytes of every Python file under checkpoint directory `path`."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.py")):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return f"sha256:{digest.hexdigest()}"


def check_code_pin(path: Path, revision: str | None) -> None:
    """trust_remote_code runs the checkpoint's Python files: only the ones the user reviewed and pinned."""
    files = ", ".join(sorted(f.relative_to(path).as_posix() for f in path.rglob("*.py"))) or "none"
    actual = code_digest(path)
    if not revision:
        raise UserError(f"backbone.trust_remote_code=true runs the Python files in {path} ({files}): review them, "
                        f"then pin them with backbone.revision={actual}.")
    if revision != actual:
        raise UserError(f"the Python files in {path} ({files}) are not the ones pinned by backbone.revision={revision} "
                        f"(they hash to {actual}); review the change before updating the pin.")


def _text_markers(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class BackboneSpec:
    """What a checkpoint directory says without loading its weights: tokenizer, special tokens, embedders."""

    config: object
    model_type: str
    tokenizer: object
    tokens: SpecialTokens
    multimodal: MultimodalSpec
    bidirectional_image: bool


def read_backbone_spec(path: str | Path, trust_remote_code: bool = False, revision: str | None = None) -> BackboneSpec:
    """Config, tokenizer, special tokens and embedder geometry of a checkpoint directory (no weights read).

    `trust_remote_code`: let transformers run the directory's own Python files (config.json's auto_map), which
    `revision` must pin (`code_digest`); otherwise no code from the checkpoint runs.
    """
    path = Path(path).expanduser()
    config, model_type = _read_config(path, trust_remote_code, revision)
    if not has_tokenizer(path):
        if model_type == "gemma4_unified":  # its special token ids are in config.json: the model builds without one
            return gemma4_spec(config, NoTokenizer(path))
        raise no_tokenizer_error(path, f"a model_type '{model_type}' checkpoint (its special tokens come from them)")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if model_type == "gemma4_unified":
        return gemma4_spec(config, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _first(tokenizer.eos_token_id)
    tokens = SpecialTokens(
        bos=tokenizer.bos_token_id, eos=_first(tokenizer.eos_token_id), pad=pad,
        image_start=_text_markers(tokenizer, "<image>"), image_end=_text_markers(tokenizer, "</image>"),
        image_token=pad, audio_start=_text_markers(tokenizer, "<audio>"),
        audio_end=_text_markers(tokenizer, "</audio>"), audio_token=pad,
    )
    return BackboneSpec(config, model_type, tokenizer, tokens, MultimodalSpec(), False)


def gemma4_spec(config, tokenizer=None) -> BackboneSpec:
    """What a Gemma 4 unified config says (special tokens, embedder geometry, bidirectional images); also for a
    model built in memory from a config (benchmarks), where there may be no tokenizer."""
    text_config = config.get_text_config()
    spec = MultimodalSpec()
    if config.vision_config is not None:
        vc = config.vision_config
        spec.vision = dict(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                           embed_dim=vc.mm_embed_dim, posemb_size=vc.mm_posemb_size, eps=vc.rms_norm_eps)
    if config.audio_config is not None:
        spec.audio = dict(frame_dim=config.audio_config.audio_embed_dim, eps=config.audio_config.rms_norm_eps)
    tokens = SpecialTokens(
        bos=text_config.bos_token_id, eos=_first(text_config.eos_token_id), pad=text_config.pad_token_id,
        image_start=[config.boi_token_id], image_end=[config.eoi_token_id], image_token=config.image_token_id,
        audio_start=[config.boa_token_id], audio_end=[config.eoa_token_index], audio_token=config.audio_token_id,
    )
    return BackboneSpec(config, "gemma4_unified", tokenizer, tokens, spec,
                        text_config.use_bidirectional_attention == "vision")


def full_model_class(model_type: str):
    """The transformers class a checkpoint of `model_type` loads as (the whole model, not only the decoder)."""
    if model_type == "gemma4_unified":
        return Gemma4UnifiedForConditionalGeneration
    return AutoModelForCausalLM


def meta_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The whole transformers model for `config` on the meta device: names, shapes and dtypes, no memory.
    Raises ValueError for a model type transformers cannot build as a causal LM."""
    cls = full_model_class(config.model_type)
    with torch.device("meta"):
        if cls is AutoModelForCausalLM:  # a config of the checkpoint's own code exists only if the user trusted it
            return cls.from_config(config, dtype=dtype, trust_remote_code=is_remote_code(config))
        return cls._from_config(config, dtype=dtype)


def is_remote_code(config) -> bool:
    """The config's class came from a checkpoint's own Python files (loaded with trust_remote_code)."""
    return type(config).__module__.startswith("transformers_modules")


def module_paths(full: nn.Module) -> tuple[str, str]:
    """(decoder path, LM head path) inside a transformers model, e.g. ("model.language_model", "lm_head")."""
    decoder, head = full.get_decoder(), full.get_output_embeddings()
    names = {id(m): n for n, m in full.named_modules()}
    return names[id(decoder)], names[id(head)]


def load_backbone(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa",
                  trust_remote_code: bool = False, revision: str | None = None) -> LoadedBackbone:
    """Load a frozen backbone, its tokenizer and (for Gemma 4 unified) its embedder weights from `path`
    (`trust_remote_code` / `revision`: see `read_backbone_spec`)."""
    path = Path(path).expanduser()
    if dtype not in DTYPES:
        raise UserError(f"backbone.dtype={dtype} is not supported; choose one of {sorted(DTYPES)}.")
    spec = read_backbone_spec(path, trust_remote_code, revision)
    check_not_quantized_export(path)
    full = full_model_class(spec.model_type).from_pretrained(
        path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation)
    return split_full_model(full, spec)


def check_not_quantized_export(path: Path) -> None:
    """A quantised `gemma_fusion.export` stores its int8 / int4 Linear layers as `P.qweight` + `P.scale`, which
    transformers cannot load: one sentence instead of its missing-weights warning (read from the headers only)."""
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            if any(key.endswith(".qweight") for key in weights.keys()):
                raise UserError(f"{path} is a quantised gemma_fusion export (int8 / int4 weights in {file.name}); "
                                "load it with gemma_fusion.export.load_export(path) or python -m gemma_fusion.infer "
                                "run=PATH.")


def split_full_model(full: nn.Module, spec: BackboneSpec) -> LoadedBackbone:
    """A loaded transformers model -> the frozen Backbone (decoder + LM head) and, for Gemma 4 unified, the
    embedder weights its projectors start from (`spec.multimodal` is filled in place)."""
    placeholder_ids = ()
    if spec.model_type == "gemma4_unified":
        decoder, lm_head = full.model.language_model, full.lm_head
        placeholder_ids = (full.config.image_token_id, full.config.audio_token_id, full.config.video_token_id)
        text_config = decoder.config  # the live config: it carries the attention implementation
        if full.model.embed_vision is None:
            spec.multimodal.vision = {}
        else:
            spec.multimodal.vision_state = full.model.embed_vision.state_dict()
        if full.model.embed_audio is None:
            spec.multimodal.audio = {}
        else:
            spec.multimodal.audio_state = full.model.embed_audio.state_dict()
    else:
        decoder, lm_head, text_config = full.get_decoder(), full.get_output_embeddings(), full.config
    backbone = Backbone(decoder, lm_head, text_config, spec.model_type, placeholder_ids)
    backbone.requires_grad_(False)
    backbone.eval()
    return LoadedBackbone(backbone, spec.tokenizer, spec.tokens, spec.multimodal, spec.bidirectional_image)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
