"""Print xnat-inbox(1) in roff, from the command line's own parser: the commands and their
one-line help as `xnat-inbox --help` shows them, then where the rest is written. Run by the
Python of the venv being packaged (build.py), so the page matches the program it ships with."""

from __future__ import annotations

import argparse
import sys
from datetime import date

from xnat_inbox import __version__
from xnat_inbox.commands.cli import build_parser


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def commands(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """Each command's name and help, in the order --help lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [(choice.dest, choice.help or "") for choice in action._choices_actions]
    return []


def page() -> str:
    parser = build_parser()
    lines = [
        f'.TH XNAT-INBOX 1 "{date.today():%Y-%m-%d}" "xnat-inbox {__version__}" "User Commands"',
        ".SH NAME",
        "xnat\\-inbox \\- " + roff(parser.description or ""),
        ".SH SYNOPSIS",
        ".B xnat\\-inbox",
        "[\\fB\\-\\-config\\fR \\fIFILE\\fR] [\\fB\\-\\-log\\-format\\fR "
        "\\fIconsole\\fR|\\fIjson\\fR|\\fIjournal\\fR] \\fICOMMAND\\fR [\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        "A watch-folder daemon: drops (DICOM folders or archives) copied into an inbox are "
        "grouped by study, routed by their route.yaml, sent by DICOM C\\-STORE or XNAT's REST "
        "import service, verified, and moved to done/ or failed/ with a report and a log. "
        "The service runs \\fBxnat\\-inbox run\\fR; the other commands inspect and operate it.",
        ".PP",
        "Each command's options: \\fBxnat\\-inbox\\fR \\fICOMMAND\\fR \\fB\\-\\-help\\fR.",
        ".SH COMMANDS",
    ]
    for name, text in commands(parser):
        lines += [".TP", f"\\fB{roff(name)}\\fR", roff(text)]
    lines += [
        ".SH OPTIONS",
        ".TP", "\\fB\\-\\-config\\fR \\fIFILE\\fR",
        "the site config; default: $XNAT_INBOX_CONFIG if set, else /etc/xnat\\-inbox/config.yaml",
        ".TP", "\\fB\\-\\-log\\-format\\fR \\fIconsole\\fR|\\fIjson\\fR|\\fIjournal\\fR",
        "console lines for a terminal, JSON lines for files, journal fields under systemd "
        "(the default there)",
        ".TP", "\\fB\\-\\-version\\fR, \\fB\\-\\-help\\fR", "",
        ".SH EXIT STATUS",
        "0 success; 1 a check or delivery failed (status: the daemon isn't running); 2 an "
        "unusable config or arguments, or the daemon can't start.",
        ".SH FILES",
        ".TP", "/etc/xnat\\-inbox/config.yaml",
        "the site config (\\fBxnat\\-inbox example\\-config\\fR prints the commented original)",
        ".TP", "/etc/xnat\\-inbox/route.yaml",
        "a route template for the inboxes",
        ".TP", "/var/lib/xnat\\-inbox",
        "the state database; the home of the xnat\\-inbox account",
        ".TP", "/lib/systemd/system/xnat\\-inbox.service",
        "the unit; site settings go in a drop\\-in: \\fBsystemctl edit xnat\\-inbox\\fR",
        ".SH SEE ALSO",
        "/usr/share/doc/xnat\\-inbox/README.md, and in docs/ there: configuration.md (every key "
        "of config.yaml and route.yaml), operations.md (the service, upgrades, journal, "
        "troubleshooting by symptom).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(page())
