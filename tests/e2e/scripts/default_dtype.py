# torch.set_default_dtype(torch.float64), as scientific code sets it: factories without a
# dtype, int tensors promoted by floats and divisions, a model built afterwards and trained
# a step, then back to float32 mid-run. dtypes and values (to 12 digits) are printed.
import torch

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_default_dtype(torch.float64)
torch.manual_seed(0)


def show(name: str, t: torch.Tensor) -> None:
    print("RESULT", name, t.dtype, [round(float(v), 12) for v in t.detach().cpu().flatten()])


show("zeros", torch.zeros(2, device=dev))
show("full", torch.full((2,), 1 / 3, device=dev))
show("arange float", torch.arange(0.0, 1.0, 0.25, device=dev))
show("arange int", torch.arange(3, device=dev))
show("linspace", torch.linspace(0, 1, 4, device=dev))
ints = torch.arange(4, device=dev)
show("int / 3", ints / 3)
show("int + 0.1", ints + 0.1)
show("sqrt int", torch.sqrt(ints))
show("where numbers", torch.where(ints > 1, 0.1, 0.2))
model = torch.nn.Linear(3, 1).to(dev)
x = torch.linspace(-1, 1, 12, device=dev).reshape(4, 3)
loss = (model(x) ** 2).mean()
loss.backward()
torch.optim.SGD(model.parameters(), lr=0.1).step()
show("weight after a step", model.weight)
show("loss", loss)
torch.set_default_dtype(torch.float32)
show("zeros back", torch.zeros(2, device=dev))
show("int / 3 back", ints / 3)
