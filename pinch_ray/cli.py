"""The ``pinch-ray`` command: argument parsing only; the work is done by library functions.

    pinch-ray corpus synth data/synth_corpus --utterances 6000 --seed 0

Exit codes: 0 success, 2 bad input (arguments, existing output, invalid settings), 1 failure.
Each command group registers its subcommands in one ``_add_*_commands`` function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pinch_ray.config import ConfigError

logger = logging.getLogger("pinch_ray.cli")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _corpus_synth(args: argparse.Namespace) -> int:
    from pinch_ray.corpus.synth import DEFAULT_SPLITS, generate_corpus

    fractions = DEFAULT_SPLITS
    if args.splits:
        fractions = {}
        for item in args.splits.split(","):
            name, _, value = item.partition("=")
            fractions[name.strip()] = float(value)
    summary = generate_corpus(args.out_dir, args.utterances, seed=args.seed, split_fractions=fractions,
                              num_workers=args.workers, progress=not args.quiet)
    print(json.dumps({key: summary[key] for key in ("utterances", "hours", "mean_duration_s",
                                                     "generation_seconds", "utterances_per_second")}))
    return EXIT_OK


def _add_corpus_commands(subparsers) -> None:
    corpus = subparsers.add_parser("corpus", help="speech corpora")
    corpus_commands = corpus.add_subparsers(dest="corpus_command", required=True)
    synth = corpus_commands.add_parser(
        "synth", help="generate the synthetic espeak-ng speech corpus (LibriSpeech layout)",
        description="Write a synthetic English speech corpus (espeak-ng voices as speakers, 16 kHz FLAC, "
                    "LibriSpeech layout, disjoint sentences per split). Deterministic for a seed.")
    synth.add_argument("out_dir", help="output directory (must not exist or be empty)")
    synth.add_argument("--utterances", type=int, default=6000, help="total utterances over all splits")
    synth.add_argument("--seed", type=int, default=0, help="seed of sentences and speakers")
    synth.add_argument("--splits", default=None,
                       help="split fractions, e.g. train=0.8,dev=0.1,test=0.1 (the default)")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(handler=_corpus_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pinch-ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_corpus_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - the exit code reports it; the traceback goes to the log
        logger.exception("pinch-ray %s failed", args.command)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
