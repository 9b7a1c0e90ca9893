"""pseudolabel: cluster embeddings at scale on Ray and turn the clusters into pseudo-labels.

    import pseudolabel
    km = pseudolabel.KMeans(n_clusters=1024, spherical=True).fit(X)  # numpy, Dataset or URL
    labels = km.predict(X)
    ds = pseudolabel.label(dataset, km.cluster_centers_, topk=5)     # a lazy ray.data.Dataset
    result = pseudolabel.run("s3://in/", "s3://out/", k=1024, balanced=True)

The math lives in ``pseudolabel.ops`` (numpy, faiss, torch), everything that touches Ray
or storage in ``pseudolabel.pipelines``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from importlib import metadata

_ROOMS = {"pseudolabel.ops": "ops", "pseudolabel.pipelines": "pipelines"}


class _SourceTree(importlib.abc.MetaPathFinder):
    """In a source tree that was never installed (a checkout on ``sys.path``, or
    ``ray job submit --working-dir .``), ops/ and pipelines/ stand beside this folder:
    import them as pseudolabel.ops and pseudolabel.pipelines from there, and nothing
    else. Installed (a wheel, or ``pip install -e``), the package's own mapping answers
    first and this finder is never asked."""

    def __init__(self, top: str):
        self.top = top

    def find_spec(self, name, path=None, target=None):
        if name not in _ROOMS:
            return None
        folder = os.path.join(self.top, _ROOMS[name])
        return importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )


_here = os.path.dirname(os.path.abspath(__file__))
_top = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "ops")) and os.path.isfile(
    os.path.join(_top, "ops", "__init__.py")
):
    sys.meta_path.append(_SourceTree(_top))

# The API loads on first use (PEP 562): ``import pseudolabel.ops.gpu`` on a machine with
# torch alone (no Ray, no faiss, no pyarrow) must not pull in the pipelines.
_API = {"KMeans", "RunResult", "label", "run"}
_ERRORS = {"ConfigError", "InputError", "PseudolabelError", "ResourceError", "StorageError"}


def __getattr__(name: str):
    if name in _API:
        from pseudolabel.pipelines import api

        return getattr(api, name)
    if name in _ERRORS:
        from pseudolabel.pipelines import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'pseudolabel' has no attribute {name!r}")


try:
    __version__ = metadata.version("pseudolabel")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ConfigError",
    "InputError",
    "KMeans",
    "PseudolabelError",
    "ResourceError",
    "RunResult",
    "StorageError",
    "__version__",
    "label",
    "run",
]
