# Explicit random generators, as diffusion pipelines and data augmentation use them:
# torch.Generator(device=...) seeded, drawn from by factories and in-place random ops,
# its state saved and restored, copied, and a second generator with the same seed. On an
# emulated GPU the server's generator is a CPU one, so the numbers equal the local run's.
import copy
import pickle

import torch

dev = "cuda" if torch.cuda.is_available() else "cpu"


def show(name: str, t: torch.Tensor) -> None:
    print("RESULT", name, t.device.type == dev, [round(float(v), 5) for v in t.cpu().flatten()])


g = torch.Generator(device=dev)
print("RESULT new", g.device.type == dev, g.initial_seed(), isinstance(g, torch.Generator))
assert g.manual_seed(1234) is g
show("randn", torch.randn(5, generator=g, device=dev))
show("rand", torch.rand(2, 3, generator=g, device=dev))
show("randperm", torch.randperm(8, generator=g, device=dev))
show("randint", torch.randint(0, 10, (4,), generator=g, device=dev))
show("normal_", torch.empty(6, device=dev).normal_(generator=g))
show("uniform_", torch.empty(6, device=dev).uniform_(-1, 1, generator=g))
show("bernoulli", torch.bernoulli(torch.full((6,), 0.5, device=dev), generator=g))
show("multinomial", torch.multinomial(torch.tensor([0.1, 0.2, 0.7], device=dev), 5,
                                      replacement=True, generator=g))
show("normal", torch.normal(torch.zeros(3, device=dev), 1.0, generator=g))

state = g.get_state()
first = torch.randn(4, generator=g, device=dev)
g.set_state(state)
print("RESULT set_state replays", torch.equal(first, torch.randn(4, generator=g, device=dev)))

twin = torch.Generator(dev).manual_seed(1234)
again = torch.Generator(dev).manual_seed(1234)
print("RESULT same seed same stream",
      torch.equal(torch.randn(5, generator=twin, device=dev),
                  torch.randn(5, generator=again, device=dev)))

torch.manual_seed(7)  # the default generator is not an explicit one's
show("default after seed", torch.randn(3, device=dev))
show("explicit unaffected", torch.randn(3, generator=g, device=dev))

clone = copy.deepcopy(g)
print("RESULT deepcopy continues", torch.equal(torch.randn(3, generator=clone, device=dev),
                                               torch.randn(3, generator=g, device=dev)))
thawed = pickle.loads(pickle.dumps(g))
print("RESULT pickle continues", torch.equal(torch.randn(3, generator=thawed, device=dev),
                                             torch.randn(3, generator=g, device=dev)))
s = g.seed()
print("RESULT seed() is initial_seed()", s == g.initial_seed())

gens = [torch.Generator(device=dev).manual_seed(i) for i in range(3)]  # one per sample
show("per-sample", torch.stack([torch.randn(2, generator=k, device=dev) for k in gens]))
del gens

if dev == "cuda":
    dg = torch.cuda.default_generators[0]
    torch.cuda.manual_seed(99)
    a = torch.randn(3, device=dev)
else:
    dg = torch.default_generator
    torch.manual_seed(99)
    a = torch.randn(3, device=dev)
dg.manual_seed(99)
print("RESULT default generator", dg.initial_seed(),
      torch.equal(a, torch.randn(3, device=dev, generator=dg)))
