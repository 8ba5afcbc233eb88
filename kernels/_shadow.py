"""What prolix's `kernels/` folder does when it is imported under the top-level name `kernels`.

That happens when the repository root is on sys.path (`python -m`, `torchrun -m`, `python -m
pytest` run from a clone) and a library asks for Hugging Face's `kernels` package (recent
transformers on import, its setuptools entry point in `pip install -e`). prolix's own code is
`prolix.kernels`; under the name `kernels` the folder hands the import over to the installed
package, or, with none installed, stands in as an empty module that looks uninstalled (no file,
no version, no submodules), so that availability checks say "not installed".
"""

import importlib.machinery
import importlib.util
import os
import sys
from typing import Any


def hand_over(namespace: dict[str, Any]) -> None:
    """Make `import kernels` return the installed package (the module in `namespace` otherwise)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(namespace["__file__"])))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module     # `import kernels` returns what sys.modules holds once __init__ ran
        spec.loader.exec_module(module)
        return
    message = (f"Hugging Face's `kernels` package is not installed ({root}/kernels is prolix's source, "
               "imported as prolix.kernels)")

    def __getattr__(name: str) -> Any:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}: {message}")

    namespace.update(__file__=None, __path__=[], __doc__=message, __getattr__=__getattr__)
