"""What tests/test_deb.py uses: `make dist deb` run side by side, dpkg run under a stand-in
systemd, the package's daemon run as its account, and the paths the package touches."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tests.daemon_runner import REPO, DaemonProcess, wait_for_report
from tests.systemd_support import QUIET
from xnat_inbox.commands.synthetic import SeriesSpec, write_session

PACKAGE = "xnat-inbox"
ACCOUNT = "xnat-inbox"
STATE = Path("/var/lib/xnat-inbox")
ETC = Path("/etc/xnat-inbox")
OPT = Path("/opt/xnat-inbox")
UNIT = Path("/lib/systemd/system/xnat-inbox.service")
#: what dpkg and the package touch beyond its own files; none may exist before the test
FOOTPRINT = (ETC, OPT, STATE, UNIT, Path("/usr/bin/xnat-inbox"))
RESTART_FLAG = Path("/run/xnat-inbox.dpkg-restart")  # prerm to postinst: it was running
POLICY = "/usr/sbin/policy-rc.d"
DSH_STATE = Path("/var/lib/systemd/deb-systemd-helper-enabled/xnat-inbox.service.dsh-also")
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NEWER = f"{VERSION}.post1"  # Debian: {VERSION}+post1, newer than {VERSION}
#: a line added to the example files of the newer package, so that dpkg has to choose
CHANGED = "# changed in the newer package\n"


def tools_missing() -> str | None:
    for tool in ("dpkg", "dpkg-deb", "dpkg-shlibdeps", "make"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make system-deps installs dpkg-dev)"
    if subprocess.run(["/usr/bin/python3", "-c", "import ensurepip"], capture_output=True,
                      check=False).returncode != 0:
        return "Debian's /usr/bin/python3 with python3-venv is needed (make system-deps)"
    return None


@dataclass
class Built:
    deb: Path
    wheel: Path
    sdist: Path


def make_deb(sources: dict[str, Path], out: Path) -> dict[str, Built]:
    """`make dist deb` in each source at once, writing into out/<name>, with this test run's
    Python: its [test] extra holds build and twine, so make installs nothing (DIST_TOOLS=)."""
    running = {name: subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(source), "dist", "deb",
         f"DIST={out / name}", f"BIN={Path(sys.executable).parent}", "DIST_TOOLS="],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for name, source in sources.items()}
    built = {}
    try:
        for name, process in running.items():
            output, _ = process.communicate(timeout=600)
            assert process.returncode == 0, output[-6000:]
            [deb] = (out / name).glob("xnat-inbox_*.deb")
            [wheel] = (out / name).glob("xnat_inbox-*.whl")
            [sdist] = (out / name).glob("xnat_inbox-*.tar.gz")
            built[name] = Built(deb, wheel, sdist)
    finally:
        for process in running.values():
            if process.poll() is None:  # make, and the pip and python it runs (its session)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return built


def installed_status() -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True,
                          text=True, check=False).stdout


def account_exists() -> bool:
    try:
        pwd.getpwnam(ACCOUNT)
    except KeyError:
        return False
    return True


class FakeSystemd:
    """dpkg run where maintainer scripts see a running systemd: a private mount namespace with
    a tmpfs on /run holding systemd/system/, and a `systemctl` that logs each call and keeps
    the unit's active state in a file. A restart flag left in that /run is reported. Docker's
    /usr/sbin/policy-rc.d (exit 101: start nothing) is covered by one allowing it all, as on
    a server."""

    SCRIPT = """#!/bin/sh
echo "$*" >> "$FAKE_SYSTEMD/calls"
case " $* " in
*" is-active "*) [ -e "$FAKE_SYSTEMD/active" ] ;;
*" is-enabled "*) echo disabled; exit 1 ;;
*" start "*|*" restart "*) touch "$FAKE_SYSTEMD/active" ;;
*" stop "*) rm -f "$FAKE_SYSTEMD/active" ;;
esac
"""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "bin").mkdir(parents=True)
        systemctl = folder / "bin" / "systemctl"
        systemctl.write_text(self.SCRIPT)
        systemctl.chmod(0o755)
        (folder / "bin" / "policy-rc.d").write_text("#!/bin/sh\nexit 0\n")
        (folder / "bin" / "policy-rc.d").chmod(0o755)

    def set_active(self, active: bool) -> None:
        (self.folder / "active").unlink(missing_ok=True)
        if active:
            (self.folder / "active").touch()

    @property
    def active(self) -> bool:
        return (self.folder / "active").exists()

    def calls(self) -> list[str]:
        """The calls since the last look, and forget them."""
        log = self.folder / "calls"
        found = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return found

    def dpkg(self, *args: str) -> str:
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system || exit 99\n'
                   f'if [ -e {POLICY} ]; then mount --bind "$FAKE_SYSTEMD/bin/policy-rc.d" '
                   f'{POLICY} || exit 99; fi\n'
                   '"$@"; code=$?\n'
                   f'if [ -e {RESTART_FLAG} ]; then echo "restart flag left"; fi\n'
                   'exit $code', "fake-systemd"]
        env = {**os.environ, "FAKE_SYSTEMD": str(self.folder), "DEBIAN_FRONTEND": "noninteractive",
               "PATH": f"{self.folder / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                       "/sbin:/bin"}
        result = subprocess.run([*wrapper, "dpkg", *args], env=env, capture_output=True,
                                text=True, timeout=300, check=False, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "restart flag left" not in result.stdout
        return result.stdout + result.stderr


class InstalledDaemon(DaemonProcess):
    """The package's /usr/bin/xnat-inbox with the package's default config, as the package's
    account, in the foreground: nothing of this checkout or its venv on its paths."""

    def launch(self) -> InstalledDaemon:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(QUIET, PATH="/usr/sbin:/usr/bin:/sbin:/bin", PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["setpriv", f"--reuid={ACCOUNT}", f"--regid={ACCOUNT}", "--init-groups", "--",
                 "/usr/bin/xnat-inbox", "--log-format", "json", "run"],
                stdout=log, stderr=log, cwd="/", env=env)
        return self


def deliver(site: Path, inbox: Path, name: str, log: Path) -> dict:
    """Run the installed daemon until the drop `name` (3 instances) is delivered."""
    account = pwd.getpwnam(ACCOUNT)
    staging = site / f"staging-{name}"
    write_session(staging, series=(SeriesSpec("T1", 3),))
    for path in [staging, *staging.rglob("*")]:  # the daemon moves the drop: it must own it
        os.chown(path, account.pw_uid, account.pw_gid)
    process = InstalledDaemon(ETC / "config.yaml", log)
    try:
        process.start()
        with open(f"/proc/{process.pid}/cmdline", "rb") as cmdline:
            assert cmdline.read().split(b"\0")[:2] == [b"/opt/xnat-inbox/bin/python",
                                                       b"/usr/bin/xnat-inbox"]
        staging.rename(inbox / name)
        outcome, report, _ = wait_for_report(inbox, name, daemon=process)
    finally:
        assert process.stop() == 0, process.text()[-3000:]
    assert outcome == "done", report["reasons"]
    return report


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def owner_and_mode(path: Path) -> tuple[str, str, int]:
    info = path.stat()
    return (pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name,
            stat.S_IMODE(info.st_mode))
