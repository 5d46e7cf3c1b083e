"""notebooks/quickstart.ipynb: it runs top to bottom in a real kernel (a toy training run inside
it) and draws its figures inline, and the committed copy shows them without running it."""

import importlib.util
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"


def _images(notebook) -> list[str]:
  """The inline PNG figures among the outputs of the code cells."""
  return [out["data"]["image/png"] for cell in notebook.cells if cell.cell_type == "code"
          for out in cell.get("outputs", [])
          if out.get("output_type") == "display_data" and "image/png" in out.get("data", {})]


def test_committed_notebook_is_the_generated_one_and_shows_its_pictures():
  nbformat = pytest.importorskip("nbformat")
  spec = importlib.util.spec_from_file_location("make_quickstart",
                                                REPO_ROOT / "notebooks" / "make_quickstart.py")
  make_quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_quickstart)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert [c.source for c in notebook.cells] == [src for _, src in make_quickstart.CELLS], (
      "notebooks/quickstart.ipynb is out of date: run "
      "`python notebooks/make_quickstart.py --execute /tmp/iterfuse_demo` after the demo")
  assert len(_images(notebook)) == 2  # predictions and attention, from the demo workdir
  assert os.path.getsize(NOTEBOOK) < 500_000


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  workdir = tmp_path / "work"
  monkeypatch.setenv("ITERFUSE_WORKDIR", str(workdir))
  monkeypatch.setenv("ITERFUSE_QUICK", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own default: inline figures
  monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in notebook.cells:  # run it fresh: the committed outputs must not count
    if cell.cell_type == "code":
      cell.outputs = []
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}})
  client.execute()
  text = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))
  assert "checkpoint step 12" in text
  assert "cib_depth_to_semseg" in text and "cib_semseg_to_depth" in text
  assert "affinity row sums to 1.0" in text or "affinity row sums to 0.99" in text
  assert len(_images(notebook)) == 2  # both figures drawn inline
  for name in ("quickstart_predictions.png", "quickstart_attention.png"):
    assert (workdir / name).stat().st_size > 1000
