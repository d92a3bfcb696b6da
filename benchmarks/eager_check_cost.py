"""What the eager API's per-call check of a prepared model costs (issue 19, item 4's eager target).

A model prepared by ``prepare_model_outputs`` refuses to run when a submodule its graph calls
was replaced since. Prints that check's time per call for quantizable mobilenet_v2's float
and quantized models: the parents' ``_modules`` links it reads now (``edges``), and the walk of
every path with ``get_submodule`` it did before (``walk``)::

    .venv/bin/python benchmarks/eager_check_cost.py
"""
import warnings, timeit, copy
warnings.filterwarnings("ignore")
import torch, torchvision
import fxnumeric as ns
from fxnumeric import eager
torch.manual_seed(0)
m = torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False).eval()
m.fuse_model()
m.qconfig = torch.ao.quantization.get_default_qconfig("x86")
p = torch.ao.quantization.prepare(copy.deepcopy(m)); p(torch.randn(1,3,224,224))
q = torch.ao.quantization.convert(p)
f = copy.deepcopy(m)
ns.prepare_model_outputs(f, q)
for model in (f, q):
    inst = model.__dict__["forward"]
    if hasattr(inst, "edges"):
        t = min(timeit.repeat(lambda: any(pa._modules.get(n) is not c for pa, n, c in inst.edges), number=100, repeat=5)) / 100
        print("edges", len(inst.edges), f"{t*1e3:.3f} ms")
    def walk():
        for path, module in inst.calls:
            if inst.model.get_submodule(path) is not module: raise RuntimeError
    t = min(timeit.repeat(walk, number=100, repeat=5)) / 100
    print("walk", len(inst.calls), f"{t*1e3:.3f} ms")
