"""The ``lis`` command line: ``lis <command> CONFIG [section.key=value ...]``.

User mistakes (``LISError``) become one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from lis.errors import LISError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config field")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")


def _train_teacher(args: argparse.Namespace) -> None:
    from lis.config import load_config
    from lis.pipeline import train_teacher_job

    train_teacher_job(load_config(args.config, args.overrides), overwrite=args.overwrite)


def _compress(args: argparse.Namespace) -> None:
    from lis.config import load_config
    from lis.pipeline import compress

    compress(load_config(args.config, args.overrides), overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lis", description="LIS (Learning-in-School): distillation + ADMM pruning steered by a meta-learned dean.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train-teacher", help="train (and cache) the teacher of a config",
                       description="Train the teacher of CONFIG; the result is cached for later compress runs.")
    _add_config_args(p)
    p.set_defaults(func=_train_teacher)
    p = sub.add_parser("compress", help="teacher -> KDP (prune + distill) -> hard prune -> fine-tune -> evaluate",
                       description="Compress the teacher of CONFIG into a physically pruned student with the "
                                   "policy named by policy.name; writes runs/<run.name>/.")
    _add_config_args(p)
    p.set_defaults(func=_compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LISError as e:
        print(f"lis: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lis: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
