"""Views of every kind, on the device the program sees (a vGPU, or the CPU locally): the
values must be those of the same program run locally, bit for bit. On a vGPU it also
prints the commands a burst of views sent (they are made on the client: none)."""

import gc

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def show(name: str, t: torch.Tensor) -> None:
    h = t.detach().cpu()
    print(f"RESULT {name} {tuple(h.shape)} {h.flatten().tolist()}")


def views() -> None:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(6, 8, generator=g).to(DEV)
    show("t", a.t())
    show("slice", a[1:5, 2:7])
    show("slice-of-t", a.t()[1:3])
    show("select", a[2])
    show("view", a.view(4, 12))
    show("permute-expand", a.view(2, 3, 8).permute(2, 0, 1).unsqueeze(0).expand(2, 8, 2, 3))
    show("reshape-slice-transpose", a.reshape(-1)[5:17].view(3, 4).transpose(0, 1))
    show("diagonal", a.diagonal())
    show("unfold", a[0].unfold(0, 3, 2))
    show("as_strided", a.as_strided((3, 3), (2, 5), 4))
    show("narrow-squeeze", a.narrow(0, 2, 1).squeeze(0))
    show("t-of-1d", a[3].t())
    show("t-t-detach", a[1:4].t().t().detach().t())
    try:
        a.view(2, 3, 8).t()
        print("RESULT t-of-3d no error")
    except RuntimeError as exc:
        print(f"RESULT t-of-3d {str(exc).splitlines()[0]}")


def writes_through() -> None:
    a = torch.zeros(4, 6, device=DEV)
    a.detach().add_(1)              # a detached alias writes into a
    a.view(24)[3:10].mul_(5)        # a view of a view, written in place
    a.t()[2].fill_(-1)              # a column, through a transpose
    a[1:3, ::2] += torch.arange(6.0, device=DEV).view(2, 3)
    show("written", a)


def outlives_its_base() -> None:
    a = torch.arange(20.0, device=DEV).view(4, 5)
    v = a.t()[1:4]
    w = v.detach()
    del a, v
    gc.collect()
    show("outlived", w * 2)
    show("outlived-itself", w)


def trains_through_views() -> None:
    torch.manual_seed(3)
    w = torch.randn(8, 4, device=DEV, requires_grad=True)
    x = torch.randn(5, 8, device=DEV)
    for _ in range(3):
        y = (x.view(5, 2, 4).transpose(1, 2).reshape(5, 8) @ w).t().relu()
        loss = y[:, 1:].sum()
        loss.backward()
        with torch.no_grad():
            w -= 0.1 * w.grad
            w.grad = None
    show("trained", w)


def reshaped_in_place() -> None:
    """In-place ops that change sizes or strides change only the tensor they are given,
    not the tensor it shares its storage with."""
    a = torch.arange(12.0, device=DEV).view(3, 4)
    b = a.detach()
    b.t_()
    show("t_", b)
    c = a[1]
    c.unsqueeze_(0)
    show("unsqueeze_", c)
    d = a.detach().view(12)
    d.resize_(2, 3)
    show("resize_", d)
    e = torch.empty(0, device=DEV)
    torch.add(a, 1, out=e)  # an out= op resizes its output
    show("out-resized", e)
    f = a.t()
    f.transpose_(0, 1)
    f.mul_(2)  # writes into a, through f's new strides
    show("transpose_", f)
    show("base-written-through-f", a)


def graph_of_a_view_made_before() -> None:
    if DEV != "cuda":
        print("RESULT graph (12.0,)")  # what the capture below gives: 3 x 2 x 2
        return
    x = torch.ones(8, device=DEV)
    xs = x.view(2, 4)  # made before the capture, used inside it
    y = (xs.t() * 2).sum(1)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = (xs.t() * 2).sum(1)
    x.fill_(3)
    g.replay()
    print(f"RESULT graph {tuple(y.cpu().unique().tolist())}")


def commands_of_views() -> None:
    if DEV != "cuda":
        return
    from sent_commands import sent_commands

    from orion_vgpu.protocol import messages as m

    a = torch.randn(16, 16, device=DEV)

    def burst() -> list:
        return [a.t(), a[2:5], a.view(256)[7:9], a.detach(), a.permute(1, 0)[3],
                a.unsqueeze(0).expand(3, 16, 16), a.transpose(0, 1).diagonal()]

    burst()  # first sight: the server runs each once and reports its metadata
    torch.cuda.synchronize()
    with sent_commands() as sent:
        kept = [burst() for _ in range(20)]
        torch.cuda.synchronize()
    ops = sum(kinds.count(m.CMD_OP) for kinds in sent)
    print(f"COMMANDS views-sent-ops {ops} views-made {sum(len(k) for k in kept)}")


views()
writes_through()
outlives_its_base()
trains_through_views()
reshaped_in_place()
graph_of_a_view_made_before()
commands_of_views()
