# An LSTM over variable-length sequences, as NLP programs write it: host lengths,
# pack_padded_sequence (unsorted: PyTorch sorts), the LSTM, pad_packed_sequence, a masked
# loss, backward and an optimizer step; then CTC loss with host and device lengths (as
# speech programs call it). Losses and gradients are printed; the test compares them with
# the same script run locally.
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
lstm = nn.LSTM(6, 5, num_layers=2, batch_first=True).to(device)
head = nn.Linear(5, 1).to(device)
opt = torch.optim.SGD([*lstm.parameters(), *head.parameters()], lr=0.1)
x = torch.randn(4, 7, 6).to(device)
lengths = torch.tensor([3, 7, 5, 1])  # on the host, as PyTorch requires
target = torch.randn(4, 7, 1).to(device)
losses, norms = [], []
for _ in range(3):
    opt.zero_grad()
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = lstm(packed)
    padded, out_lengths = pad_packed_sequence(out, batch_first=True, total_length=7)
    mask = (torch.arange(7)[None, :] < out_lengths[:, None]).to(device).unsqueeze(-1)
    loss = ((head(padded) - target) ** 2 * mask).sum() / mask.sum()
    loss.backward()
    norms.append(nn.utils.clip_grad_norm_(lstm.parameters(), 10.0).item())
    opt.step()
    losses.append(loss.item())
print("RESULT", packed.batch_sizes.device, packed.batch_sizes.tolist(), out_lengths.tolist(),
      tuple(padded.shape))
print("RESULT losses", " ".join(f"{v:.6f}" for v in losses))
print("RESULT norms", " ".join(f"{v:.6f}" for v in norms))

log_probs = torch.randn(12, 3, 5).to(device).log_softmax(2).detach().requires_grad_()
targets = torch.tensor([[1, 2, 2, 4], [3, 1, 0, 0], [2, 4, 1, 0]])
in_lengths, tg_lengths = torch.tensor([12, 10, 7]), torch.tensor([4, 2, 3])
ctc = [nn.functional.ctc_loss(log_probs, targets, in_lengths, tg_lengths),
       nn.functional.ctc_loss(log_probs, targets.to(device), in_lengths.to(device),
                              tg_lengths.to(device), reduction="sum"),
       nn.functional.ctc_loss(log_probs, targets, [12, 10, 7], [4, 2, 3], reduction="none",
                              zero_infinity=True).sum()]
sum(ctc).backward()
print("RESULT ctc", " ".join(f"{v.item():.5f}" for v in ctc), f"{log_probs.grad.sum().item():.5f}",
      f"{log_probs.grad.abs().sum().item():.4f}")
