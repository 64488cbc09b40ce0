"""The front ends of the ``gpt2-effnet`` subcommands, one module each.

Each module defines ``add_arguments(parser)`` and ``main(args) -> exit status`` and does
nothing but parse, check and call the library; :mod:`gpt2_effnet.cli` imports only the
chosen one. Keeping them here (not inside the packages they drive) means no package
imports a command, so the library has no import cycles through its CLIs.
"""
