# copy.deepcopy of a model, its state dict and its optimizer's state (an EMA or "best so
# far" model, a checkpoint kept in memory), and of a tensor with a gradient: the copies are
# independent tensors on the same device, parameters stay parameters (without gradients,
# as PyTorch copies them), and training resumes from the copied state exactly. copy.copy:
# a tensor on the same device sharing the original's memory.
import copy

import torch
import torch.nn as nn

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
x, y = torch.randn(32, 8).to(device), torch.randn(32, 1).to(device)


def step(m: nn.Module, o: torch.optim.Optimizer) -> float:
    o.zero_grad()
    loss = nn.functional.mse_loss(m(x), y)
    loss.backward()
    o.step()
    return loss.item()


for _ in range(2):
    step(model, opt)
best = copy.deepcopy(model)
saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
before = best(x).sum().item()
after_copy = [step(model, opt) for _ in range(3)]
print("RESULT copy unchanged", best(x).sum().item() == before)
print("RESULT copy params", [(isinstance(p, nn.Parameter), p.device.type == device,
                              p.requires_grad, p.grad is None) for p in best.parameters()])
model.load_state_dict(saved["model"])
opt.load_state_dict(saved["opt"])
again = [step(model, opt) for _ in range(3)]
print("RESULT resumed equal", again == after_copy)
best_opt = torch.optim.Adam(best.parameters(), lr=1e-2)
print("RESULT losses", " ".join(f"{v:.6f}" for v in after_copy + [step(best, best_opt)]))

t = torch.ones(3, device=device, requires_grad=True)
(t * 2).sum().backward()
t2 = copy.deepcopy(t)
t2.grad.add_(1)
with torch.no_grad():
    t2.mul_(5)
print("RESULT tensor copy", t.tolist(), t.grad.tolist(), t2.tolist(), t2.grad.tolist(),
      t2.requires_grad, t2.is_leaf)

shallow = copy.copy(t)
with torch.no_grad():
    shallow.add_(1)
p = copy.copy(best[0].weight)
print("RESULT shallow copy", shallow.device.type == device, shallow.requires_grad,
      shallow.is_leaf, t.tolist(), isinstance(p, nn.Parameter), p.device.type == device)
