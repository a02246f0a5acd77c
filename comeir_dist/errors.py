"""User-facing errors: one line, no traceback, non-zero exit (see cli.main)."""


class UserError(Exception):
    """A problem with the user's input (file, field, value, flag). Printed as one line by the CLI."""


def fail(message: str) -> "UserError":
    """Build a UserError; use as ``raise fail(f"{path}: field 'x' ...")``."""
    return UserError(message)
