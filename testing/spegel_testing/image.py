# -*- test-case-name: tests.e2e.test_e2e_image -*-
"""
Build spegel's image offline: the root C{Containerfile}, with C{buildah}, on a Debian bookworm
base made by C{debootstrap} from Debian's packages (no container registry is reachable here),
with the project and its dependencies installed from a wheelhouse.

    .venv/bin/python -m spegel_testing.image [--push 127.0.0.1:5000/spegel:0.1.0] [--archive out.tar]

Steps, each cached under C{$SPEGEL_CACHE_DIR} (default C{/var/cache/spegel-ci}) so a second
build repeats only what changed:

1. The two bases: C{runtime} (python3, ca-certificates; docs, locales and apt's caches removed)
   and C{build} (the runtime plus python3-venv and binutils' strip), imported into buildah's
   store from tarballs kept by Debian suite and package list.
2. The wheelhouse: C{pip wheel} of the checkout and every dependency, kept by the hash of
   setup.cfg (the project's own wheel is always rebuilt).
3. C{buildah bud} of the Containerfile with C{BASE}/C{BUILD_BASE} pointing at the two bases.

buildah runs with the vfs storage driver and chroot isolation, which need no kernel feature
beyond what a container on this machine has.  The result is tagged C{localhost/spegel:<version>};
L{push} copies it to a registry (plain HTTP, as the rig's), and L{compressed_size} says what a
node downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import spegel
from spegel_testing.process import CommandFailed, run

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE_ENV = "SPEGEL_CACHE_DIR"
DEFAULT_CACHE = "/var/cache/spegel-ci"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
RUNTIME_PACKAGES = ("python3", "ca-certificates")
BUILD_PACKAGES = (*RUNTIME_PACKAGES, "python3-venv", "binutils")
# What neither base needs (globs under the root file system). The packages' copyright files
# stay: they are the licences of what the image ships.
_TRIM = (
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt/*",
    "var/lib/apt/lists/*",
    "var/log/*",
)
# What the runtime does not need either: the package manager (the image is never changed in
# place), perl (only dpkg's scripts use it), glibc's iconv modules and time zones (Python has
# its own codecs; spegel logs in UTC), and the parts of Python's library a server never imports.
_RUNTIME_TRIM = (
    "usr/bin/apt*",
    "usr/bin/dpkg*",
    "usr/bin/perl*",
    "usr/bin/gpgv",
    "usr/bin/localedef",
    "usr/lib/apt",
    "usr/lib/dpkg",
    "usr/lib/x86_64-linux-gnu/libapt-*",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/share/perl5",
    "usr/share/zoneinfo",
    "usr/share/bash-completion",
    "var/lib/dpkg",
    "etc/apt",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/ensurepip",
)
BUILDAH = ("buildah", "--storage-driver", "vfs")
BUILD_TIMEOUT = 1800.0


def cache_dir() -> Path:
    path = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(args: list[str]) -> str:
    # debootstrap and a cold build take minutes; run()'s default of a minute is for ctr.
    return run(args, timeout=BUILD_TIMEOUT)


def base_image(packages: tuple[str, ...], name: str, trim: tuple[str, ...] = ()) -> str:
    """
    The name of a base image in buildah's store holding Debian bookworm with C{packages},
    made with debootstrap once per package list and kept as a tarball.
    """
    key = hashlib.sha256(f"{SUITE} {' '.join(sorted(packages))} {' '.join(trim)}".encode()).hexdigest()[:12]
    tag = f"localhost/spegel-base-{name}:{SUITE}-{key}"
    if subprocess.run([*BUILDAH, "inspect", "--type", "image", tag], capture_output=True).returncode == 0:
        return tag
    tarball = cache_dir() / "bases" / f"{name}-{SUITE}-{key}.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="spegel-rootfs-", dir=tarball.parent) as work:
            rootfs = Path(work) / "rootfs"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(rootfs), MIRROR])
            _trim(rootfs, (*_TRIM, *trim))
            partial = tarball.with_suffix(".partial")
            _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."])
            os.rename(partial, tarball)
    container = _run([*BUILDAH, "from", "scratch"]).strip()
    try:
        mount = _run([*BUILDAH, "mount", container]).strip()
        _run(["tar", "-C", mount, "--numeric-owner", "-xf", str(tarball)])
        _run([*BUILDAH, "umount", container])
        _run([*BUILDAH, "config", "--env", "LANG=C.UTF-8", container])
        _run([*BUILDAH, "commit", "--quiet", container, tag])
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)
    return tag


def _trim(rootfs: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    # Every package's documentation but its copyright file.
    for path in (rootfs / "usr/share/doc").glob("*/*"):
        if path.name != "copyright":
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def wheelhouse(python: str = sys.executable) -> Path:
    """
    A folder of wheels for the checkout and every dependency: the dependencies' kept by the
    hash of setup.cfg, the project's built afresh.
    """
    key = hashlib.sha256((ROOT / "setup.cfg").read_bytes()).hexdigest()[:12]
    directory = cache_dir() / "wheels" / key
    if not directory.is_dir():
        partial = directory.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _run([python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(partial), str(ROOT)])
        for own in partial.glob("spegel-*.whl"):
            own.unlink()
        os.rename(partial, directory)
    return directory


def build(tag: str | None = None) -> str:
    """
    Build the image; its name in buildah's store.
    """
    tag = tag or f"localhost/spegel:{spegel.__version__}"
    runtime = base_image(RUNTIME_PACKAGES, "runtime", _RUNTIME_TRIM)
    build_base = base_image(BUILD_PACKAGES, "build")
    wheels = wheelhouse()
    with tempfile.TemporaryDirectory(prefix="spegel-context-") as context:
        # The build context: the checkout's tracked files, and the wheelhouse with our wheel.
        files = _run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).split("\0")
        for name in filter(None, files):
            source = ROOT / name
            if source.is_file():
                target = Path(context) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        shutil.copytree(wheels, Path(context) / ".wheels")
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(Path(context) / ".wheels"), context])
        _run(
            [
                *BUILDAH, "bud", "--quiet", "--isolation", "chroot", "--layers=false",
                "--build-arg", f"BASE={runtime}", "--build-arg", f"BUILD_BASE={build_base}",
                "--tag", tag, "--file", str(Path(context) / "Containerfile"), context,
            ]
        )
    # The previous build of the tag, now untagged: vfs keeps every layer whole, so it goes.
    subprocess.run([*BUILDAH, "rmi", "--prune"], capture_output=True)
    return tag


def build_pause() -> str:
    """
    A pod sandbox ("pause") image for tests that run pods through the CRI, on the runtime base
    (no registry here serves registry.k8s.io/pause): it only has to sit there, holding the
    pod's namespaces; the CRI kills it with SIGKILL when the pod stops.  Its name in buildah's
    store; built once per base.
    """
    runtime = base_image(RUNTIME_PACKAGES, "runtime", _RUNTIME_TRIM)
    tag = f"localhost/spegel-test-pause:{runtime.rsplit(':', 1)[1]}"
    if subprocess.run([*BUILDAH, "inspect", "--type", "image", tag], capture_output=True).returncode == 0:
        return tag
    container = _run([*BUILDAH, "from", "--quiet", runtime]).strip()
    try:
        _run([*BUILDAH, "config", "--entrypoint", '["/bin/sleep", "infinity"]', "--cmd", "", container])
        _run([*BUILDAH, "commit", "--quiet", container, tag])
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)
    return tag


def push(tag: str, destination: str) -> None:
    """
    Copy image C{tag} to C{destination} (C{host:port/repo:tag}, plain HTTP), gzip'd.
    """
    _run([*BUILDAH, "push", "--quiet", "--tls-verify=false", "--compression-format", "gzip", tag, f"docker://{destination}"])


def sizes(tag: str) -> tuple[int, int]:
    """
    The image's (compressed, unpacked) size in bytes: the sum of its layers gzip'd as a node
    downloads them, and its files once unpacked.
    """
    container = _run([*BUILDAH, "from", "--quiet", tag]).strip()
    try:
        mount = _run([*BUILDAH, "mount", container]).strip()
        unpacked = int(_run(["du", "-sb", mount]).split()[0])
        _run([*BUILDAH, "umount", container])
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)
    return _layers_size(tag, ("--compression-format", "gzip")), unpacked


def _layers_size(tag: str, compression: tuple[str, ...]) -> int:
    with tempfile.TemporaryDirectory(prefix="spegel-oci-") as layout:
        _run([*BUILDAH, "push", "--quiet", *compression, tag, f"oci:{layout}:image"])
        index = json.loads((Path(layout) / "index.json").read_text())
        manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads((Path(layout) / "blobs" / "sha256" / manifest_digest).read_text())
        return sum(layer["size"] for layer in manifest["layers"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spegel_testing.image", description="Build spegel's image offline.")
    parser.add_argument("--tag", default=None, help="the image's name (default localhost/spegel:<version>)")
    parser.add_argument("--push", metavar="HOST:PORT/REPO:TAG", help="also push it there (plain HTTP)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        tag = build(args.tag)
        compressed, uncompressed = sizes(tag)
        print(f"built {tag} in {time.monotonic() - started:.0f}s: {compressed / 2**20:.1f} MiB compressed, {uncompressed / 2**20:.1f} MiB unpacked")
        if args.push:
            push(tag, args.push)
            print(f"pushed to {args.push}")
    except (CommandFailed, OSError) as e:
        print(f"image build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
