"""The GPUs a node serves: NVIDIA GPUs found through NVML, else configured emulated GPUs.

An emulated GPU executes on the CPU with a configured memory size. It is always named
`Emulated GPU (CPU) <size>`, has a `EMU-` uuid and `emulated=True`, so no report, log or
dashboard can pass it off as hardware.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from orion_vgpu.config import EmulatedGpus, ServerConfig, UserError, format_mib

_EMU_NAMESPACE = uuid.UUID("5f1c3a52-8d1e-4d53-9a53-0e1f2b3c4d5e")


class DeviceError(UserError):
    """No device to serve, and how to configure one."""


@dataclass(frozen=True)
class Device:
    index: int
    uuid: str
    name: str
    memory_mib: int
    emulated: bool
    torch_device: str  # "cpu" for emulated GPUs, "cuda:<i>" for real ones

    def to_register(self) -> dict[str, Any]:
        """The GPU entry of `POST /nodes/register`."""
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_mib": self.memory_mib,
            "emulated": self.emulated,
        }


@dataclass(frozen=True)
class NvmlReport:
    """What NVML says: the driver and GPUs, or why it could not be asked."""

    driver_version: str | None
    devices: list[Device]
    error: str | None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def probe_nvml() -> NvmlReport:
    """Ask NVML for NVIDIA GPUs; never raises (a missing driver is a normal answer)."""
    try:
        import pynvml
    except ImportError as exc:
        return NvmlReport(None, [], f"nvidia-ml-py is not installed ({exc})")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlReport(None, [], f"NVML unavailable: {exc}")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)
            devices.append(
                Device(
                    index=i,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_mib=int(memory),
                    emulated=False,
                    torch_device=f"cuda:{i}",
                )
            )
        return NvmlReport(driver, devices, None)
    except pynvml.NVMLError as exc:
        return NvmlReport(None, [], f"NVML error: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def emulated_name(memory_mib: int) -> str:
    return f"Emulated GPU (CPU) {format_mib(memory_mib)}"


def emulated_uuid(node_name: str, index: int) -> str:
    """Stable across restarts for the same node name and index."""
    return f"EMU-{uuid.uuid5(_EMU_NAMESPACE, f'{node_name}/{index}')}"


def emulated_devices(node_name: str, spec: EmulatedGpus) -> list[Device]:
    return [
        Device(
            index=i,
            uuid=emulated_uuid(node_name, i),
            name=emulated_name(spec.memory_mib),
            memory_mib=spec.memory_mib,
            emulated=True,
            torch_device="cpu",
        )
        for i in range(spec.count)
    ]


def how_to_emulate(cfg: ServerConfig) -> str:
    where = cfg.path or "/etc/orion/server.conf"
    return (
        f"to serve emulated GPUs (they run on the CPU) set `[server] emulated_gpus = 2x16GiB` "
        f"in {where}, or run `orion up --emulated-gpus 2x16GiB`"
    )


def discover_devices(cfg: ServerConfig, nvml: NvmlReport | None = None) -> list[Device]:
    """NVIDIA GPUs when NVML reports some; else the configured emulated GPUs; else DeviceError."""
    nvml = nvml or probe_nvml()
    if nvml.devices:
        return nvml.devices
    if cfg.emulated_gpus:
        return emulated_devices(cfg.name, cfg.emulated_gpus)
    reason = nvml.error or "NVML reports no GPU"
    raise DeviceError(f"no NVIDIA GPU found ({reason}); {how_to_emulate(cfg)}")


def device_notes(cfg: ServerConfig, devices: list[Device]) -> list[str]:
    """Warnings worth a log line about what `discover_devices` chose."""
    notes = []
    if cfg.emulated_gpus and devices and not devices[0].emulated:
        notes.append(f"Found {len(devices)} NVIDIA GPU(s); ignoring [server] emulated_gpus = {cfg.emulated_gpus}")
    emulated = [d for d in devices if d.emulated]
    ram = host_memory_mib()
    total = sum(d.memory_mib for d in emulated)
    # Emulated GPU memory is host RAM: promising more than exists ends in the OOM killer.
    if emulated and ram is not None and total > ram:
        notes.append(
            f"Emulated GPUs promise {total} MiB but this host has {ram} MiB of RAM; "
            "sessions may be killed by the kernel before reaching their quota"
        )
    return notes


def host_memory_mib() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return None
