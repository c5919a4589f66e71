"""`python -m medift.testing.tiny_checkpoints FAMILY OUT_DIR [--seed N]`: write a tiny random checkpoint."""

from __future__ import annotations

import argparse

from medift.testing.tiny_checkpoints import build_tiny_checkpoint, family_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("family", choices=family_names())
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_checkpoint(args.family, args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
