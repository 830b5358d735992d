"""`workbench pack export|merge|open`: a batch ranked by a class, one pack file per annotator.

    workbench pack export --project DIR --batch ID|NAME --annotators ana,ben,chloe --overlap 2
    workbench pack open FILE.wbpack          (the app's ranking view on the pack; no project)
    workbench pack merge --project DIR FILE.wbpack...
"""
from __future__ import annotations

import argparse
from pathlib import Path

from workbench import packs
from workbench.annotate_cli import CliError, _guarded, _project, open_store, out_folder_problem
from workbench.pack_merge import merge_packs


def cmd_export(args) -> int:
    out = args.out or args.project / "packs"
    problem = out_folder_problem(out)
    if problem:       # before any work, and not blamed on the project's database
        raise CliError(f"--out {out}: {problem}")
    with open_store(args.project) as store:
        paths = packs.export_packs(store, args.project, args.batch, args.annotators.split(","),
                                   args.overlap, out,
                                   repeat_fraction=args.repeats, seed=args.seed)
        for path in paths:
            with packs.open_pack(path) as pack:
                n = len(pack.store.item_ids(pack.batch_id))
            print(f"{path}  ({pack.info.annotator}: {n} items)")
    print(f"each item is ranked by {args.overlap} of {len(paths)} annotators; merge the packs back "
          f"with: workbench pack merge --project {args.project} FILES...")
    return 0


def cmd_merge(args) -> int:
    with open_store(args.project) as store:
        results = merge_packs(store, args.files)
    for r in results:
        print(r.line())
        for c in r.conflicts:
            print(f"  conflict: {c}")
    return 0


def check_pack(path: Path) -> str | None:
    """None if `path` opens as a pack, else the one line saying why not (before any window)."""
    try:
        packs.open_pack(path).close()
    except packs.PackError as e:
        return str(e)
    except Exception as e:      # StoreError: busy, a newer schema
        return f"{path}: {e}"
    return None


def add_commands(sub) -> None:
    p = sub.add_parser("pack", help="annotation packs: a batch ranked on many machines, merged back",
                       description=__doc__.split("\n\n")[0] + " A pack holds one annotator's items, "
                       "their shuffled answer orders and the guidelines, and saves each ranking as "
                       "it is made. Merging is idempotent and refuses a pack of another batch.")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    e = psub.add_parser("export", help="write one pack file per annotator for a batch",
                        description="Deal the batch's items so each is ranked by --overlap "
                                    "annotators (loads differ by at most one item) and write "
                                    "BATCH-NAME.wbpack per annotator.")
    _project(e)
    e.add_argument("--batch", required=True, metavar="ID|NAME", help="see `workbench batches`")
    e.add_argument("--annotators", required=True, metavar="A,B,C", help="comma-separated names")
    e.add_argument("--overlap", type=int, default=2, metavar="N",
                   help="how many annotators rank each item (default 2; 2+ measures agreement)")
    e.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for the pack files (default: PROJECT/packs)")
    e.add_argument("--repeats", type=float, default=0.0, metavar="F",
                   help="fraction of each pack's items shown twice, unannounced (default 0)")
    e.add_argument("--seed", type=int, default=0, help="seed of the dealing and the repeats")
    e.set_defaults(func=_guarded(cmd_export))

    m = psub.add_parser("merge", help="merge ranked packs into the project (idempotent)",
                        description="Copy the packs' rankings into the batch they were made from. "
                                    "Every pack is checked first; one made from another batch is "
                                    "refused by name and nothing is merged. Merging a pack again "
                                    "adds nothing; rankings undone or redone in a pack since are "
                                    "followed; an item its annotator ranked differently in the "
                                    "project is a conflict (the project's ranking is kept).")
    _project(m)
    m.add_argument("files", type=Path, nargs="+", metavar="FILE")
    m.set_defaults(func=_guarded(cmd_merge))

    o = psub.add_parser("open", help="rank a pack in the app (no project needed)")
    o.add_argument("pack", type=Path, metavar="FILE")
    o.set_defaults(func=None)


def open_args(args: argparse.Namespace) -> argparse.Namespace:
    """`pack open FILE` as the app's arguments."""
    return argparse.Namespace(**{**vars(args), "project": None, "demo": False})
