"""A checkpoint saved with `save_pretrained` alone (no tokenizer files): a Gemma 4 unified model builds from its
config's special token ids; whatever needs text stops with one sentence naming the directory and what to add."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Gemma4UnifiedForConditionalGeneration, LlamaConfig, LlamaForCausalLM

from gemma_fusion import FusionModel
from gemma_fusion.core.errors import UserError
from gemma_fusion.data.pipeline import preprocessor_for
from gemma_fusion.models.backbone import load_backbone
from gemma_fusion.models.tiny import tiny_gemma4_config
from gemma_fusion.training.startup import check_backbone_dir
from tests.models.test_parity import _batch


@pytest.fixture(scope="module")
def bare_gemma4_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bare_gemma4")
    torch.manual_seed(0)
    config = tiny_gemma4_config(mm_embed_dim=48, audio_samples_per_token=320, patch_size=4)
    Gemma4UnifiedForConditionalGeneration(config).save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    return path


def _one_sentence_about(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert "\n" not in message and ". " not in message.replace("e.g. ", "") and message.endswith(").")
    assert f"backbone.path={path}" in message and "tokenizer" in message and "save_pretrained" in message


def test_gemma4_checkpoint_without_tokenizer_builds_and_matches_transformers(bare_gemma4_dir):
    ours = FusionModel.from_pretrained(bare_gemma4_dir).eval()
    theirs = Gemma4UnifiedForConditionalGeneration.from_pretrained(bare_gemma4_dir).eval()
    config = theirs.config
    assert (ours.tokens.bos, ours.tokens.eos, ours.tokens.pad) == (config.text_config.bos_token_id,
                                                                   config.text_config.eos_token_id,
                                                                   config.text_config.pad_token_id)
    assert (ours.tokens.image_token, ours.tokens.audio_token) == (config.image_token_id, config.audio_token_id)
    batch = _batch(ours)  # built from the special token ids alone
    with torch.no_grad():
        assert abs(ours(**batch).loss.item() - theirs(**batch).loss.item()) < 1e-4


def test_text_needs_a_tokenizer_and_says_so_in_one_sentence(bare_gemma4_dir):
    model = FusionModel.from_pretrained(bare_gemma4_dir)
    with pytest.raises(UserError) as err:  # training, evaluation and prompts all tokenize through this
        preprocessor_for(model, image_tokens=8)
    _one_sentence_about(err, bare_gemma4_dir)
    with pytest.raises(UserError) as err:  # decoding generated ids
        model.tokenizer.decode([40, 41])
    _one_sentence_about(err, bare_gemma4_dir)
    with pytest.raises(UserError) as err:  # train.py's start-up check, before anything is prepared
        check_backbone_dir(OmegaConf.create({"path": str(bare_gemma4_dir)}))
    _one_sentence_about(err, bare_gemma4_dir)


def test_a_llama_checkpoint_without_tokenizer_stops_in_one_sentence(tmp_path):
    """Without Gemma 4's config ids, the special tokens come from the tokenizer: no model without it."""
    config = LlamaConfig(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UserError) as err:
        load_backbone(tmp_path)
    _one_sentence_about(err, tmp_path)
    assert "model_type 'llama'" in str(err.value)
