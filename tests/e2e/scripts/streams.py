"""Streams, events and device ordinals as a program on two GPUs sees them (2 vGPUs)."""

import torch


def refused(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (RuntimeError, ValueError, AssertionError) as exc:
        return f"{type(exc).__name__}:{'invalid device ordinal' in str(exc) or 'Invalid device' in str(exc) or 'Expected a cuda device' in str(exc)}"
    return "accepted"


print("RESULT ordinals", refused(torch.cuda.memory_allocated, 5),
      refused(torch.cuda.synchronize, 5), refused(torch.cuda.Stream, device=5),
      refused(torch.cuda.memory_allocated, "cpu"), refused(torch.cuda.memory_reserved, 2),
      refused(torch.cuda.can_device_access_peer, 0, 7))
print("RESULT peers", torch.cuda.can_device_access_peer(0, 1))

default = torch.cuda.current_stream()
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
print("RESULT identity", s1 == s1, s1 != s2, default == torch.cuda.default_stream(),
      default.cuda_stream, s1.cuda_stream != 0, len({s1, s2, default}))

x = torch.arange(6.0, device="cuda")
with torch.cuda.stream(s1):
    inside = torch.cuda.current_stream() == s1
    y = x * 2
print("RESULT stream ctx", inside, torch.cuda.current_stream() == default, y.tolist())

side = torch.cuda.Stream(device=1)
with torch.cuda.stream(side):
    z = torch.ones(3, device="cuda") + 1
    where = (torch.cuda.current_device(), str(z.device), torch.cuda.current_stream(1) == side)
print("RESULT other device", *where, torch.cuda.current_device(), z.tolist())

with s2:
    entered = torch.cuda.current_stream() == s2
print("RESULT with stream", entered, torch.cuda.current_stream() == default)

torch.cuda.set_stream(side)
print("RESULT set_stream", torch.cuda.current_device(), torch.cuda.current_stream() == side)
torch.cuda.set_stream(default)
print("RESULT set back", torch.cuda.current_device(), torch.cuda.current_stream() == default)

e = torch.cuda.Event(enable_timing=True)
before = e.device
e.record(side)
print("RESULT event", before, e.device, torch.cuda.Event().device)
s1.wait_stream(default)
default.synchronize()
print("RESULT done", (x + y).sum().item())
