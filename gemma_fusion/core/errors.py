"""One exception type for mistakes a user can fix; entry points print it as one sentence."""
from __future__ import annotations

import os
import sys


class UserError(ValueError):
    """Bad input or configuration: the message says what, where, and what to do."""


class BadSample(UserError):
    """One sample (or file) cannot be used; `reason` is a short stable tag that counters and reports group by.

    Reasons used across the writer, the inspector and the loader (see docs/DATA.md):
    image_undecodable, image_too_large, audio_undecodable, audio_empty, missing_file, outside_root,
    bad_row, empty_target, too_long, missing_json, bad_json, no_media_member, no_vision, no_audio,
    duplicate_id, unsupported_extension.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def exit_on_user_error(fn, *args):
    """Call `fn(*args)`; a UserError ends the program with its one sentence (traceback with HYDRA_FULL_ERROR=1)."""
    try:
        return fn(*args)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {sentence(err)}")


def sentence(err: UserError) -> str:
    """The error's sentence; a DataLoader worker re-raises it with the worker's traceback in the message
    ("Caught UserError in DataLoader worker process 0. Original Traceback ..."), whose last line holds it."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text
