"""torch.load puts each tensor on the vGPU its map_location names (it used to ignore any
map_location but None), a module saved across devices comes back across them, tensors in
other objects are found; integer devices work; a foreign generator state is refused at
the call that sets it."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, result_lines, run_script


def test_load_map_locations_modules_and_int_devices(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c", ORION_VGPU="2", ORION_GMEM="1024")
    results = result_lines(run_script("load_devices.py", env))
    values = "[0.0, 1.0, 2.0, 3.0]"
    assert results == [
        f"RESULT load none cuda:1 {values}",
        f"RESULT load str cuda:0 {values}",
        f"RESULT load device cuda:1 {values}",
        f"RESULT load dict cuda:0 {values}",
        f"RESULT load cpu cpu {values}",
        f"RESULT load callable cuda:1 {values}",
        "RESULT module ['cpu', 'cpu', 'cuda:1', 'cuda:1']",
        "RESULT nested cuda:1 cuda:1 [1.0, 2.0, 3.0, 4.0]",
        "RESULT int-device cuda:1 cuda:1 cuda:0",
        "RESULT rng-state refused True",
        "RESULT after [0.0, 0.0]",
    ]
