"""``orion run [--vgpu N] [--gmem MiB] [--ratio %] [--cross-node] -- CMD...``.

Runs CMD with the ORION_* variables set; the runtime arms itself in any Python process of
this environment (the .pth hook), so CMD needs no change.
"""

from __future__ import annotations

import os
import subprocess


def run_command(cmd: list[str], vgpu: int | None = None, gmem: int | None = None,
                ratio: int | None = None, cross_node: bool = False) -> int:
    if not cmd:
        raise ValueError("nothing to run: give a command after --, e.g. orion run -- python train.py")
    env = dict(os.environ)
    env["ORION_VGPU"] = str(vgpu if vgpu is not None else env.get("ORION_VGPU", "1") or "1")
    if gmem is not None:
        env["ORION_GMEM"] = str(gmem)
    if ratio is not None:
        env["ORION_RATIO"] = str(ratio)
    if cross_node:
        env["ORION_CROSS_NODE"] = "1"
    try:
        return subprocess.call(cmd, env=env)
    except FileNotFoundError:
        raise ValueError(f"command not found: {cmd[0]}") from None
    except KeyboardInterrupt:
        return 130
