"""torch.load onto vGPUs as on a two-GPU machine (ORION_VGPU=2): map_location as a string,
device, dict or callable; a module saved across devices; tensors inside other objects.
Also integer devices (x.to(1), module.to(1)) and a generator state from another device."""

import collections
import io
import types

import torch
import torch.nn as nn


def roundtrip(obj, **kw):  # noqa: ANN001, ANN003, ANN201
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False, **kw)


t1 = torch.arange(4.0, device="cuda:1")
for name, loc in [("none", None), ("str", "cuda"), ("device", torch.device("cuda:1")),
                  ("dict", {"cuda:1": "cuda:0"}), ("cpu", "cpu"),
                  ("callable", lambda s, loc: s.cuda(1))]:
    out = roundtrip({"t": t1}, map_location=loc)["t"]
    print("RESULT load", name, out.device, out.cpu().tolist(), flush=True)

model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to("cuda:1"))
loaded = roundtrip(model)
print("RESULT module", [str(p.device) for p in loaded.parameters()], flush=True)

ns = types.SimpleNamespace(w=t1 * 2, q=collections.deque([t1 + 1]))
back = roundtrip(ns)
print("RESULT nested", back.w.device, back.q[0].device, back.q[0].cpu().tolist(), flush=True)

print("RESULT int-device", torch.ones(2).to(1).device, nn.Linear(2, 2).to(1).weight.device,
      torch.ones(2).to(device=0).device, flush=True)

try:
    torch.cuda.set_rng_state(torch.zeros(16, dtype=torch.uint8), 1)  # a real GPU's format
    print("RESULT rng-state no error", flush=True)
except RuntimeError as exc:
    print("RESULT rng-state refused", "size" in str(exc), flush=True)
print("RESULT after", torch.zeros(2, device="cuda:1").new_zeros(2).tolist(), flush=True)
