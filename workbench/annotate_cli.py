"""The annotation commands of `workbench`, headless: import samples, rank, export, agreement.

    workbench import-samples --project DIR RUN_DIR [--name NAME]
    workbench batches --project DIR
    workbench rank --project DIR --batch ID --annotator NAME [--simulated]
    workbench preferences export --project DIR --out FILE
                                 --format kway|pairs|hf|hf-messages|label-studio|argilla
                                 (--include-simulated | --human-only)
    workbench preferences import --project DIR FILE [--annotator NAME] [--simulated]
    workbench agreement --project DIR [--between annotators|repeats] [--batch ID] [--human-only]

Everything lives in DIR/workbench.db (workbench.store); this module only parses, prints and
maps errors to exit codes: 0 done, 2 bad input (a message on stderr, never a traceback).
The ranking loop is a plain read-eval loop over `AnnotationSession`, so a session quit here
resumes in the app and the other way round.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Callable

from workbench.annotation import MovedOn, SessionSettingsError, answer_copies
from workbench.chat_cli import typed_line
from workbench.project import Project, ProjectError
from workbench.store import DB_NAME, FLAGS, InputError, RankingError, Store, StoreError

RANK_HELP = """\
  3 1=2 4      rank the answers, best first; '=' ties two answers (also 3>1=2>4 or 31=24)
  f2 harmful   flag answer 2 (flags: fails_instruction, made_up_facts, harmful, other; a
               prefix is enough: f2 h); f2 alone clears answer 2's flags
  s3 5         give answer 3 an overall score from 1 (worst) to 7 (best); s3 alone clears it
  n TEXT       a note on this item; n alone clears it
  s, skip      put this item at the back of the queue
  u, undo      take back your last ranking and show that item again, with its labels
  p            show the item again
  ?            this help
  q, quit      stop; every ranking you submitted is stored, and the same command resumes
Flags, scores and the note are typed before the ranking line and stored with it."""


class CliError(Exception):
    """A message for stderr and exit status 2."""


# --- shared plumbing ------------------------------------------------------------------------

def open_store(project: Path, *, create: bool = False) -> Store:
    """The project's store. Only importing commands may create workbench.db: a mistyped
    --project for `rank` or `agreement` should say so, not quietly make an empty database."""
    if not project.is_dir():
        raise CliError(f"{project} is a file, not a project folder" if project.exists()
                       else f"project folder {project} does not exist")
    try:        # a folder of something else, or a project cut short: no workbench.db in it
        Project.open(project)
    except ProjectError as e:
        raise CliError(str(e)) from None
    if not create and not (project / DB_NAME).exists():
        raise CliError(f"{project} has no {DB_NAME} yet: import samples or preferences first "
                       f"(workbench import-samples / workbench preferences import)")
    try:
        return Store.for_project(project)
    except StoreError as e:
        raise CliError(str(e)) from None


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command, turning the errors a user can cause into one line and exit status 2."""
    def run(args: argparse.Namespace) -> int:
        prog = " ".join(filter(None, ["workbench", args.command, getattr(args, "action", None)]))
        try:
            return fn(args)
        except BrokenPipeError:     # a reader gone (`| head`): workbench.cli.main ends quietly
            raise
        except (CliError, InputError, StoreError) as e:
            print(f"{prog}: {e}", file=sys.stderr)
        except UnicodeError as e:   # an argument in another encoding (lone surrogates)
            print(f"{prog}: an argument is not UTF-8 text ({e.object[e.start:e.end]!r} in "
                  f"{e.object!r})", file=sys.stderr)
        except (KeyError, ValueError) as e:   # unknown batch, a name taken by the other kind
            print(f"{prog}: {e.args[0] if e.args else e}", file=sys.stderr)
        except OSError as e:   # an unreadable file, a folder --out cannot make
            where = f"{e.filename}: " if e.filename else ""
            print(f"{prog}: {where}{e.strerror or e}", file=sys.stderr)
        except sqlite3.Error as e:  # the store turns busy and full into StoreError; not these
            print(f"{prog}: {args.project / DB_NAME}: {e}", file=sys.stderr)
        return 2
    return run


def out_folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (made if missing), or None: its nearest
    existing folder is tried with a file made and removed, so a read-only disk, a folder
    without write permission or an immutable one is named before any work."""
    near = next(p for p in [folder, *folder.parents] if p.exists() or p == p.parent)
    if not near.is_dir():
        return f"{near} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".workbench-probe-", dir=near)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write into {near} ({e.strerror or e})"
    return None


# --- import-samples and batches -------------------------------------------------------------

def cmd_import_samples(args) -> int:
    from engine.runio import read_events
    from workbench.samples import SAMPLES, import_sample_run

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise CliError(f"{run_dir} is not a folder")
    # A stopped or still-running sample job has a partial samples.jsonl that would import
    # cleanly and silently give a batch with fewer prompts; only a completed run is taken.
    done = [e for e in read_events(run_dir) if e.get("type") == "done"]
    if not done or done[-1].get("status") != "completed":
        state = (f"its last done event says {done[-1].get('status')!r}" if done
                 else "events.jsonl has no done event (still running, or killed)")
        raise CliError(f"{run_dir} is not a finished sample run: {state}; run "
                       f"`python -m engine.sample --run-dir {run_dir}` again to finish it")
    if not (run_dir / SAMPLES).exists():
        raise CliError(f"{run_dir} has no {SAMPLES}: is it a sample run?")
    with open_store(args.project, create=True) as store:
        before = {b.id for b in store.batches()}
        batch = store.batch(import_sample_run(store, run_dir, args.name))
        how = "already imported as" if batch.id in before else "imported as"
        print(f"{how} batch {batch.id} {batch.name!r}: {batch.n_items} items, K={batch.k}")
        print(f"rank it with: workbench rank --project {args.project} --batch {batch.id} "
              f"--annotator NAME")
    return 0


def cmd_batches(args) -> int:
    with open_store(args.project) as store:
        batches = store.batches()
        if not batches:
            print("no batches yet: workbench import-samples or workbench preferences import")
            return 0
        print(f"{'id':>4}  {'name':<32} {'kind':<9} {'K':>3} {'items':>6}  ranked by")
        for b in batches:
            who = ", ".join(f"{name}{' (simulated)' if kind == 'simulated' else ''} {n}/{b.n_items}"
                            for _, name, kind, n in store.ranked_counts(b.id)) or "-"
            print(f"{b.id:>4}  {b.name[:32]:<32} {b.kind:<9} {b.k if b.k else 'mix':>3} "
                  f"{b.n_items:>6}  {who}")
    return 0


# --- rank -----------------------------------------------------------------------------------

def _flag(name: str) -> str:
    """A flag from a unique prefix ('h', 'made-up'): typing 'fails_instruction' is too slow."""
    key = name.lower().replace("-", "_")
    hits = [f for f in FLAGS if f.startswith(key)]
    if len(hits) != 1:
        raise RankingError(f"unknown flag {name!r}; flags are {', '.join(FLAGS)}")
    return hits[0]


def _ordering_text(groups) -> str:
    return " ".join("=".join(map(str, g)) for g in groups)


def _answer_number(token: str, k: int) -> int:
    if not token.isdigit() or not 1 <= int(token) <= k:
        raise RankingError(f"answers are numbered 1-{k}, got {token!r}")
    return int(token)


class RankLoop:
    """The terminal ranking session: one item on screen, labels gathered until the ranking
    line submits them. `read` and `out` are parameters so tests can drive it in-process."""

    def __init__(self, session, *, read: Callable[[str], str] = typed_line, out=None):
        self.session, self.read, self.out = session, read, out or sys.stdout
        self.flags: dict[int, list[str]] = {}
        self.scores: dict[int, int] = {}
        self.note = ""
        self.item = None

    def write(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def progress_line(self) -> str:
        p = self.session.progress()
        pace = f", {p.mean_seconds:.1f} s per item" if p.mean_seconds is not None else ""
        skipped = f", {p.skipped} skipped" if p.skipped else ""
        return f"[{p.ranked}{skipped}{pace}]"

    def load(self) -> None:
        """Fetch the current item; after undo its withdrawn labels become the pending ones,
        so fixing one flag does not mean typing the others again."""
        self.item = self.session.current()
        prev = self.item.previous if self.item else None
        self.flags = {n: list(f) for n, f in prev.flags.items()} if prev else {}
        self.scores = dict(prev.scores) if prev else {}
        self.note = prev.note if prev else ""

    def show(self) -> None:
        item = self.item
        if item is None:
            self.write(f"{self.progress_line()} every item is ranked. u = undo the last one, q = quit")
            return
        # No item number: a hidden repeat would give itself away by a number seen before.
        self.write(f"\n{self.progress_line()} {item.k} answers")
        for role, text in ([(m["role"], m["content"]) for m in item.messages] if item.messages
                           else [("prompt", item.prompt)]):
            self.write(_block(f"{role}:", text))
        copies = answer_copies([a.text for a in item.answers])
        for a in item.answers:
            same = copies[a.number][0]
            self.write(_block(f"  ({a.number})", f"(same answer as {same}; ranked with it)" if same != a.number
                              else a.text if a.text.strip() else "(empty answer)"))
        if item.previous:
            self.write(f"  you ranked this before: {_ordering_text(item.previous.ordering)}"
                       " (its labels are kept; type the ranking again to submit)")
        self.show_labels()

    def show_labels(self) -> None:
        parts = [f"{n}: {', '.join(f)}" for n, f in sorted(self.flags.items()) if f]
        parts += [f"{n}: score {s}" for n, s in sorted(self.scores.items())]
        if self.note:
            parts.append(f"note: {self.note}")
        if parts:
            self.write("  labels  " + "; ".join(parts))

    def label(self, cmd: str, rest: str) -> None:
        """f<N> flags..., s<N> score, n text: pending labels of the shown item."""
        k = self.item.k
        if cmd[0] == "n":
            self.note = rest
        elif cmd[0] == "f":
            n = _answer_number(cmd[1:], k)
            flags = [_flag(t) for t in rest.split()]
            self.flags[n] = sorted(set(self.flags.get(n, []) + flags)) if flags else []
        else:
            n = _answer_number(cmd[1:], k)
            if not rest:
                self.scores.pop(n, None)
            elif not rest.isdigit() or not 1 <= int(rest) <= 7:
                raise RankingError(f"a score is a whole number from 1 to 7, got {rest!r}")
            else:
                self.scores[n] = int(rest)
        self.show_labels()

    def run(self) -> int:
        p = self.session.progress()
        if p.done or p.skipped:
            self.write(f"resuming {self.session.annotator.name}'s session: {p.ranked}")
        self.write("type ? for help")
        self.load()
        self.show()
        while True:
            try:
                line = self.read("rank> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.write("")
                break
            cmd, _, rest = line.partition(" ")
            rest = rest.strip()
            try:
                if cmd in ("q", "quit"):
                    break
                elif cmd in ("?", "h", "help"):
                    self.write(RANK_HELP)
                elif cmd in ("p", ""):
                    self.show()
                elif cmd in ("u", "undo"):
                    if self.session.undo() is None:
                        self.write("  nothing to undo")
                    else:
                        self.load()
                        self.show()
                elif self.item is None:
                    self.write("  every item is ranked: u = undo the last one, q = quit")
                elif cmd in ("s", "skip"):
                    self.session.skip(shown=self.item)
                    self.write("  skipped: it comes back at the end")
                    self.load()
                    self.show()
                elif cmd[0] in "fs" and cmd[1:].isdigit() or cmd == "n":
                    self.label(cmd, rest)
                elif line[0].isdigit():
                    self.session.submit(line, flags=self.flags, scores=self.scores, note=self.note,
                                        shown=self.item)
                    self.load()
                    self.show()
                else:
                    self.write(f"  unknown command {line!r}; ? lists the commands")
            except MovedOn as e:
                self.write(f"  {e}")
                self.load()
                self.show()
            except RankingError as e:
                self.write(f"  {e}")
        p = self.session.progress()
        left = "" if p.finished else "; run the same command to continue"
        self.write(f"{p.ranked}, all stored{left}")
        return 0


def _block(label: str, text: str, width: int = 9) -> str:
    """`label` then the text, its later lines indented under the first: multi-line answers
    (code, lists) stay readable and the numbers stay in one column."""
    lines = text.splitlines() or [""]
    pad = " " * max(width, len(label) + 1)
    return "\n".join([f"{label:<{len(pad)}}{lines[0]}"] + [pad + line for line in lines[1:]])


_FLAGS = {"repeat_fraction": "--repeats", "seed": "--seed"}


def _settings_line(e: SessionSettingsError) -> str:
    """A session resumed with another --repeats or --seed, in the command's own terms."""
    flag = _FLAGS.get(e.setting)
    if flag is None:
        return str(e)
    started = f"{flag} {e.started:g}"
    return (f"{e.annotator}'s session on batch {e.batch.id} {e.batch.name!r} was started with "
            f"{started}; resume it with {started} or without {flag}")


def cmd_rank(args) -> int:
    from workbench.annotation import AnnotationSession

    (args.annotator or "").encode("utf-8")      # a name the store cannot keep, before opening it
    if args.repeats is not None and not 0.0 <= args.repeats <= 1.0:
        raise CliError(f"--repeats is a fraction of the items, from 0 to 1, got {args.repeats:g}")
    with open_store(args.project) as store:
        batch = store.batch(args.batch)
        if args.simulated:
            # The simulated annotator goes through the same session API, under a name of kind
            # "simulated", so its rankings are labelled and exports keep them apart.
            from workbench.simulated import DEFAULT_NAME, rank_batch
            name = args.annotator or DEFAULT_NAME
            try:
                n = rank_batch(store, batch.id, name, seed=args.seed)   # None: as started
            except SessionSettingsError as e:
                raise CliError(_settings_line(e)) from None
            print(f"simulated annotator {name!r} ranked {n} item(s) of batch {batch.id} "
                  f"{batch.name!r} (labelled simulated; exports need --include-simulated)")
            return 0
        if not args.annotator:
            raise CliError("--annotator NAME is required (or --simulated)")
        try:
            session = AnnotationSession(store, batch.id, args.annotator, seed=args.seed,
                                        repeat_fraction=args.repeats, kind="human")
        except SessionSettingsError as e:
            raise CliError(_settings_line(e)) from None
        print(f"batch {batch.id} {batch.name!r}, annotator {args.annotator!r}")
        return RankLoop(session).run()


# --- preferences ----------------------------------------------------------------------------

def cmd_export(args) -> int:
    from workbench.preferences import export_rankings

    problem = out_folder_problem(args.out.parent)
    if problem:
        raise CliError(f"--out {args.out}: {problem}")
    with open_store(args.project) as store:
        for b in args.batch or []:
            store.batch(b)        # an unknown id is refused before the file is written
        counts = export_rankings(store, args.out, include_simulated=args.include_simulated,
                                 fmt=args.format, batch_ids=args.batch or None,
                                 include_repeats=args.include_repeats)
    what = {"kway": "K-way rankings", "pairs": "pairs", "hf": "Hugging Face pairs",
            "hf-messages": "Hugging Face message pairs", "label-studio": "Label Studio tasks",
            "argilla": "Argilla records"}[args.format]
    print(f"wrote {counts['records']} {what} to {args.out} from {counts['rankings']} ranking(s): "
          f"{counts['human']} human, {counts['simulated']} simulated")
    return 0


def _import_line(res, file: Path, batch, names: dict[int, str]) -> str:
    """What an import did (ImportResult.held says what the records the project holds are)."""
    at = f"batch {batch.id} {batch.name!r}"
    unit, n, of = res.held
    if res.existing and not res.already:
        return f"{file} was already imported as {at}; nothing new"
    if res.existing:
        return f"every {unit} in {file} ({n}{of}) is already in the project, the first in {at}; nothing imported"
    left = f"; left out {n} {unit}(s){of} already in the project" if res.already else ""
    if res.joined:
        joined = res.joined_clause(names)
        made = (f"; the other {res.records - res.joined} of {res.items} new item(s) as {at}"
                if res.items else "; no new batch")
        return f"imported {res.records} ranking(s): {joined}{made}{left}"
    return f"imported {res.records} ranking(s) of {res.items} item(s) as {at}{left}"


def cmd_import(args) -> int:
    from workbench.preferences import import_preferences

    if not args.file.is_file():
        raise CliError(f"{args.file} is not a file")
    with open_store(args.project, create=True) as store:
        res = import_preferences(store, args.file, annotator=args.annotator,
                                 simulated=args.simulated, name=args.name,
                                 on_error="skip" if args.skip_bad else "raise")
        batch = store.batch(res.batch_id)
        names = {b.id: b.name for b in store.batches()}
    print(_import_line(res, args.file, batch, names))
    if res.skipped:
        print(str(InputError(res.skipped, "file; these records were left out")), file=sys.stderr)
    return 0


# --- agreement ------------------------------------------------------------------------------

def cmd_agreement(args) -> int:
    from workbench import agreement_text as text
    from workbench.agreement import agreement, figures
    from workbench.review import reward_accuracy

    with open_store(args.project) as store:
        kw = dict(batch_ids=args.batch or None, include_simulated=not args.human_only)
        if args.between == "annotators":
            found = figures(store, **kw)
        else:
            names = [a.name for a in store.annotators() if not (args.human_only and a.simulated)]
            total = agreement(store, between="repeats", **kw)
            rows = [(name, agreement(store, between="repeats", annotators=[name], **kw))
                    for name in names]
    if args.between == "annotators":
        text.annotator_report(found, reward_accuracy(args.project))
        return 0
    if not total.items:
        print("no item has been ranked twice by one annotator (rank with --repeats F to get "
              "hidden repeats)")
        return 0
    rows = [(label, a) for label, a in rows if a.items]
    print(f"agreement between repeats: {text.PAIRWISE}")
    for line in text.agreement_rows(
            [(label, a.items, a.comparisons, a.agreement, a.alpha, a.alpha_interval)
             for label, a in rows + ([("all", total)] if len(rows) != 1 else [])]):
        print(line)
    print(text.ALPHA)
    return 0


# --- the parsers ----------------------------------------------------------------------------

def _project(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", type=Path, required=True, metavar="DIR",
                   help="the project folder (its workbench.db holds batches and rankings)")


def add_commands(sub) -> None:
    """Register the annotation subcommands on the `workbench` parser's subparsers."""
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("import-samples", help="import a finished sample run as a ranking batch",
                       description="Import RUN_DIR (written by python -m engine.sample: samples.jsonl, "
                                   "provenance.json) as a batch to rank. Importing the same run "
                                   "again returns the batch made the first time.")
    _project(p)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--name", default=None, help="batch name (default: the run folder's name)")
    p.set_defaults(func=_guarded(cmd_import_samples))

    p = sub.add_parser("batches", help="list the project's batches and who ranked how much")
    _project(p)
    p.set_defaults(func=_guarded(cmd_batches))

    p = sub.add_parser("rank", help="rank a batch's answers in the terminal (or --simulated)",
                       description="Rank a batch: each prompt with its K answers, shuffled (the "
                                   "order is recorded); one line ranks them all. Quit any time; "
                                   "the same command resumes.",
                       epilog="Commands while ranking:\n" + RANK_HELP, formatter_class=raw)
    _project(p)
    p.add_argument("--batch", type=int, required=True, metavar="ID", help="see `workbench batches`")
    p.add_argument("--annotator", default=None, metavar="NAME",
                   help="who is ranking (required unless --simulated)")
    p.add_argument("--simulated", action="store_true",
                   help="rank with the simulated annotator (correct first, then finished, then "
                        "shorter); its rankings are labelled simulated")
    p.add_argument("--repeats", type=float, default=None, metavar="F",
                   help="show this fraction of items a second time, unannounced, to measure your "
                        "consistency (workbench agreement --between repeats); fixed at the "
                        "session's start (default 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the answer shuffle and the repeats; fixed at the session's start")
    p.set_defaults(func=_guarded(cmd_rank))

    p = sub.add_parser("preferences", help="export or import preference data (rankings, pairs)")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = psub.add_parser("export", help="write rankings as K-way JSONL, pairs, or for Hugging Face, "
                                       "Label Studio or Argilla",
                        description="Write the project's rankings to FILE. Say whether simulated "
                                    "rankings go in: human and simulated labels are never mixed "
                                    "silently (every record also says which it is).")
    _project(e)
    e.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="hf and hf-messages: .jsonl or .parquet; label-studio and argilla: .json")
    e.add_argument("--format", choices=["kway", "pairs", "hf", "hf-messages", "label-studio",
                                        "argilla"], default="kway",
                   help="kway: one JSONL record per ranking (default); pairs: one per (better, "
                        "worse) pair, ties give none; hf: those pairs as Hugging Face/TRL "
                        "{prompt, chosen, rejected} strings; hf-messages: the same as TRL's "
                        "message lists; label-studio: a Ranker project's JSON export, a task per "
                        "item; argilla: v2 records with a RankingQuestion 'ranking', one per item")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--include-simulated", action="store_true",
                     help="human and simulated rankings")
    who.add_argument("--human-only", action="store_true", help="human rankings only")
    e.add_argument("--batch", type=int, action="append", metavar="ID",
                   help="only this batch (repeatable; default all)")
    e.add_argument("--include-repeats", action="store_true",
                   help="also the hidden repeat rankings (marked repeat: true)")
    e.set_defaults(func=_guarded(cmd_export))

    i = psub.add_parser("import", help="import K-way, pairs, transcripts, Hugging Face, Label "
                                       "Studio or Argilla preference data",
                        description="Import a preference file as a new batch with its rankings: "
                                    "K-way or pairs JSONL, Human:/Assistant: transcripts, Hugging "
                                    "Face preference sets (strings or message lists; .jsonl or "
                                    ".parquet), a Label Studio ranker/pairwise JSON export, or "
                                    "Argilla records with a ranking question (.json, .jsonl, "
                                    ".parquet). Every record is checked first; bad ones are "
                                    "listed as FILE:LINE: reason (FILE:record N in a JSON array, "
                                    "FILE:row N in Parquet) and nothing is imported (or, with "
                                    "--skip-bad, the rest is). An item all of whose rankings "
                                    "the project already holds (the same annotator, prompt, "
                                    "answers and order, as in its own export) is left out and "
                                    "counted. A new ranking of a prompt and answers a batch "
                                    "already has (in any order) joins that item, if its "
                                    "annotator has not ranked it, so agreement compares it "
                                    "with the rankings made here.")
    _project(i)
    i.add_argument("file", type=Path, metavar="FILE")
    i.add_argument("--annotator", default=None, metavar="NAME",
                   help="annotator of records that name none (default: the file's name)")
    i.add_argument("--simulated", action="store_true",
                   help="records that do not say are from a simulated annotator")
    i.add_argument("--name", default=None, help="batch name (default: the file's name)")
    i.add_argument("--skip-bad", action="store_true",
                   help="import the good records and list the bad ones")
    i.set_defaults(func=_guarded(cmd_import))

    p = sub.add_parser("agreement", help="agreement between annotators: pairs, alpha, Kendall's W, "
                                         "the items most disagreed on, the ceiling for a reward model",
                       description="How consistently items are ranked. Between annotators (items "
                                   "ranked by two or more): progress and each annotator against "
                                   "the rest, pairwise agreement and Krippendorff's alpha per "
                                   "pair, Kendall's W, the items most disagreed on, and the "
                                   "human-human agreement ceiling beside the newest reward "
                                   "model's held-out accuracy. Between repeats: each annotator's "
                                   "ranking against its hidden repeat.")
    _project(p)
    p.add_argument("--between", choices=["annotators", "repeats"], default="annotators")
    p.add_argument("--batch", type=int, action="append", metavar="ID",
                   help="only this batch (repeatable; default all)")
    p.add_argument("--human-only", action="store_true", help="leave simulated annotators out")
    p.set_defaults(func=_guarded(cmd_agreement))
