"""Sphinx configuration of the curvlinops_fisher documentation.

Build (from the repository root): ``python -m sphinx -W -b html docs docs/_build/html``.
``-D plot_gallery=0`` skips executing the example gallery (for a quick check).
"""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))
os.environ.setdefault("MPLBACKEND", "Agg")

import curvlinops_fisher  # noqa: E402

project = "curvlinops_fisher"
author = "curvlinops_fisher developers"
copyright = "2026, curvlinops_fisher developers"
release = curvlinops_fisher.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md", "examples/README.txt", "gallery_order.py"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# laplace-torch is optional (installed without its dependencies, see the README): mock it
# when absent so that the API page of curvlinops_fisher.laplace still builds.
autodoc_mock_imports = [] if importlib.util.find_spec("laplace") else ["laplace"]

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = True

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    # Execute every example (not only plot_*.py).
    "filename_pattern": r".*\.py$",
    "within_subsection_order": "gallery_order.ExampleOrder",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "abort_on_example_error": True,
}

html_theme = "furo"
html_title = f"curvlinops_fisher {release}"
html_static_path: list[str] = []
