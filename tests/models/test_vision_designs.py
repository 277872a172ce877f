"""The vision designs: one soft token per merged patch, padding ignored, gradients, positions, frozen HF towers."""
from __future__ import annotations

import json

import pytest
import torch
from einops import rearrange
from tests.conftest import save_tiny_siglip

from gemma_fusion.core.errors import UserError
from gemma_fusion.models.projectors.posemb import SinCosPosemb, TablePosemb, make_posemb
from gemma_fusion.models.projectors.vision_designs import (ConvStemProjector, HFVisionProjector, LinearPatchProjector,
                                                           MLPPatchProjector, PixelShuffleProjector, ViTProjector,
                                                           row_ends)

OUT = 32
LOCAL = {  # tiny widths; 4 px patches merged 2 x 2 -> 8 px tokens
    "linear": lambda **kw: LinearPatchProjector(OUT, 4, 2, **kw),
    "mlp2x_gelu": lambda **kw: MLPPatchProjector(OUT, 4, 2, **kw),
    "conv_stem": lambda **kw: ConvStemProjector(OUT, 4, 2, stem_dim=8, merge_dim=16, **kw),
    "pixel_shuffle": lambda **kw: PixelShuffleProjector(OUT, 4, 2, subpatch_dim=8, **kw),
    "vit": lambda **kw: ViTProjector(OUT, 4, 2, width=16, depth=2, heads=2, **kw),
}
DESIGNS = [*LOCAL, "hf_vision"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_tiny_siglip(tmp_path_factory.mktemp("siglip"), patch_size=16, image_size=32)


def make(name, siglip_dir, **kw):
    torch.manual_seed(0)
    if name == "hf_vision":  # 16 px patches merged 2 x 2 -> 32 px tokens: 2 x 2 tower patches pooled per token
        return HFVisionProjector(OUT, 16, 2, path=str(siglip_dir), **kw)
    return LOCAL[name](**kw)


def grid(gw, gh, pad=0):
    cells = torch.tensor([(x, y) for y in range(gh) for x in range(gw)])
    return torch.cat([cells, torch.full((pad, 2), -1)])


def batch(model, seed=0):
    """Two images, 3 x 2 and 2 x 2 patches, the second padded to 6 with (-1, -1)."""
    pos = torch.stack([grid(3, 2), grid(2, 2, pad=2)])
    pixels = torch.rand(2, 6, model.patch_dim, generator=torch.Generator().manual_seed(seed))
    return pixels, pos


@pytest.mark.parametrize("name", DESIGNS)
def test_one_token_per_merged_patch(name, siglip_dir):
    model = make(name, siglip_dir)
    pixels, pos = batch(model)
    out = model(pixels, pos)
    assert out.shape == (2, 6, OUT) and torch.isfinite(out).all()
    assert {"patch_size", "pooling_kernel_size", "patch_dim", "out_dim"} <= set(vars(model))
    assert model.patch_dim == (model.patch_size * model.pooling_kernel_size) ** 2 * 3
    idle = model(*model.idle_inputs("cpu"))
    assert idle.shape == (1, 1, OUT)


@pytest.mark.parametrize("name", DESIGNS)
def test_padding_patches_do_not_change_valid_outputs(name, siglip_dir):
    model = make(name, siglip_dir).eval()
    pixels, pos = batch(model)
    other = pixels.clone()
    other[1, 4:] = torch.rand_like(other[1, 4:]) * 100
    with torch.no_grad():
        a, b = model(pixels, pos), model(other, pos)
    valid = (pos != -1).all(-1)
    torch.testing.assert_close(a[valid], b[valid])
    if name in ("vit", "hf_vision"):
        assert (a[~valid] == 0).all()


@pytest.mark.parametrize("name", DESIGNS)
def test_outputs_follow_the_input_patch_order(name, siglip_dir):
    model = make(name, siglip_dir).eval()
    pixels, pos = batch(model)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    with torch.no_grad():
        out = model(pixels, pos)
        shuffled = model(pixels[:, perm], pos[:, perm])
    torch.testing.assert_close(shuffled, out[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kw", [(n, {}) for n in DESIGNS] + [("hf_vision", {"trainable": True})])
def test_gradients_reach_every_trainable_parameter(name, kw, siglip_dir):
    model = make(name, siglip_dir, **kw).train()
    pixels, pos = batch(model)
    out = model(pixels, pos)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        if pname.startswith("tower.") and not kw.get("trainable"):
            assert not p.requires_grad and p.grad is None, pname
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_a_frozen_hf_tower_stays_frozen_and_in_eval_mode(siglip_dir):
    model = make("hf_vision", siglip_dir).train()
    assert not any(p.requires_grad for p in model.tower.parameters()) and model.frozen_modules() == [model.tower]
    assert not any(m.training for m in model.tower.modules()) and model.fc1.training
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("tower."))
    assert not hasattr(model.tower, "head")  # SigLIP's attention-pooling head is unused, so dropped
    trainable = make("hf_vision", siglip_dir, trainable=True).train()
    assert all(p.requires_grad for p in trainable.tower.parameters()) and trainable.tower.training
    assert not trainable.frozen_modules()


def test_hf_tower_sees_the_reassembled_image(siglip_dir):
    model = make("hf_vision", siglip_dir).eval()
    image = torch.rand(1, 64, 96, 3)  # H, W, C: a 2 x 3 grid of 32 px tokens, cut as the data pipeline cuts it
    pixels = rearrange(image, "1 (gh a) (gw b) c -> (gh gw) (a b c)", a=32, b=32)
    with torch.no_grad():
        out = model(pixels[None], grid(3, 2)[None])
        tokens = model.tower(pixel_values=(image.permute(0, 3, 1, 2) - 0.5) / 0.5, interpolate_pos_encoding=True)
        tokens = rearrange(tokens.last_hidden_state, "1 (h w) d -> 1 d h w", h=4)  # 16 px tower patches
        pooled = rearrange(torch.nn.functional.avg_pool2d(tokens, 2), "1 d gh gw -> 1 (gh gw) d")
        torch.testing.assert_close(out, model.fc2(torch.nn.functional.gelu(model.fc1(pooled))))


def test_hf_tower_normalisation_and_geometry_checks(siglip_dir, tmp_path):
    assert torch.equal(make("hf_vision", siglip_dir).mean.flatten(), torch.full((3,), 0.5))
    for f in siglip_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.4, 0.5, 0.6]}))
    model = HFVisionProjector(OUT, 16, 2, path=str(tmp_path))
    assert model.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert model.std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    with pytest.raises(UserError, match="multiple of 16"):
        HFVisionProjector(OUT, 4, 3, path=str(siglip_dir))
    with pytest.raises(UserError, match="not a local directory"):
        HFVisionProjector(OUT, 16, 2, path=str(tmp_path / "missing"))


@pytest.mark.parametrize("name", list(LOCAL))
@pytest.mark.parametrize("kind", ["table", "sincos", "none"])
def test_position_kinds(name, kind, siglip_dir):
    model = make(name, siglip_dir, posemb=kind).eval()
    pixels, pos = batch(model)
    moved = torch.where(pos == -1, pos, pos + 1)  # the same images, one patch further right and down
    with torch.no_grad():
        a, b = model(pixels, pos), model(pixels, moved)
    valid = (pos != -1).all(-1)
    assert torch.allclose(a[valid], b[valid], atol=1e-6) == (kind == "none")


@pytest.mark.parametrize("name", DESIGNS)
def test_a_position_beyond_the_table_raises(name, siglip_dir):
    model = make(name, siglip_dir, posemb="table", posemb_size=3)
    pixels, pos = batch(model)
    model(pixels, pos)  # largest position 2 fits 3 rows
    with pytest.raises(ValueError, match="position table has 3 rows"):
        model(pixels, torch.where(pos == -1, pos, pos + 1))


def test_position_modules():
    x = torch.zeros(1, 3, 8)
    pos = torch.tensor([[[0, 0], [2, 1], [-1, -1]]])
    table = TablePosemb(8, size=4)
    out = table(x, pos)
    torch.testing.assert_close(out[0, 1], table.table[2, 0] + table.table[1, 1])
    assert (out[0, 2] == 0).all()  # padding gets nothing
    sincos = SinCosPosemb(8)(x, pos)
    assert (sincos[0, 2] == 0).all() and not torch.equal(sincos[0, 0], sincos[0, 1])
    same_x = SinCosPosemb(8)(x[:, :2], torch.tensor([[[2, 0], [2, 3]]]))
    assert torch.equal(same_x[0, 0, :4], same_x[0, 1, :4]) and not torch.equal(same_x[0, 0, 4:], same_x[0, 1, 4:])
    assert torch.equal(make_posemb("none", 8)(x, pos), x)
    with pytest.raises(ValueError, match="divisible by 4"):
        SinCosPosemb(6)
    with pytest.raises(ValueError, match="posemb='rope'"):
        make_posemb("rope", 8)


def test_row_ends_mark_the_last_valid_patch_of_each_row():
    pos = torch.stack([grid(3, 2), torch.cat([grid(2, 2), torch.full((2, 2), -1)])])
    assert row_ends(pos).tolist() == [[False, False, True, False, False, True],
                                      [False, True, False, True, False, False]]
