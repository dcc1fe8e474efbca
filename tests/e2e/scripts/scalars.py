"""Python data built from vGPU tensors (torch.tensor of a list of losses, the legacy
constructor, mixed lists) and CPU-only tensor methods, on the device the program sees:
the same values, dtypes and errors as the same program run locally."""

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def show(name: str, fn) -> None:  # noqa: ANN001
    try:
        t = fn()
        print(f"RESULT {name} {t.device.type} {t.dtype} {tuple(t.shape)} {t.tolist()}")
    except (TypeError, ValueError, RuntimeError) as exc:
        print(f"RESULT {name} {type(exc).__name__}: {exc}")


losses = [torch.tensor(v, device=DEV) for v in (1.5, 2.25, -3.0)]
ints = [torch.tensor(v, device=DEV) for v in (4, 5)]
doubles = [torch.tensor(v, dtype=torch.float64, device=DEV) for v in (0.1, 0.2)]
show("list-of-0d", lambda: torch.tensor(losses))
show("tuple-of-0d", lambda: torch.tensor(tuple(ints)))
show("float64-0d", lambda: torch.tensor(doubles))
show("nested", lambda: torch.tensor([losses[:2], [losses[2], losses[0]]]))
show("mixed-host-first", lambda: torch.tensor([0.5, losses[1]]))
show("as_tensor", lambda: torch.as_tensor(losses))
show("to-device", lambda: torch.tensor(losses, device=DEV).cpu())
show("stacked-back", lambda: torch.stack(losses).cpu())
show("1d-elements", lambda: torch.tensor([torch.ones(2, device=DEV), torch.ones(2, device=DEV)]))
x = torch.arange(3.0, device=DEV)
show("apply_", lambda: x.apply_(lambda v: v * 2))
show("after-apply_", lambda: x.cpu())
