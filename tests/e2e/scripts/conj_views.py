"""Lazy conjugate and negative views of complex tensors (conj(), .H, .mH, and .real /
.imag of them), on the device the program sees: the same values and flags as locally."""

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def show(name: str, fn) -> None:  # noqa: ANN001
    try:
        t = fn()
        if isinstance(t, torch.Tensor):
            h = t.detach().cpu().resolve_conj().resolve_neg()
            print(f"RESULT {name} {tuple(t.shape)} {t.dtype} {h.flatten().tolist()}")
        else:
            print(f"RESULT {name} {t}")
    except RuntimeError as exc:
        print(f"RESULT {name} RuntimeError {exc}")


c = torch.complex(torch.arange(4.0), -torch.arange(4.0) * 2).view(2, 2).to(DEV)
show("conj-flag", lambda: c.conj().is_conj())
show("conj-imag", lambda: c.conj().imag)
show("conj-real", lambda: c.conj().real)
show("H-imag", lambda: c.H.imag)
show("mH-real", lambda: c.mH.real)
show("conj-times-2", lambda: c.conj() * 2)
show("conj-matmul", lambda: c.conj() @ c)
show("view-as-real-resolved", lambda: torch.view_as_real(c.conj().resolve_conj()))
show("neg-flag", lambda: c.conj().imag.is_neg())
show("imag-plus-1", lambda: c.conj().imag + 1)
d = c.clone()
d.conj().imag.add_(10)  # writes through the views into d's imaginary parts, negated
show("write-through", lambda: d)
