# Stops for good in the middle of a 32 MiB upload over TCP: the frame's header and half
# its payload are sent, so oriond's worker waits inside recv_into for the rest. Prints
# HALF then. Uses the runtime's connection as the client's own upload path does.
import time

import torch

from orion_vgpu.client.runtime import get_runtime
from orion_vgpu.protocol import codec, frames
from orion_vgpu.protocol import messages as m

assert (torch.ones(4, device="cuda") * 2).sum().item() == 8  # the session is open
conn = get_runtime().conns[0]
nbytes = 32 << 20
body = conn.packer.pack([m.CMD_UPLOAD, 1 << 30, codec.DTYPE_CODE[torch.uint8], [nbytes],
                         nbytes, None])
conn.sock.sendall(frames.HEADER.pack(len(body), nbytes) + body + bytes(nbytes // 2))
print("HALF", flush=True)
time.sleep(3600)
