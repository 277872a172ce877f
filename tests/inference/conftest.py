"""Fixtures for generation tests: tiny multimodal batches, a Llama backbone, a demo data set and a trained run."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gemma_fusion import FusionModel
from gemma_fusion.data.collate import collate
from gemma_fusion.data.sequence import build_sequence
from gemma_fusion.models.backbone import load_backbone
from gemma_fusion.models.projectors import AudioFrameProjector, PatchEmbedder
from gemma_fusion.models.tokenizer import build_byte_tokenizer
from tests.conftest import save_tiny_gemma4

PROMPTS = ("Read:", "What do the picture and the clip show, in a few words?", "Say it")


def prompt_batch(model: FusionModel, prompts=PROMPTS, seed: int = 0) -> dict:
    """Right-padded generation prompts of different lengths, each with an image and an audio clip."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, prompt in enumerate(prompts):
        n_image, n_audio = 3 + i, 4 + 3 * i
        grid = torch.tensor([(x, 0) for x in range(n_image)])
        pixels = torch.rand(n_image, model.vision.patch_dim, generator=g)
        frames = torch.randn(n_audio, model.audio.frame_dim, generator=g) * 0.1
        seq = build_sequence(model.tokenizer, model.tokens, prompt, None, [n_image], [n_audio])
        samples.append(dict(input_ids=seq.input_ids, labels=seq.labels, mm_token_type_ids=seq.mm_token_type_ids,
                            images=[(pixels, grid)], audio=[frames]))
    batch = collate(samples, model.tokens.pad)
    batch.pop("meta")
    return batch


def sharpened(model: FusionModel) -> FusionModel:
    """Random 0.02-std tied embeddings make every logit tiny; give them a trained model's scale (no near-ties)."""
    embedding, head = model.backbone.decoder.get_input_embeddings().weight, model.backbone.lm_head.weight
    with torch.no_grad():
        embedding.mul_(8)
        if head is not embedding:
            head.mul_(8)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                         eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma4_sliding_dir(tmp_path_factory):
    """Like `tiny_gemma4_dir` with an 8-token sliding window: prompts are longer, so the window is in play."""
    path = tmp_path_factory.mktemp("tiny_gemma4_sliding")
    save_tiny_gemma4(path, mm_embed_dim=48, audio_samples_per_token=320, patch_size=4, sliding_window=8)
    return path


def llama_fusion(path) -> FusionModel:
    loaded = load_backbone(path)
    torch.manual_seed(0)
    return FusionModel(loaded.backbone, loaded.tokens, PatchEmbedder(64, embed_dim=32, posemb_size=16),
                       AudioFrameProjector(64), bidirectional_image=True, tokenizer=loaded.tokenizer)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from gemma_fusion.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", train_per_task=4, val_per_task=2,
                            test_per_task=2, samples_per_shard=8, num_workers=1, progress=False)
