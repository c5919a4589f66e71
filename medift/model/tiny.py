"""Moved: `python -m medift.model.tiny ...` is now `python -m medift.testing.tiny_checkpoints ...`
(same arguments); its builder table `FAMILIES` is `TINY_BUILDERS` there."""

import sys

MESSAGE = (
    "medift.model.tiny moved to medift.testing.tiny_checkpoints: run "
    "`python -m medift.testing.tiny_checkpoints FAMILY OUT_DIR` (same arguments); "
    "its builder table FAMILIES is now TINY_BUILDERS"
)

if __name__ == "__main__":
    print(MESSAGE, file=sys.stderr)
    sys.exit(2)
raise ImportError(MESSAGE)
