"""The `xnat-inbox` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from .. import __version__
from ..config import DEFAULT_CONFIG_PATH, ConfigError, SiteConfig, load_config
from ..logs import configure, default_format
from .examples import CONFIGS, UNITS

EXAMPLES = """\
examples:
  xnat-inbox check                                 validate config and routes, C-ECHO, XNAT login
  xnat-inbox explain /srv/inbox/scanner/MR_0042    how a folder would be grouped and routed
  xnat-inbox --config ./config.yaml run            watch the inboxes (what systemd runs)
  xnat-inbox status                                is it running; settling, waiting, sending
  xnat-inbox retry /srv/inbox/scanner/failed/2026-11-25/MR_0042   put a failed drop back
  xnat-inbox pause xnat-web --until "2026-12-08 07:00" --reason "XNAT upgrade"
  xnat-inbox resume xnat-web                       send again (pause/resume --all: every one)
  xnat-inbox cancel MR_0042                        a waiting or sending drop to failed/
  xnat-inbox history --since 7d --failed           drops finished (failed) in the last 7 days
  xnat-inbox demo                                  a local receiver, an inbox, a real drop
  xnat-inbox example-config > config.yaml          the commented example site config

--config and --log-format go before or after the command. The site config is the one named
by --config, else by $XNAT_INBOX_CONFIG, else /etc/xnat-inbox/config.yaml.

exit codes: 0 success, 1 a check or delivery failed, 2 unusable config or arguments
"""
#: names the site config when --config does not
CONFIG_ENV = "XNAT_INBOX_CONFIG"


def _common_options(parser: argparse.ArgumentParser) -> None:
    """--config and --log-format, accepted before the command and after it (SUPPRESS: one
    not given after the command leaves the one given before it standing)."""
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help=f"site config file (default: ${CONFIG_ENV} if set, else "
                        f"{DEFAULT_CONFIG_PATH})")
    parser.add_argument("--log-format", choices=("console", "json", "journal"),
                        default=argparse.SUPPRESS,
                        help="console lines for a terminal, JSON lines for files, or fields to "
                        "the systemd journal (the default when run by systemd)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xnat-inbox",
        description="Watch inboxes for DICOM drops and deliver them to XNAT by C-STORE or REST.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"xnat-inbox {__version__}")
    _common_options(parser)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common],
                        help="watch the inboxes and deliver drops until stopped")
    commands.add_parser("check", parents=[common], help="validate the config and every "
                        "route.yaml; C-ECHO each DICOM destination, log in to each XNAT one")
    explain = commands.add_parser("explain", parents=[common],
                                  help="show how a folder or archive would be grouped, labelled, "
                                  "filtered and where it would go; sends nothing")
    explain.add_argument("path", type=Path,
                         help="a drop folder or archive (.zip, .tar, .tar.gz, .tgz), in an "
                         "inbox, or anywhere with --inbox")
    explain.add_argument("--inbox", type=Path, metavar="FOLDER",
                         help="evaluate PATH as if copied into FOLDER (an inbox or a routing "
                         "folder in one); default: where PATH is")
    explain.add_argument("--show-phi", action="store_true",
                         help="show labels derived from patient data instead of [PHI]")
    status = commands.add_parser("status", parents=[common], help="whether the daemon runs; "
                                 "drops settling, waiting, sending (with progress), done and "
                                 "failed today; destinations' health (exit 1: the daemon isn't "
                                 "running)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    retry = commands.add_parser("retry", parents=[common], help="put drops from failed/ back in "
                                "line; studies their report shows as delivered are skipped")
    retry.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                       help="a drop (folder or archive) in failed/YYYY-MM-DD/, or in the "
                       "routing folder kept below it (failed/YYYY-MM-DD/StudyV/v1)")
    retry.add_argument("--all", action="store_true", help="send delivered studies again too")
    _steering(commands, common)
    lookup = commands.add_parser(
        "lookup", parents=[common], help="PHI-BEARING: map de-identified UIDs/PatientIDs to the "
        "originals (and back) from the state database; for authorised staff only",
        description="PHI-BEARING COMMAND: prints original patient identifiers and UIDs. Run it "
        "only when authorised to re-identify; its output is not masked.")
    lookup.add_argument("values", nargs="+", metavar="VALUE",
                        help="a UID or PatientID, original or de-identified")
    demo = commands.add_parser("demo", help="generate a synthetic MR session and deliver it to an "
                               "embedded receiver on 127.0.0.1")
    demo.add_argument("--dir", type=Path, default=Path("demo-run"),
                      help="working folder for the demo (default ./demo-run, emptied first)")
    commands.add_parser("example-config", help="print the commented example site config, or a "
                        "route: " + ", ".join(CONFIGS[1:])).add_argument(
        "name", nargs="?", choices=CONFIGS, default=CONFIGS[0], metavar="FILE",
        help=f"one of {', '.join(CONFIGS)} (default {CONFIGS[0]})")
    commands.add_parser("example-unit", help="print the systemd unit (its ExecStart= runs this "
                        "xnat-inbox), or its sysusers.d account or tmpfiles.d state folder"
                        ).add_argument("name", nargs="?", choices=UNITS, default=UNITS[0],
                                       metavar="FILE", help=f"one of {', '.join(UNITS)} "
                                       f"(default {UNITS[0]})")
    return parser


def _steering(commands: Any, common: argparse.ArgumentParser) -> None:
    """pause, resume, cancel, history: for whoever may write the state database."""
    pause = commands.add_parser("pause", parents=[common], help="stop sending to a destination "
                                "after the instance in flight; its drops wait in order")
    resume = commands.add_parser("resume", parents=[common], help="send to a paused destination "
                                 "again")
    for parser in (pause, resume):
        parser.add_argument("destination", nargs="?", help="a destination of the site config")
        parser.add_argument("--all", action="store_true", help="every destination")
    pause.add_argument("--until", metavar="WHEN", help='"2026-12-08 07:00" (local time), 07:00 '
                       "(the next), or a duration: 90m, 2h, 1d; default: until resumed")
    pause.add_argument("--reason", metavar="TEXT", help="shown by status and the STATUS line")
    cancel = commands.add_parser("cancel", parents=[common], help="move waiting or sending "
                                 "drops to failed/ (a sending one at its next instance); nothing "
                                 "is deleted, retry brings them back")
    cancel.add_argument("drops", nargs="+", metavar="DROP",
                        help="a drop as status shows it: its path in the inbox, name, id, or "
                        "path on disk")
    history = commands.add_parser("history", parents=[common], help="one line per drop "
                                  "finished: when, inbox, drop, outcome, destination, studies, "
                                  "instances, bytes, seconds, first reason")
    history.add_argument("--since", default="7d", metavar="WHEN",
                         help="a duration back (7d, 12h) or a date (2026-12-01); default 7d")
    history.add_argument("--failed", action="store_true", help="only drops that failed")
    history.add_argument("--json", action="store_true", help="machine-readable output")


def config_path(args: argparse.Namespace) -> tuple[Path, str]:
    """The site config to read, and where its name came from: the command line over the
    environment over the default."""
    if getattr(args, "config", None) is not None:
        return args.config, "named by --config"
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), f"named by ${CONFIG_ENV}"
    return DEFAULT_CONFIG_PATH, f"the default; --config FILE or ${CONFIG_ENV} names another"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.dir)
    if args.command in ("example-config", "example-unit"):
        from .examples import print_example

        return print_example(args.command.removeprefix("example-"), args.name)
    path, named_by = config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"xnat-inbox: the site config is unusable ({named_by}):\n{exc}", file=sys.stderr)
        return 2
    configure(getattr(args, "log_format", None) or default_format(), config.log_phi)
    if args.command == "run":
        return run(config)
    if args.command == "lookup":
        return lookup(config, args.values)
    if args.command == "status":
        from .status import status

        return status(config, args.json)
    if args.command == "retry":
        return retry(config, args)
    if args.command in ("pause", "resume", "cancel"):
        from .steer import steer

        return steer(config, args.command, args)
    if args.command == "history":
        from .history import history
        from .when import WhenError

        try:
            return history(config, args.since, args.failed, args.json)
        except WhenError as exc:
            print(f"xnat-inbox history: --since {exc}", file=sys.stderr)
            return 2
    if args.command == "check":
        from .explain import check

        lines, ok = check(config)
        print("\n".join(lines))
        return 0 if ok else 1
    from .explain import ExplainError, explain

    try:
        for line in explain(config, args.path, args.show_phi, args.inbox):
            print(line)
    except ExplainError as exc:
        print(f"xnat-inbox explain: {exc}", file=sys.stderr)
        return 2
    return 0


def run(config: SiteConfig) -> int:
    from ..service.daemon import Daemon, StartupError

    stop = threading.Event()
    try:
        daemon = Daemon(config, stop)
    except OSError as exc:
        print(f"xnat-inbox: cannot start: state_dir {config.state_dir}: {exc.strerror}",
              file=sys.stderr)
        return 2

    def request_stop(signum: int, _: FrameType | None) -> None:
        stop.set()

    def request_reload(signum: int, _: FrameType | None) -> None:
        daemon.reload_requested.set()  # the main loop reloads: not in a signal handler

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    try:
        daemon.run()
    except StartupError as exc:
        print(f"xnat-inbox: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def lookup(config: SiteConfig, values: list[str]) -> int:
    """Print the de-identification map's rows for each value (PHI: never logged)."""
    from ..service.state import State

    state = State(config.state_dir)
    try:
        code = 0
        for value in values:
            rows = state.deid_lookup(value)
            if not rows:
                print(f"{value}: not in the de-identification map", file=sys.stderr)
                code = 1
            for kind, original, replacement in rows:
                print(f"{kind}\t{original}\t{replacement}")
        return code
    finally:
        state.close()


def retry(config: SiteConfig, args: argparse.Namespace) -> int:
    from ..service.state import State
    from .retry import RetryError, requeue

    state = State(config.state_dir)
    try:
        code = 0
        for path in args.paths:
            try:
                print(requeue(config, state, path, args.all))
            except (RetryError, OSError) as exc:
                print(f"xnat-inbox retry: {exc}", file=sys.stderr)
                code = 1
        return code
    finally:
        state.close()


if __name__ == "__main__":
    sys.exit(main())
