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
