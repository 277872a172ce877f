"""A byte-level tokenizer for the project's tiny backbones: any UTF-8 text encodes, nothing is unknown.

Layout: 16 special ids first (Gemma's pad=0, eos=1, bos=2, then media markers), then the 256 bytes.
Saved with `save_pretrained` as a plain `tokenizer.json`, so `AutoTokenizer` loads it with no remote code.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<bos>", "<boi>", "<eoi>", "<image>", "<boa>", "<eoa>", "<audio>"]
NUM_RESERVED = 16
VOCAB_SIZE = NUM_RESERVED + 256


def special_id(token: str) -> int:
    return SPECIALS.index(token)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    to_byte = _unicode_to_byte()
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: to_byte[c])  # stand-ins of bytes 0..255
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"<reserved_{i}>": i for i in range(len(SPECIALS), NUM_RESERVED)})
    vocab.update({c: NUM_RESERVED + i for i, c in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        extra_special_tokens={"boi_token": "<boi>", "eoi_token": "<eoi>", "image_token": "<image>",
                              "boa_token": "<boa>", "eoa_token": "<eoa>", "audio_token": "<audio>"},
    )


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte <-> unicode map: printable bytes stand for themselves, the others for 256 + n in order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for c, b in zip(cs, bs)}
