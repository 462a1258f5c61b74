"""The ``lis`` command line: ``lis <command> CONFIG [section.key=value ...]``.

User mistakes (``LISError``) become one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys

from lis.errors import LISError, RunStopped


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, help="YAML config file (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config field")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")


def _train_teacher(args: argparse.Namespace) -> None:
    from lis.config import load_config
    from lis.pipeline import train_teacher_job

    train_teacher_job(load_config(args.config, args.overrides), overwrite=args.overwrite)


def _compress(args: argparse.Namespace) -> None:
    from lis.config import load_config
    from lis.pipeline import compress, resume_config

    if args.resume is None:
        if args.config is None:
            raise LISError("give a CONFIG file to start a run, or --resume RUN_DIR to continue one")
        compress(load_config(args.config, args.overrides), overwrite=args.overwrite)
        return
    # lis compress --resume RUN_DIR [overrides]: the positional slot holds the first override, if any
    overrides = ([args.config] if args.config is not None else []) + list(args.overrides)
    if any("=" not in o for o in overrides):
        raise LISError(f"--resume continues the run with its own config.yaml: drop "
                       f"{next(o for o in overrides if '=' not in o)!r} (only section.key=value overrides may follow)")
    if args.overwrite:
        raise LISError("--resume and --overwrite contradict each other: pass one of them")
    compress(resume_config(args.resume, overrides), resume=True)


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _seeds(text: str) -> list[int]:
    """``0,1,2``, ``0-9`` or a mix (``0,5-7``): the seeds in order, each once."""
    seeds = []
    for part in _csv(text):
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if span and int(span[1]) <= int(span[2]):
            seeds += range(int(span[1]), int(span[2]) + 1)
        elif re.fullmatch(r"-?\d+", part):
            seeds.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of seeds: give integers and ranges, e.g. "
                                             f"0,1,2 or 0-9")
    return list(dict.fromkeys(seeds))


def _compare(args: argparse.Namespace) -> None:
    from lis.compare import compare

    compare(args.config, args.policies, args.seeds, args.overrides, args.sweep, args.name, jobs=args.jobs,
            plan=args.plan)


def _bench(args: argparse.Namespace) -> None:
    from lis.bench import bench

    options = {"policies": args.policies, "select_seeds": args.select_seeds, "report_seeds": args.report_seeds,
               "sweeps": args.sweep or None, "jobs": args.jobs}  # None: lis.bench's default
    bench(args.config, overrides=args.overrides, name=args.name, **{k: v for k, v in options.items() if v is not None})


def _plot(args: argparse.Namespace) -> None:
    from lis.plots import plot

    plot(args.run_dirs, args.out)


def _probe(args: argparse.Namespace) -> None:
    from lis.config import load_config
    from lis.probe import probe

    probe(load_config(args.config, args.overrides), epochs=args.epochs, max_drop=args.max_drop,
          overwrite=args.overwrite)


DEMO_CONFIG = "demo.yaml"  #: in the package (experiments/demo.yaml links to it), so an installed lis has it
DEMO_POLICIES = ["dean", "fixed", "prune_only", "l1_prune"]


def _demo(args: argparse.Namespace) -> None:
    import os
    from pathlib import Path

    from lis.compare import compare

    config = Path(__file__).resolve().parent / DEMO_CONFIG
    jobs = len(os.sched_getaffinity(0))  # one run per core at once; each run has one thread whatever the machine
    if args.quick:
        compare(config, DEMO_POLICIES, [0], ["teacher.epochs=10", "kdp.epochs=3", "finetune.epochs=2"]
                + args.overrides, name="demo-quick", jobs=jobs)
    else:
        compare(config, DEMO_POLICIES, [0, 1, 2], args.overrides, name="demo", jobs=jobs)


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
    _add_config_args(p, optional=True)
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a stopped run from its last checkpoint, with RUN_DIR/config.yaml; overrides "
                        "may change learning rates (e.g. kdp.lr=0.01 after a NaN), checkpointing and tracking")
    p.set_defaults(func=_compress)

    p = sub.add_parser("compare", help="run policies x seeds of one config and compare them (mean ± std, dean vs best)",
                       description="Compress CONFIG with every policy and seed into <run.dir>/<name>/ and write "
                                   "comparison.csv, comparison.md (mean ± std over seeds, dean minus the best "
                                   "baseline with a 95% CI) and plots/acc_vs_macs.png. Finished runs are skipped, "
                                   "so an interrupted comparison continues where it stopped.")
    p.add_argument("config", help="YAML config file (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config field (all runs)")
    p.add_argument("--policies", type=_csv, default="dean,fixed,prune_only,l1_prune", metavar="P1,P2,...",
                   help="comma-separated policy names (default: dean,fixed,prune_only,l1_prune)")
    p.add_argument("--seeds", type=_seeds, default="0,1,2", metavar="S1,S2,...",
                   help="run.seed values, comma-separated, ranges allowed: 0,1,2 or 0-9 (default: 0,1,2)")
    p.add_argument("--sweep", action="append", default=[], metavar="section.key=V1,V2,...",
                   help="values to try for the fixed policy, each its own row; repeat for a grid. A list, one value "
                        "per layer, is one value: policy.alpha=[0,1,1,1],[1,1,1,1]")
    p.add_argument("--name", default=None, help="comparison folder under run.dir (default: compare-<config stem>)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N pairs at once, each in its own process (same results as N=1: each run has "
                        "run.threads CPU threads, 1 unless the config sets it)")
    p.add_argument("--plan", action="store_true",
                   help="print one 'lis compress' command per unfinished pair (for a scheduler, e.g. a SLURM "
                        "array: docs/cluster.md) and run nothing; 'lis compare' again aggregates what finished")
    p.set_defaults(func=_compare)

    p = sub.add_parser("bench", help="the protocol: tune fixed weights on val (seeds 0-4), report every policy "
                                      "on seeds 5-9",
                       description="Run the fixed-weight grid (--sweep) on the selection seeds and choose the "
                                   "setting with the highest mean validation accuracy; then run every policy, the "
                                   "fixed one at the chosen setting, on the report seeds. Writes <run.dir>/<name>/"
                                   "bench.md and bench.csv (test accuracy mean ± std, params, MACs, wall time, the "
                                   "dean minus each baseline with a paired 95% CI, what was chosen on what). "
                                   "Finished runs are skipped, so an interrupted bench continues where it stopped.")
    p.add_argument("config", help="YAML config file (see experiments/bench/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config field (all runs)")
    p.add_argument("--policies", type=_csv, default=None, metavar="P1,P2,...",
                   help="comma-separated policy names, fixed among them (default: the dean and every baseline)")
    p.add_argument("--select-seeds", type=_seeds, default=None, metavar="SEEDS",
                   help="seeds the fixed-weight setting is chosen on (default: 0-4)")
    p.add_argument("--report-seeds", type=_seeds, default=None, metavar="SEEDS",
                   help="seeds of the report, none of them a selection seed (default: 5-9)")
    p.add_argument("--sweep", action="append", default=[], metavar="section.key=V1,V2,...",
                   help="the fixed-weight grid to choose from, repeat for more keys (default: lis.bench.GRID, "
                        "policy.alpha=0.1,0.3,1,3 x policy.alpha_out=0.5,2,4)")
    p.add_argument("--name", default=None, help="bench folder under run.dir (default: bench-<config stem>; the "
                                                "selection runs go to <name>-select)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N pairs at once, each in its own process (as lis compare --jobs: same results)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("plot", help="draw runs' figures: distillability, sparsity, ADMM gap, weights, channels kept",
                       description="Draw the figures of each RUN_DIR into RUN_DIR/plots/ (or --out for a single "
                                   "run). With several runs, also overlay them (mean and per-layer distillability "
                                   "against training progress, accuracy vs MACs) into --out, by default <their "
                                   "common parent>/plots.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory written by 'lis compress'")
    p.add_argument("--out", default=None, metavar="DIR", help="where the overlays (or a single run's figures) go")
    p.set_defaults(func=_plot)

    p = sub.add_parser("probe", help="per-layer distillability and sparsability of a teacher, without a dean",
                       description="Teach a copy of CONFIG's teacher by plain distillation for a few epochs, "
                                   "measuring distillability per layer, and prune each layer alone at ratios "
                                   "0.1..0.9 to find its sparsability (the largest ratio within --max-drop of the "
                                   "teacher's accuracy). Writes probe.json and two figures into "
                                   "<run.dir>/<run.name>-probe/.")
    _add_config_args(p)
    p.add_argument("--max-drop", type=float, default=0.01, metavar="FRACTION",
                   help="accuracy drop a layer's sparsability allows, as a fraction (default: 0.01, one point)")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs of plain distillation for the distillability curves, at most kdp.epochs")
    p.set_defaults(func=_probe)

    p = sub.add_parser("demo", help="the embedded demo: dean vs baselines on MNIST-1D, 3 seeds, about 2 min on 2 CPU cores",
                       description=f"Compare {', '.join(DEMO_POLICIES)} on MNIST-1D at a 90%% MACs cut "
                                   f"(experiments/{DEMO_CONFIG}), three seeds, and print the table. --quick: one seed, "
                                   f"short schedules, about a minute.")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config field")
    p.add_argument("--quick", action="store_true", help="one seed and short schedules (about a minute)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may also follow options (lis compare CONFIG --seeds 0,1 kdp.epochs=5)
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except RunStopped as e:
        print(f"lis: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except LISError as e:
        print(f"lis: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lis: interrupted", file=sys.stderr)
        return 130
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
