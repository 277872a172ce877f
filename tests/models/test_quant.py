"""Weight-only int8 / int4 frozen backbone: storage sizes, rounding error, LoRA training on top."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from torch import nn

from gemma_fusion.core.config import CONFIG_DIR
from gemma_fusion.core.errors import UserError
from gemma_fusion.models.build import build_model
from gemma_fusion.models.quant import QuantizedLinear, frozen_linears, pack_int4, tensor_bytes, unpack_int4


def test_int4_packing_round_trips_every_value():
    q = torch.randint(-8, 8, (5, 36), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 18)
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bits, in_features, group, weight_bytes, scale_count, max_rel_err", [
    (8, 96, None, 40 * 96, 40, 0.01),
    (4, 96, 32, 40 * 48, 40 * 3, 0.15),
    (4, 100, 32, 40 * 64, 40 * 4, 0.15),  # 100 inputs: padded to 4 groups of 32
])
def test_storage_is_exact_and_outputs_stay_close(bits, in_features, group, weight_bytes, scale_count, max_rel_err):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 40, bias=True).to(torch.bfloat16)
    quant = QuantizedLinear(linear, bits, group or 64)
    assert quant.qweight.numel() * quant.qweight.element_size() == weight_bytes
    assert quant.scale.numel() == scale_count and quant.scale.dtype == torch.bfloat16
    assert tensor_bytes(quant) == weight_bytes + scale_count * 2 + 40 * 2  # + bf16 bias
    assert list(quant.parameters()) == [] and quant.state_dict() == {}  # nothing trains, nothing is saved

    x = torch.randn(3, 7, in_features, dtype=torch.bfloat16)
    expected, got = linear(x).float(), quant(x).float()
    assert got.shape == expected.shape and got.dtype == torch.float32
    rel = (got - expected).norm() / expected.norm()
    assert 0 < rel < max_rel_err
    # round to nearest: at most half a step per weight (checked in fp32, where dequantising adds no rounding)
    fp32 = linear.float()
    step = fp32.weight.abs().amax(dim=1, keepdim=True) / (127 if bits == 8 else 7)
    if bits == 4:
        groups = nn.functional.pad(fp32.weight.detach(), (0, -in_features % group)).view(40, -1, group)
        step = (groups.abs().amax(-1, keepdim=True) / 7).expand(-1, -1, group).reshape(40, -1)[:, :in_features]
    weight_err = (QuantizedLinear(fp32, bits, group or 64).dequantize() - fp32.weight).abs()
    assert (weight_err <= step / 2 * (1 + 1e-5)).all()


def _cfg(tiny_gemma4_dir, tiny_demo_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[
            f"backbone.path={tiny_gemma4_dir}", "~backbone.pretrain", f"data.train={tiny_demo_dir}/train",
            f"data.val={tiny_demo_dir}/val", "data.prepare_demo=false", "lora=qv_r8", *overrides])


@pytest.fixture(scope="module")
def tiny_demo_dir(tmp_path_factory):
    from gemma_fusion.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", train_per_task=4, val_per_task=2,
                            test_per_task=2, samples_per_shard=8, num_workers=1, progress=False)


def _loss_and_grads(model, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


backends = ["native"] + (["torchao"] if importlib.util.find_spec("torchao") else [])


@pytest.mark.parametrize("quant, backend", [("int8", b) for b in backends] + [("int4", "native")])
def test_lora_trains_on_a_quantized_backbone(tiny_gemma4_dir, tiny_demo_dir, quant, backend):
    from gemma_fusion.core.schema import DataConfig
    from gemma_fusion.data.pipeline import make_loader, preprocessor_for

    torch.manual_seed(0)
    full = build_model(_cfg(tiny_gemma4_dir, tiny_demo_dir)).train()
    torch.manual_seed(0)
    cfg = _cfg(tiny_gemma4_dir, tiny_demo_dir, f"backbone.quant={quant}", f"backbone.quant_backend={backend}",
               "backbone.quant_group_size=16")
    model = build_model(cfg).train()
    decoder = model.backbone.decoder
    def full_precision(m):  # torchao keeps the nn.Linear and swaps its weight for a quantised tensor subclass
        return type(m) is nn.Linear and type(m.weight) is nn.Parameter

    assert not any(full_precision(m) for _, m in frozen_linears(decoder))  # every frozen Linear quantised ...
    lora_bases = [m.base_layer for n, m in decoder.named_modules() if hasattr(m, "base_layer")]
    assert lora_bases and not any(full_precision(b) for b in lora_bases)  # ... LoRA's base layers included
    from gemma_fusion.training.compute import parameter_counts

    assert parameter_counts(model) == parameter_counts(full)  # quantised weights still count as parameters
    ratio = tensor_bytes(decoder) / tensor_bytes(full.backbone.decoder)
    assert ratio < 0.75  # fp32 tiny model; embeddings and norms are not quantised

    batch = next(iter(make_loader(DataConfig(batch_size=4), preprocessor_for(model, 8), train=True,
                                  spec=cfg.data.train)))
    loss_full, _ = _loss_and_grads(full, batch)
    loss_q, grads = _loss_and_grads(model, batch)
    assert torch.isfinite(loss_q) and abs(loss_q - loss_full) / loss_full < 0.1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) <= trainable and any("lora_" in n for n in grads)  # one modality per batch
    assert any(n.startswith(("vision.", "audio.")) for n in grads)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):  # the same batch: the loss must fall with only adapters and projectors training
        optimizer.zero_grad()
        loss, _ = _loss_and_grads(model, batch)
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_dora_reads_the_dequantized_weight(tiny_gemma4_dir, tiny_demo_dir):
    """A DoRA layer on an int8 base against the DoRA formula written out on the int8 weight made by hand:
    y = x (m / ||V||_row * V)^T with V = W_int8 + (alpha / r) B A and ||V|| treated as a constant (DoRA, sec. 4.3),
    W_int8 = round(W / s) * s with s = max_row |W| / 127, W read from the checkpoint file."""
    cfg = _cfg(tiny_gemma4_dir, tiny_demo_dir, "backbone.quant=int8", "lora.use_dora=true")
    model = build_model(cfg)
    layer = model.backbone.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, QuantizedLinear)
    with safe_open(str(tiny_gemma4_dir / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.language_model.layers.0.self_attn.q_proj.weight").float()
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    int8_weight = torch.round(weight / step) * step
    assert (int8_weight - weight).abs().max() > 1e-4  # the full-precision weight would give another answer

    g = torch.Generator().manual_seed(0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():  # B starts at zero; a trained B makes the direction differ from the base's
        b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    magnitude = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(3, 5, weight.shape[1], generator=g)
    got = layer(x)
    got.square().sum().backward()

    m = magnitude.detach().clone().requires_grad_(True)
    v = int8_weight + cfg.lora.alpha / cfg.lora.r * b.detach() @ a.detach()
    expected = x @ (m[:, None] * v / v.norm(dim=1, keepdim=True)).T
    expected.square().sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(magnitude.grad, m.grad, atol=1e-4, rtol=1e-4)

    ids = torch.randint(20, 200, (2, 10))  # and the whole model trains the magnitudes through it
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    assert any("lora_magnitude_vector" in n and p.grad is not None for n, p in model.named_parameters())


def test_bad_quant_settings_are_refused(tiny_gemma4_dir, tiny_demo_dir):
    with pytest.raises(UserError, match="backbone.quant=int3"):
        build_model(_cfg(tiny_gemma4_dir, tiny_demo_dir, "backbone.quant=int3"))
    with pytest.raises(UserError, match="lora.merge=true"):
        build_model(_cfg(tiny_gemma4_dir, tiny_demo_dir, "backbone.quant=int8", "lora.merge=true"))


def test_backward_keeps_no_full_precision_weight():
    """Between forward and backward autograd holds the input, never a dequantised weight."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=False)
    quant = QuantizedLinear(linear, 8)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = quant(x)
    assert (512, 256) not in saved and (256, 512) not in saved
    out.sum().backward()
    expected = torch.ones(4, 512) @ quant.dequantize()
    assert torch.allclose(x.grad, expected, atol=1e-5)
