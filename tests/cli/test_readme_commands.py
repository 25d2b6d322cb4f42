"""The README's "Working with your own rasters" commands, run literally through a shell (issue 18).

The shell expands ``aux/*.tif`` itself, as a user's would. The only additions are options that
keep training short (appended to ``train`` and ``resume``: a few steps, and a short fit of the
mass prior's correction, which takes most of a short CPU run); everything else is the README's text.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import cli_env

from carbonsr_cli.sample_data import generate_sample_data

README = Path(__file__).resolve().parents[2] / "README.md"
#: Appended to the README's train/resume lines: a few CPU steps instead of 30 epochs of `base`.
SHORT = {"train": "--max-steps 2 --steps-per-epoch 2 --batch-size 2 --mass-fit-steps 20 --device cpu -q",
         "resume": "--max-steps 3 --device cpu -q"}


def readme_block(title: str) -> list[str]:
    """The command lines of the first ```bash block after the heading ``title``."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(f"## {title}"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout the README assumes: emissions_1km.tif, aux/*.tif, roads.gpkg, another inventory."""
    d = tmp_path_factory.mktemp("readme")
    sample = generate_sample_data(d / "sample", size_km=36, years=(2019, 2020))
    shutil.copy(sample.emissions, d / "emissions_1km.tif")
    shutil.copytree(sample.aux_dir, d / "aux")
    shutil.copy(sample.roads, d / "roads.gpkg")  # aux/ keeps its copy too: `--aux aux/` sees the same layers
    shutil.copy(sample.emissions, d / "other_inventory_1km.tif")
    return d


def test_readme_own_rasters_commands_run_literally(workdir: Path) -> None:
    lines = readme_block("Working with your own rasters")
    assert any("--aux aux/*.tif --aux roads.gpkg" in ln for ln in lines)
    script = [f'carbonsr() {{ "{sys.executable}" -m carbonsr_cli.cli "$@"; }}', "set -e"]
    for ln in lines:
        cmd = ln.split("#", 1)[0].rstrip()
        words = cmd.split()
        assert words[0] == "carbonsr", ln
        script.append(f"{cmd} {SHORT.get(words[1], '')}".rstrip())
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, capture_output=True, text=True,
                          env=cli_env(COLUMNS="200"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("stats.json", "runs/city/best_model.pth", "emissions_100m.tif", "uniform_100m.tif",
                 "compare.png", "scores.json"):
        assert (workdir / name).exists(), name
    config = json.loads((workdir / "runs" / "city" / "config.json").read_text())["train_config"]
    assert config["mass_fit_steps"] == 20  # the option reached the run (and resume kept it)
