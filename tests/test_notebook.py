"""examples/speculative_sampling.ipynb: committed without outputs, and runs top to bottom on tiny models."""

import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "speculative_sampling.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs"


def test_notebook_runs_on_tiny_models(monkeypatch):
    monkeypatch.setenv("SPECULATIVE_NOTEBOOK_TINY", "1")  # the kernel inherits it: no checkpoint is looked for
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})  # cwd: examples/
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    print(f"the notebook ran in {time.perf_counter() - start:.1f} s")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream" and out.name == "stdout")
    assert not [out for out in outputs if out.output_type == "stream" and out.name == "stderr"]  # no warnings
    assert "Using TINY RANDOM models" in text
    assert "identical outputs: True" in text
    assert text.count("K=") == 4
    html = [out.data["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert len(html) == 1 and 'title="draft"' in html[0] and "speculative-legend" in html[0]
    assert sum("image/png" in out.get("data", {}) for out in outputs) == 2  # the two plots
