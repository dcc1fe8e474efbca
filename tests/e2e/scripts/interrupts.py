"""Ctrl-C at random moments of a vGPU program that goes on after it (a Jupyter kernel):
uploads of every size, downloads, ops and syncs are interrupted many times, and after each
KeyboardInterrupt the session still computes and moves the right values. Then two Ctrl-C
in a row during a long wait: the program gets its KeyboardInterrupt at once, and the next
CUDA call says the session was given up."""

import os
import random
import signal
import threading
import time

import torch

PID = os.getpid()
# As an interactive interpreter or a Jupyter kernel has it: a process started in the
# background of a non-interactive shell (CI) inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupter(*delays: float) -> threading.Thread:
    """A thread that sends SIGINT after each delay, once started. Start it inside the
    ``try`` that expects the interrupt: with a delay of 1 ms on a loaded host, the signal
    can come while ``start()`` still waits for the thread to begin."""
    def run() -> None:
        for d in delays:
            time.sleep(d)
            os.kill(PID, signal.SIGINT)
    return threading.Thread(target=run, daemon=True)


def interrupt_after(*delays: float) -> threading.Thread:
    t = interrupter(*delays)
    t.start()
    return t


def busy(hosts: list[torch.Tensor], rng: random.Random) -> None:
    deadline = time.monotonic() + 5
    acc = torch.zeros(1, device="cuda")
    while time.monotonic() < deadline:
        h = rng.choice(hosts)
        d = h.to("cuda")
        acc += (d * 2 + 1).sum()
        if rng.random() < 0.5:
            back = d.cpu()
            assert back.shape == h.shape
        if rng.random() < 0.3:
            acc.item()


def main() -> None:
    rng = random.Random(5)
    g = torch.Generator().manual_seed(3)
    hosts = [torch.randn(n, generator=g) for n in (16, 4096, 200_000, 3_000_000)]
    interrupted = 0
    for _ in range(40):
        timer = interrupter(rng.uniform(0.001, 0.08))
        try:
            timer.start()
            busy(hosts, rng)
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
        for h in hosts:
            d = h.to("cuda")
            assert torch.equal(d.cpu(), h), "a transfer after an interrupt is wrong"
            assert torch.equal((d * 2).cpu(), h * 2), "an op after an interrupt is wrong"
        assert torch.arange(5.0, device="cuda").sum().item() == 10.0
    print("RESULT interrupted", interrupted, "of 40, session intact", flush=True)

    a = torch.randn(1024, 1024, device="cuda")
    x = a
    for _ in range(40):  # a second or more of work queued on the server
        x = (x @ a) / 1024
    timer = interrupt_after(0.05, 0.05)
    t0 = time.monotonic()
    try:
        x.sum().item()
        print("RESULT double no interrupt", flush=True)
    except KeyboardInterrupt:
        print("RESULT double KeyboardInterrupt", flush=True)
    waited = time.monotonic() - t0
    timer.join()
    try:
        torch.ones(2, device="cuda").sum().item()
        print("RESULT after-double no error", flush=True)
    except RuntimeError as exc:
        print("RESULT after-double", type(exc).__name__, exc, flush=True)
    print(f"WAITED {waited:.3f}", flush=True)


main()
