"""Installs the ``.pth`` hook that arms the runtime in every Python of this environment.

``python -m orion_vgpu.client.install_hook`` (run by the set-up script; wheels built by
setup.py ship the same file). It also byte-compiles the package, as pip does for a wheel:
an editable install (or ``PYTHONDONTWRITEBYTECODE=1``) would otherwise compile the client
runtime from source in every program that uses a vGPU (tens of ms of start-up).
"""

from __future__ import annotations

import compileall
import py_compile
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "orion_vgpu_autoload.pth"
PTH_LINE = ("import os; os.environ.get('ORION_VGPU', '').strip() not in ('', '0') and "
            "__import__('orion_vgpu.client.autoload').client.autoload.maybe_arm()\n")


def install(site: Path | None = None) -> Path:
    target = (site or Path(sysconfig.get_paths()["purelib"])) / PTH_NAME
    target.write_text(PTH_LINE)
    return target


def compile_package() -> bool:
    """Byte-compile orion_vgpu where it lives; False if that directory is read-only.

    Hash-checked .pyc files: Python compares the source's hash, not its mtime, so a file
    edited afterwards (even twice in the same second) is never run from a stale .pyc.
    """
    import orion_vgpu
    root = Path(orion_vgpu.__file__).parent
    try:
        return bool(compileall.compile_dir(
            str(root), quiet=1, workers=1,
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH))
    except OSError:
        return False


if __name__ == "__main__":
    print(f"installed {install()}", file=sys.stderr)
    if not compile_package():
        print("could not byte-compile all of orion_vgpu (read-only, or a syntax error); "
              "programs compile what is missing at start-up", file=sys.stderr)
