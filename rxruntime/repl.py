"""The terminal chat: ``rxrt chat``.

Tokens stream as they are generated. After each answer a status line says the memory update is
running; when it commits, a second line gives the new STM version and how long it took. You can
type the next message meanwhile: it waits for the update. Ctrl-C stops the current answer (at the
prompt it clears the line); Ctrl-D or ``/exit`` quits. Line editing and history come from
``readline`` when the terminal has it.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.bar import Bar
from rich.console import Console
from rich.table import Table

from rxruntime.conversation import Conversation
from rxruntime.engine import Engine
from rxruntime.errors import RxTError
from rxruntime.events import AnswerCompleted, Event, InteractionFailed, MemoryUpdated, Token
from rxruntime.snapshot import ConversationState

try:  # line editing and history where the platform has GNU readline / libedit
    import readline
except ImportError:  # pragma: no cover - e.g. Windows without pyreadline
    readline = None  # type: ignore[assignment]

PROMPT = "you> "
HELP = """\
Commands:
  /help          this help
  /reset         forget everything (fresh STM)
  /save PATH     save the conversation's memory (STM) to a file
  /load PATH     load a memory saved with /save
  /stats         per-turn statistics (time to first token, tokens/s, memory update)
  /memory        what the last memory update changed: a bar per STM layer
  /temp X        sampling temperature (0 = greedy)
  /exit          quit (or Ctrl-D)
Ctrl-C stops the current answer."""


class ChatREPL:
    def __init__(
        self,
        engine: Engine,
        conversation: Conversation,
        console: Console,
        *,
        temperature: float = 0.0,
        max_new_tokens: int | None = None,
        thinking_mode: str | None = None,
        options: dict[str, Any] | None = None,
        history_file: Path | None = None,
        notice: str | None = None,
    ) -> None:
        self.engine = engine
        self.conv = conversation
        self.console = console
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.thinking_mode = thinking_mode
        self.options = dict(options or {})
        """Turn options every turn passes (``rxrt chat --presence-penalty`` ...), checked by the caller."""
        self.history_file = history_file
        self.notice = notice
        self._print_lock = threading.Lock()
        self._at_prompt = False
        self._answering = False  # an answer is being printed: memory status lines wait for its end
        self._held: list[str] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._last_memory: MemoryUpdated | None = None

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        self._setup_readline()
        self._banner()
        # Ctrl-C must reach us even if a parent started us with SIGINT ignored (e.g. a background job).
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        subscription = self.conv.memory_events.subscribe(self._on_memory_event)
        try:
            while True:
                try:
                    line = self._read().strip()
                    if not line:
                        continue
                    if line.startswith("/"):
                        if self._command(line) == "exit":
                            return 0
                        continue
                    self._turn(line)
                except EOFError:  # Ctrl-D
                    self.console.print()
                    return 0
                except KeyboardInterrupt:  # Ctrl-C anywhere but in an answer: drop the line, stay
                    self.console.print("^C")
        finally:
            subscription.dispose()
            self._save_history()
            signal.signal(signal.SIGINT, previous)

    def _read(self) -> str:
        with self._print_lock:
            self._at_prompt = True
        try:
            return input(PROMPT)
        finally:
            with self._print_lock:
                self._at_prompt = False

    # ------------------------------------------------------------------ one turn
    def _turn(self, text: str) -> None:
        with self._print_lock:
            self._answering = True
        try:
            self._answer(text)
        finally:
            with self._print_lock:
                self._answering = False
                held, self._held = self._held, []
            for message in held:  # a memory update that committed while its answer was printed
                self._async_status(message)

    def _answer(self, text: str) -> None:
        events: queue.Queue[Event | BaseException | None] = queue.Queue()
        answered = threading.Event()

        def on_next(event: Event) -> None:
            if not answered.is_set():
                events.put(event)
            if isinstance(event, AnswerCompleted):
                answered.set()
                events.put(None)

        def on_error(exc: Exception) -> None:
            events.put(exc)

        options: dict[str, Any] = {**self.options, "temperature": self.temperature}
        if self.max_new_tokens is not None:
            options["max_new_tokens"] = self.max_new_tokens
        if self.thinking_mode is not None:
            options["thinking_mode"] = self.thinking_mode
        try:
            subscription = self.conv.interact(text, **options).subscribe(on_next, on_error)
        except RxTError as exc:
            self._error(exc)
            return
        # An extended-thinking turn writes its thinking, then an [A] of its own, then the answer:
        # the text drops special tokens, so the REPL marks where each part starts.
        thinking = self.thinking_mode == "extended"
        self._write("rxt> [thinking] " if thinking else "rxt> ")
        try:
            while True:
                item = events.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    self._write("\n")
                    self._error(item)
                    return
                if isinstance(item, Token):
                    if thinking and item.token_id == self.engine.tokenizer.special.answer_id:
                        thinking = False
                        self._write("\n[answer] ")
                    self._write(item.text)
                elif isinstance(item, InteractionFailed):
                    continue  # its typed error follows
                elif isinstance(item, AnswerCompleted):
                    self._write("\n")
                    self._status(
                        f"⟳ updating memory… ({len(item.token_ids)} tokens, first after "
                        f"{item.ttft_s * 1000:.0f} ms, {item.tokens_per_s:.0f} tok/s)"
                    )
        except KeyboardInterrupt:
            subscription.dispose()
            self._write("\n")
            self._status("[stopped] the partial answer was not written to memory")

    # ------------------------------------------------------------------ memory status (background)
    def _on_memory_event(self, event: Event) -> None:
        if isinstance(event, MemoryUpdated) and event.turn > 0:
            self._last_memory = event
            self._async_status(f"✓ memory v{event.stm_version} ({event.duration_s * 1000:.0f} ms)")

    def _async_status(self, message: str) -> None:
        """Print a status line without wrecking the line the user is typing (or, while an answer
        is being printed, once it is done, so the memory's line comes after its answer's)."""
        with self._print_lock:
            if self._answering:
                self._held.append(message)
            elif self._at_prompt and readline is not None:
                buffer = readline.get_line_buffer()
                sys.stdout.write("\r\x1b[K")
                sys.stdout.flush()
                self.console.print(message, style="dim", markup=False, highlight=False, soft_wrap=True)
                sys.stdout.write(PROMPT + buffer)
                sys.stdout.flush()
            else:
                self.console.print(message, style="dim", markup=False, highlight=False, soft_wrap=True)

    # ------------------------------------------------------------------ commands
    def _command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/exit", "/quit"):
                return "exit"
            if name == "/help":
                self.console.print(HELP, markup=False, highlight=False)
            elif name == "/reset":
                self.conv.reset()
                self._status(f"memory reset (STM v{self.conv.stm_version})")
            elif name == "/save":
                if not arg:
                    raise ValueError("usage: /save PATH")
                state = self.conv.export_state()
                state.save(Path(arg).expanduser())
                self._status(f"saved STM v{state.stm_version} (after turn {state.turn}) to {arg}")
            elif name == "/load":
                if not arg:
                    raise ValueError("usage: /load PATH")
                self.conv.load_state(ConversationState.load(Path(arg).expanduser()))
                self._status(f"loaded {arg} (now STM v{self.conv.stm_version})")
            elif name == "/stats":
                self._stats()
            elif name == "/memory":
                self._memory()
            elif name == "/temp":
                value = float(arg)
                if not value >= 0 or value == float("inf"):
                    raise ValueError("temperature must be a finite number >= 0")
                self.temperature = value
                self._status(f"temperature {value:g}" + (" (greedy)" if value == 0 else ""))
            else:
                raise ValueError(f"unknown command {name}; /help lists them")
        except (RxTError, ValueError, OSError) as exc:
            self._error(exc)
        return None

    def _stats(self) -> None:
        rows: dict[int, dict[str, Any]] = {}
        for entry in self.conv.history():
            rows.setdefault(int(entry["turn"]), {}).update(entry)
        self.console.print(
            f"conversation {self.conv.id} · STM v{self.conv.stm_version} · {len(rows)} turn{'s' * (len(rows) != 1)}",
            soft_wrap=True,
        )
        table = Table()
        for col in ("turn", "tokens", "TTFT ms", "tok/s", "queued ms", "memory ms", "STM", "end"):
            table.add_column(col, justify="right")
        for turn, r in sorted(rows.items()):
            table.add_row(
                str(turn),
                str(r.get("tokens", "")),
                _ms(r.get("ttft_s")),
                f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "",
                _ms(r.get("queued_s")),
                _ms(r.get("memory_update_s")),
                f"v{r['stm_version']}" if "stm_version" in r else "",
                str(r.get("finish_reason", "")),
            )
        self.console.print(table)

    def _memory(self) -> None:
        """Per STM layer: how far the last update moved the memory (relative to its norm, bars
        scaled to the layer that moved most) and how open the residual gates were (0 to 1)."""
        event = self._last_memory
        if event is None:
            self._status("no memory update yet")
            return
        head = f"memory v{event.stm_version} after turn {event.turn} ({event.duration_s * 1000:.0f} ms)"
        if not event.layer_change:
            self._status(f"{head}: no per-layer figures")
            return
        widest = max(max(event.layer_change), 1e-12)
        table = Table(title=head, title_justify="left")
        for col, justify in (("layer", "right"), ("moved", "left"), ("", "right"), ("gate", "left"), (" ", "right")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        gates = event.layer_gate or tuple(float("nan") for _ in event.layer_change)
        for i, (moved, gate) in enumerate(zip(event.layer_change, gates)):
            gate_cells = (Bar(1.0, 0.0, gate, width=16), f"{gate:.2f}") if gate == gate else ("", "")
            table.add_row(str(i), Bar(widest, 0.0, moved, width=24), f"{moved:.1%}", *gate_cells)
        self.console.print(table)

    # ------------------------------------------------------------------ output helpers
    def _banner(self) -> None:
        c = self.engine.config
        template = "" if c.interaction_template == "alpha" else f" · {c.interaction_template} template"
        if self.thinking_mode is not None:
            template += f" ({self.thinking_mode})"
        self.console.print(
            f"[bold]rxrt chat[/bold] · RxT {c.num_layers} layers, dim {c.dim}, STM {c.num_layers}x{c.stm_size} "
            f"slots{template} · device {self.engine.device} · /help for commands",
            soft_wrap=True,
        )
        if self.notice:
            self.console.print(self.notice, style="yellow", markup=False)

    def _write(self, text: str) -> None:
        with self._print_lock:
            self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    def _status(self, message: str) -> None:
        with self._print_lock:
            self.console.print(message, style="dim", markup=False, highlight=False, soft_wrap=True)

    def _error(self, exc: BaseException) -> None:
        with self._print_lock:
            self.console.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)

    def _setup_readline(self) -> None:
        if readline is None or self.history_file is None:
            return
        with contextlib.suppress(OSError):
            readline.read_history_file(self.history_file)
        readline.set_history_length(1000)

    def _save_history(self) -> None:
        if readline is None or self.history_file is None:
            return
        with contextlib.suppress(OSError):
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(self.history_file)


def _ms(seconds: Any) -> str:
    return "" if seconds is None else f"{float(seconds) * 1000:.0f}"
