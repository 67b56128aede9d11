"""The ``weightzoo`` command line. Each subcommand lives in ``weightzoo/cli/commands/<name>.py``.

A command module defines ``HELP`` (its one-sentence summary) and ``register(subparsers)``, which adds
its parser and sets ``func``; heavy imports (torch, diffusers, prefect) happen inside the command, so
``weightzoo --help`` and a mistyped command answer at once. Every path flag is made absolute and every
``--out`` is checked against dataset folders here, before a command runs (weightzoo.cli.paths).

A fault is named by the operation that failed, not by its exception's type: storage calls raise
``StorageError`` naming the URI they touched (storage/fs.py ``storage_step``, ``health.probe`` for every
object-store flag before the command), a Prefect API call's fault names the API URL, a closed stdout
(``weightzoo status --json | head -1``) ends quietly as git does (exit 141), and SIGINT/SIGTERM end in one
line with exit 130/143. Only what is left unnamed after that is guessed from its cause chain here.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import os
import re
import select
import signal
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

from pydantic import ValidationError

from weightzoo import __version__
from weightzoo.cli.commands.options import HELP_FORMATTER
from weightzoo.cli.paths import absolute_paths, check_dataset, check_out
from weightzoo.cli.progress import HIDDEN
from weightzoo.cli.quiet import LOG_FORMATS, quiet
from weightzoo.cli.server import mark_process, patient_server, reap_orphan_servers
from weightzoo.errors import WeightzooError
from weightzoo.tasks.device import use_free_cores

# Set before prefect/transformers are imported: no telemetry calls from a closed network, no noise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weightzoo never downloads; fail fast if anything tries

# Order is the order `weightzoo --help` lists them.
COMMANDS = ["demo", "base", "manifest", "build", "serve", "status", "verify", "gc", "files", "export", "merge", "publish", "train-diffusion", "generate", "init", "fit-subspace", "sample", "edit", "invert", "project"]


class _Parser(argparse.ArgumentParser):
    """Help states each flag's real default (weightzoo.cli.commands.options); a mistyped flag or command
    gets this parser's usage and the nearest real one."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HELP_FORMATTER)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{_suggestion(self, message)}\n")


class _CommandParser(_Parser):
    """A subcommand's parser: the output flags work after the command too (``weightzoo build -v``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if self.add_help:  # the stand-ins `weightzoo --help` lists take no flags
            _output_flags(self, argparse.SUPPRESS)


def _suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    """``; did you mean --batch-size?`` for an unknown flag, command or choice close to a real one."""
    if m := re.search(r"unrecognized arguments: (\S+)", message):
        word, choices = m[1].split("=", 1)[0], [s for s in parser._option_string_actions if s.startswith("--")]
    elif m := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
        word, choices = m[1], re.findall(r"'([^']*)'", m[2])
    else:
        return ""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _output_flags(parser: argparse.ArgumentParser, default: object) -> None:
    """-v / --quiet / --log-format, on the top-level parser and (defaults suppressed) on every command."""
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", default=default,
                      help="Also show Prefect's run logs, library warnings and progress bars.")
    loud.add_argument("-q", "--quiet", action="store_true", default=default,
                      help="Print errors only (and what --json asks for).")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text" if default is False else default,
                        help="How log lines and errors are printed on stderr.")


def _summary(module: object) -> str:
    """A command's line in ``weightzoo --help``: its ``HELP`` sentence."""
    return str(module.HELP)


def _description(module: object) -> str:
    """A command's ``--help`` description: its module docstring without RST markup or the name prefix."""
    text = (getattr(module, "__doc__", "") or "").strip()
    text = re.sub(r"^``weightzoo [\w-]+``:\s*", "", text)
    text = re.sub(r":\w+:`([^`]+)`", r"\1", text).replace("``", "")
    return text[:1].upper() + text[1:]


def build_parser(command: str | None = None, full: bool = False) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are built (all with ``full``), since a command's flags come
    from its pydantic models, whose modules import torch: ``weightzoo --help`` stays fast."""
    parser = _Parser(
        prog="weightzoo",
        description="Build datasets of fine-tuned LoRAs with Prefect, store them as Parquet, learn from them.",
    )
    _output_flags(parser, False)
    parser.add_argument("--version", action="version", version=f"weightzoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    for name in COMMANDS:
        module = importlib.import_module(f"weightzoo.cli.commands.{name.replace('-', '_')}")
        if full or name == command:
            module.register(sub)
            sub.choices[name].description = sub.choices[name].description or _description(module)
        else:
            sub.add_parser(name, help=_summary(module), add_help=False)
    return parser


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):  # a model built from the user's flags refused them
        # pydantic prefixes a validator's own sentence with "Value error, ": the sentence is what the user needs
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {str(e['msg']).removeprefix('Value error, ')}"
                         for e in exc.errors())
    return " ".join(str(exc).split())


def _print_error(args: argparse.Namespace, exc: Exception) -> None:
    text = _one_line(exc)
    if args.log_format == "json":
        line = json.dumps({"level": "error", "command": args.command, "error": type(exc).__name__, "message": text})
        print(line, file=sys.stderr)
    else:
        print(f"weightzoo {args.command}: error: {text}", file=sys.stderr)


OBJECT_STORES = ("s3://", "s3a://", "gs://", "gcs://", "abfs://", "az://")


def _probe_storage(args: argparse.Namespace) -> None:
    """Every storage a command names (its dataset, and any object-store URI among its path flags: --out,
    --manifest, --base, ...) is asked once, fast, before the command touches it: an endpoint nothing
    listens on, refused credentials or a missing bucket is one line in seconds naming that URI, not
    after the store client's own retries (11 s and more per request), and not blamed on the dataset."""
    from weightzoo.cli.paths import PATH_DESTS

    dataset = getattr(args, "dataset", None)
    uris = [dataset] if isinstance(dataset, str) and "://" in dataset else []
    uris += [v for d in PATH_DESTS if d != "dataset" and isinstance(v := getattr(args, d, None), str)
             and v.startswith(OBJECT_STORES)]
    if uris:
        from weightzoo.storage.health import probe

        for uri in dict.fromkeys(uris):
            probe(uri)


class Interrupted(WeightzooError):
    """The command was stopped by a signal (SIGINT from a terminal, SIGTERM from a scheduler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.code = 128 + signum


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so it unwinds (and cleans up) as Ctrl-C does."""


def _signal_raised(exc: BaseException | None) -> int | None:
    """The signal whose handler raised ``exc`` (ours, or Prefect's SIGTERM bridge during a flow run), if any."""
    from weightzoo.tasks import stop

    if isinstance(exc, _Terminated):
        return signal.SIGTERM
    if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, stop.Stopped):
        return signal.SIGINT
    signum = getattr(exc, "signal", None)
    return signum if type(exc).__name__ == "TerminationSignal" and isinstance(signum, int) else None


_commanding = threading.Event()  # set while ``_sigterm_as_interrupt`` holds the signal handlers


def _redeliver(signum: int) -> None:
    """Sends ``signum`` to the main thread again in a moment, by which time it has left the finalizer (a real
    signal, so it also wakes a blocking wait, which ``_thread.interrupt_main`` would not)."""
    import time

    main = threading.main_thread().ident

    def later() -> None:
        time.sleep(0.05)
        if _commanding.is_set():  # not once the command has ended and the default handlers are back
            signal.pthread_kill(main, signum)  # type: ignore[arg-type]

    threading.Thread(target=later, name="weightzoo-signal", daemon=True).start()


def _unraisable(previous: object) -> object:
    """A ``sys.unraisablehook`` for signals that land in a finalizer (a ``__del__``, a weakref callback: the
    collector runs them at any moment, asyncio's transports among them). Python prints, then swallows, what
    a finalizer raises ("Exception ignored in ..."), so a handler's KeyboardInterrupt, or Prefect's
    TerminationSignal, would be a traceback and no stop (seen: a stray traceback on SIGINT in CI, and a build
    that never stopped on SIGTERM). The stop is requested and the signal sent again, outside the finalizer."""

    def hook(unraisable: object) -> None:
        from weightzoo.tasks import stop

        signum = _signal_raised(getattr(unraisable, "exc_value", None))
        if signum is None:
            return previous(unraisable)  # type: ignore[operator]
        stop.request(signum)
        _redeliver(signum)

    return hook


def _on_sigterm(signum: int, frame: object) -> None:
    from weightzoo.tasks import stop

    stop.request(signum)  # worker threads (a build's batches) stop at their next step
    raise _Terminated()


def _on_sigint(signum: int, frame: object) -> None:
    from weightzoo.tasks import stop

    stop.request(signum)
    raise KeyboardInterrupt


def _stdout_closed() -> bool:
    """Whether nobody reads this process's stdout any more: its pipe's reader is gone (poll says POLLERR)."""
    try:
        fd = sys.__stdout__.fileno()  # type: ignore[union-attr]
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _quiet_exit_on_closed_stdout() -> int:
    """As git does when its reader goes (``| head``, ``| true``): no message, exit 128 + SIGPIPE. The closed
    stdout is replaced with /dev/null so the interpreter's last flush does not complain either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.__stdout__.fileno())  # type: ignore[union-attr]
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _unnamed_fault(args: argparse.Namespace, e: Exception) -> WeightzooError | None:
    """A fault no boundary named: a Prefect API call's (by the API URL), else a storage client's (by the
    dataset URI, the command's storage); None keeps the traceback (a bug)."""
    from weightzoo.cli.server import prefect_fault
    from weightzoo.storage.health import storage_fault

    target = getattr(args, "dataset", None) or getattr(args, "path", None) or "the dataset"
    return _api_unreachable(e) or prefect_fault(e) or storage_fault(e, target)


def _api_unreachable(exc: BaseException) -> WeightzooError | None:
    """Nothing answering at the Prefect API's address, told by the request that found it out (an httpx
    connection error to the API URL): one line naming that URL, never the storage."""
    from weightzoo.storage.retry import chain

    api = os.environ.get("PREFECT_API_URL")
    for e in chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        if not type(e).__module__.startswith("httpx") or not names & {"ConnectError", "RemoteProtocolError"}:
            continue
        try:
            url = str(e.request.url)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # httpx: an exception without its request
            continue
        if url.startswith(api.rstrip("/")) if api else url.startswith(("http://127.0.0.1:", "http://localhost:")):
            where = api or "the temporary server this command started"
            return WeightzooError(f"the Prefect API ({where}) does not answer ({type(e).__name__}: {str(e)[:120]}); "
                                  "start it (weightzoo serve) or set PREFECT_API_URL to a running server")
    return None


def _run(args: argparse.Namespace) -> int:
    """Paths made absolute, ``--out`` checked, then the command; with --quiet its stdout is dropped
    unless it prints what --json asked for."""
    absolute_paths(args)
    check_dataset(args)
    check_out(args)
    _probe_storage(args)
    if not args.quiet or getattr(args, "json", False):
        return int(args.func(args) or 0)
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            return int(args.func(args) or 0)
        finally:
            sys.stdout = stdout


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _refuse_unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A flag the command does not have is reported by the command's parser (its usage, the nearest
    flag), before argparse complains about the required flags the typo left out."""
    for token in argv[argv.index(parser.prog.split()[-1]) + 1:]:
        flag = token.split("=", 1)[0]
        if flag == "--":
            return
        known = flag in parser._option_string_actions or any(s.startswith(flag) for s in parser._option_string_actions)
        if flag.startswith("--") and not known:
            parser.error(f"unrecognized arguments: {token}")


def _early(argv: list[str], command: str | None) -> argparse.Namespace:
    """The output flags read from the raw arguments, before any parser is built: a command's parser may
    import torch, diffusers and huggingface_hub, which read their verbosity from the environment then."""
    json_logs = "--log-format=json" in argv or any(
        a == "--log-format" and b == "json" for a, b in zip(argv, argv[1:], strict=False))
    return argparse.Namespace(command=command, log_format="json" if json_logs else "text",
                              verbose=bool({"-v", "--verbose"} & set(argv)), quiet=bool({"-q", "--quiet"} & set(argv)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mark_process()  # a temporary Prefect server this command starts is reaped by the next, should this one be killed
    reap_orphan_servers()
    patient_server()  # Prefect's temporary server may take a minute to start on a busy machine: wait, and say so
    use_free_cores()  # torch threads for the cores others leave free, set before any command imports torch
    command = next((a for a in argv if a in COMMANDS), None)
    early = _early(argv, command)
    quiet(verbose=early.verbose, errors_only=early.quiet, log_format=early.log_format)
    if command:  # a command's light checks first: its full parser may import torch (flags from models)
        module = importlib.import_module(f"weightzoo.cli.commands.{command.replace('-', '_')}")
        try:
            getattr(module, "precheck", lambda _: None)(argv[argv.index(command) + 1:])
        except (WeightzooError, ValidationError) as e:
            _print_error(early, e)
            return 2
    parser = build_parser(command)
    if command:
        _refuse_unknown_flags(_command_parser(parser, command), argv)
    args = parser.parse_args(argv)
    HIDDEN["bars"] = args.quiet or args.log_format == "json"
    with _sigterm_as_interrupt():
        return _main(args)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds the command as Ctrl-C does (its ``finally`` blocks run, the exit is one line and 143),
    where nothing else owns SIGTERM; the previous handler is back afterwards (``main`` called in-process)."""
    from weightzoo.tasks import stop

    main = threading.current_thread() is threading.main_thread()
    owned = main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    own_int = main and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stop.reset()
    if owned:
        signal.signal(signal.SIGTERM, _on_sigterm)
    if own_int:  # Ctrl-C as before, and the build's worker threads are told too
        signal.signal(signal.SIGINT, _on_sigint)
    previous_hook = sys.unraisablehook
    if main:
        sys.unraisablehook = _unraisable(previous_hook)  # type: ignore[assignment]
        _commanding.set()
    try:
        yield
    finally:
        _commanding.clear()
        sys.unraisablehook = previous_hook
        if owned and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if own_int and signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _main(args: argparse.Namespace) -> int:
    """The command, and what its end is reported as: a result, one line, or (a bug) a traceback."""
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        stopped = Interrupted(signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
        _print_error(args, stopped)
        return stopped.code
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return _quiet_exit_on_closed_stdout()
    except (WeightzooError, ValidationError) as e:  # user errors: one line; anything else keeps its traceback
        _print_error(args, e)
        return 2
    except Exception as e:  # a storage or Prefect API fault no boundary named is one line too; a bug is not
        fault = _unnamed_fault(args, e)
        if fault is None:
            raise
        _print_error(args, fault)
        return 2
    except BaseException as e:  # Prefect's TerminationSignal: a flow run stopped by SIGTERM
        signum = _signal_raised(e)
        if signum is None:
            raise
        stopped = Interrupted(signum)
        _print_error(args, stopped)
        return stopped.code


if __name__ == "__main__":
    sys.exit(main())
