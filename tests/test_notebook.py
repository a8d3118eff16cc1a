"""examples/speculative_sampling.ipynb: committed executed (so that a reader online sees its outputs), and it runs
top to bottom on tiny models."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "speculative_sampling.ipynb"


def outputs_of(nb) -> tuple[str, list[str], list]:
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream" and out.name == "stdout")
    html = [out.data["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    return text, html, outputs


def check_outputs(nb) -> None:
    text, html, outputs = outputs_of(nb)
    assert not [out for out in outputs if out.output_type in ("error",)]
    assert not [out for out in outputs if out.output_type == "stream" and out.name == "stderr"]  # no warnings
    assert "Using TINY RANDOM models" in text or "as target and" in text  # it says which models it used
    assert "identical outputs: True" in text
    assert text.count("K=") == 4
    assert len(html) == 2 and 'title="draft"' in html[0] and "speculative-legend" in html[0]
    assert "counted from the rounds below" in html[1] and html[1].count('class="round"') >= 1  # the trace page
    assert sum("image/png" in out.get("data", {}) for out in outputs) == 2  # the two plots


def test_committed_notebook_is_executed():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "execute it top to bottom"
    check_outputs(nb)


@pytest.mark.slow
def test_notebook_runs_on_tiny_models(monkeypatch):
    monkeypatch.setenv("SPECULATIVE_NOTEBOOK_TINY", "1")  # the kernel inherits it: no checkpoint is looked for
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})  # cwd: examples/
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    print(f"the notebook ran in {time.perf_counter() - start:.1f} s")
    check_outputs(nb)
    assert "Using TINY RANDOM models" in outputs_of(nb)[0]
