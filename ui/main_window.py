"""The main window: the pipeline as a sidebar, a page per stage, menus, the status bar.

The sidebar lists the stages in pipeline order, each with its state (the newest run's status
and result, or the running job's progress), and under it the lineage of the run the current
page shows: which tokenizer and checkpoints it was made from. Window geometry, the splitter
and recent projects persist in QSettings.
"""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import QSettings, QSize, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QAction, QDesktopServices, QKeySequence
from PySide6.QtWidgets import (QInputDialog, QLabel, QListView, QListWidget, QListWidgetItem,
                               QMainWindow, QMessageBox, QSplitter, QStackedWidget, QTabWidget, QVBoxLayout,
                               QWidget)

from engine.runio import format_duration
from workbench import stages
from workbench.project import Project, ProjectError, create_project, creation_problem
from ui import help as help_pages
from ui import file_dialogs
from ui.collector import settle_gc, thaw_gc
from ui.icons import app_icon, page_icon, status_color
from ui.status_bar import MachineStatus
from ui.app import fit_to_screen
# The project's pages (ui.project_context, ui.stage_pages, ui.runs_browser, ...) are imported
# when a project opens, not here: they load PyTorch, a second or more, and the window should
# paint before that (bench/app_start.py).

# Pages that are not a stage's own, by key.
OTHER_PAGES = {"rank": "Sample & Rank", "chat": "Chat", "runs": "Runs"}


def sidebar() -> list[tuple[str, str]]:
    """(page key, title) in pipeline order: a page per stage of the catalogue (a stage with a
    `page` lives on that one, as sampling lives on Sample & Rank), then chat and the runs."""
    pages: list[tuple[str, str]] = []
    for s in stages.STAGES:
        if not s.sidebar:
            continue
        key = s.page or s.name
        if key not in (k for k, _ in pages):
            pages.append((key, OTHER_PAGES.get(key, s.title)))
    return pages + [("chat", OTHER_PAGES["chat"]), ("runs", OTHER_PAGES["runs"])]


SIDEBAR = sidebar()
MAX_RECENT = 8


class MainWindow(QMainWindow):
    projectOpened = Signal()     # a project's pages are built and shown

    def __init__(self, settings: QSettings | None = None):
        super().__init__()
        self.settings = settings or QSettings()
        self.ctx = None                  # ui.project_context.ProjectContext of the open project
        self.pages: dict[str, QWidget] = {}
        self.setWindowIcon(app_icon())
        self.setWindowTitle("Workbench")
        fit_to_screen(self, 1360, 860)

        self.sidebar = QListWidget()
        self.sidebar.setIconSize(QSize(22, 22))
        self.sidebar.setSpacing(2)
        self.sidebar.setMinimumWidth(210)
        # A stage's state line may be longer than the column ("val acc 50.0% (only 1 held out)"):
        # it wraps onto a third line rather than being cut where its warning starts.
        self.sidebar.setWordWrap(True)
        self.sidebar.setResizeMode(QListView.ResizeMode.Adjust)
        for key, label in SIDEBAR:
            item = QListWidgetItem(page_icon(key), label)
            item.setData(Qt.ItemDataRole.UserRole, key)
            self.sidebar.addItem(item)
        self.sidebar.currentRowChanged.connect(self._on_stage_chosen)
        self.lineage = QLabel()
        self.lineage.setWordWrap(True)
        self.lineage.setTextFormat(Qt.TextFormat.RichText)
        self.lineage.setAlignment(Qt.AlignmentFlag.AlignTop)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(6, 6, 0, 6)
        ll.addWidget(self.sidebar, 1)
        ll.addWidget(self.lineage)
        self.stack = QStackedWidget()
        self.placeholder = QLabel("Opening…")
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.stack.addWidget(self.placeholder)
        self.split = QSplitter(Qt.Orientation.Horizontal)
        self.split.addWidget(left)
        self.split.addWidget(self.stack)
        self.split.setStretchFactor(1, 1)
        self.split.setSizes([230, 1130])
        self.setCentralWidget(self.split)
        self.machine = MachineStatus(lambda: [j.pid for j in (self.ctx.running_jobs() if self.ctx else []) if j.pid])
        self.statusBar().addPermanentWidget(self.machine)
        self._build_menus()
        self._state_timer = QTimer(self)
        self._state_timer.setInterval(1000)
        self._state_timer.timeout.connect(self.update_states)
        self.restore_state()

    # --- menus --------------------------------------------------------------------------------

    def _build_menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        self._action(file, "&New Project…", self.new_project, QKeySequence.StandardKey.New)
        self._action(file, "&Open Project…", self.choose_project, QKeySequence.StandardKey.Open)
        self.recent_menu = file.addMenu("Open &Recent")
        file.addSeparator()
        self.import_action = self._action(file, "&Import Model…", self.choose_model_to_import)
        self._action(file, "Show Project &Folder", self.show_project_folder)
        file.addSeparator()
        self._action(file, "Open Annotation &Pack…", self.choose_pack)
        file.addSeparator()
        # Not StandardKey.Quit: outside KDE and GNOME, Qt's generic theme binds it to no key.
        self._action(file, "&Quit", self.close, QKeySequence("Ctrl+Q"))
        view = self.menuBar().addMenu("&View")
        for i, (key, label) in enumerate(SIDEBAR):
            # "&&": a lone & in a menu marks the next letter as the mnemonic ("Sample _Rank").
            self._action(view, label.replace("&", "&&"), lambda _=False, k=key: self.go(k),
                         QKeySequence(help_pages.page_key(i)) if help_pages.page_key(i) else None)
        helpm = self.menuBar().addMenu("&Help")
        self._action(helpm, "&Keyboard shortcuts", self.show_shortcuts, QKeySequence("Ctrl+/"))
        guide = helpm.addMenu("&Guide")
        for text, heading in help_pages.SECTIONS:
            self._action(guide, text, lambda _=False, h=heading: help_pages.guide_dialog(h, self).exec())
        helpm.addSeparator()
        self._action(helpm, "&About the workbench", self.about)
        self._fill_recent()

    def _action(self, menu, text, slot, shortcut=None) -> QAction:
        a = QAction(text, self)
        if shortcut is not None:
            a.setShortcut(shortcut)
        a.triggered.connect(slot)
        menu.addAction(a)
        return a

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        for path in self.recent_projects():
            self._action(self.recent_menu, path, lambda _=False, p=path: self.open_project(Path(p)))
        self.recent_menu.setEnabled(bool(self.recent_projects()))

    def recent_projects(self) -> list[str]:
        value = self.settings.value("recentProjects", [])
        if isinstance(value, str):
            value = [value]
        return [p for p in (value or []) if (Path(p) / "workbench.toml").exists()]

    def _remember(self, path: Path) -> None:
        recent = [str(path)] + [p for p in self.recent_projects() if p != str(path)]
        self.settings.setValue("recentProjects", recent[:MAX_RECENT])
        self.settings.setValue("lastProject", str(path))
        self._fill_recent()

    # --- projects -----------------------------------------------------------------------------

    def open_project(self, path: Path) -> bool:
        try:
            project = Project.open(Path(path).absolute())
        except ProjectError as e:
            QMessageBox.warning(self, "Cannot open project", str(e))
            return False
        self.close_project()
        from ui.project_context import ProjectContext
        self.ctx = ProjectContext(project, self)
        self._build_pages()
        self.setWindowTitle(f"{project.name} — {project.path} — Workbench")
        self._remember(project.path)
        self.ctx.runsChanged.connect(self.update_states)
        self.ctx.projectGone.connect(self._project_gone)
        attached = self.ctx.reattach()
        if attached:
            self.statusBar().showMessage(f"Following {len(attached)} job(s) still running from the last session", 8000)
        self._state_timer.start()
        row = int(self.settings.value("stage", 0) or 0)
        self.sidebar.setCurrentRow(min(max(row, 0), len(SIDEBAR) - 1))
        self._on_stage_chosen(self.sidebar.currentRow())
        self.update_states()
        settle_gc()
        self.projectOpened.emit()
        return True

    def close_project(self) -> None:
        if self.ctx is None:
            return
        thaw_gc()
        self._state_timer.stop()
        for page in self.pages.values():
            shutdown = getattr(page, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.stack.removeWidget(page)
            page.deleteLater()
        self.pages = {}
        self.ctx.close()
        self.ctx.deleteLater()
        self.ctx = None

    def new_project(self) -> None:
        folder = file_dialogs.existing_dir(self, "Folder for the new project (empty or new)")
        if not folder:
            return
        if (Path(folder) / "workbench.toml").exists():
            if QMessageBox.question(self, "New project", f"{folder} already holds a project. Open it?",
                                    QMessageBox.Yes | QMessageBox.No, QMessageBox.Yes) == QMessageBox.Yes:
                self.open_project(Path(folder))
            return
        if problem := creation_problem(Path(folder)):       # before a name is asked for
            QMessageBox.warning(self, "Cannot create project", problem)
            return
        name, ok = QInputDialog.getText(self, "New project", "Project name:", text=Path(folder).name)
        if not ok:
            return
        try:
            create_project(Path(folder), name or Path(folder).name)
        except (ProjectError, OSError) as e:
            QMessageBox.warning(self, "Cannot create project", str(e))
            return
        self.open_project(Path(folder))

    def choose_project(self) -> None:
        folder = file_dialogs.existing_dir(self, "Open a project folder (with workbench.toml)")
        if folder:
            self.open_project(Path(folder))

    def choose_pack(self) -> None:
        """Rank an annotation pack in a window of its own (no project needed)."""
        from ui.pack_window import choose_and_open_pack
        window = choose_and_open_pack(self, self.ctx.path / "packs" if self.ctx is not None else None)
        if window is not None:
            self.pack_windows = [w for w in getattr(self, "pack_windows", []) if w.isVisible()]
            self.pack_windows.append(window)

    def choose_model_to_import(self) -> None:
        """A model already in the local Hugging Face cache by name, or any model folder."""
        if self.ctx is None:
            return
        from engine.hf_import import cached_models
        folder_item = "A model folder on disk…"
        cached = cached_models()
        source = folder_item
        if cached:
            source, ok = QInputDialog.getItem(
                self, "Import a Hugging Face model", "Models in the local Hugging Face cache (nothing is "
                "downloaded), or a folder:", [folder_item] + cached, 0, False)
            if not ok:
                return
        if source == folder_item:
            source = file_dialogs.existing_dir(
                self, "A Hugging Face model folder (config.json, model.safetensors, tokenizer.json)")
        if source:
            self.import_model(source)

    def import_model(self, source: str) -> None:
        """Start an import run of `source` and show it on the Runs page."""
        from engine.config import ConfigError
        try:
            job = self.ctx.launch("hf_import", {"source": source})
        except (ConfigError, ValueError) as e:
            QMessageBox.warning(self, "Cannot import", str(e))
            return
        self.go("runs")
        self.runs_browser.select([job.run_dir.name])

    def show_project_folder(self) -> None:
        if self.ctx is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.ctx.path)))

    def show_shortcuts(self) -> None:
        help_pages.shortcuts_dialog(SIDEBAR, self).exec()

    def about(self) -> None:
        QMessageBox.about(self, "About the workbench",
                          "<b>The workbench</b><p>Tokenizer → pretraining → SFT → ranking → reward model → "
                          "PPO → chat, on your own machine.</p><p>Every stage is a run folder; the same "
                          "stages run headless with <code>workbench run</code> and "
                          "<code>python -m engine.&lt;stage&gt;</code>.</p>")

    # --- pages --------------------------------------------------------------------------------

    def _build_pages(self) -> None:
        from ui.runs_browser import RunsBrowser
        from ui.stage_pages import make_panel
        from ui.chat_view import ChatView
        from ui.compare_view import CompareView
        from ui.methods_view import MethodsView
        from ui.ranking_view import RankingView
        ctx = self.ctx
        for key, _title in SIDEBAR:
            if key in stages.BY_NAME:
                panel = make_panel(ctx, key)
                panel.runSelected.connect(lambda _n: self.update_lineage())
                self.pages[key] = panel
        rank = QTabWidget()
        self.ranking = RankingView(ctx.path, checkpoints=ctx.checkpoints)
        self.sample_panel = make_panel(ctx, "sample")
        rank.addTab(self.ranking, "Ranking")
        rank.addTab(self.sample_panel, "Sample jobs")
        self.ranking.sampleRequested.connect(self._sample_for_ranking)
        ctx.jobFinished.connect(self._import_samples)
        rank.shutdown = self.ranking.close_store
        self.pages["rank"] = rank
        chat = QTabWidget()
        # One cache for both views, so chat and compare share loaded models (two at most).
        from workbench.model_cache import ModelCache
        self.model_cache = ModelCache(capacity=2)
        self.chat = ChatView(ctx.path, ctx.checkpoints, cache=self.model_cache)
        self.compare = CompareView(ctx.path, ctx.checkpoints, cache=self.model_cache)
        self.methods = MethodsView(ctx.path, ctx.run_list)
        ctx.runsChanged.connect(self.methods.runs_changed)
        self.methods.abRequested.connect(self._blind_ab)
        chat.addTab(self.chat, "Chat")
        chat.addTab(self.compare, "Compare")
        chat.addTab(self.methods, "Methods")
        chat.shutdown = lambda: (self.chat.shutdown(), self.compare.shutdown(), self.methods.shutdown(),
                                 self.model_cache.clear())
        chat.currentChanged.connect(lambda _i: (self.chat.refresh(), self.compare.refresh(),
                                                self.methods.refresh()))
        self.pages["chat"] = chat
        self.runs_browser = RunsBrowser(ctx)
        self.runs_browser.openRun.connect(self.open_run)
        self.pages["runs"] = self.runs_browser
        for page in self.pages.values():
            self.stack.addWidget(page)

    def _blind_ab(self, sft: Path, run: Path) -> None:
        """A method's run against its SFT model, in the Compare tab, blind."""
        self.compare.pickers[0].set_path(sft)
        self.compare.pickers[1].set_path(run)
        self.compare.blind.setChecked(True)
        self.pages["chat"].setCurrentWidget(self.compare)

    def _sample_for_ranking(self, config) -> None:
        self.ctx.launch("sample", config)
        self.pages["rank"].setCurrentWidget(self.sample_panel)

    def _import_samples(self, job) -> None:
        # A finished sample run becomes a ranking batch, and the ranking view opens it.
        if job.stage == "sample" and job.status == "completed":
            from workbench.store import InputError
            try:
                self.ranking.import_sample_run(job.run_dir)
            except InputError as e:
                QMessageBox.warning(self, "Cannot rank this sample run", str(e))
                return
            self.pages["rank"].setCurrentWidget(self.ranking)

    def _batch_finished_samples(self) -> None:
        """Sample runs made outside the app (`workbench pipeline --until sample`, `workbench run
        sample`) become batches to rank too, as the app's own do when they finish."""
        from workbench.samples import import_sample_run
        from workbench.store import InputError
        known = {b.source for b in self.ranking.store.batches()}
        for info in self.ctx.run_list("sample"):
            if info.status == "completed" and str(info.path.resolve()) not in known:
                try:
                    import_sample_run(self.ranking.store, info.path)
                except (InputError, OSError):
                    continue        # a run it cannot read: its own page says why when opened

    def go(self, key: str) -> None:
        keys = [k for k, _ in SIDEBAR]
        self.sidebar.setCurrentRow(keys.index(key))

    def open_run(self, stage: str, name: str) -> None:
        if stage == "sample":
            self.go("rank")
            self.pages["rank"].setCurrentWidget(self.sample_panel)
            self.sample_panel.select_run(name)
        elif stage in self.pages:
            self.go(stage)
            self.pages[stage].select_run(name)

    def _on_stage_chosen(self, row: int) -> None:
        if self.ctx is None or row < 0:
            return
        key = SIDEBAR[row][0]
        page = self.pages[key]
        self.stack.setCurrentWidget(page)
        refresh = getattr(page, "refresh", None)
        if key == "rank":
            self._batch_finished_samples()
        if key in ("rank", "chat"):
            inner = page.currentWidget()
            refresh = getattr(inner, "refresh", None)
        if refresh is not None and key != "runs":
            refresh()
        self.settings.setValue("stage", row)
        self.update_lineage()

    # --- sidebar state ------------------------------------------------------------------------

    def _project_gone(self, gone: bool) -> None:
        """The project's folder was moved or deleted while open (or is back): said at once, not
        left to read as a project with no runs."""
        path = self.ctx.path
        if getattr(self, "gone_box", None) is not None:
            self.gone_box.close()
            self.gone_box.deleteLater()
        if not gone:
            self.gone_box = None
            self.statusBar().showMessage(f"{path} is back", 8000)
            for page in self.pages.values():        # data previews read while it was away
                if hasattr(page, "refresh_preview"):
                    page.refresh_preview()
            return
        self.gone_box = QMessageBox(QMessageBox.Icon.Warning, "Project folder gone",
                                    f"{path} is not there any more (moved, renamed or deleted). "
                                    "Nothing more can be saved into it: put it back, or open it where it is "
                                    "now (File ▸ Open Project). Jobs still running go on in their own folders.",
                                    QMessageBox.StandardButton.Ok, self)
        self.gone_box.open()        # not modal to the app: the window can still be closed
        self.statusBar().showMessage(f"{path} is gone (moved or deleted)")

    def update_states(self) -> None:
        if self.ctx is None:
            return
        for row, (key, label) in enumerate(SIDEBAR):
            item = self.sidebar.item(row)
            state, status = self._state(key)
            item.setText(f"{label}\n{state}")
            item.setToolTip(f"{label}: {state}")
            item.setIcon(page_icon(key) if status is None else page_icon(key, status_color(status)))
        self.update_lineage()

    def _state(self, key: str) -> tuple[str, str | None]:
        ctx = self.ctx
        if key == "runs":
            n = len(ctx.run_list())
            return f"{n} run{'s' * (n != 1)}", None
        if key == "chat":
            n = len(ctx.checkpoints())
            return f"{n} checkpoint{'s' * (n != 1)}", None
        stage = next((st.name for st in stages.STAGES if (st.page or st.name) == key), key)
        job = next((j for j in ctx.running_jobs() if j.stage == stage), None)
        if job is not None:
            p, eta = job.progress, job.fold.eta_s()
            if p and p.get("total"):
                text = f"running {p['step'] / max(p['total'], 1):.0%}"
                if eta is not None:
                    text += f" · ETA {format_duration(eta)}"
                return text, "running"
            return "running", "running"
        if key == "rank":
            # The run index's connection is open anyway.
            b, n = ctx.runs.store.counts()
            # Store.counts: rankings with a preference to train on (not repeats, not all-tied),
            # which the Rank page's progress and an export count differently: say which.
            return f"{b} batch{'es' * (b != 1)} · {n} ranking{'s' * (n != 1)} to train on", None
        info = ctx.latest(stage)
        if info is None:
            return "not started", None
        from ui.runs_browser import result_text
        result = result_text(info, short=True).split(", ")[0]
        return (f"{info.status} · {result}" if result and info.status == "completed" else info.status), info.status

    def update_lineage(self) -> None:
        if self.ctx is None:
            return
        key = SIDEBAR[max(self.sidebar.currentRow(), 0)][0]
        page = self.pages.get(key)
        run = getattr(page, "run", None)
        if run is None:
            self.lineage.setText("")
            return
        # Oldest first: a parent always starts before its children.
        chain = sorted(self.ctx.lineage(run.name), key=lambda r: (r.started_at or r.created_at, r.name))
        lines = [f"<b>{html.escape(r.stage)}</b> {html.escape(r.name)}" for r in chain]
        self.lineage.setText("<small>Lineage<br>" + "<br>↓ ".join(lines) + "</small>")

    # --- window state -------------------------------------------------------------------------

    def restore_state(self) -> None:
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        split = self.settings.value("split")
        if split is not None:
            self.split.restoreState(split)

    def closeEvent(self, event) -> None:
        running = self.ctx.running_jobs() if self.ctx else []
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("split", self.split.saveState())
        self.close_project()
        for window in getattr(self, "pack_windows", []):   # quitting quits: no pack window stays
            window.close()
        if running:
            # Jobs are separate processes: they finish (or stop with a checkpoint) on their own,
            # and the next session follows them.
            print(f"{len(running)} job(s) keep running; reopen the workbench to follow them.")
        super().closeEvent(event)

