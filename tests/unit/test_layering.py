"""
The request path's imports go one way: registry -> mirror -> hedging -> selection, and
mirror -> streaming -> peerresponse, with the shared declarations in spegel.interfaces. A lower layer importing a higher
one (the mirror importing the registry, as it once did) fails here.
"""

from __future__ import annotations

import ast
import importlib

from twisted.trial.unittest import SynchronousTestCase

# Each module, and the spegel modules it must never import.
_HIGHER = {
    "spegel.interfaces": {"spegel.registry", "spegel.responses", "spegel.mirror", "spegel.selection", "spegel.streaming", "spegel.peerresponse"},
    "spegel.peerresponse": {"spegel.registry", "spegel.responses", "spegel.mirror", "spegel.selection", "spegel.streaming"},
    "spegel.streaming": {"spegel.registry", "spegel.responses", "spegel.mirror", "spegel.selection"},
    "spegel.selection": {"spegel.registry", "spegel.responses", "spegel.mirror", "spegel.streaming", "spegel.hedging"},
    "spegel.hedging": {"spegel.registry", "spegel.responses", "spegel.mirror", "spegel.streaming"},
    "spegel.mirror": {"spegel.registry", "spegel.responses"},
    "spegel.coalesce": {"spegel.registry", "spegel.mirror"},
    "spegel.ingest": {"spegel.registry", "spegel.mirror", "spegel.selection", "spegel.streaming"},
    "spegel.responses": {"spegel.registry", "spegel.mirror"},
    "spegel.registry": {"spegel.mirror", "spegel.selection", "spegel.streaming"},
}


def _imports(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    tree = ast.parse(open(module.__file__).read())  # type: ignore[arg-type]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


class LayeringTests(SynchronousTestCase):
    def test_one_way(self) -> None:
        for module, forbidden in _HIGHER.items():
            self.assertEqual(_imports(module) & forbidden, set(), module)

    def test_the_check_sees_imports(self) -> None:
        self.assertIn("spegel.selection", _imports("spegel.mirror"))
        self.assertIn("spegel.interfaces", _imports("spegel.registry"))
