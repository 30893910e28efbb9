"""`xnat-inbox example-config` and `example-unit`: the commented example site config and routes,
and the systemd unit with its account and state directory, as shipped in the package
(xnat_inbox/examples/). An installation from the wheel has no checkout to copy them from."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

#: what each command prints: its choices, the first one the default
CONFIGS = ("config.yaml", "route.yaml", "routes/study-by-folder.yaml")
UNITS = ("service", "sysusers", "tmpfiles")
#: the unit's ExecStart= as written: the Debian package's venv, and the pip way's advice
UNIT_PROGRAM = "/opt/xnat-inbox/bin/xnat-inbox"


def example_text(kind: str, name: str) -> str:
    """The text of one example file: kind "config" (a name of CONFIGS) or "unit" (of UNITS)."""
    examples = files("xnat_inbox").joinpath("examples")
    if kind == "config":
        return examples.joinpath("etc", *name.split("/")).read_text(encoding="utf-8")
    return examples.joinpath("systemd", f"xnat-inbox.{name}").read_text(encoding="utf-8")


def installed_program() -> Path | None:
    """This installation's own `xnat-inbox`, beside the Python running it (a venv's or
    pipx's bin/), or None when it has none there (run as `python -m xnat_inbox`)."""
    program = Path(sys.executable).parent / "xnat-inbox"
    return program if program.is_file() and " " not in str(program) else None  # unquoted


def print_example(kind: str, name: str) -> int:
    text = example_text(kind, name)
    program = installed_program()
    if kind == "unit" and name == "service" and program is not None:
        # the unit runs the xnat-inbox that printed it (e.g. installed by pipx elsewhere)
        text = text.replace(f"ExecStart={UNIT_PROGRAM} ", f"ExecStart={program} ")
    sys.stdout.write(text)
    return 0
