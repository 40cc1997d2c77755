"""Write, register and run a custom pass from a YAML pipeline: python examples/custom_pass.py"""
from __future__ import annotations

import torch
from torch import nn

import graphkd as gk
from graphkd.graph import ScopeFilter, find_nodes, insert_module_after, scopes_of


class ClampActivations(gk.Pass):
    """Clamp the output of every ReLU to [0, limit] (a ReLU6-style student)."""

    name = "clamp_relu"

    def __init__(self, *, limit: float = 6.0, ignored_scopes: list[str] | None = None) -> None:
        if limit <= 0:
            raise gk.ConfigError(f"must be > 0, got {limit}", "limit")
        self.limit, self.ignored_scopes = limit, ignored_scopes

    def apply(self, gm: torch.fx.GraphModule, ctx: gk.PassContext) -> None:
        select = ScopeFilter(scopes_of(gm), ignored_scopes=self.ignored_scopes)
        clamped = []
        for node in find_nodes(gm, module_type=nn.ReLU):
            if select(node.meta["scope"]):
                insert_module_after(gm, node, f"clamps.{node.name}", nn.Hardtanh(0.0, self.limit))
                clamped.append(node.meta["scope"])
        ctx.statistics[self.name] = {"clamped": clamped, "limit": self.limit}


def main() -> None:
    torch.manual_seed(0)
    gk.register_pass(ClampActivations)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(4, 3, 8, 8) * 10
    config = """
pipeline:
  - pass: clamp_relu
    limit: 1.0
    ignored_scopes: ["3"]
"""
    c = gk.compress(model, config, x)
    print(c.model.code)
    print("statistics:", c.statistics())
    print("max |student - original| =", (c.model(x) - model(x)).abs().max().item())


if __name__ == "__main__":
    main()
