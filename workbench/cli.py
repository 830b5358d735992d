"""The `workbench` command: the desktop app, and every stage, the demo and the pipeline headless.

    workbench [--project DIR]               open the app (the last project, or the demo project)
    workbench demo --project DIR            write the offline demo project
    workbench pipeline --demo               the whole pipeline on the demo project, with a table
    workbench run STAGE --run-dir DIR       run one stage on a run folder (--set key=value)
    workbench chat --checkpoint PATH        talk to a checkpoint in the terminal
    workbench import-samples / batches / rank / preferences / agreement
                                            ranking data, headless (workbench/annotate_cli.py)
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

from workbench import annotate_cli, chat_cli, demo
from workbench.runner import STAGES, config_nproc, stage_command
from workbench.suggest import TRAINING as T   # the demo settings, shared with the app's panels

EPILOG = """\
Each stage is also `python -m engine.<stage> --run-dir DIR`, which reads DIR/config.json and
writes everything into DIR (events.jsonl, checkpoints/, summary.json). Stop a running stage with
Ctrl-C, SIGTERM or by creating DIR/STOP: it saves a checkpoint and exits; run it again to resume.
Pretrain, SFT and the reward model train on several GPUs with DDP when the config's nproc is
above 1: `workbench run` then starts them under torchrun (one process per GPU; gloo on CPU).
"""


def parse_set(values: list[str]) -> dict:
    """`key=value` pairs; a value that parses as JSON is taken as JSON (numbers, lists, true)."""
    out = {}
    for item in values:
        if "=" not in item:
            raise SystemExit(f"error: --set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def cmd_run(args) -> int:
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if args.set:
        config.update(parse_set(args.set))
        cfg_path.write_text(json.dumps(config, indent=2) + "\n")
    if not cfg_path.exists():
        raise SystemExit(f"error: {cfg_path} does not exist; pass settings with --set key=value")
    if config_nproc(run_dir) > 1:
        return subprocess.call(stage_command(args.stage, run_dir, args.log_format))
    module = importlib.import_module(f"engine.{args.stage}")
    return module.main(["--run-dir", str(run_dir), "--log-format", args.log_format])


def cmd_pipeline(args) -> int:
    from workbench.pipeline import run_pipeline
    return run_pipeline(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The workbench: take a small GPT-style model through the InstructGPT pipeline "
                    "(tokenizer, pretraining, SFT, ranking, reward model, PPO, chat) on one machine.",
        epilog=EPILOG)
    parser.add_argument("--project", type=Path, default=None,
                        help="with no command: the project folder the app opens (default: the last "
                             "one, or the demo project, written on first start)")
    parser.add_argument("--demo", action="store_true", help="with no command: open the app on the demo project")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("app", help="open the desktop app (the same as no command)")
    p.add_argument("--project", type=Path, default=None, help="project folder to open")
    p.add_argument("--demo", action="store_true", help="open the demo project")
    p.set_defaults(func=None)

    p = sub.add_parser("demo", help="write the offline demo project (corpus, SFT data, prompts, tasks)")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run_from_args)

    p = sub.add_parser("pipeline", help="run the whole pipeline headless, one run folder per stage",
                       description="Run tokenizer -> pretrain -> SFT -> sample -> simulated ranking -> "
                                   "reward model -> PPO -> evaluation in a project folder (the demo "
                                   "project with --demo), one run per stage under PROJECT/runs/, with a "
                                   "progress line per stage and a table of each stage's key figure.")
    p.add_argument("--demo", action="store_true", help="use (and if needed write) the demo project")
    p.add_argument("--project", type=Path, default=None,
                   help="project folder (default with --demo: ./demo-project)")
    p.add_argument("--until", default="evaluate", metavar="STAGE",
                   help="stop after this stage: tokenizer, pretrain, sft, sample, rank, reward, ppo, "
                        "evaluate (default: all)")
    p.add_argument("--scale", choices=["tiny", "small", "full"], default="small",
                   help="size of a newly written demo corpus (default small)")
    p.add_argument("--preset", default=None,
                   help="model size preset (default: the project's)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary (default: the project's)")
    p.add_argument("--steps", type=int, default=T["pretrain"]["max_steps"], help="pretraining steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=T["pretrain"]["batch_size"], help="pretraining batch size (default 16)")
    p.add_argument("--lr", type=float, default=T["pretrain"]["lr"], help="pretraining peak learning rate (default 2e-3)")
    p.add_argument("--sft-steps", type=int, default=T["sft"]["max_steps"], help="SFT steps (default 500)")
    p.add_argument("--sft-lr", type=float, default=T["sft"]["lr"], help="SFT learning rate (default 1e-3)")
    p.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks for accuracy and win rate")
    p.add_argument("--rank-prompts", type=int, default=T["sample"]["n_prompts"], help=f"prompts sampled for ranking (default {T['sample']['n_prompts']})")
    p.add_argument("--k", type=int, default=T["sample"]["k"], help=f"answers per prompt to rank (default {T['sample']['k']})")
    p.add_argument("--rm-epochs", type=float, default=T["reward"]["epochs"], help=f"reward-model epochs (default {T['reward']['epochs']:g})")
    p.add_argument("--rm-lr", type=float, default=T["reward"]["lr"], help=f"reward-model learning rate (default {T['reward']['lr']:g})")
    p.add_argument("--ppo-steps", type=int, default=T["ppo"]["steps"], help="PPO iterations (default 40)")
    p.add_argument("--ppo-lr", type=float, default=T["ppo"]["lr"], help="PPO learning rate (default 3e-5)")
    p.add_argument("--kl-coef", type=float, default=T["ppo"]["kl_coef"], help="PPO KL coefficient beta (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (one per GPU) for pretrain, SFT and the reward model, with DDP "
                        "under torchrun; each trains batch-size samples, so the global batch grows")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("run", help="run one engine stage on a run folder",
                       description="Run one stage on DIR: reads DIR/config.json, after merging any "
                                   "--set key=value into it. Same as python -m engine.STAGE.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config setting, value as JSON if it parses (repeatable)")
    p.add_argument("--log-format", choices=["auto", "human", "json"], default="human")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="talk to a checkpoint in the terminal (streamed answers)",
                       description="A terminal chat with a checkpoint, through the chat template its "
                                   "SFT used; --completion continues plain text (for base models).",
                       epilog=chat_cli.COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat_cli.add_arguments(p)
    p.set_defaults(func=chat_cli.run_from_args)

    annotate_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None, open_app=None) -> int:
    """`open_app(args)` opens the desktop app; the `workbench` entry point (ui/launcher.py)
    passes it in, so this package never imports Qt widgets and works where Qt cannot load."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in (None, "app"):
        if open_app is None:
            parser.print_help()
            print("\nThe desktop app is started by the `workbench` command (python -m ui.launcher).")
            return 0
        return int(open_app(args) or 0)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
