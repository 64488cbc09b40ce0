"""The front ends of the ``gpt2-effnet`` subcommands, one module each.

Each module defines ``add_arguments(parser)`` and ``main(args) -> exit status`` and does
nothing but parse, check and call the library; :mod:`gpt2_effnet.cli` imports only the
chosen one. Keeping them here (not inside the packages they drive) means no package
imports a command, so the library has no import cycles through its CLIs.
"""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """An error's first line for a one-line message (its type where it says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
