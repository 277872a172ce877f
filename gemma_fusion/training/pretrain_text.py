"""Text-only pretraining of the demo's tiny Gemma-4-unified backbone, cached as a transformers directory.

The result is an ordinary checkpoint (config.json, model.safetensors, tokenizer.json) that the demo
loads through the same `backbone.path` code as a real Gemma 4 checkpoint, then freezes.

    python -m gemma_fusion.training.pretrain_text --out data/backbones/tiny    # --help lists every key
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import Gemma4UnifiedForConditionalGeneration

from gemma_fusion.core.cli import option, parse_cli
from gemma_fusion.data.demo_text import text_example
from gemma_fusion.data.sequence import encode_text
from gemma_fusion.models.backbone import Backbone
from gemma_fusion.core.batch import IGNORE_INDEX
from gemma_fusion.models.fusion import block_ids_from
from gemma_fusion.models.tiny import tiny_gemma4_config
from gemma_fusion.models.tokenizer import build_byte_tokenizer, special_id

FORMAT_VERSION = 2  # bump when the corpus or the recipe changes: cached backbones are rebuilt


@dataclass
class PretrainConfig:
    """The tiny backbone's architecture and its text-pretraining recipe."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    # Each phase trains `steps` steps on a uniform mix of `tasks`; a repeated task weighs more. DTMF's
    # run-collapse is the hard format and gets half the mix; the image copy must also be well practised,
    # or projectors trained later against the frozen model stall (measured: loss flat for 800 steps).
    phases: list[dict] = field(default_factory=lambda: [
        {"steps": 1500, "tasks": ["ocr_digits", "ocr_words", "dtmf", "dtmf"]},
    ])
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_examples: int = 256
    bidirectional_audio: bool = True  # audio slots attend both ways, as the demo's FusionModel does
    # > 0: Gaussian noise on the slot characters' embeddings, a random share in [0, slot_noise] of each row's
    # embedding RMS, so the backbone learns to read approximate slot embeddings (a projector's early output).
    slot_noise: float = 0.0


def make_batch(tokenizer, tasks: list[str], rng: np.random.Generator, batch_size: int,
               bidirectional_audio: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded text batch; the slot characters are marked as one bidirectional block, like soft tokens."""
    rows, labels, blocks, names = [], [], [], []
    for _ in range(batch_size):
        names.append(tasks[int(rng.integers(len(tasks)))])
        kind, slots, prompt, target = text_example(names[-1], rng)
        start, end = (("<boi>", "<eoi>") if kind == "image" else ("<boa>", "<eoa>"))
        slot_ids = encode_text(tokenizer, slots)
        head = [special_id("<bos>"), special_id(start)]
        ids = head + slot_ids + [special_id(end)] + encode_text(tokenizer, prompt)
        tgt = encode_text(tokenizer, target) + [special_id("<eos>")]
        rows.append(ids + tgt)
        labels.append([IGNORE_INDEX] * len(ids) + tgt)
        after = [False] * (len(ids) - len(head) - len(slot_ids) + len(tgt))
        blocks.append([False] * len(head) + [kind == "image" or bidirectional_audio] * len(slot_ids) + after)
    width = max(map(len, rows))
    def pad(seqs, v):
        return torch.tensor([s + [v] * (width - len(s)) for s in seqs])
    return dict(input_ids=pad(rows, special_id("<pad>")), labels=pad(labels, IGNORE_INDEX), blocks=pad(blocks, False),
                tasks=names)


def step_loss(backbone: Backbone, batch: dict[str, torch.Tensor], slot_noise: float = 0.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the target tokens and, per row, whether every target token is the argmax
    (`slot_noise`: see PretrainConfig)."""
    embeds = backbone.embed(batch["input_ids"])
    if slot_noise > 0:
        rms = embeds.detach().pow(2).mean(-1, keepdim=True).sqrt()  # B, S, 1
        share = torch.rand(embeds.shape[0], 1, 1, generator=generator) * slot_noise  # B, 1, 1
        noise = torch.randn(embeds.shape, generator=generator) * rms * share
        embeds = embeds + noise * batch["blocks"].unsqueeze(-1)
    hidden = backbone(embeds, None, None, block_ids_from(batch["blocks"]))
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    logits = backbone.logits(hidden[:, :-1][selected]).float()
    loss = F.cross_entropy(logits, targets[selected])
    correct = torch.ones_like(targets, dtype=torch.bool)
    correct[selected] = logits.argmax(-1) == targets[selected]
    return loss, correct.all(1)


def pretrain(out_dir: str | Path, cfg: PretrainConfig = PretrainConfig()) -> dict:
    """Train the tiny backbone on the demo's text formats and save it atomically to `out_dir`."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tokenizer = build_byte_tokenizer()
    config = tiny_gemma4_config(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
    )
    model = Gemma4UnifiedForConditionalGeneration(config)
    backbone = Backbone(model.model.language_model, model.lm_head, model.model.language_model.config, "gemma4_unified")
    backbone.train()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = sum(p["steps"] for p in cfg.phases)
    task_at = [p["tasks"] for p in cfg.phases for _ in range(p["steps"])]
    all_tasks = sorted({t for p in cfg.phases for t in p["tasks"]})
    def schedule(s):
        return min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    noise_generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="pretraining tiny backbone on text", unit="step")
    for step in bar:
        loss, _ = step_loss(backbone, make_batch(tokenizer, task_at[step], rng, cfg.batch_size, cfg.bidirectional_audio),
                            cfg.slot_noise, noise_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    backbone.eval()
    with torch.no_grad():
        eval_rng = np.random.default_rng(cfg.seed + 10_000)
        batch = make_batch(tokenizer, all_tasks, eval_rng, cfg.eval_examples, cfg.bidirectional_audio)
        eval_loss, exact = step_loss(backbone, batch)
    report = dict(format_version=FORMAT_VERSION, config=asdict(cfg), seconds=round(time.perf_counter() - start, 1),
                  final_train_loss=round(loss.item(), 4), eval_loss=round(eval_loss.item(), 4),
                  eval_exact_match=round(exact.float().mean().item(), 4),
                  eval_exact_match_per_task={t: round(exact[[n == t for n in batch["tasks"]]].float().mean().item(), 4)
                                             for t in all_tasks})
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return report


def ensure_pretrained(out_dir: str | Path, cfg: PretrainConfig = PretrainConfig()) -> Path:
    """Pretrain once: reuse `out_dir` when it holds a backbone made with the same recipe."""
    out_dir = Path(out_dir)
    stamp = out_dir / "pretrain.json"
    if stamp.is_file():
        made = json.loads(stamp.read_text())
        # a key added to PretrainConfig after the backbone was made had its default then (new keys default to the
        # former behaviour), so a backbone made before it still matches a recipe that keeps the default
        recorded = {**asdict(PretrainConfig()), **made.get("config", {})}
        if made.get("format_version") == FORMAT_VERSION and recorded == asdict(cfg):
            return out_dir
    report = pretrain(out_dir, cfg)
    print(f"tiny backbone pretrained in {report['seconds']} s: held-out text exact match "
          f"{report['eval_exact_match']:.3f} -> {out_dir}")
    return out_dir


@dataclass
class PretrainOptions(PretrainConfig):
    """Pretrain the demo's tiny backbone on text and save it as a transformers directory in `out`. Every
    other key is a field of PretrainConfig (gemma_fusion/training/pretrain_text.py): its architecture and recipe."""

    out: str = option(help="the directory to write (config.json, model.safetensors, tokenizer.json)", metavar="DIR")


def main(argv: list[str] | None = None) -> None:
    opts = parse_cli(PretrainOptions, argv, prog="python -m gemma_fusion.training.pretrain_text")
    cfg = PretrainConfig(**{f.name: getattr(opts, f.name) for f in fields(PretrainConfig)})
    print(json.dumps(pretrain(opts.out, cfg)))


if __name__ == "__main__":
    main()
