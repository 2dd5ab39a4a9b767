"""Progress bars draw on a terminal only; logs and captured output stay clean."""

import io
import sys

from emcaps.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_draws_on_a_terminal(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with progress_bar(10, "render", unit="img") as bar:
        bar.update(4)
        bar.update(6)
    assert "render" in screen.getvalue() and "10/10" in screen.getvalue()
    screen.truncate(0)
    with progress_bar(3 << 20, "f.bin", unit="B") as bar:
        bar.update(3 << 20)
    assert "3.00M/3.00M" in screen.getvalue()                                # bytes shown scaled


def test_bar_is_silent_off_a_terminal_or_when_disabled(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(5, "epoch 1/1") as bar:
        bar.update(5)
    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress_bar(5, "epoch 1/1", enabled=False) as quiet:
        quiet.update(5)
    assert log.getvalue() == "" and sys.stderr.getvalue() == "" and bar.disable and quiet.disable
