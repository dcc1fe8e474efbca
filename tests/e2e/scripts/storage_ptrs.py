# Shared-storage checks as libraries make them before saving (safetensors' storage_ptr,
# transformers' id_tensor_storage): untyped_storage().data_ptr() and nbytes() group the
# tensors of a state dict that share memory. A tied weight shares; a weight of the same
# size does not. Every result printed; the test compares them with the same script run
# locally.
import collections

import torch
import torch.nn as nn

DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
emb = nn.Embedding(10, 4)
head = nn.Linear(4, 10, bias=False)
head.weight = emb.weight  # tied
extra = nn.Linear(4, 10, bias=False)  # the same size as the tied weight
model = nn.ModuleDict({"emb": emb, "head": head, "extra": extra, "out": nn.Linear(10, 4)})
model = model.to(DEV)


def storage_ptr(t):
    return t.untyped_storage().data_ptr()


groups = collections.defaultdict(list)
for name, t in model.state_dict().items():
    groups[(t.device, storage_ptr(t), t.untyped_storage().nbytes())].append(name)
print("RESULT shared", sorted(sorted(names) for names in groups.values() if len(names) > 1))
a = torch.arange(12.0, device=DEV)
v = a.view(3, 4)[1:]
print("RESULT a view shares its base's storage", storage_ptr(v) == storage_ptr(a))
print("RESULT a storage's pointer is not null", storage_ptr(a) != 0)
print("RESULT data_ptr is the storage's plus the offset",
      v.data_ptr() - storage_ptr(v) == v.storage_offset() * v.element_size())
print("RESULT another tensor's storage is another", storage_ptr(torch.zeros(12, device=DEV))
      != storage_ptr(a))
print("RESULT a clone's storage is another", storage_ptr(a.clone()) != storage_ptr(a))
print("RESULT nbytes", a.untyped_storage().nbytes(), v.untyped_storage().nbytes())
