"""Op classes (``analysis.op_classes``): which ops of a Llama layer are barriers, vector work
or transparent."""

from __future__ import annotations

from fxprefetch.passes.analysis.graph_utils import op_name
from fxprefetch.passes.analysis.op_classes import classify

from support.planning import fresh_export


def test_classification_of_common_ops(dense):
    _, _, gm, _ = fresh_export(dense)
    kinds = {op_name(n): classify(n).value for n in gm.graph.nodes if n.op == "call_function"}
    assert kinds["aten::mm"] == "barrier" and kinds["aten::embedding"] == "barrier"
    assert kinds["aten::rsqrt"] == kinds["aten::mean"] == kinds["aten::mul"] == "vector"
    assert kinds["aten::view"] == kinds["aten::permute"] == "transparent"
