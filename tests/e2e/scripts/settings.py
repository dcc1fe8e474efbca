# Process-wide torch settings a training script sets: deterministic algorithms (which also
# fill new memory: NaN for floats, the largest value for ints), the cuDNN flags (property,
# and the flags() context manager), TF32 and the float32 matmul precision. Printed values
# must equal the local run's: the vGPU's session follows the program's settings.
import torch
import torch.nn.functional as F

dev = "cuda" if torch.cuda.is_available() else "cpu"
before = torch.empty(3, device=dev)  # queued before the change: no fill either way
torch.use_deterministic_algorithms(True)
print("RESULT float empty is nan", torch.isnan(torch.empty(4, device=dev)).all().item())
print("RESULT int empty", torch.empty(2, dtype=torch.int64, device=dev).cpu().tolist())
print("RESULT empty_like is nan",
      torch.isnan(torch.empty_like(torch.zeros(2, device=dev))).all().item())
torch.utils.deterministic.fill_uninitialized_memory = False
torch.utils.deterministic.fill_uninitialized_memory = True
print("RESULT fill on again", torch.isnan(torch.empty(2, device=dev)).all().item())
torch.manual_seed(0)
x, w = torch.randn(1, 2, 5, 5, device=dev), torch.randn(3, 2, 3, 3, device=dev)
with torch.backends.cudnn.flags(enabled=False, deterministic=True):
    y = F.conv2d(x, w, padding=1)
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.set_float32_matmul_precision("high")
print("RESULT conv", [round(v, 4) for v in y.sum(dim=(2, 3)).flatten().cpu().tolist()])
print("RESULT matmul", [round(v, 4) for v in (x.flatten()[:4] @ x.flatten()[:4]).reshape(1).cpu().tolist()])
torch.use_deterministic_algorithms(False)
print("RESULT off", torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
