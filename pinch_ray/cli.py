"""The ``pinch-ray`` command: argument parsing only; the work is done by library functions.

    pinch-ray run pipelines/demo.yaml                         # every stage; reruns skip finished ones
    pinch-ray run pipelines/demo.yaml training.max_steps=100 --from-stage compress
    pinch-ray evaluate runs/demo/sspg-0.65/model --corpus .cache/synth/benchmark-7500 --split test
    pinch-ray export-2to4 runs/demo/sspg-0.5/model runs/demo/sspg-0.5/model-2to4
    pinch-ray corpus synth data/synth_corpus --utterances 6000 --seed 0
    pinch-ray corpus fetch /data/LibriSpeech                  # LibriSpeech from OpenSLR, checksummed, resumable
    pinch-ray foundation list                                 # shipped foundations (model.init_from names)
    pinch-ray foundation ship runs/foundation                 # after pinch-ray run pipelines/foundation.yaml

Exit codes: 0 success, 2 bad input (arguments, existing output, invalid settings), 1 failure.
Each command group registers its subcommands in one ``_add_*_commands`` function.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from pinch_ray import __version__
from pinch_ray.config import ConfigError

logger = logging.getLogger("pinch_ray.cli")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _corpus_synth(args: argparse.Namespace) -> int:
    from pinch_ray.data.synth import DEFAULT_SPLITS, generate_corpus

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


def _corpus_fetch(args: argparse.Namespace) -> int:
    from pinch_ray.data.fetch import PAPER_SUBSETS, FetchError, fetch_librispeech

    try:
        summaries = fetch_librispeech(args.root, args.subsets or PAPER_SUBSETS, mirror=args.mirror,
                                      keep_archives=args.keep_archives, progress=not args.quiet)
    except FetchError as error:  # network, mirror or checksum: the message says what to do
        logger.error("%s", error)
        return EXIT_FAILURE
    for summary in summaries:
        print(json.dumps(summary))
    return EXIT_OK


def _init_ray(verbose: bool) -> None:
    """Join the cluster at RAY_ADDRESS (``ray job submit``), else start one on this machine.

    Ray Data's per-operator progress bars are off unless ``--verbose``: streamed from every training
    worker they are thousands of lines; the stage lines and each trial's progress lines say enough.
    The setting reaches the workers of a cluster started here (they inherit the environment) and,
    on a cluster joined, this job's workers (the job's runtime environment), unless the job was
    submitted with the variable set.
    """
    quiet = {} if verbose else {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    for key, value in quiet.items():
        os.environ.setdefault(key, value)
    import ray
    import ray.data

    runtime_env = None
    if os.environ.get("RAY_ADDRESS"):
        # a submitted job's runtime env (Ray merges ours into it, and refuses a variable set in both)
        submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
        env_vars = {key: value for key, value in quiet.items() if key not in (submitted.get("env_vars") or {})}
        runtime_env = {"env_vars": env_vars} if env_vars else None
    ray.init(runtime_env=runtime_env)
    if not verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False


def _run(args: argparse.Namespace) -> int:
    from pinch_ray.pipeline import stages
    from pinch_ray.config import load_pipeline
    from pinch_ray.pipeline.sweep import SettingsChangedError

    stages.stages_to_run(args.from_stage, args.only)  # ValueError (exit 2) before anything starts
    cfg = load_pipeline(args.pipeline, args.overrides, check_paths=True)  # ConfigError: every problem
    problems = stages.model_problems(cfg)  # the model's own: unreadable, unreachable targets
    if problems:
        raise ConfigError(problems, source=args.pipeline)
    _init_ray(args.verbose)
    try:
        stages.run(cfg, from_stage=args.from_stage, only=args.only)
    except (ConfigError, SettingsChangedError):  # bad input: exit 2, the message without a traceback
        raise
    except Exception:  # noqa: BLE001 - finished work is kept; the exit code and the log report it
        logger.exception("pinch-ray run failed; finished stages and trials are kept: rerun the same "
                         "command to resume")
        return EXIT_FAILURE
    logger.info("outputs in %s (summary.md, one directory per trial)", cfg.output_dir)
    return EXIT_OK


def _add_run_commands(subparsers) -> None:
    from pinch_ray.pipeline import STAGES

    run = subparsers.add_parser(
        "run", parents=[_verbose()], help="run a pipeline YAML: prepare -> baseline -> compress -> finalize",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every stage of a pipeline: prepare the corpus (Ray Data), fine-tune the dense "
                    "baseline and the compression trials (Ray Train, swept with Ray Tune), then hard-prune, "
                    "export and evaluate every trial and write <output_dir>/summary.md.\n\n"
                    "All settings are checked first; any problem stops the run before anything is written "
                    "(exit 2). A finished stage is skipped on a rerun, and an interrupted run resumes: "
                    "finished trials are reused, unfinished ones continue from their last checkpoint.",
        epilog="examples:\n"
               "  pinch-ray run pipelines/demo.yaml\n"
               "  pinch-ray run pipelines/demo.yaml training.max_steps=100 output_dir=runs/short\n"
               "  pinch-ray run pipelines/demo.yaml --only finalize     # redo the evaluation and summary\n"
               "  ray job submit --working-dir . -- python -m pinch_ray.cli run pipelines/wav2vec2_base_ls100.yaml\n"
               "    (on a cluster: --working-dir ships this project, so nodes need only its dependencies)")
    run.add_argument("pipeline", help="pipeline YAML (keys: see pinch_ray/config/schema.py; pipelines/demo.yaml)")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="settings overriding the YAML, e.g. training.max_steps=500 sweep.target_sparsities=[0.6]")
    stages = run.add_mutually_exclusive_group()
    stages.add_argument("--from-stage", choices=STAGES, default=None,
                        help="redo this stage and every later one, even if finished")
    stages.add_argument("--only", choices=STAGES, default=None,
                        help="redo only this stage (the earlier ones must have finished)")
    run.set_defaults(handler=_run)


def _evaluate(args: argparse.Namespace) -> int:
    from pinch_ray import storage
    from pinch_ray.config import DataConfig

    problems = []
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        problems.append(f"MODEL_DIR: {args.model_dir} is not an exported model directory (no config.json); "
                        "give a trial's model/ directory, e.g. runs/demo/sspg-0.65/model")
    if not storage.is_uri(args.corpus) and not os.path.isdir(os.path.join(args.corpus, args.split)):
        problems.append(f"--corpus/--split: {os.path.join(args.corpus, args.split)} is not a directory; "
                        "give a corpus root holding the split directory")
    if args.batch_size < 1:
        problems.append(f"--batch-size: must be >= 1 (got {args.batch_size})")
    if problems:
        raise ConfigError(problems, "pinch-ray evaluate")
    from pinch_ray.core import scoring
    from pinch_ray.pipeline.transcribe import transcribe_dataset
    from pinch_ray.data.prepare import prepare_split
    from pinch_ray.core.models import load_model

    model, processor = load_model(args.model_dir)
    _init_ray(args.verbose)
    data_cfg = DataConfig(cache_dir=args.cache_dir) if args.cache_dir else DataConfig()
    prepared = prepare_split(args.corpus, args.split, processor.tokenizer.get_vocab(), data_cfg)
    utterances = transcribe_dataset(prepared.dataset(), model, processor, batch_size=args.batch_size)
    scores = scoring.score(utterances)
    print(json.dumps({"model_dir": args.model_dir, "corpus": args.corpus, "split": args.split,
                      "wer": scores.wer, "cer": scores.cer, "num_utterances": scores.num_utterances,
                      "num_words": scores.num_words}))
    return EXIT_OK


def _add_evaluate_commands(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate", parents=[_verbose()], help="WER/CER of any exported model on a corpus split",
        description="Transcribe one split of a corpus (LibriSpeech layout or HF parquet) with an exported "
                    "model directory (a trial's model/, or any Hugging Face *ForCTC checkpoint with its "
                    "processor) and print WER and CER as one JSON line.",
        epilog="example (after pinch-ray run pipelines/demo.yaml):\n"
               "  pinch-ray evaluate runs/demo/sspg-0.65/model --corpus .cache/synth/benchmark-7500 --split test",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("model_dir", help="exported model directory (config.json, weights, processor files)")
    evaluate.add_argument("--corpus", required=True, help="corpus root: a local directory or s3:// / gs:// URI")
    evaluate.add_argument("--split", required=True, help="split directory under the corpus root, e.g. test-clean")
    evaluate.add_argument("--batch-size", type=int, default=16, help="utterances per inference batch")
    evaluate.add_argument("--cache-dir", default=None,
                          help="where the prepared split is cached (default: .cache/prepared)")
    evaluate.set_defaults(handler=_evaluate)


def _export_2to4(args: argparse.Namespace) -> int:
    from pinch_ray.core.sparse24 import export_2to4

    report = export_2to4(args.model_dir, args.out_dir)
    if report["kernels"] != "available":
        logger.warning("%s", report["kernels"])
    print(json.dumps({"out_dir": args.out_dir, "layers": len(report["layers"]), "kernels": report["kernels"],
                      "sparsity_before": report["sparsity_before"], "sparsity_after": report["sparsity_after"]}))
    return EXIT_OK


def _add_export_commands(subparsers) -> None:
    export = subparsers.add_parser(
        "export-2to4", parents=[_verbose()],
        help="give an exported model the 2:4 pattern GPU sparse tensor cores run fast",
        description="Keep the 2 largest of every 4 consecutive weights in each gated Linear layer of an "
                    "exported model and write it as a stock Hugging Face directory (plus "
                    "sparsity_2to4.json: each layer's sparsity before and after). On an Ampere or newer GPU, "
                    "pinch_ray.core.sparse24.to_semi_structured(model) then runs those layers on sparse tensor "
                    "cores; on a CPU the model runs densely (said so, not an error).",
        epilog="example:\n  pinch-ray export-2to4 runs/demo/sspg-0.5/model runs/demo/sspg-0.5/model-2to4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("model_dir", help="exported model directory (a trial's model/)")
    export.add_argument("out_dir", help="new directory for the 2:4 model")
    export.set_defaults(handler=_export_2to4)


def _add_corpus_commands(subparsers) -> None:
    corpus = subparsers.add_parser("corpus", parents=[_verbose()], help="speech corpora")
    corpus_commands = corpus.add_subparsers(dest="corpus_command", required=True)
    synth = corpus_commands.add_parser(
        "synth", parents=[_verbose()],
        help="generate the synthetic espeak-ng speech corpus (LibriSpeech layout)",
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

    from pinch_ray.data.fetch import OPENSLR_URL, PAPER_SUBSETS, SUBSETS

    fetch = corpus_commands.add_parser(
        "fetch", parents=[_verbose()], help="download LibriSpeech subsets from OpenSLR (checksummed, resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download LibriSpeech subsets (OpenSLR resource 12) into ROOT/<subset>/<speaker>/<chapter>/, "
                    "the layout corpus.layout: librispeech reads (corpus.root: ROOT). Each archive's md5 is checked "
                    "against the value OpenSLR publishes; an interrupted download resumes where it stopped when "
                    "the command is run again; a subset appears only once extracted whole, and one already "
                    "fetched is skipped. Exit 1 on a failed download or a bad checksum (the message says what "
                    "to do), 2 on an unknown subset.\n\n"
                    "The same data elsewhere: the Hugging Face dataset librispeech_asr (openslr/librispeech_asr) "
                    "as parquet files, one directory per split under the root (ROOT/<split>/**/*.parquet, "
                    "corpus.layout: hf_parquet; the YAML's splits are named as the directories, e.g. "
                    "train.clean.100), or an existing LibriSpeech tree (local, s3:// or gs://) that corpus.root "
                    "names directly.",
        epilog="examples:\n"
               "  pinch-ray corpus fetch /data/LibriSpeech                  # the paper pipelines' subsets:\n"
               "      7.3 GB to download; ~14 GB free while train-clean-100 is extracted, 7 GB after\n"
               "  pinch-ray corpus fetch /data/LibriSpeech dev-other train-clean-360\n"
               "  pinch-ray corpus fetch /data/LibriSpeech --mirror https://openslr.elda.org/resources/12")
    fetch.add_argument("root", help="corpus root (created if missing); each subset goes to ROOT/<subset>/")
    fetch.add_argument("subsets", nargs="*", metavar="SUBSET",
                       help=f"subsets to fetch, of: {', '.join(SUBSETS)} (default: {' '.join(PAPER_SUBSETS)})")
    fetch.add_argument("--mirror", default=OPENSLR_URL,
                       help="base URL holding <subset>.tar.gz (default: %(default)s; e.g. "
                            "https://openslr.elda.org/resources/12 or https://us.openslr.org/resources/12)")
    fetch.add_argument("--keep-archives", action="store_true",
                       help="keep the verified .tar.gz files in ROOT/.downloads/ (deleted once extracted)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(handler=_corpus_fetch)


def _foundation_list(args: argparse.Namespace) -> int:
    from pinch_ray.core import models

    for name in models.foundation_names():
        record = models.foundation_record(name)
        try:
            models.checkpoint_path(name)
            state = "ok"
        except models.FoundationDrift as drift:
            state = f"out of date: {drift}"
        print(json.dumps({"name": name, "path": str(models.FOUNDATIONS_DIR / name), "state": state,
                          "wer": record.get("results", {}).get("wer"), "code_version": record.get("code_version")}))
    return EXIT_OK


def _foundation_ship(args: argparse.Namespace) -> int:
    from pinch_ray.pipeline.foundation import ship

    path = ship(args.output_dir, args.name, args.dest)
    print(json.dumps({"name": path.name, "path": str(path)}))
    return EXIT_OK


def _add_foundation_commands(subparsers) -> None:
    foundation = subparsers.add_parser("foundation", parents=[_verbose()],
                                       help="the small pre-trained foundations shipped with the package")
    commands = foundation.add_subparsers(dest="foundation_command", required=True)
    listing = commands.add_parser("list", parents=[_verbose()], help="shipped foundations and whether they "
                                  "match this code (one JSON line each)")
    listing.set_defaults(handler=_foundation_list)
    ship = commands.add_parser(
        "ship", parents=[_verbose()], help="copy a finished foundation run into the package",
        description="Copy trial 'foundation' of a finished run of pipelines/foundation.yaml to pinch_ray/foundations/<name> "
                    "with foundation.json (settings, corpus, code version, WER, fingerprint), so "
                    "model.init_from: <name> loads it.",
        epilog="example:\n  pinch-ray run pipelines/foundation.yaml && pinch-ray foundation ship runs/foundation",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ship.add_argument("output_dir", help="output_dir of the finished foundation run: a directory or an object-store "
                      "URI (s3://..., file:///...)")
    ship.add_argument("--name", default=None, help="foundation name (default: synth-tiny, for a run of "
                      "pipelines/foundation.yaml; another foundation pipeline's run needs one)")
    ship.add_argument("--dest", default=None, help="directory to put <name>/ in (default: the package's foundations/)")
    ship.set_defaults(handler=_foundation_ship)


def _verbose() -> argparse.ArgumentParser:
    """``-v`` for a command: after the command it sets the same ``verbose`` as before it; not given,
    it leaves the top level's value (``SUPPRESS``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pinch-ray", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress speech foundation models (wav2vec2, HuBERT, WavLM) in one CTC fine-tuning pass "
                    "with sparsity-aware self-pinching gates, as a Ray pipeline.",
        epilog="start here (offline: synthetic speech, a tiny wav2vec2, a few minutes on a laptop CPU):\n"
               "  pinch-ray run pipelines/demo.yaml\n"
               "then read runs/demo/summary.md. 'pinch-ray COMMAND --help' explains each command.\n"
               "exit codes: 0 success, 2 bad settings or input (nothing written), 1 failure.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (before or after COMMAND)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_commands(commands)
    _add_evaluate_commands(commands)
    _add_export_commands(commands)
    _add_corpus_commands(commands)
    _add_foundation_commands(commands)
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
