"""The progress bar, seen in a real terminal: ``weightzoo invert`` runs in a tmux pane (a real pty), the
screen is read back with ``capture-pane``, and it shows a bar with the step counter and the loss; the
same command with stdout piped shows none. tmux, not a fake: what a person sees is what is checked.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux): "
                                "this test needs a real terminal")

STEPS = 8
WAIT_S = 180  # a bound on a hung command, not a timing assertion


DONE = "__weightzoo_done__"


class Tmux:
    """A private tmux server (own socket, no user config) that runs one command per pane and keeps the
    pane after the command exits, so its last screen can be read."""

    def __init__(self, folder: Path) -> None:
        self.socket = str(folder / "tmux.sock")
        self.conf = folder / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\nset -g history-limit 200\n")
        self.env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        self.env.pop("TMUX", None)

    def _tmux(self, *args: str) -> str:
        cmd = [TMUX, "-S", self.socket, "-f", str(self.conf), *args]
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True).stdout

    def start(self, name: str, command: str) -> None:
        """Run ``command`` (a shell line) in a new detached 160×40 session ``name``; the shell then prints a
        marker and stays, so the screen is read while the pane is alive (a dead pane may lose its last frame)."""
        self._tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "40", f"{command}; echo {DONE}; sleep 600")

    def final_screen(self, name: str, command: str) -> str:
        """The pane's screen once its command has finished."""
        deadline = time.monotonic() + WAIT_S
        while DONE not in (screen := self._tmux("capture-pane", "-p", "-J", "-t", name)):
            if time.monotonic() > deadline:
                pytest.fail(f"{command!r} still running after {WAIT_S} s:\n{screen}")
            time.sleep(0.5)
        return screen.split(DONE)[0]

    def close(self) -> None:
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], env=self.env, capture_output=True, check=False)


def _invert_command(root: Path, tiny_base: Path, tiny_pipe) -> str:
    """``weightzoo invert`` on a tiny fitted subspace of the tiny model, a few steps (a shell line)."""
    from test_w2w import write_lora_dataset

    from weightzoo.tasks.identity.synthetic import _draw, _rng, _subject
    from weightzoo.tasks.subspace.config import SubspaceConfig
    from weightzoo.tasks.subspace.pca import fit_subspace

    write_lora_dataset(str(root / "ds"), tiny_pipe, n=12)
    fit_subspace(str(root / "ds"), str(root / "sub"), SubspaceConfig(components=3))
    rng = _rng(3, 0)
    _draw(_subject(rng), rng, 32).save(root / "face.png")
    return shlex.join([sys.executable, "-m", "weightzoo.cli", "invert", "--subspace", str(root / "sub"),
                       "--base", str(tiny_base), "--image", str(root / "face.png"), "--steps", str(STEPS),
                       "--batch", "1", "--out", str(root / "inv")])


@pytest.fixture(scope="module")
def screens(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_pipe, one_thread: None) -> Iterator[dict[str, str]]:
    """The final screens of the same invert, once with the pane as stdout and once piped into ``cat``
    (stderr still the pane); run side by side, one torch thread each."""
    root = tmp_path_factory.mktemp("terminal")
    command = _invert_command(root, tiny_base, tiny_pipe)
    tmux = Tmux(root)
    try:
        runs = {"tty": command, "piped": f"{command} | cat"}
        for name, line in runs.items():
            tmux.start(name, line)
        yield {name: tmux.final_screen(name, line) for name, line in runs.items()}
    finally:
        tmux.close()


@needs_tmux
def test_invert_shows_a_bar_with_steps_and_loss_in_a_terminal(screens: dict[str, str]) -> None:
    screen = screens["tty"]
    assert "wrote " in screen, screen
    bar = re.search(rf"invert +━+ +{STEPS}/{STEPS} steps · loss \d\S* .*ETA", screen)
    assert bar, f"no finished bar on the screen:\n{screen}"
    assert screen.index(bar.group(0)) < screen.index("wrote "), "the result prints below the bar"


@needs_tmux
def test_invert_shows_no_bar_when_stdout_is_piped(screens: dict[str, str]) -> None:
    screen = screens["piped"]
    assert "wrote " in screen, screen
    assert f"/{STEPS} steps" not in screen and "━" not in screen, screen


def test_report_moves_the_current_bar_and_nothing_without_one() -> None:
    """The hook itself: reports reach the bar installed by the command (a new run on a bar restarts it,
    unknown bars are ignored) and are dropped once it is closed; under pytest nothing is a terminal."""
    from weightzoo.cli.progress import Bar, shows_progress, terminal_progress
    from weightzoo.tasks.progress import COMMITTED, report

    assert not shows_progress()
    with terminal_progress(Bar("x")) as off:
        assert off is None
        report(1, 2)  # no bar: a no-op
    with terminal_progress(Bar("train", loss=True), Bar("committed", "ids", name=COMMITTED), enabled=True) as term:
        assert term is not None
        report(7, 10, 0.25)
        report(3, 4, bar=COMMITTED)
        report(1, 1, bar="unknown")
        main, committed = term.progress.tasks
        assert (main.completed, main.total, main.fields["info"]) == (7, 10, "steps · loss 0.25")
        assert (committed.completed, committed.total) == (3, 4)
        report(2, 8)  # the next batch on the same bar
        assert (main.completed, main.total) == (2, 8)
    report(9, 10)
    assert main.completed == 2
