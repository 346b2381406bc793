"""Classic step() through the grouped Triton kernels (interpreter) equals the torch path; run by test_grouped_step."""
import copy
import os

import torch

import adalomo
from adalomo import kernels

assert kernels.use_triton(torch.zeros(2)), "interpreter not active"
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
x = torch.randn(4, 7)
res = {}
for name, mk in {"adalomo": lambda ps: adalomo.AdaLomo(ps, lr=1e-2, weight_decay=0.1),
                 "adafactor": lambda ps: adalomo.Adafactor(ps, beta1=0.9),
                 "lomo": lambda ps: adalomo.Lomo(ps, lr=1e-2)}.items():
    outs = []
    for disable in ("0", "1"):
        os.environ["ADALOMO_DISABLE_TRITON"] = disable
        m = copy.deepcopy(base)
        opt = mk(m.parameters())
        for _ in range(3):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        outs.append([p.detach().clone() for p in m.parameters()])
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*outs))
    print(name, "grouped vs torch max rel err", err)
    assert err < 1e-5
