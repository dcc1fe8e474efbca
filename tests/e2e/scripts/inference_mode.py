# Evaluation as programs write it: a model run under torch.inference_mode(), its results
# brought to the host (.cpu(), .to("cpu"), .numpy(), .tolist()), inference tensors used
# after the block. Each result printed as RESULT <name>, a tab, its JSON; the test
# compares them with the same script run locally.
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 8 * 8, 10)).to(DEV).eval()
emb, ln = nn.Embedding(20, 6).to(DEV), nn.LayerNorm(6).to(DEV)
x = torch.randn(4, 3, 8, 8).to(DEV)


def show(name, value):
    if isinstance(value, torch.Tensor):
        # where a result lives is part of it: a host copy must be a plain host tensor
        where = f"{type(value).__name__} {value.device.type} {value.dtype}"
        value = {"where": where, "values": value.double().flatten().tolist()}
    print(f"RESULT {name}\t{json.dumps(value)}", flush=True)


with torch.inference_mode():
    y = model(x)
    show("is_inference", [y.is_inference(), x[:1].is_inference(), x.is_inference()])
    show("cpu", y.cpu())
    show("to cpu", y.to("cpu"))
    show("to cpu float64", y.to("cpu", torch.float64))
    show("to like a host tensor", y.to(torch.zeros(1, dtype=torch.float64)))
    show("half", y.half().float().cpu())
    show("type", y.type(torch.float64).cpu())
    show("argmax of softmax", F.softmax(y, -1).argmax(-1).cpu())
    show("topk", y.topk(3, dim=-1).values.cpu())
    show("sort", y.sort(dim=-1).indices.cpu())
    show("reshape", y.reshape(2, -1).contiguous().cpu())
    show("chunks", torch.cat([c * i for i, c in enumerate(y.chunk(2, dim=1))], 1).cpu())
    show("where", torch.where(y > 0, y, torch.zeros_like(y)).cpu())
    show("nonzero", (y > 0).nonzero().cpu())
    show("einsum", torch.einsum("ij,kj->ik", y, y).cpu())
    show("tolist", y[0].tolist())
    show("item", y.sum().item())
    show("numpy", y.cpu().numpy()[1].tolist())
    show("embedding, layer norm", ln(emb(torch.tensor([[1, 2, 3], [4, 5, 19]]).to(DEV))).cpu())
    show("upload", (torch.arange(6.0).to(DEV) * 2).cpu())
    show("factory", torch.ones(3, device=DEV).cumsum(0).cpu())
    show("slice of a normal tensor", F.interpolate(x[:1], scale_factor=2, mode="bilinear")
         .sum((2, 3)).cpu())
    v = y.clone()
    v[:, 0] = 5.0
    v.add_(1)
    show("in place", v.cpu())
show("after the block", (y * 2).cpu())
show("after the block, tolist", y[1].tolist())
try:
    y.add_(1)
    show("in-place on an inference tensor outside the block", "allowed")
except RuntimeError as exc:
    show("in-place on an inference tensor outside the block", str(exc).splitlines()[0])
