# torch.nn's transformer (multi-head attention calls attention from inside Python, with a
# causal mask) and attention on 3-D inputs (no fused kernel: the math path with is_causal).
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
V, D, T, B = 60, 32, 12, 8
layer = nn.TransformerEncoderLayer(D, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
embed, head = nn.Embedding(V, D), nn.Linear(D, V)
model = nn.ModuleList([embed, encoder, head]).to(device)
mask = nn.Transformer.generate_square_subsequent_mask(T).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
data = torch.randint(0, V, (B, T + 1))
x, y = data[:, :-1].to(device), data[:, 1:].to(device)
for step in range(6):
    causal = step % 2 == 0  # the is_causal hint, and the mask alone
    logits = head(encoder(embed(x), mask=mask, is_causal=causal))
    loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    print("step", step, repr(loss.item()))
q = torch.randn(B, T, D).to(device)
a = F.scaled_dot_product_attention(q, q * 0.5, q + 1.0, is_causal=True)
print("sdpa3d", repr(a.sum().item()), tuple(a.shape))
keep = torch.rand(T, T) > 0.3
keep.fill_diagonal_(True)
qg = q.clone().requires_grad_(True)
b = F.scaled_dot_product_attention(qg, qg, qg, attn_mask=keep.to(device))  # a bool mask
b.sum().backward()
print("sdpa-bool", repr(b.sum().item()), repr(qg.grad.sum().item()))
# Inference with a padding mask: PyTorch packs the batch into a nested tensor on CUDA and
# the CPU (a vGPU takes the dense path); the unpadded positions must agree.
packed = nn.TransformerEncoder(layer, 2).to(device).eval()  # enable_nested_tensor=True
lengths = torch.tensor([T, 9, 5, T, 1, 7, 12, 3])
pad = torch.arange(T)[None, :] >= lengths[:, None]
with torch.inference_mode():
    out = packed(embed(x), src_key_padding_mask=pad.to(device)).cpu()
print("eval-padded", [round(out[i, :n].abs().sum().item(), 3) for i, n in enumerate(lengths.tolist())])
