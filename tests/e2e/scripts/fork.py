"""Processes forked from a vGPU program behave as with CUDA: a child forked before the
parent used its vGPU opens a session of its own (and says so at its exit); one forked
after gets PyTorch's "Cannot re-initialize CUDA in forked subprocess" at its first CUDA
call (a DataLoader worker too), and the parent's session goes on untouched."""

import multiprocessing as mp
import os

import torch


def fresh_child(q) -> None:  # noqa: ANN001
    q.put(float((torch.ones(3, device="cuda") * 2).sum().item()))


class CudaItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.ones(2, device="cuda") * i


def loader_error() -> str:
    try:
        for _ in torch.utils.data.DataLoader(CudaItems(), batch_size=4, num_workers=2):
            pass
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[-1]
    return "no error"


def forked_child_call(b: torch.Tensor) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            msg = f"no error {b.sum().item()}"
        except RuntimeError as exc:
            msg = f"{type(exc).__name__}: {exc}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    print("RESULT fork-child", os.read(r, 4096).decode(), flush=True)


if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=fresh_child, args=(q,))
    p.start()
    print("RESULT fresh-child", q.get(timeout=120), flush=True)
    p.join()
    print("RESULT fresh-child-exit", p.exitcode, flush=True)
    a = torch.arange(6.0, device="cuda")
    b = a * 2
    print("RESULT loader", loader_error(), flush=True)
    forked_child_call(b)
    b.add_(1)
    print("RESULT parent", (a + b).sum().item(), flush=True)
