"""The torch.fx flow: graphs ``torch.fx.symbolic_trace`` (and ``prepare_fx``/``convert_fx``) made.

Their modules are ``call_module`` nodes the op tables read directly; what this flow adds is
where a *functional* op ran: torch.fx records the module stack of every node it traces in
``node.meta["nn_module_stack"]``, so a residual ``operator.add`` inside ``blocks.1`` is known to
belong to ``blocks.1`` (what FX's ``QConfigMapping.set_module_name_object_type_order`` names it
by).
"""

from __future__ import annotations

import torch.fx as fx

from . import Flow

__all__ = ["FxFlow"]


class FxFlow(Flow):
    """Graphs traced by torch.fx: the module path a functional op ran in."""

    name = "fx"

    def scope(self, node: fx.Node) -> str | None:
        """The innermost module path of the node's ``nn_module_stack``."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        return str(list(stack.values())[-1][0]) or None
