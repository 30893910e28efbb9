"""Issue 21: the Debian package, the wheel and the sdist.

`make dist deb` builds the wheel, the sdist and xnat-inbox_<version>_<arch>.deb; a second
package, one version newer with changed example files, is built from a copy of the checkout.
The packages are inspected (dpkg-deb -c and -I), then installed on this machine with dpkg
(root, as CI runs), the installed daemon delivers a drop to a storescp in the foreground as
the package's account, the newer package upgrades it keeping the edited config, and dpkg -r
and dpkg -P remove it. Whatever the test installs is removed at the end, also on failure.

systemd is not PID 1 here. The maintainer scripts' systemctl calls (daemon-reload; stop and
start around an upgrade of a running service; never start or enable on a fresh install) are
recorded by running dpkg in a private mount namespace where /run/systemd/system exists and
`systemctl` is a script that logs its arguments and keeps "active" in a file.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemon_runner import REPO, dicom_destination
from tests.deb_support import (
    ACCOUNT,
    CHANGED,
    DSH_STATE,
    ETC,
    FOOTPRINT,
    NEWER,
    OPT,
    PACKAGE,
    RESTART_FLAG,
    STATE,
    UNIT,
    VERSION,
    Built,
    FakeSystemd,
    account_exists,
    deliver,
    installed_status,
    make_deb,
    owner_and_mode,
    run,
    tools_missing,
)
from xnat_inbox.commands.cli import main

pytestmark = pytest.mark.systemd

@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """This checkout's package, and a newer one whose config.yaml and route.yaml differ, built
    side by side."""
    if reason := tools_missing():
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("deb")
    newer = work / "newer-source"
    shutil.copytree(REPO, newer, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".*_cache",
        ".hypothesis", "demo-run"))
    pyproject = newer / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(f'version = "{VERSION}"',
                                                       f'version = "{NEWER}"', 1))
    for name in ("config.yaml", "route.yaml"):
        example = newer / "etc/xnat-inbox" / name
        example.write_text(example.read_text() + CHANGED)
    return make_deb({"old": REPO, "new": newer}, work)


# --- the wheel and the sdist ----------------------------------------------------------------

def test_example_commands_print_the_shipped_files(capsys):
    """From this checkout: the package data are the links to etc/xnat-inbox/ and systemd/."""
    def cli(*args: str) -> str:
        assert main(list(args)) == 0
        return capsys.readouterr().out
    for name in ("config.yaml", "route.yaml", "routes/study-by-folder.yaml"):
        assert cli("example-config", name) == (REPO / "etc/xnat-inbox" / name).read_text()
    assert cli("example-config") == (REPO / "etc/xnat-inbox/config.yaml").read_text()
    for kind in ("sysusers", "tmpfiles"):
        assert cli("example-unit", kind) == (REPO / f"systemd/xnat-inbox.{kind}").read_text()
    unit = (REPO / "systemd/xnat-inbox.service").read_text()
    program = Path(sys.executable).parent / "xnat-inbox"  # this venv's, as pip installed it
    assert cli("example-unit") == unit.replace("/opt/xnat-inbox/bin/xnat-inbox", str(program))



def test_wheel_and_sdist_are_clean_and_carry_the_examples(packages, tmp_path):
    built = packages["old"]
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(built.wheel),
                            str(built.sdist)], capture_output=True, text=True, timeout=120,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    examples = {"etc/config.yaml": "etc/xnat-inbox/config.yaml",
                "etc/route.yaml": "etc/xnat-inbox/route.yaml",
                "etc/routes/study-by-folder.yaml": "etc/xnat-inbox/routes/study-by-folder.yaml",
                **{f"systemd/xnat-inbox.{kind}": f"systemd/xnat-inbox.{kind}"
                   for kind in ("service", "sysusers", "tmpfiles")}}
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
        for packaged, original in examples.items():
            assert wheel.read(f"xnat_inbox/examples/{packaged}") == (REPO / original).read_bytes()
        metadata = wheel.read(f"xnat_inbox-{VERSION}.dist-info/METADATA").decode()
        wheel.extractall(tmp_path / "wheel")
    assert f"xnat_inbox-{VERSION}.dist-info/licenses/docs/LICENSE" in names
    assert re.search(rf"^Version: {re.escape(VERSION)}$", metadata, re.M)
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "daemon/"))]

    with tarfile.open(built.sdist) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    for needed in ("docs/LICENSE", "README.md", "pyproject.toml",
                   "daemon/xnat_inbox/examples/etc/config.yaml",
                   "daemon/xnat_inbox/examples/systemd/xnat-inbox.service"):
        assert needed in members, needed
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]

    # the wheel's own copy prints them (PYTHONPATH comes before this checkout's install)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "wheel")}
    def wheel_cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "xnat_inbox", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, check=True, timeout=60).stdout
    assert wheel_cli("--version") == f"xnat-inbox {VERSION}\n"
    assert wheel_cli("example-config") == (REPO / "etc/xnat-inbox/config.yaml").read_text()
    assert wheel_cli("example-config", "routes/study-by-folder.yaml") == \
        (REPO / "etc/xnat-inbox/routes/study-by-folder.yaml").read_text()
    assert wheel_cli("example-unit", "sysusers") == \
        (REPO / "systemd/xnat-inbox.sysusers").read_text()
    unit = wheel_cli("example-unit")  # ExecStart= the xnat-inbox beside this Python
    assert f"ExecStart={Path(sys.executable).parent / 'xnat-inbox'} --config" in unit
    assert unit.replace(str(Path(sys.executable).parent / "xnat-inbox"),
                        "/opt/xnat-inbox/bin/xnat-inbox") == \
        (REPO / "systemd/xnat-inbox.service").read_text()


# --- the package as built -------------------------------------------------------------------

def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_package_holds_the_venv_unit_account_conffiles_docs_and_depends_on_runtime_only(
        packages):
    deb = packages["old"].deb
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert deb.name == f"xnat-inbox_{VERSION}_{arch}.deb"
    assert deb_field(deb, "Package") == PACKAGE and deb_field(deb, "Version") == VERSION
    assert deb_field(packages["new"].deb, "Version") == f"{VERSION}+post1"
    depends = [d.split()[0] for d in deb_field(deb, "Depends").split(", ")]
    python = os.path.basename(os.path.realpath("/usr/bin/python3"))  # python3.11
    assert python in depends and "libsystemd0" in depends and "systemd-sysusers" in depends
    assert not {"dcmtk", "orthanc", "gcc", "libsystemd-dev", "python3-dev"} & set(depends)
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                               text=True, check=True).stdout.split()
    assert conffiles == ["/etc/xnat-inbox/config.yaml", "/etc/xnat-inbox/route.yaml"]
    for script in ("postinst", "prerm", "postrm"):
        assert subprocess.run(["dpkg-deb", "-I", str(deb), script], capture_output=True,
                              check=False).returncode == 0, script

    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    entries = {}
    for line in listing:  # "-rw-r--r-- root/root 3206 2026-12-08 01:24 ./lib/...[ -> target]"
        mode, owner, _, _, _, path = line.split(None, 5)
        path, _, target = path.partition(" -> ")
        entries["/" + path.lstrip("./").rstrip("/")] = (mode, owner, target)
    assert {owner for _, owner, _ in entries.values()} == {"root/root"}
    for path in ("/lib/systemd/system/xnat-inbox.service", "/usr/lib/sysusers.d/xnat-inbox.conf",
                 "/usr/lib/tmpfiles.d/xnat-inbox.conf", "/opt/xnat-inbox/bin/xnat-inbox",
                 "/opt/xnat-inbox/pyvenv.cfg", "/usr/share/doc/xnat-inbox/README.md",
                 "/usr/share/doc/xnat-inbox/copyright", "/usr/share/doc/xnat-inbox/changelog.gz",
                 "/usr/share/doc/xnat-inbox/docs/operations.md",
                 "/usr/share/man/man1/xnat-inbox.1.gz"):
        assert entries[path][0].startswith("-"), path
    assert entries["/etc/xnat-inbox/config.yaml"][0] == "-rw-r--r--"  # 0640 by postinst
    assert entries["/usr/bin/xnat-inbox"][2] == "/opt/xnat-inbox/bin/xnat-inbox"
    assert entries[f"/opt/xnat-inbox/bin/{python}"][2] == f"/usr/bin/{python}"
    assert any(re.search(r"/site-packages/systemd/_daemon\..*\.so$", p) for p in entries)
    # an installed program, not a development venv: no pip or setuptools to write into it
    assert not [p for p in entries if re.search(r"/site-packages/(pip|setuptools)/", p)]
    outside = [p for p in entries if not p.startswith((
        "/opt/xnat-inbox", "/etc/xnat-inbox", "/usr/share/doc/xnat-inbox",
        "/usr/lib/sysusers.d/xnat-inbox.conf", "/usr/lib/tmpfiles.d/xnat-inbox.conf",
        "/lib/systemd/system/xnat-inbox.service", "/usr/bin/xnat-inbox",
        "/usr/share/man/man1/xnat-inbox.1.gz"))
        and p not in ("/", "/etc", "/lib", "/lib/systemd", "/lib/systemd/system", "/opt", "/usr",
                      "/usr/bin", "/usr/lib", "/usr/lib/sysusers.d", "/usr/lib/tmpfiles.d",
                      "/usr/share", "/usr/share/doc", "/usr/share/man", "/usr/share/man/man1")]
    assert not outside


# --- installed on this machine --------------------------------------------------------------

@pytest.fixture
def machine(tmp_path: Path) -> Iterator[FakeSystemd]:
    """Refuses a machine where xnat-inbox is installed already (not ours to touch); afterwards
    purges the package, and removes the account and what the test left, also on failure."""
    if os.geteuid() != 0:
        pytest.skip("installs the .deb with dpkg -i: needs root (as CI runs)")
    if reason := tools_missing():
        pytest.skip(reason)
    if not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs unshare and setpriv (util-linux)")
    if installed_status() or [path for path in FOOTPRINT if os.path.lexists(path)]:
        pytest.skip("xnat-inbox is installed on this machine (or its files are there): "
                    "not touching a real installation")
    had_account = account_exists()
    try:
        yield FakeSystemd(tmp_path / "fake-systemd")
    finally:
        if installed_status():
            subprocess.run(["dpkg", "--purge", PACKAGE], capture_output=True, timeout=300,
                           check=False, stdin=subprocess.DEVNULL)
        for path in (STATE, ETC):
            shutil.rmtree(path, ignore_errors=True)
        RESTART_FLAG.unlink(missing_ok=True)
        DSH_STATE.unlink(missing_ok=True)
        if not had_account and account_exists():
            subprocess.run(["userdel", ACCOUNT], capture_output=True, check=False)
            if subprocess.run(["getent", "group", ACCOUNT], capture_output=True,
                              check=False).returncode == 0:
                subprocess.run(["groupdel", ACCOUNT], capture_output=True, check=False)
        assert not installed_status(), "the test left xnat-inbox installed"


def test_install_run_upgrade_remove_purge(packages, machine, storescp):
    old, new = packages["old"].deb, packages["new"].deb
    transcript: list[str] = []

    # install: the account, its state folder, daemon-reload; never started, never enabled
    output = machine.dpkg("-i", str(old))
    transcript += [f"# dpkg -i {old.name}", output]
    assert "the service is not enabled" in output
    calls = machine.calls()
    assert "--system daemon-reload" in calls
    assert not [c for c in calls if re.search(r"\b(start|restart|enable)\b", c)], calls
    assert not machine.active
    assert installed_status() == "install ok installed"
    version = run("/usr/bin/xnat-inbox", "--version")
    transcript += ["# xnat-inbox --version", version.stdout]
    assert version.stdout == f"xnat-inbox {VERSION}\n"
    account = pwd.getpwnam(ACCOUNT)
    assert (account.pw_dir, account.pw_shell) == (str(STATE), "/usr/sbin/nologin")
    assert owner_and_mode(STATE) == (ACCOUNT, ACCOUNT, 0o750)
    for conffile in ("config.yaml", "route.yaml"):
        assert owner_and_mode(ETC / conffile) == ("root", ACCOUNT, 0o640)
    assert run("/usr/bin/xnat-inbox", "example-config").stdout == \
        (ETC / "config.yaml").read_text() == (REPO / "etc/xnat-inbox/config.yaml").read_text()
    assert run("/usr/bin/xnat-inbox", "example-unit").stdout == UNIT.read_text() == \
        (REPO / "systemd/xnat-inbox.service").read_text()
    assert DSH_STATE.read_text().split() == [
        "/etc/systemd/system/multi-user.target.wants/xnat-inbox.service"]
    if shutil.which("man") and Path("/usr/share/man/man1/xnat-inbox.1.gz").exists():
        # (docker images often leave /usr/share/man out: dpkg path-exclude)
        assert "example-config" in run("man", "-P", "cat", "xnat-inbox").stdout

    # the installed unit: verifies, and is as hardened as the repository's
    analyze = shutil.which("systemd-analyze")
    if analyze:
        verify = run(analyze, "verify", str(UNIT))
        assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
        security = run(analyze, "security", "--offline=yes", str(UNIT))
        exposure = re.search(r"Overall exposure level for xnat-inbox\.service: (\d+\.\d+)",
                             security.stdout)
        assert exposure, security.stdout + security.stderr
        assert float(exposure.group(1)) <= 2.0
        transcript += ["# systemd-analyze verify && security --offline=yes",
                       f"exposure {exposure.group(1)}\n"]

    # the admin's steps: edit /etc/xnat-inbox/config.yaml, check, run (here in the foreground,
    # as the service's account, with the package's state folder)
    site = Path(tempfile.mkdtemp(prefix="xnat-inbox-deb-"))
    try:
        site.chmod(0o755)
        inbox = site / "inbox"
        inbox.mkdir()
        os.chown(inbox, account.pw_uid, account.pw_gid)
        config = {"state_dir": str(STATE), "settle_seconds": 0.5,
                  "destinations": {"scp": dicom_destination(storescp)},
                  "inboxes": [{"path": str(inbox), "route": {
                      "destination": "scp", "project": "Proj", "subject": "{PatientID}",
                      "session": "{PatientID}_{StudyDate}"}}]}
        edited = "# this site's config\n" + yaml.safe_dump(config, sort_keys=False)
        (ETC / "config.yaml").write_text(edited)
        check = run("/usr/bin/xnat-inbox", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "ok   destination scp: C-ECHO" in check.stdout
        report = deliver(site, inbox, "MR_DEB_1", site / "daemon-1.log")
        assert report["studies"][0]["stored"] == 3
        assert len(list(storescp.output_dir.iterdir())) == 3
        assert owner_and_mode(STATE / "state.db")[0] == ACCOUNT

        # upgrade while the service runs: stopped before the unpack, started after; the edited
        # config is kept (the newer one beside it), the unedited route.yaml is the newer one
        machine.set_active(True)
        output = machine.dpkg("--force-confdef", "--force-confold", "-i", str(new))
        transcript += [f"# dpkg --force-confdef --force-confold -i {new.name}", output]
        calls = machine.calls()
        stop = [i for i, call in enumerate(calls) if call.endswith("stop xnat-inbox.service")]
        assert len(stop) == 1 and calls.index("--system daemon-reload") > stop[0], calls
        assert calls[-1] == "--system start xnat-inbox.service", calls
        assert "starting the service again" in output and machine.active
        assert run("/usr/bin/xnat-inbox", "--version").stdout == f"xnat-inbox {NEWER}\n"
        assert (ETC / "config.yaml").read_text() == edited
        assert (ETC / "config.yaml.dpkg-dist").read_text().endswith(CHANGED)
        assert (ETC / "route.yaml").read_text().endswith(CHANGED)
        for conffile in ("config.yaml", "route.yaml"):
            assert owner_and_mode(ETC / conffile) == ("root", ACCOUNT, 0o640)
        # installing it again with the service stopped leaves it stopped
        machine.set_active(False)
        machine.dpkg("--force-confdef", "--force-confold", "-i", str(new))
        calls = machine.calls()
        assert not [c for c in calls if re.search(r"\b(start|stop|restart|enable)\b", c)], calls
        assert not machine.active
        report = deliver(site, inbox, "MR_DEB_2", site / "daemon-2.log")
        assert report["studies"][0]["stored"] == 3
        delivered = sorted(p.name for p in inbox.glob("done/*/*") if p.is_dir())
        assert delivered == ["MR_DEB_1", "MR_DEB_2"]

        # remove: stops the service, keeps the config, the state and the inboxes
        machine.set_active(True)
        output = machine.dpkg("-r", PACKAGE)
        transcript += [f"# dpkg -r {PACKAGE}", output]
        assert [c for c in machine.calls() if c.endswith("stop xnat-inbox.service")]
        assert not machine.active and "Kept:" in output
        assert not OPT.exists() and not UNIT.exists() and not os.path.lexists("/usr/bin/xnat-inbox")
        assert installed_status() == "deinstall ok config-files"
        assert (ETC / "config.yaml").read_text() == edited
        assert (STATE / "state.db").is_file()
        postrm = shutil.copy(f"/var/lib/dpkg/info/{PACKAGE}.postrm", site / "postrm")

        # purge: says what it removes, removes the config and the state; the inbox stays
        output = machine.dpkg("-P", PACKAGE)
        transcript += [f"# dpkg -P {PACKAGE}", output]
        assert f"purge removes the daemon's state in {STATE}" in output
        assert not installed_status()
        assert not ETC.exists() and not STATE.exists() and not DSH_STATE.exists()
        assert "/etc/xnat-inbox" not in run("dpkg-statoverride", "--list").stdout
        assert sorted(p.name for p in inbox.glob("done/*/*") if p.is_dir()) == delivered

        # purge removes only the daemon's own files: an inbox put in the state folder stays
        # (the package's postrm, run again by hand: dpkg has forgotten the package)
        planted = STATE / "inbox" / "MR_KEPT"
        planted.mkdir(parents=True)
        (planted / "IM1.dcm").write_bytes(b"kept")
        (STATE / "state.db").write_bytes(b"state")
        again = run("sh", str(postrm), "purge")
        assert again.returncode == 0, again.stderr
        assert f"kept {STATE}: it holds what is not the daemon's own state" in again.stderr
        assert "  inbox" in again.stderr
        assert (planted / "IM1.dcm").read_bytes() == b"kept"
        assert sorted(p.name for p in STATE.iterdir()) == ["inbox"]
    finally:
        shutil.rmtree(site, ignore_errors=True)
        print("\n".join(transcript))  # shown on failure, and by pytest -rP
