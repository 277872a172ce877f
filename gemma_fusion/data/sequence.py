"""Token sequences for one sample: [bos] + media blocks + prompt + target + [eos], with labels.

Each image becomes `image_start + image_token * n + image_end`, each audio clip
`audio_start + audio_token * n + audio_end` (n = its number of soft tokens). Media come first, in the
order given, then the prompt, then the target. Only the target and the final eos carry labels.
Prompt and target text are encoded with `split_special_tokens=True`: text that looks like a special
token ("<boi>") stays text.
"""
from __future__ import annotations

from dataclasses import dataclass

from gemma_fusion.core.batch import SpecialTokens
from gemma_fusion.core.batch import AUDIO, IGNORE_INDEX, IMAGE, TEXT


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def build_sequence(
    tokenizer,
    tokens: SpecialTokens,
    prompt: str,
    target: str | None,
    image_tokens: list[int] = (),
    audio_tokens: list[int] = (),
) -> TokenizedSample:
    """Lay out one sample. `image_tokens` / `audio_tokens`: soft-token counts, one entry per image / clip.

    `target=None` builds a generation prompt (no target, no eos, no labels).
    """
    ids: list[int] = [] if tokens.bos is None else [tokens.bos]
    types: list[int] = [TEXT] * len(ids)

    def add(seq: list[int], kind: int = TEXT) -> None:
        ids.extend(seq)
        types.extend([kind] * len(seq))

    for n in image_tokens:
        add(tokens.image_start)
        add([tokens.image_token] * n, IMAGE)
        add(tokens.image_end)
    for n in audio_tokens:
        add(tokens.audio_start)
        add([tokens.audio_token] * n, AUDIO)
        add(tokens.audio_end)
    add(encode_text(tokenizer, prompt))
    labels = [IGNORE_INDEX] * len(ids)
    if target is not None:
        target_ids = encode_text(tokenizer, target) + [tokens.eos]
        add(target_ids)
        labels += target_ids
    return TokenizedSample(ids, labels, types)
