"""File dialogs that never open a file to learn its type.

Qt's file dialog (and GTK's, which Qt uses on a Linux desktop) reads the head of every file it
lists to guess its type and icon, workbench.db included. On Linux and macOS a process's POSIX
locks on a file go when it closes any descriptor of that file, so the app's SQLite locks on
workbench.db went the moment a dialog opened the project folder. The next process to close
the database (`workbench batches`, a job) then took itself for the last user, checkpointed and
deleted the write-ahead log the app was still writing to, and every ranking or import the app
stored after that was lost. These dialogs name types by suffix only. Windows locks per handle,
so there the native dialog is kept.

Callers use the module's functions (`file_dialogs.open_file(...)`), which tests replace.
"""
from __future__ import annotations

import sys

from PySide6.QtCore import QFileInfo
from PySide6.QtWidgets import QFileDialog, QFileIconProvider, QWidget

_NATIVE_IS_SAFE = sys.platform == "win32"
_PROVIDER = None        # the one _NamesOnly, made on first use


class _NamesOnly(QFileIconProvider):
    """Icons by kind and types by suffix: nothing is read from a file."""

    def icon(self, what):
        if isinstance(what, QFileInfo):
            kind = QFileIconProvider.IconType.Folder if what.isDir() else QFileIconProvider.IconType.File
            return super().icon(kind)
        return super().icon(what)

    def type(self, info: QFileInfo) -> str:
        if info.isDir():
            return "Folder"
        return f"{info.suffix().upper()} file" if info.suffix() else "File"


def _run(parent: QWidget | None, caption: str, directory: str, name_filter: str,
         mode: QFileDialog.FileMode, save: bool = False) -> list[str]:
    dialog = QFileDialog(parent, caption)
    if not _NATIVE_IS_SAFE:
        dialog.setOption(QFileDialog.Option.DontUseNativeDialog)
        # Set before the dialog lists any folder: its first listing would read the files. The
        # dialog does not own its provider: held here, or Python frees it under the dialog.
        global _PROVIDER
        _PROVIDER = _PROVIDER or _NamesOnly()
        dialog.setIconProvider(_PROVIDER)
    dialog.setFileMode(mode)
    if mode == QFileDialog.FileMode.Directory:
        dialog.setOption(QFileDialog.Option.ShowDirsOnly)
    if save:
        dialog.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)
    if name_filter:
        dialog.setNameFilter(name_filter)
    if directory:
        info = QFileInfo(directory)
        if save and not info.isDir():
            dialog.setDirectory(info.absolutePath())
            dialog.selectFile(info.fileName())
        else:
            dialog.setDirectory(directory)
    return dialog.selectedFiles() if dialog.exec() else []


def open_file(parent: QWidget | None, caption: str, directory: str = "", name_filter: str = "") -> str:
    """An existing file's path, or "" if none was chosen."""
    files = _run(parent, caption, directory, name_filter, QFileDialog.FileMode.ExistingFile)
    return files[0] if files else ""


def open_files(parent: QWidget | None, caption: str, directory: str = "", name_filter: str = "") -> list[str]:
    return _run(parent, caption, directory, name_filter, QFileDialog.FileMode.ExistingFiles)


def save_file(parent: QWidget | None, caption: str, directory: str = "", name_filter: str = "") -> str:
    """A path to write (a proposed name may be given as `directory`), or "" if none was chosen."""
    files = _run(parent, caption, directory, name_filter, QFileDialog.FileMode.AnyFile, save=True)
    return files[0] if files else ""


def existing_dir(parent: QWidget | None, caption: str, directory: str = "") -> str:
    files = _run(parent, caption, directory, "", QFileDialog.FileMode.Directory)
    return files[0] if files else ""
