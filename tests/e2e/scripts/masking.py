# Masking and clipping as losses and activations write them, forward and backward:
# torch.where with tensors and with numbers, Tensor.where, clamp, masked_fill, a hinge
# loss. Their backward formulas make helper tensors with the gradient's options. Results
# and gradients are printed; the test compares them with the same script run locally.
import torch

device = "cuda" if torch.cuda.is_available() else "cpu"
base = torch.linspace(-2, 2, 9)
x = base.to(device).requires_grad_()
h = torch.tensor([1, 2, 3], dtype=torch.float16).to(device)
outs = {
    "where tensors": torch.where(x > 0, x, torch.zeros_like(x)),
    "where number": torch.where(x > 0, x * 2, 0.5),
    "where numbers": torch.where(x > 0, 1.0, -1.0),
    "where int": torch.where(x > 0, 3, 0),
    "Tensor.where": x.where(x < 1, 7.0),
    "where keeps half": torch.where(h > 1, h, 0.5),
    "clamp": x.clamp(min=-1, max=1.5),
    "clamp_min": x.clamp_min(0.25),
    "masked_fill": x.masked_fill(x.abs() < 0.6, 0.0),
    "hinge": torch.clamp(1 - x * torch.sign(base.to(device)), min=0),
}
loss = sum(v.float().sum() for k, v in outs.items() if v.requires_grad)
loss.backward()
for name, v in outs.items():
    print("RESULT", name, v.dtype, [round(a, 4) for a in v.detach().float().cpu().tolist()])
print("RESULT grad", [round(a, 4) for a in x.grad.cpu().tolist()])
