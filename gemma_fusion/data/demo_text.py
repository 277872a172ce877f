"""Text-only versions of the demo tasks, used to pretrain the tiny backbone before it is frozen.

The media block is written with ordinary byte tokens standing in for soft tokens: an image of the
demo is 8 cells, so its text version is 8 slots holding the characters (one per cell) and spaces;
a DTMF clip is 40 ms frames, so its text version repeats each digit for 2-4 frames with 1-3 blank
frames between tones. After the prompt the backbone learns to write the collapsed characters. A
frozen backbone that already reads this format gives the projectors a target to aim at: soft tokens
that look like the characters they show.
"""
from __future__ import annotations

import numpy as np

from gemma_fusion.data.demo import ALPHABETS, CELL, IMAGE_SIZE, TARGET_LENGTH, TASKS

CELLS = IMAGE_SIZE[0] // CELL
BLANK = " "


def random_target(task: str, rng: np.random.Generator) -> str:
    alphabet = ALPHABETS[task]
    n = int(rng.integers(TARGET_LENGTH[0], TARGET_LENGTH[1] + 1))
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))


def image_slots(target: str, cells: int = CELLS) -> str:
    """One character per cell from the first cell, as the demo renders them; blanks after."""
    return target + BLANK * (cells - len(target))


def audio_slots(target: str, rng: np.random.Generator) -> str:
    """Each digit held for 2-4 frames, 1-3 blank frames between tones, 0-5 at each end."""
    out = BLANK * int(rng.integers(0, 6))
    for i, ch in enumerate(target):
        if i:
            out += BLANK * int(rng.integers(1, 4))
        out += ch * int(rng.integers(2, 5))
    return out + BLANK * int(rng.integers(0, 6))


def text_example(task: str, rng: np.random.Generator) -> tuple[str, str, str, str]:
    """(kind 'image' | 'audio', slot text, prompt, target) for one text-only example of `task`."""
    target = random_target(task, rng)
    if task == "dtmf":
        return "audio", audio_slots(target, rng), TASKS[task], target
    return "image", image_slots(target), TASKS[task], target
