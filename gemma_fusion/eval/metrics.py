"""Exact match, character error rate and word error rate (Levenshtein over characters / words)."""
from __future__ import annotations


def edit_distance(a, b) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def score(prediction: str, target: str) -> dict[str, float]:
    """Per-sample metrics; CER/WER are edits divided by the reference length (at least 1)."""
    return {
        "exact_match": float(prediction.strip() == target.strip()),
        "cer": edit_distance(prediction, target) / max(1, len(target)),
        "wer": edit_distance(prediction.split(), target.split()) / max(1, len(target.split())),
    }
