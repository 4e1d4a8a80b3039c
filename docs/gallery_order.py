"""Order of the example gallery (Sphinx-Gallery's ``within_subsection_order``)."""

ORDER = [
    "quickstart.py",
    "plot_mc_vs_ggn.py",
    "plot_eigenvalues.py",
    "plot_trace_diagonal.py",
    "plot_laplace.py",
    "functional_laplace.py",
    "laplace_backend.py",
    "plot_huggingface.py",
]


class ExampleOrder:
    """Sort key: the position in ``ORDER``; unlisted examples follow by name."""

    def __init__(self, src_dir: str):
        self.src_dir = src_dir

    def __call__(self, filename: str) -> tuple[int, str]:
        index = ORDER.index(filename) if filename in ORDER else len(ORDER)
        return index, filename

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
