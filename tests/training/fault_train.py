"""`python fault_train.py FAULT N [train.py overrides]`: train.py with the N-th checkpoint save cut short by SIGKILL.

FAULT is `kill_mid_save` (half of the checkpoint's bytes reach the file) or `kill_before_rename` (all of them,
fsynced, but the process dies before the rename that publishes it). Used by tests/training/test_faults.py.
"""
import io
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

fault, nth = sys.argv[1], int(sys.argv[2])
root = Path(__file__).resolve().parents[2]
train_py = str(root / "train.py")
sys.argv, sys.path[0] = [train_py, *sys.argv[3:]], str(root)  # as `python train.py` would have them
real_save, saves = torch.save, 0


def dying_save(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves < nth:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data if fault == "kill_before_rename" else data[: len(data) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = dying_save
runpy.run_path(train_py, run_name="__main__")
