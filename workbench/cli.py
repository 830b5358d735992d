"""The `workbench` command: the desktop app, and every stage, the demo and the pipeline headless.

    workbench [--project DIR]               open the app (the last project, or the demo project)
    workbench demo --project DIR            write the offline demo project
    workbench pipeline --demo               the whole pipeline on the demo project, with a table
    workbench run STAGE --run-dir DIR       run one stage on a run folder (--set key=value)
    workbench report RUN [--out FILE.html]  a run as one HTML page: plots, config, lineage, samples
    workbench compare-methods --project DIR PPO, DPO and GRPO runs side by side against SFT
    workbench chat --checkpoint PATH        talk to a checkpoint in the terminal
    workbench import-model PATH|NAME        a Hugging Face model as a run of the project
    workbench export RUN --format hf|gguf   a checkpoint for transformers or llama.cpp
    workbench export tensorboard RUN...     runs' metrics and samples as TensorBoard files
    workbench import-samples / batches / rank / preferences / agreement
                                            ranking data, headless (workbench/annotate_cli.py)
    workbench pack export|merge|open        a batch ranked by a class, one file per annotator
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from engine.config import ConfigError
from engine.fsutil import atomic_write_bytes
from workbench import annotate_cli, chat_cli, demo, pack_cli, runfolder, stages
from workbench.jobs import config_nproc, stage_command

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
            raise ValueError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def refuse(message: str) -> int:
    """A refusal before any work: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_run(args) -> int:
    run_dir: Path = args.run_dir
    cfg_path = run_dir / runfolder.CONFIG
    if run_dir.exists() and not run_dir.is_dir():
        return refuse(f"{run_dir} is a file, not a run folder")
    held = runfolder.folder_stage(run_dir)
    if held is not None and held != args.stage:
        return refuse(f"{run_dir} holds a run of the {held} stage, not of {args.stage}: give "
                      f"{args.stage} a new folder")
    try:
        changes = parse_set(args.set)
    except ValueError as e:
        return refuse(str(e))
    before = cfg_path.read_bytes() if changes and cfg_path.is_file() else None
    try:
        if changes:
            # Checked as a whole before anything is written: a bad value leaves the folder as it was.
            runfolder.update_config(args.stage, run_dir, changes)
        elif not cfg_path.exists():
            return refuse(f"{cfg_path} does not exist; pass settings with --set key=value "
                          f"(or write a default one: python -m {stages.spec(args.stage).module} --help)")
    except ConfigError as e:
        return refuse(runfolder.config_error_line(e, run_dir) + " (nothing was written)")
    except runfolder.RunFolderError as e:
        return refuse(str(e))
    if config_nproc(run_dir) > 1:
        rc = subprocess.call(stage_command(args.stage, run_dir, args.log_format))
    else:
        module = importlib.import_module(stages.spec(args.stage).module)
        rc = module.main(["--run-dir", str(run_dir), "--log-format", args.log_format])
    if changes and rc == 2:
        # The stage refused before any work (a setting its checkpoints cannot take on resume, a
        # device this machine lacks, a folder another process holds): the folder keeps the
        # config that describes it, or a later plain resume would fail on the same change.
        if before is None:
            cfg_path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(cfg_path, before)
        print(f"{cfg_path} is as it was before --set", file=sys.stderr)
    return rc


def cmd_import_model(args) -> int:
    from engine.hf_import import find_source
    from workbench.project import Project, ProjectError
    source = Path(args.source).expanduser()
    values = {"source": str(source.resolve()) if source.exists() else args.source,
              "dtype": args.dtype, "chat_template": args.chat_template}
    try:
        find_source(Path("."), values["source"])    # before a run folder exists for it
    except ConfigError as e:
        return refuse(e.message)
    try:
        run_dir = runfolder.new_run(Project.open(args.project), "hf_import", values)
    except ProjectError as e:
        return refuse(str(e))
    except ConfigError as e:
        return refuse(runfolder.config_error_line(e) + " (nothing was written)")
    print(f"run folder: {run_dir}")
    module = importlib.import_module(stages.spec("hf_import").module)
    rc = module.main(["--run-dir", str(run_dir), "--log-format", args.log_format])
    if rc == 2:     # refused before any work (a model it cannot read): the folder made above holds nothing
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{run_dir} was removed: nothing was imported", file=sys.stderr)
    return rc


def add_import_parser(sub) -> None:
    from engine.hf_import import DTYPES, TEMPLATES
    from engine.hf_model import SUPPORTED
    p = sub.add_parser("import-model", help="import a Hugging Face model as a run of the project",
                       description=textwrap.fill(
                           "Import a Hugging Face model folder (config.json, model.safetensors or its "
                           "shards, tokenizer.json, tokenizer_config.json), or a model already in the "
                           "local Hugging Face cache by its name, as a new run of the project that SFT, "
                           "the reward model, PPO, DPO, GRPO and chat can start from. Nothing is "
                           f"downloaded. Supported: {SUPPORTED}.", 92))
    p.add_argument("source", metavar="PATH|NAME", help="a model folder, or org/name in the local cache")
    p.add_argument("--project", type=Path, required=True, help="the project folder")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="weights as the run keeps them (default float32, which trains on any device)")
    p.add_argument("--chat-template", choices=list(TEMPLATES), default="auto",
                   help="auto: the model's own chat template, or the workbench's when it has none")
    p.add_argument("--log-format", choices=["auto", "human", "json"], default="human")
    p.set_defaults(func=cmd_import_model)


def cmd_pipeline(args) -> int:
    from workbench.pipeline import run_pipeline
    return run_pipeline(args)


# (option, type, help) of `workbench pipeline`'s settings; what each sets is pipeline.OPTIONS.
PIPELINE_OPTIONS = [
    ("--vocab-size", int, "tokenizer vocabulary"),
    ("--preset", str, "model size preset"),
    ("--steps", int, "pretraining steps"),
    ("--batch-size", int, "pretraining batch size"),
    ("--lr", float, "pretraining peak learning rate"),
    ("--sft-steps", int, "SFT steps"),
    ("--sft-lr", float, "SFT learning rate"),
    ("--eval-tasks", int, "held-out tasks for SFT's and GRPO's accuracy and the final win rate"),
    ("--rank-prompts", int, "prompts sampled for ranking"),
    ("--k", int, "answers per prompt to rank"),
    ("--rm-epochs", float, "reward-model epochs"),
    ("--rm-lr", float, "reward-model learning rate"),
    ("--ppo-steps", int, "PPO iterations"),
    ("--ppo-lr", float, "PPO learning rate"),
    ("--kl-coef", float, "PPO KL coefficient beta"),
    ("--dpo-lr", float, "DPO learning rate"),
    ("--dpo-beta", float, "DPO beta"),
    ("--grpo-steps", int, "GRPO iterations"),
    ("--grpo-lr", float, "GRPO learning rate"),
]


def add_pipeline_parser(sub) -> None:
    from workbench.pipeline import DEFAULT_METHODS, methods, steps, targets
    p = sub.add_parser("pipeline", help="run the whole pipeline headless, one run folder per stage",
                       description="Run tokenizer -> pretrain -> SFT -> sample -> simulated ranking -> "
                                   "reward model -> PPO (and DPO, GRPO with --methods) -> evaluation in a project folder (the demo "
                                   "project with --demo), one run per stage under PROJECT/runs/, with a "
                                   "progress line per stage and a table of each stage's key figure. Each "
                                   "stage starts from the settings the app's panels start with (the "
                                   "demo's, from the stage catalogue); these options change them. All of "
                                   "them are checked before the first stage runs; Ctrl-C or SIGTERM stops "
                                   "the running stage with a checkpoint, and the same command with "
                                   "--resume goes on from there.")
    p.add_argument("--demo", action="store_true", help="use (and if needed write) the demo project")
    p.add_argument("--project", type=Path, default=None,
                   help="project folder (default with --demo: ./demo-project)")
    p.add_argument("--until", default="evaluate", choices=steps(), metavar="STAGE",
                   help=f"stop after this stage: {', '.join(steps())} (default: all)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="LIST",
                   help=f"alignment methods to run from the SFT model and evaluate against it, "
                        f"comma-separated: {', '.join(methods())} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--scale", choices=["tiny", "small", "full"], default="small",
                   help="size of a newly written demo corpus (default small)")
    for flag, kind, text in PIPELINE_OPTIONS:
        stage, name = targets(flag[2:].replace("-", "_"))[0]
        default = stages.spec(stage).demo_settings().get(name)
        where = f"default {default:g}" if isinstance(default, float) else (
            f"default {default}" if default is not None else "default: the project's")
        p.add_argument(flag, type=kind, default=None, help=f"{text} ({where})")
    p.add_argument("--min-agreement", type=float, default=None, metavar="F",
                   help="reward model and DPO: train only on items whose rankings agree on at "
                        "least this share (0-1) of answer pairs; items ranked once are kept "
                        "(see workbench agreement)")
    p.add_argument("--borda", action="store_true",
                   help="reward model and DPO: one ranking per item, the Borda count of its "
                        "rankings, instead of every ranking")
    p.add_argument("--seed", type=int, default=0, help="random seed of every stage (default 0)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default auto)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes (one per GPU) for pretrain, SFT and the reward model, with DDP "
                        "under torchrun; each trains batch-size samples, so the global batch grows")
    p.add_argument("--resume", action="store_true",
                   help="go on from what the last pipeline in this project did (PROJECT/pipeline.json): "
                        "its finished stages are kept, the stage it stopped in resumes from its "
                        "checkpoint, and the rest run (a later --until or more --methods too); the "
                        "other options must be the ones it ran with")
    p.add_argument("--table-out", type=Path, default=None, metavar="FILE",
                   help="also write the final table to FILE (docs/pipeline_table.py uses it)")
    p.set_defaults(func=cmd_pipeline)


def add_run_parser(sub) -> None:
    listing = "\n".join(textwrap.fill(s.blurb, 92, initial_indent=f"  {s.name:<11}", subsequent_indent=" " * 13)
                         for s in stages.STAGES)
    p = sub.add_parser("run", help="run one engine stage on a run folder",
                       description=textwrap.fill(
                           "Run one stage on a run folder: reads DIR/config.json, after merging any "
                           "--set key=value into it (checked first: a bad value writes nothing). The "
                           "same as python -m engine.STAGE --run-dir DIR; run that with --help for every "
                           "setting of a stage, its type, default and meaning.", 92) + "\n\nstages:\n" + listing,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=stages.NAMES, metavar="STAGE",
                   help=f"the stage to run: {', '.join(stages.NAMES)}")
    p.add_argument("--run-dir", type=Path, required=True, metavar="DIR",
                   help="the run folder: its config.json is the stage's settings, and everything the "
                        "stage writes goes into it (created if absent; run it again to resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting, value as JSON if it parses, else a string (repeatable); paths are "
                        "relative to DIR. Written to DIR/config.json, which goes back to what it was "
                        "if the stage refuses the run before any work")
    p.add_argument("--log-format", choices=["auto", "human", "json"], default="human",
                   help="stdout: readable progress lines (human, the default) or one JSON event per line")
    p.set_defaults(func=cmd_run)


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

    add_pipeline_parser(sub)
    add_run_parser(sub)

    from workbench import report
    p = sub.add_parser("report", help="write a run as one self-contained HTML page to hand in",
                       description=report.DESCRIPTION)
    report.add_arguments(p)
    p.set_defaults(func=report.run_from_args)

    from workbench import methods
    p = sub.add_parser("compare-methods", help="PPO, DPO and GRPO runs side by side against their SFT model",
                       description=methods.__doc__.split("\n\n")[0] + " " + " ".join(
                           methods.__doc__.split("\n\n")[2].split()))
    methods.add_arguments(p)
    p.set_defaults(func=methods.run_from_args)

    p = sub.add_parser("chat", help="talk to a checkpoint in the terminal (streamed answers)",
                       description="A terminal chat with a checkpoint, through the chat template its "
                                   "SFT used; --completion continues plain text (for base models).",
                       epilog=chat_cli.COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat_cli.add_arguments(p)
    p.set_defaults(func=chat_cli.run_from_args)

    add_import_parser(sub)
    from workbench import tb_export
    p = sub.add_parser("export", help="export a checkpoint (Hugging Face folder, GGUF file), or runs' "
                                      "metrics for TensorBoard (export tensorboard RUN...)",
                       usage=tb_export.USAGE, description=tb_export.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    tb_export.add_arguments(p)
    p.set_defaults(func=tb_export.run_from_args)

    annotate_cli.add_commands(sub)
    pack_cli.add_commands(sub)
    return parser


def app_only_args(argv: list[str]) -> argparse.Namespace | None:
    """The arguments of a plain `workbench [app] [--project DIR] [--demo]`, parsed without
    building every command's parser (which imports PyTorch: a second before the window could
    show); None for anything else, --help included, which the full parser then handles."""
    p = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    p.add_argument("--project", type=Path, default=None)
    p.add_argument("--demo", action="store_true")
    try:
        args, rest = p.parse_known_args(argv)
    except argparse.ArgumentError:
        return None
    if rest not in ([], ["app"]):
        return None
    return argparse.Namespace(command=rest[0] if rest else None, project=args.project,
                              demo=args.demo)


def reader_gone() -> int:
    """stdout's reader has closed the pipe (`workbench batches | head -1`): stop quietly, as a
    command whose output was taken as far as it was wanted (exit 0), and point stdout at
    /dev/null so the interpreter's last flush does not complain on stderr."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # stdout replaced (tests) or closed
        pass
    return 0


def main(argv: list[str] | None = None, open_app=None) -> int:
    """`open_app(args)` opens the desktop app; the `workbench` entry point (ui/launcher.py)
    passes it in, so this package never imports Qt widgets and works where Qt cannot load."""
    argv = sys.argv[1:] if argv is None else list(argv)
    quick = app_only_args(argv) if open_app is not None else None
    if quick is not None:
        return int(open_app(quick) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in (None, "app"):
        if open_app is None:
            parser.print_help()
            print("\nThe desktop app is started by the `workbench` command (python -m ui.launcher).")
            return 0
        return int(open_app(args) or 0)
    if args.command == "pack" and args.action == "open":
        problem = pack_cli.check_pack(args.pack)
        if problem or open_app is None:
            return refuse(problem or "the app is started by the `workbench` command")
        return int(open_app(pack_cli.open_args(args)) or 0)
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()      # a reader gone (`| head`) shows here, not at the interpreter's exit
        return rc
    except BrokenPipeError:
        return reader_gone()


if __name__ == "__main__":
    sys.exit(main())
