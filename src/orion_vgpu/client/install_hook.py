"""Installs the ``.pth`` hook that arms the runtime in every Python of this environment.

``python -m orion_vgpu.client.install_hook`` (run by the set-up script; wheels built by
setup.py ship the same file).
"""

from __future__ import annotations

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


if __name__ == "__main__":
    print(f"installed {install()}", file=sys.stderr)
