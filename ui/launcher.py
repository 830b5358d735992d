"""The `workbench` command: the desktop app with no command (or `app`), else the headless
CLI of workbench/cli.py. Qt is imported only when the app opens, so the headless commands
start fast and work where no display or Qt library is available."""
from __future__ import annotations

import sys

from workbench import cli


def open_app(args) -> int:
    from ui import app
    return app.run(args)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, open_app=open_app)


if __name__ == "__main__":
    sys.exit(main())
