"""Model-side subcommands (train / evaluate / experiment) registered on the `comeir` parser."""
from __future__ import annotations

import argparse


def add_model_commands(sub: "argparse._SubParsersAction") -> None:
    """Registered once the model issue lands; kept separate so cli.py stays small."""
    return None
