# Indexing as programs write it, on the device: lists of indices, host index tensors and
# masks (allowed for CUDA tensors), numpy indices, numbers assigned into slices and masks,
# F.one_hot. Every result printed; the test compares them with the same script run locally.
import numpy as np
import torch
import torch.nn.functional as F

device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.arange(24.0, device=device).view(4, 6)
host_idx, host_mask = torch.tensor([0, 2]), torch.tensor([True, False, True, False])
cases = {
    "list": lambda: x[[0, 2]],
    "list of bools": lambda: x[[True, False, True, True]],
    "list, slice": lambda: x[[1, 3], 2:4],
    "slice, list": lambda: x[:, [5, 0]],
    "two lists": lambda: x[[0, 1], [2, 3]],
    "host tensor": lambda: x[host_idx],
    "host mask": lambda: x[host_mask],
    "host tensor in tuple": lambda: x[1:, torch.tensor([1, 4])],
    "0-dim host tensor": lambda: x[torch.tensor(2)],
    "numpy": lambda: x[np.array([3, 1])],
    "device mask": lambda: x[x > 17],
    "ellipsis, None": lambda: x[..., None, 1],
}
for name, fn in cases.items():
    print("RESULT", name, fn().tolist())

y = x.clone()
y[:, 0] = 7
y[1] = -1.5
y[[0, 3], 1] = 100
y[y > 20] = 0
y[host_mask, 5] = torch.tensor(9.0)
y[1:3, 2:4] = torch.ones(2, 2, device=device)
y[torch.tensor([2]), torch.tensor([4])] = 3
b = torch.zeros(3, dtype=torch.bool, device=device)
b[1] = True
print("RESULT assigned", y.tolist(), b.tolist())
labels = torch.tensor([0, 2, 1], device=device)
print("RESULT one_hot", F.one_hot(labels).tolist(), F.one_hot(labels, 5).sum().item(),
      F.one_hot(labels.view(3, 1), num_classes=3).shape)
