"""notebooks/*.ipynb run top to bottom: each in a fresh kernel of this interpreter, in a temporary directory, offline,
with UNCLIP_NOTEBOOK_SMOKE=1 (few sampling steps; the training notebook runs the smoke recipe, about 6 minutes on
2 CPU cores: deselect it with -m "not slow"). The committed notebooks carry no outputs.
UNCLIP_NOTEBOOK_OUT=DIR keeps the executed notebooks, outputs included."""

import json
import os
import re
import sys
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel the notebooks run in; in the test extra with nbclient and nbformat)
import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager  # nbclient's dependency
from jupyter_client.manager import AsyncKernelManager
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
# The notebooks that load the shipped demo model (the training notebook trains its own).
NEEDS_DEMO_MODEL = {"quickstart.ipynb", "manipulations.ipynb"}
SLOW = {"training.ipynb": 2400}   # per-cell timeout (s): the smoke recipe runs in one cell
CELL_TIMEOUT = 900
KERNEL = "unclip-jax-tests"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _kernel_manager(root: Path) -> AsyncKernelManager:
    """A kernel of exactly this interpreter (a kernelspec of our own: a user's "python3" spec may point elsewhere)."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(root / "kernels")])
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs,
                              connection_file=str(root / "kernels" / "connection.json"))


def _failure(name: str, nb, err: Exception) -> str:
    """The failing cell's index, source and error (tracebacks without terminal colours)."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                tb = ANSI.sub("", "\n".join(out.get("traceback", [])))
                return (f"{name}: cell {i} (counting from 0) failed\n----- source -----\n{cell.source}\n"
                        f"----- error -----\n{out.get('ename')}: {out.get('evalue')}\n{tb}")
    return f"{name}: {type(err).__name__}\n{ANSI.sub('', str(err))}"


def run_notebook(name: str, workdir: Path, timeout: int) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {**os.environ, "UNCLIP_NOTEBOOK_SMOKE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "IPYTHONDIR": str(workdir / "ipython"),
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    run_dir = workdir / "cwd"
    run_dir.mkdir()
    client = nbclient.NotebookClient(nb, km=_kernel_manager(workdir), timeout=timeout, allow_errors=False,
                                     resources={"metadata": {"path": str(run_dir)}})
    failure = None
    try:
        client.execute(env=env, cwd=str(run_dir))
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        failure = _failure(name, nb, err)
    if os.environ.get("UNCLIP_NOTEBOOK_OUT"):  # keep the executed notebooks (outputs and all) to look at
        out = Path(os.environ["UNCLIP_NOTEBOOK_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out / name)
    if failure:
        pytest.fail(failure, pytrace=False)


def _params():
    marks = {name: [pytest.mark.slow] if name in SLOW else [] for name in ALL}
    return [pytest.param(name, marks=marks[name], id=name.removesuffix(".ipynb")) for name in ALL]


@pytest.mark.parametrize("name", _params())
def test_notebook_runs(name, tmp_path):
    if name in NEEDS_DEMO_MODEL:
        from unclip_jax.demo import MODEL_DIR
        if not (MODEL_DIR / "model_index.json").exists():
            pytest.skip(f"{name} loads the demo model, which is missing from {MODEL_DIR}: build it with "
                        "`python -m unclip_jax.demo.recipe --workdir DIR --install`")
    run_notebook(name, tmp_path, SLOW.get(name, CELL_TIMEOUT))


def test_notebooks_are_committed_clean():
    """No outputs or execution counts stored, valid nbformat, and the smoke switch the tests rely on."""
    assert {"quickstart.ipynb", "manipulations.ipynb", "training.ipynb"} <= set(ALL)
    for name in ALL:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} cell {i} has stored outputs"
        assert any("UNCLIP_NOTEBOOK_SMOKE" in cell.source for cell in nb.cells), f"{name} ignores the smoke switch"
