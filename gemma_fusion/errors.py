"""One exception type for mistakes a user can fix; entry points print it as one sentence."""
from __future__ import annotations

import os
import sys


class UserError(ValueError):
    """Bad input or configuration: the message says what, where, and what to do."""


def exit_on_user_error(fn, *args):
    """Call `fn(*args)`; a UserError ends the program with its one sentence (traceback with HYDRA_FULL_ERROR=1)."""
    try:
        return fn(*args)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {err}")
