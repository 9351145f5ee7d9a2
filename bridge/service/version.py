"""The product's version and build, from the installed package (one place for both services).

Two builds of one version must be told apart (``--version``, the health endpoint's
readers, a bug report): the build is the git commit of a checkout (an editable install)
or, for an installed wheel, a digest of the files it installed (pip's RECORD holds each
file's sha256), which changes whenever any shipped file does.
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

__all__ = ["VERSION", "build", "describe"]

DIST = "pudu-fleet-bridge"
try:
    VERSION = version(DIST)
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0"

_OWN = ("bridge/", "edge_agent/", "callback_server/")


@cache
def build() -> str:
    """``git <commit>[+modified]`` in a checkout, ``wheel <digest>`` when installed,
    ``unknown`` when neither can be told."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / ".git").exists():
        return _git(checkout)
    try:
        record = distribution(DIST).read_text("RECORD") or ""
    except PackageNotFoundError:
        return "unknown"
    files = sorted(line for line in record.splitlines()
                   if line.startswith(_OWN) and ",sha256=" in line and ".pyc," not in line)
    if not files:
        return "unknown"
    return "wheel " + hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]


def _git(checkout: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True,
                              text=True, timeout=10, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        modified = git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git on this machine
        return "unknown"
    return f"git {commit}{'+modified' if modified else ''}" if commit else "unknown"


def describe(prog: str) -> str:
    """What ``--version`` prints: ``edge-agent 0.1.0 (build git 1a2b3c4d5e6f)``."""
    return f"{prog} {VERSION} (build {build()})"
