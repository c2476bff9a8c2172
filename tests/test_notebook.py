"""notebooks/bookgpt_colab.ipynb runs top to bottom (nbclient, a real kernel) in its tiny setting, from the
checkout and from the zip `make colab` writes: prepare the book the tests use, train, plot, evaluate,
generate, pack the results; and it is stored clean, ready for Colab."""
from __future__ import annotations

import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

import sample

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "bookgpt_colab.ipynb"


def code_cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_clean_and_colab_ready() -> None:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), "commit the notebook without outputs"
    source = "\n".join(code_cells())
    for field in ("ZIP_PATH", "REPO_URL", "BOOK", "MINUTES", "PROMPT", "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_K",
                  "TOP_P", "SEED"):
        assert f'{field} = ' in source and "#@param" in source.split(f"\n{field} = ", 1)[1].split("\n", 1)[0], field
    setup = code_cells()[0]  # installs what Colab lacks, never torch: Colab's build fits its GPU
    installed = re.search(r'missing = \[p for p in \(([^)]*)\)', setup).group(1)
    assert "torch" not in installed and "-r requirements" not in setup and '"git", "clone"' in setup
    for name in ("config/wp_bpe_cpu.toml", "config/wp_best_gpu.toml"):  # the recommended recipes
        assert name in source and (ROOT / name).is_file()
    # the sampling form starts at sample.py's own defaults: the run's own temperature, no truncation
    values = {k: float(re.search(rf"\n{k} = ([0-9.]+)", source).group(1)) for k in ("TOP_K", "TOP_P")}
    assert values == {"TOP_K": sample.TOP_K, "TOP_P": sample.TOP_P}
    assert f'\nTEMPERATURE = "{sample.SampleConfig().temperature}" ' in source
    assert f"MAX_NEW_TOKENS = {sample.SampleConfig().max_new_tokens} " in source
    assert nb["metadata"]["accelerator"] == "GPU" and nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["checkout", "zip"])
def test_notebook_runs_top_to_bottom(source: str, tmp_path: Path, book_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    work = tmp_path / "work"
    monkeypatch.setenv("BOOKGPT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("BOOKGPT_NOTEBOOK_WORK", str(work))
    monkeypatch.setenv("BOOKGPT_BOOK", str(book_path))
    if source == "zip":  # what `make colab` writes, unpacked by the first cell as in Colab
        zip_path = tmp_path / "bookgpt.zip"
        subprocess.run(["git", "archive", "--format=zip", "-o", str(zip_path), "HEAD"], cwd=ROOT, check=True)
        monkeypatch.setenv("BOOKGPT_NOTEBOOK_ZIP", str(zip_path))
        monkeypatch.setenv("BOOKGPT_NOTEBOOK_CODE", str(tmp_path / "code"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A failing cell raises CellExecutionError with its traceback.
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    if source == "zip":
        assert (tmp_path / "code" / "train.py").is_file()
    out = work / "out" / "wp_bpe_cpu"  # no GPU here: the CPU recipe's run folder
    assert (work / "data" / "war_and_peace_bpe2048" / "meta.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "summary" and records[-1]["iter"] == 30
    ev = json.loads((out / "eval.json").read_text())
    assert ev["data"]["split"] == "test" and 0 < ev["likelihood"]["bpb"] < 8

    code = [c for c in nb.cells if c.cell_type == "code"]
    texts = ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in code]
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert "torch " in texts[0] and "best val loss" in texts[3] and len(images) >= 2
    assert f"{ev['likelihood']['bpb']:.4f}" in "".join(str(o.get("data", {})) for o in code[4].outputs)
    prompt = "Prince Andrew looked at Pierre and"
    # generated at the temperature step 5 chose on val prompts
    first, generated = texts[5].split("\n", 1)
    assert ev["sampling"]["source"] == "chosen on val" and first == f"temperature {ev['sampling']['temperature']:g}"
    assert generated.startswith(prompt) and len(generated) > len(prompt) + 100
    with zipfile.ZipFile(work / "bookgpt_results.zip") as z:
        assert {"sample.txt", "report.md", "eval.json"} <= set(z.namelist())
        assert z.read("sample.txt").decode().startswith(prompt)
