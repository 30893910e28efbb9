#!/usr/bin/python3
"""Build xnat-inbox_<version>_<arch>.deb from the wheel, with Debian's own tools (what
`make deb` runs; docs/operations.md, "The Debian package", says why it is built this way).

    daemon/packaging/deb/build.py --wheel dist/xnat_inbox-0.1.0-py3-none-any.whl --out dist

The package holds a virtual environment at /opt/xnat-inbox made by Debian's python3 at build
time: the wheel with its dependencies (systemd-python built against libsystemd-dev), every
file owned by dpkg. It is built in a staging folder and then moved there in text (shebangs,
activate scripts, pyvenv.cfg; .pyc compiled for the final path); the build fails if the
staging path is left in any file. Then the unit, the sysusers.d and tmpfiles.d snippets (from
the wheel's package data), the example config and route as conffiles, the docs, a man page,
/usr/bin/xnat-inbox, and the maintainer scripts beside this file. Depends: the Python the venv
was made with, the shared libraries of its compiled modules (dpkg-shlibdeps), systemd's
sysusers and tmpfiles. Needs python3-venv, dpkg-dev, and gcc, libsystemd-dev, pkg-config and
python3-dev for systemd-python, binutils' strip (make system-deps); pip reaches a package index
at build time only."""

from __future__ import annotations

import argparse
import email.message
import email.parser
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[2]  # the checkout: README.md, docs/
NAME = "xnat-inbox"
PREFIX = Path("/opt/xnat-inbox")  # the venv; the unit's ExecStart= runs its bin/xnat-inbox
CONFFILES = ("/etc/xnat-inbox/config.yaml", "/etc/xnat-inbox/route.yaml")
#: what the daemon needs of systemd besides the shared library: postinst runs these
SYSTEMD_DEPENDS = ("systemd-sysusers", "systemd-tmpfiles")
DESCRIPTION = """\
watch-folder daemon that delivers DICOM drops to XNAT
 Scanners and people copy DICOM session folders (or zip and tar archives) into
 an inbox; the daemon waits until each drop is completely written, groups its
 files by study, routes them by the drop's route.yaml, sends each study by DICOM
 C-STORE or XNAT's REST import service, checks that every instance arrived, and
 moves the originals to done/ or failed/ with a report and a log.
 .
 It runs as a hardened systemd service, which is not enabled at install: edit
 /etc/xnat-inbox/config.yaml, run 'xnat-inbox check', then
 'systemctl enable --now xnat-inbox'.
 .
 The program and its Python libraries live in a virtual environment in
 /opt/xnat-inbox, made with Debian's python3."""


def run(*command: str | Path, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], check=True, text=True,
                          **options)  # type: ignore[call-overload]


def debian_version(version: str) -> str:
    """PEP 440 to Debian: pre-releases and dev releases sort before the release (~), post
    releases after it (+), as pip orders them; a local version stays after a +."""
    public, plus, local = version.partition("+")
    public = re.sub(r"(?<=\d)\.?(dev|a|b|rc)(?=\d|$)", r"~\1", public)
    return public.replace(".post", "+post") + plus + local


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.BytesParser().parsebytes(archive.read(name))


def debian_python(python: str) -> tuple[Path, str]:
    """The interpreter the venv is made with (/usr/bin/python3.11), and the Debian package
    that brings it with its standard library (python3.11)."""
    interpreter = Path(os.path.realpath(shutil.which(python) or python))
    owner = subprocess.run(["dpkg", "-S", str(interpreter)], capture_output=True, text=True,
                           check=False)
    if owner.returncode != 0 or not re.fullmatch(r"python3\.\d+", interpreter.name):
        sys.exit(f"build.py: {python} ({interpreter}) is not a Debian package's python3; "
                 "give --python /usr/bin/python3 (apt-get install python3-venv)")
    return interpreter, interpreter.name  # python3.11 depends on its -minimal and stdlib


def make_venv(interpreter: Path, venv: Path, wheel: Path) -> None:
    run(interpreter, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "--quiet", "--disable-pip-version-check"]
    run(*pip, "install", "--no-warn-script-location", f"{wheel}[systemd]")
    # an installed program, not a development venv: pip would only write into dpkg's files
    run(*pip, "uninstall", "--yes", "pip", "setuptools")
    for record in venv.glob("lib/python3*/site-packages/*.dist-info/direct_url.json"):
        record.unlink()  # names the wheel's path on the build machine
    # as dh_strip does: the compiled modules' symbols and debug info (18 MB to 9 MB). Not the
    # libraries a wheel brings along in *.libs/: auditwheel rewrote those with patchelf, and
    # strip leaves them unloadable ("ELF load command address/offset not page-aligned")
    run("strip", "--strip-unneeded", "--remove-section=.comment", "--remove-section=.note",
        *(so for so in venv.rglob("*.so") if not so.parent.name.endswith(".libs")))


def move_to_prefix(venv: Path, root: Path) -> None:
    """Make the venv built at root/opt/xnat-inbox work at /opt/xnat-inbox: rewrite the paths
    pip and venv wrote, compile .pyc naming the final paths, and refuse any path left."""
    staged = str(venv).encode()
    for path in [*venv.joinpath("bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if staged in data:
                path.write_bytes(data.replace(staged, str(PREFIX).encode()))
    for cache in list(venv.rglob("__pycache__")):
        shutil.rmtree(cache)
    # by the venv's own Python (its magic number); checked-hash: valid whatever mtimes the
    # .deb gives the sources. The unit can't write .pyc (ProtectSystem=strict): without them
    # each start would compile everything again
    run(venv / "bin/python", "-m", "compileall", "-q", "-j", "0", "-s", root, "-p", "/",
        "--invalidation-mode", "checked-hash", venv / "lib", stdout=subprocess.DEVNULL)
    left = [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and staged in p.read_bytes()]
    if left:
        sys.exit(f"build.py: the staging path {venv} is still written in: {', '.join(left)}")


def install(source: Path, target: Path, mode: int = 0o644) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def gzip_to(text: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                   filename="", compresslevel=9) as out:
        out.write(text)


def add_files(root: Path, venv: Path, version: str, maintainer: str) -> None:
    examples = next(venv.glob("lib/python3*/site-packages/xnat_inbox/examples"))
    install(examples / "systemd/xnat-inbox.service", root / "lib/systemd/system/xnat-inbox.service")
    install(examples / "systemd/xnat-inbox.sysusers", root / "usr/lib/sysusers.d/xnat-inbox.conf")
    install(examples / "systemd/xnat-inbox.tmpfiles", root / "usr/lib/tmpfiles.d/xnat-inbox.conf")
    for conffile in CONFFILES:  # postinst makes them root:xnat-inbox 0640 (statoverride)
        install(examples / "etc" / Path(conffile).name, root / conffile.lstrip("/"))
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/xnat-inbox").symlink_to(PREFIX / "bin/xnat-inbox")
    doc = root / "usr/share/doc" / NAME
    install(SOURCE / "README.md", doc / "README.md")  # the unit's Documentation=
    for page in sorted((SOURCE / "docs").glob("*.md")):
        install(page, doc / "docs" / page.name)
    for route in sorted((examples / "etc/routes").glob("*.yaml")):
        install(route, doc / "examples/routes" / route.name)
    year = datetime.now(UTC).year
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {NAME}\n\nFiles: *\nCopyright: {year} the xnat-inbox authors\n"
        "License: BSD-3-Clause\n\nFiles: opt/xnat-inbox/lib/*\nCopyright: their authors\n"
        "License: various\n The Python libraries in the virtual environment, each with its "
        "license in\n its *.dist-info/ folder under /opt/xnat-inbox/lib/.\n\n"
        "License: BSD-3-Clause\n" + "\n".join(
            f" {line}" if line else " ." for line in
            (SOURCE / "docs" / "LICENSE").read_text().splitlines()[2:]) + "\n")
    stamp = datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    gzip_to(f"{NAME} ({version}) unstable; urgency=medium\n\n  * Built by 'make deb' from "
            f"xnat-inbox {version}.\n\n -- {maintainer}  {stamp}\n".encode(),
            doc / "changelog.gz")
    manpage = run(venv / "bin/python", HERE / "manpage.py", capture_output=True).stdout
    gzip_to(manpage.encode(), root / "usr/share/man/man1/xnat-inbox.1.gz")


def normalise(root: Path) -> None:
    """Directories 0755, files 0755 or 0644; owners come from dpkg-deb --root-owner-group."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            executable = path.is_dir() or path.lstat().st_mode & 0o111
            path.chmod(0o755 if executable else 0o644)


def shlib_depends(root: Path) -> list[str]:
    """dpkg-shlibdeps over the compiled modules: the Debian packages of the libraries they
    link (libc6, libstdc++6, libsystemd0, ...)."""
    objects = [str(p) for p in root.rglob("*.so") if p.is_file()]
    # wheels bring their own copies of some libraries (numpy.libs/ …): those are ours, found
    # beside the modules; Debian has no dependency information for them, nor needs any
    private = sorted({f"-l{p.parent}" for p in root.rglob("*.libs/*.so*") if p.is_file()})
    with tempfile.TemporaryDirectory() as work:
        Path(work, "debian").mkdir()
        Path(work, "debian/control").write_text(
            f"Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n")
        out = run("dpkg-shlibdeps", "-O", "--warnings=0", "--ignore-missing-info", *private,
                  *objects, cwd=work, capture_output=True).stdout
    found = re.search(r"^shlibs:Depends=(.*)$", out, re.M)
    return [d.strip() for d in found.group(1).split(",")] if found else []


def write_control(root: Path, version: str, arch: str, depends: list[str],
                  maintainer: str) -> None:
    control = root / "DEBIAN"
    control.mkdir()
    files = [p for p in root.rglob("*") if not p.is_relative_to(control)]
    size = sum((p.lstat().st_size + 1023) // 1024 if p.is_file() and not p.is_symlink() else 1
               for p in files)
    (control / "control").write_text(
        f"Package: {NAME}\nVersion: {version}\nArchitecture: {arch}\n"
        f"Maintainer: {maintainer}\nInstalled-Size: {size}\n"
        f"Depends: {', '.join(depends)}\nSection: science\nPriority: optional\n"
        f"Description: {DESCRIPTION}\n")
    (control / "conffiles").write_text("".join(f"{c}\n" for c in CONFFILES))
    sums = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n"
            for p in sorted(files) if p.is_file() and not p.is_symlink()
            and f"/{p.relative_to(root)}" not in CONFFILES]
    (control / "md5sums").write_text("".join(sums))
    for script in ("postinst", "prerm", "postrm"):
        install(HERE / script, control / script, 0o755)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True, help="xnat_inbox-*.whl")
    parser.add_argument("--out", type=Path, default=Path("dist"), help="where the .deb goes")
    parser.add_argument("--python", default="/usr/bin/python3",
                        help="Debian's python3, which the venv is made with")
    parser.add_argument("--maintainer", default=os.environ.get(
        "DEB_MAINTAINER", "xnat-inbox maintainers <root@localhost>"))
    args = parser.parse_args()

    metadata = wheel_metadata(args.wheel)
    version = debian_version(metadata["Version"])
    arch = run("dpkg", "--print-architecture", capture_output=True).stdout.strip()
    interpreter, python_package = debian_python(args.python)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out.resolve() / f"{NAME}_{version}_{arch}.deb"
    with tempfile.TemporaryDirectory(prefix="xnat-inbox-deb-") as staging:
        root = Path(staging) / "root"
        venv = root / PREFIX.relative_to("/")
        make_venv(interpreter, venv, args.wheel.resolve())
        move_to_prefix(venv, root)
        add_files(root, venv, version, args.maintainer)
        normalise(root)
        depends = [python_package, *shlib_depends(root), *SYSTEMD_DEPENDS]
        write_control(root, version, arch, depends, args.maintainer)
        # xz -1: 15 MB in 2 s; the default -6 saves 2.4 MB in 20 s
        run("dpkg-deb", "--root-owner-group", "-Zxz", "-z1", "--build", root, target,
            stdout=subprocess.DEVNULL)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
