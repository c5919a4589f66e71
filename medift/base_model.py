"""Moved: `python -m medift.base_model ...` is now `python -m medift.embedded ...` (same
subcommands and options); the modules are in the package `medift.embedded`."""

import sys

MESSAGE = (
    "medift.base_model moved to medift.embedded: run "
    "`python -m medift.embedded {recipe,pretrain,distill,evaluate}` (same options)"
)

if __name__ == "__main__":
    print(MESSAGE, file=sys.stderr)
    sys.exit(2)
raise ImportError(MESSAGE)
