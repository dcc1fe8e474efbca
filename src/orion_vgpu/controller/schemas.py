"""Request bodies of the controller REST API (docs/architecture.md), validated by pydantic.

Limits are generous but finite: clients are untrusted and bodies end up in the store.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

MAX_GPUS_PER_NODE = 256
# Bounds below keep every stored integer inside SQLite's 64 bits (a bigger one used to
# reach the store and fail with a 500) while staying far above any real value.
MAX_MIB = 2**31 - 1  # 2 PiB of GPU memory
MAX_BYTES = 2**62
MAX_PID = 2**32


class AllocationIn(BaseModel):
    vgpu: int = Field(1, ge=1, le=4096)
    gmem_mib: int | None = Field(None, ge=1, le=MAX_MIB)
    ratio: int | None = Field(None, ge=1, le=100)
    cross_node: bool = False
    policy: Literal["binpack", "spread"] | None = None
    wait_s: float = Field(0.0, ge=0, le=86400)
    user: str = Field("", max_length=256)
    host: str = Field("", max_length=256)
    pid: int | None = Field(None, ge=0, le=MAX_PID)
    command: str = Field("", max_length=4096)


class GpuIn(BaseModel):
    index: int = Field(ge=0, le=65535)
    uuid: str = Field(min_length=1, max_length=128)
    name: str = Field(max_length=255)
    memory_mib: int = Field(ge=1, le=MAX_MIB)
    emulated: bool = False


class RegisterIn(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    addr: str = Field(min_length=1, max_length=300)
    unix_socket: str | None = Field(None, max_length=1024)
    version: str = Field("", max_length=64)
    protocol_version: int | None = Field(None, ge=0, le=2**31 - 1)
    vgpu_count: int = Field(ge=1, le=64)
    gpus: list[GpuIn] = Field(max_length=MAX_GPUS_PER_NODE)

    @field_validator("gpus")
    @classmethod
    def _unique(cls, gpus: list[GpuIn]) -> list[GpuIn]:
        if len({g.index for g in gpus}) != len(gpus):
            raise ValueError("GPU indexes must be unique within a node")
        if len({g.uuid for g in gpus}) != len(gpus):
            raise ValueError("GPU uuids must be unique within a node")
        return gpus


class SessionIn(BaseModel):
    allocation_id: str = Field(max_length=64)
    vgpu_index: int = Field(ge=0, le=65535)
    mem_used_bytes: int = Field(0, ge=-MAX_BYTES, le=MAX_BYTES)  # wide: a refused beat downs the node
    busy_pct: float = 0.0


class GpuUsageIn(BaseModel):
    uuid: str = Field(max_length=128)
    mem_used_bytes: int = Field(0, ge=-MAX_BYTES, le=MAX_BYTES)  # wide: a refused beat downs the node
    busy_pct: float = 0.0


class HeartbeatIn(BaseModel):
    # None (key absent) means "not reported": only a present list is reconciled.
    sessions: list[SessionIn] | None = Field(None, max_length=65536)
    gpus: list[GpuUsageIn] = Field(default_factory=list, max_length=MAX_GPUS_PER_NODE)


class EventIn(BaseModel):
    type: Literal["session_started", "session_ended"]
    allocation_id: str = Field(max_length=64)
    vgpu_index: int = Field(0, ge=0, le=65535)
    reason: str | None = Field(None, max_length=1024)
