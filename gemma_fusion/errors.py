"""One exception type for mistakes a user can fix; entry points print it as one sentence."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input or configuration: the message says what, where, and what to do."""
