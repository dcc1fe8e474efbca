# Pre-0.4 tensor types as old code uses them: torch.cuda.FloatTensor(2, 3) and friends,
# isinstance checks against them, .type(...) with a type or its name, and
# set_default_tensor_type. Locally the same lines use the CPU types (torch.FloatTensor ...).
import warnings

import torch

warnings.simplefilter("ignore")  # set_default_tensor_type is deprecated; still in use
dev = "cuda" if torch.cuda.is_available() else "cpu"
T = torch.cuda if dev == "cuda" else torch
prefix = "torch.cuda." if dev == "cuda" else "torch."


def show(name: str, t: torch.Tensor) -> None:
    print("RESULT", name, t.dtype, t.device.type == dev, list(t.shape),
          [round(float(v), 3) for v in t.cpu().flatten()])


a = T.FloatTensor(2, 3).fill_(1.5)
show("sizes", a)
show("Size", T.FloatTensor(torch.Size([4])).zero_())
show("data long", T.LongTensor([1, 2, 3]))
show("data double", T.DoubleTensor([[1, 2], [3, 4]]))
show("empty", T.FloatTensor())
alias = T.FloatTensor(a)
alias[0, 0] = 7.0
print("RESULT alias shares memory", alias is a, a[0, 0].item())
a[0, 0] = 1.5
print("RESULT isinstance", isinstance(a, T.FloatTensor), isinstance(a, T.LongTensor),
      isinstance(T.LongTensor([1]), T.LongTensor))
show("host .type(class)", torch.arange(4.0).type(T.DoubleTensor))
show("host .type(name)", torch.arange(3.0).type(prefix + "IntTensor"))
show(".type(class)", a.type(T.HalfTensor))
show(".type(name)", a.type(prefix + "LongTensor"))
print("RESULT .type()", a.type() == prefix + "FloatTensor")
try:
    T.FloatTensor(T.LongTensor([1]))
except TypeError:
    print("RESULT wrong dtype refused")
torch.set_default_tensor_type(T.DoubleTensor)
show("default type", torch.zeros(2))
torch.set_default_tensor_type(torch.FloatTensor)
show("default type back", torch.ones(2).to("cpu") if dev == "cpu" else torch.ones(2).cuda())
print("RESULT default host again", torch.ones(1).device.type, torch.ones(1).dtype)
