"""One import namespace: only `genpan` is installed at top level, so the repository's stage folders
(prep/ train/ eval/ kernels/ jobs/) never shadow an installed package — Hugging Face's `kernels`,
which transformers imports at start-up, in particular."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE_FOLDERS = ("prep", "train", "eval", "kernels", "jobs")
FUSED_LOSS_MODULES = ("genpan.kernels.inst_loss", "genpan.kernels.sem_loss")


def _python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root: the current directory comes first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_stage_folders_are_not_packages():
    for folder in STAGE_FOLDERS:
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/ must hold no __init__.py"
        stray = sorted(p.name for p in (REPO / folder).iterdir() if p.is_dir() and (p / "__init__.py").exists())
        assert not stray, f"{folder}/ holds packages {stray}; library code lives under genpan/"


def test_transformers_and_fused_losses_import_from_the_repo_root():
    pytest.importorskip("transformers")
    pytest.importorskip("kernels")
    code = (
        "import transformers.modeling_utils, kernels, importlib\n"
        f"for name in {FUSED_LOSS_MODULES!r}: importlib.import_module(name)\n"
        "from genpan.train.losses import compute_losses\n"
        "print(kernels.__file__)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert "site-packages" in kernels_file.parts, f"`import kernels` from the repo root found {kernels_file}"


def test_stage_names_hold_no_library_code_from_the_repo_root():
    """From the repo root a stage name is at most an empty namespace over entry scripts, never a package."""
    code = (
        "import importlib.util\n"
        f"for name in {STAGE_FOLDERS!r}:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, 'none' if spec is None else (spec.origin or 'namespace'))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    found = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    for name, origin in found.items():
        if name == "kernels" and origin not in ("none", "namespace"):
            assert "site-packages" in Path(origin).parts, f"kernels resolves to {origin}, not the installed package"
        else:
            assert origin in ("none", "namespace"), f"{name} resolves to a module: {origin}"


def test_teacher_builds_beside_transformers(tmp_path):
    """The Depth Anything teacher (transformers, and so Hugging Face's kernels) and the fused losses in one
    process started in the repo root: a tiny random checkpoint is saved, loaded by the teacher and run."""
    pytest.importorskip("transformers")
    code = f"""
import numpy as np, torch
import genpan.kernels.inst_loss
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
from genpan.prep.teachers import make_teacher
backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14,
                        image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                             fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
torch.manual_seed(0)
DepthAnythingForDepthEstimation(config).save_pretrained({str(tmp_path)!r})
teacher = make_teacher("depth_anything_v2", {str(tmp_path)!r}, input_size=56, device="cpu")
disp = teacher([np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)])[0]
assert disp.shape == (40, 60) and disp.dtype == np.float32
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("GENPAN_NAMESPACE_INNER") == "1", reason="already inside the nested run")
@pytest.mark.parametrize("runner", ["python -m pytest", "pytest"])
def test_imports_under_both_pytest_runners(runner):
    """`python -m pytest` puts the current directory on sys.path, plain `pytest` does not: both must work."""
    pytest.importorskip("transformers")
    exe = [sys.executable, "-m", "pytest"] if runner == "python -m pytest" else [str(Path(sys.executable).parent / "pytest")]
    if not Path(exe[0]).exists():
        pytest.skip(f"{exe[0]} is not installed")
    env = {**os.environ, "GENPAN_NAMESPACE_INNER": "1"}
    proc = subprocess.run([*exe, "-q", "-p", "no:cacheprovider", "tests/test_namespace.py::test_in_process_imports"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_in_process_imports():
    pytest.importorskip("transformers")
    import importlib

    import transformers.modeling_utils  # noqa: F401

    for name in FUSED_LOSS_MODULES:
        importlib.import_module(name)
    hf_kernels = sys.modules["kernels"]
    assert "site-packages" in Path(hf_kernels.__file__).parts, hf_kernels.__file__


def test_non_editable_install_exposes_only_genpan(tmp_path):
    """`pip install .` (not editable) into a scratch venv adds exactly one top-level import name."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in files.stdout.splitlines():
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    scratch_python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(scratch_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    before = set(os.listdir(purelib))
    # The wheel is built with this environment's setuptools (no download), then installed alone.
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("genpan-*.whl")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(scratch_python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    added = set(os.listdir(purelib)) - before
    top_level = sorted(name for name in added if not name.endswith((".dist-info", ".pth")) and name != "__pycache__")
    print("installed top-level names:", top_level)
    assert top_level == ["genpan"], top_level
    installed = purelib / "genpan"
    for sub in ("prep", "train", "eval", "kernels", "jobs"):
        assert (installed / sub / "__init__.py").is_file(), f"genpan.{sub} is missing from the install"
    assert sysconfig.get_paths()["purelib"] != str(purelib)
