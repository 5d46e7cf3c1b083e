"""notebooks/quickstart.ipynb runs top to bottom (a toy training run inside it), so it never rots."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  workdir = tmp_path / "work"
  monkeypatch.setenv("ITERFUSE_WORKDIR", str(workdir))
  monkeypatch.setenv("ITERFUSE_QUICK", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  notebook = nbformat.read(REPO_ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}})
  client.execute()
  text = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))
  assert "checkpoint step 6" in text
  assert "cib_depth_to_semseg" in text and "cib_semseg_to_depth" in text
  assert "affinity row sums to 1.0" in text or "affinity row sums to 0.99" in text
  for name in ("quickstart_predictions.png", "quickstart_attention.png"):
    assert (workdir / name).stat().st_size > 1000
