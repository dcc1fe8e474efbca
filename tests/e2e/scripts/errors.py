# Errors surface as PyTorch's own types: shape errors at the line, server errors at sync.
import torch

a = torch.ones(3, 4, device="cuda")
try:
    a @ torch.ones(5, 6, device="cuda")
    print("RESULT no-shape-error")
except RuntimeError as exc:
    # raised by the client's metadata step, before anything reached the server
    print("RESULT shape", "[3, 4]" in str(exc) or "3x4" in str(exc))
torch.index_select(a, 0, torch.tensor([0, 1], device="cuda"))  # output shape now known
idx = torch.tensor([0, 7], device="cuda")
bad = torch.index_select(a, 0, idx)  # queued, no wait; the server finds 7 out of range
try:
    bad.sum().item()
    print("RESULT no-index-error")
except IndexError as exc:
    print("RESULT index", "out of range" in str(exc))
print("RESULT after", (a * 2).sum().item())  # the session goes on
# An op whose arguments cannot be sent (a storage) fails at its line, and only there: the
# session had been told the op's name, which it refuses, and the next op used to get that.
try:
    torch.empty(0, device="cuda").set_(a.untyped_storage(), 2, (2, 3), (3, 1))
    print("RESULT no-storage-error")
except (RuntimeError, ValueError) as exc:
    print("RESULT storage", type(exc).__name__, str(exc).split(":")[0])
print("RESULT next", (torch.arange(3.0, device="cuda") * 2).tolist())
# A sparse gradient (nn.Embedding(sparse=True)) cannot live on a vGPU: PyTorch's error
# type with the reason, and the session goes on.
emb = torch.nn.Embedding(4, 2, sparse=True).to("cuda")
try:
    emb(torch.tensor([1, 1, 3], device="cuda")).sum().backward()
    print("RESULT no-sparse-error")
except RuntimeError as exc:
    print("RESULT sparse", str(exc).split(";")[0])
print("RESULT after-sparse", (torch.arange(3.0, device="cuda") + 1).tolist())
