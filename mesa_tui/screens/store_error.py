"""The app's answer to a store it cannot use: the same one line as the CLI, then a clean exit.

``mesa-tui`` (no command) opens the store before the app starts; when ``store.health`` (or the
schema check) refuses it, this small app shows the message on a clear screen, waits for a key
and exits with code 2, like every command. Nothing is read or written after the refusal.
"""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Static

EXIT_CODE = 2


class StoreErrorApp(App):
    """One message, any key to leave (exit code 2)."""

    TITLE = "mesa-tui"
    CSS = """
    Screen { align: center middle; }
    #box { width: 90%; max-width: 110; height: auto; border: round $error; padding: 1 2; }
    #head { text-style: bold; color: $error; }
    #message { margin: 1 0; }
    #hint { color: $text-muted; }
    """
    BINDINGS = [Binding("q,escape,enter", "leave", "quit")]

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="box"):
            yield Static("mesa-tui cannot use its store", id="head")
            yield Static(f"error: {self.message}", id="message", markup=False)
            yield Static("press any key to leave", id="hint")

    def on_key(self) -> None:
        self.action_leave()

    def action_leave(self) -> None:
        self.exit(return_code=EXIT_CODE)
