"""Device discovery: NVML when it reports GPUs, else configured emulated GPUs, else refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from orion_vgpu.config import EmulatedGpus, ServerConfig
from orion_vgpu.server.devices import (
    Device,
    DeviceError,
    NvmlReport,
    device_notes,
    discover_devices,
    probe_nvml,
)

NO_NVML = NvmlReport(None, [], "NVML unavailable: NVML Shared Library Not Found")
TESLA = Device(0, "GPU-1234", "Tesla V100-PCIE-16GB", 16160, emulated=False, torch_device="cuda:0")


def test_emulated_gpus() -> None:
    cfg = ServerConfig(name="node-a", emulated_gpus=EmulatedGpus(2, 16384))
    devices = discover_devices(cfg, NO_NVML)
    assert [d.index for d in devices] == [0, 1]
    for device in devices:
        assert device.emulated and device.torch_device == "cpu"
        assert device.name == "Emulated GPU (CPU) 16GiB"
        assert device.memory_mib == 16384
        assert device.uuid.startswith("EMU-")
    assert devices[0].uuid != devices[1].uuid
    # Stable per node name and index; different on another node.
    assert discover_devices(cfg, NO_NVML) == devices
    other = discover_devices(ServerConfig(name="node-b", emulated_gpus=EmulatedGpus(2, 16384)), NO_NVML)
    assert {d.uuid for d in other}.isdisjoint({d.uuid for d in devices})
    assert devices[0].to_register() == {
        "index": 0, "uuid": devices[0].uuid, "name": "Emulated GPU (CPU) 16GiB",
        "memory_mib": 16384, "emulated": True,
    }  # fmt: skip


def test_odd_sizes_are_named_in_mib() -> None:
    devices = discover_devices(ServerConfig(emulated_gpus=EmulatedGpus(1, 1500)), NO_NVML)
    assert devices[0].name == "Emulated GPU (CPU) 1500MiB"


def test_refuses_without_gpu_or_emulation() -> None:
    cfg = ServerConfig(path=Path("/etc/orion/server.conf"))
    with pytest.raises(DeviceError) as err:
        discover_devices(cfg, NO_NVML)
    message = str(err.value)
    assert "no NVIDIA GPU found (NVML unavailable" in message
    assert "[server] emulated_gpus = 2x16GiB` in /etc/orion/server.conf" in message
    assert "orion up --emulated-gpus 2x16GiB" in message


def test_real_gpus_win_over_emulation() -> None:
    cfg = ServerConfig(emulated_gpus=EmulatedGpus(2, 16384))
    devices = discover_devices(cfg, NvmlReport("535.1", [TESLA], None))
    assert devices == [TESLA]
    assert any("ignoring [server] emulated_gpus" in note for note in device_notes(cfg, devices))


def test_ram_note_for_oversized_emulation() -> None:
    cfg = ServerConfig(emulated_gpus=EmulatedGpus(64, 16 * 1024 * 1024))
    notes = device_notes(cfg, discover_devices(cfg, NO_NVML))
    assert any("host has" in note for note in notes)


def test_probe_nvml_never_raises() -> None:
    report = probe_nvml()  # no GPU on CI machines: an answer, not an exception
    assert report.devices or report.error
