# A loop of uploads that drops each result, as a data loader's batches are dropped: the
# server frees each before the next arrives (its memory is reused for it), and never holds
# the whole loop's uploads. Prints the most the server held at once, in MiB.
import torch

from orion_vgpu.client.runtime import get_runtime

conn = get_runtime().conn(0)
most = 0
for mib, rounds in ((4, 16), (36, 4)):  # through the ring; streamed through it (>= 32 MiB)
    src = torch.arange(mib << 18, dtype=torch.float32)
    for _ in range(rounds):
        y = src.to("cuda")  # nothing else in the loop: no op would send the frees along
        most = max(most, conn.stats()["allocated"])
        del y
assert torch.equal(src.to("cuda").cpu(), src)
print("MOST", most >> 20)
