"""Install profiles (`make setup` = CPU, `make setup DEVICE=cuda`, the Dockerfile): the pins are mutually
consistent. Nothing is downloaded; the Makefile recipes run against a fake venv whose pip only logs its calls."""
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]

# torch / fbgemm-gpu / torchrec releases that work together, with the CUDA builds of torch AND fbgemm-gpu that
# exist for the pair on download.pytorch.org/whl/<variant> (the CPU profile uses "cpu").
# Sources: FBGEMM's release compatibility table (docs "FBGEMM Releases", row added by pytorch/FBGEMM#5977):
# FBGEMM 1.8.0 <-> PyTorch 2.13.x, CUDA 12.6 and 13.0 (PyTorch dropped CUDA 12.8 from 2.12 on);
# pytorch/test-infra#8519: fbgemm-gpu 1.8.0 "aligns with PyTorch 2.13"; TorchRec releases track the FBGEMM
# minor (torchrec 1.8 <-> fbgemm-gpu 1.8). Measured on CPU (../shared/STACK.md): torch 2.13.0 + fbgemm-gpu-cpu
# 1.8.0 + torchrec 1.8.0 pass the TorchRec probes; fbgemm 1.9 fails to import on torch 2.13.
COMPATIBLE = {
    # (torch, fbgemm-gpu, torchrec): variants
    ("2.13.0", "1.8.0", "1.8.0"): ("cpu", "cu126", "cu130"),
}
CUDA_OF_VARIANT = {"cu126": "12.6", "cu130": "13.0"}  # nvidia/cuda base image of each variant
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
ACCELERATOR_PACKAGES = {"torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec"}


def read_requirements(name: str) -> tuple[dict[str, Requirement], list[str]]:
    """(canonical name -> requirement, option lines) of a requirements file; every requirement an exact pin."""
    reqs, options = {}, []
    for raw in (REPO / name).read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        r = Requirement(line)
        key = canonicalize_name(r.name)
        assert key not in reqs, f"{name}: {r.name} pinned twice"
        specs = list(r.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not r.marker and not r.url, \
            f"{name}: {line!r} is not an exact pin"
        reqs[key] = r
    return reqs, options


def pin(r: Requirement) -> Version:
    return Version(next(iter(r.specifier)).version)


def normal(r: Requirement) -> tuple:
    return canonicalize_name(r.name), tuple(sorted(r.extras)), str(pin(r))


CPU, CPU_OPTIONS = read_requirements("requirements.txt")
CUDA, CUDA_OPTIONS = read_requirements("requirements-cuda.txt")


def makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, f"Makefile: no {name}"
    return m.group(1).strip()


def cuda_variant() -> str:
    return pin(CUDA["torch"]).local


# ---- requirement files ----------------------------------------------------------------------------
def test_both_profiles_pin_the_same_stack():
    """Every package pinned in both files has the same version (torch: same release, local tag cpu vs cuXXX);
    the only differences are fbgemm-gpu-cpu <-> fbgemm-gpu and torchrec (CPU: Makefile, --no-deps)."""
    assert set(CPU) - {"fbgemm-gpu-cpu"} == set(CUDA) - {"fbgemm-gpu", "torchrec"}
    for name in set(CPU) & set(CUDA):
        a, b = CPU[name], CUDA[name]
        assert a.extras == b.extras, name
        if name == "torch":
            assert pin(a).public == pin(b).public and pin(a).local == "cpu" and pin(b).local.startswith("cu")
        else:
            assert pin(a) == pin(b), f"{name}: {pin(a)} (requirements.txt) != {pin(b)} (requirements-cuda.txt)"
    assert pin(CPU["fbgemm-gpu-cpu"]) == Version(pin(CUDA["fbgemm-gpu"]).public)


def test_cuda_profile_takes_one_cuda_variant_from_the_pytorch_index():
    variant = cuda_variant()
    assert pin(CUDA["fbgemm-gpu"]).local == variant, "torch and fbgemm-gpu must be the same CUDA build"
    assert CUDA_OPTIONS == [f"--extra-index-url {PYTORCH_INDEX}{variant}"]
    assert pin(CUDA["torchrec"]).local is None  # pure Python
    assert CPU_OPTIONS == []  # the CPU file is unchanged: torch +cpu comes from local disk / the configured index


def test_torch_fbgemm_torchrec_form_a_compatible_triple():
    torchrec = Requirement(makefile_var("TORCHREC"))
    cpu = (pin(CPU["torch"]).public, str(pin(CPU["fbgemm-gpu-cpu"])), str(pin(torchrec)))
    cuda = (pin(CUDA["torch"]).public, pin(CUDA["fbgemm-gpu"]).public, str(pin(CUDA["torchrec"])))
    assert cpu in COMPATIBLE and "cpu" in COMPATIBLE[cpu], f"CPU triple {cpu} is not a known-compatible set"
    assert cuda in COMPATIBLE and cuda_variant() in COMPATIBLE[cuda], f"CUDA triple {cuda} / {cuda_variant()}"
    assert cpu == cuda


def test_this_venv_matches_its_profile():
    """The pins are real: every package of the profile this venv was installed with has the pinned version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("fbgemm-gpu-cpu")
        reqs = {**CPU, "torchrec": Requirement(makefile_var("TORCHREC"))}
    except PackageNotFoundError:
        reqs = CUDA
    wrong = {}
    for name, r in reqs.items():
        try:
            got = Version(version(r.name))
        except PackageNotFoundError:
            got = None
        if got != pin(r):
            wrong[name] = (str(pin(r)), str(got))
    assert not wrong, f"installed != pinned: {wrong}"


# ---- pyproject ------------------------------------------------------------------------------------
def test_pyproject_declares_the_same_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [Requirement(d) for d in project["dependencies"]]
    extras = {k: [Requirement(d) for d in v] for k, v in project["optional-dependencies"].items()}
    assert not {canonicalize_name(r.name) for r in deps} & ACCELERATOR_PACKAGES, \
        "torch / fbgemm / torchrec belong in the [cpu] / [cuda] extras"
    common = deps + extras["test"]
    # CPU: everything but torchrec, which pip cannot install from metadata next to fbgemm-gpu-cpu (--no-deps)
    assert sorted(map(normal, common + extras["cpu"])) == sorted(map(normal, CPU.values()))
    assert sorted(map(normal, common + extras["cuda"])) == sorted(map(normal, CUDA.values()))
    assert Version(makefile_var("TORCHREC").split("==")[1]) == pin(CUDA["torchrec"])
    assert {r.name for r in extras["test"]} == {"pytest", "pytest-xdist", "hypothesis"}


# ---- Makefile -------------------------------------------------------------------------------------
def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "pip").write_text(
        f'#!/bin/sh\necho "DS_ACCELERATOR=${{DS_ACCELERATOR-unset}} DS_BUILD_OPS=${{DS_BUILD_OPS-unset}} $*" >> {log}\n')
    for f in ("python", "pip"):
        os.chmod(venv / "bin" / f, 0o755)
    return venv, log


def _make(venv: Path, *args: str) -> subprocess.CompletedProcess:
    drop = {"DS_ACCELERATOR", "DS_BUILD_OPS", "DEVICE", "VENV", "PY", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}  # also when pytest runs under `make test`
    return subprocess.run(["make", "-s", "-C", str(REPO), "setup", f"VENV={venv}", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_profiles_run_their_recipe(tmp_path):
    venv, log = _fake_venv(tmp_path)
    cpu = _make(venv)
    assert cpu.returncode == 0, cpu.stderr
    # the CPU path: exactly the commands `make setup` always ran, with DeepSpeed on its CPU accelerator
    assert log.read_text().splitlines() == [
        "DS_ACCELERATOR=cpu DS_BUILD_OPS=unset install --quiet --upgrade pip",
        "DS_ACCELERATOR=cpu DS_BUILD_OPS=unset install --quiet -r requirements.txt",
        "DS_ACCELERATOR=cpu DS_BUILD_OPS=unset install --quiet --no-deps torchrec==1.8.0",
        "DS_ACCELERATOR=cpu DS_BUILD_OPS=unset install --quiet --no-deps --no-build-isolation -e .",
    ]
    assert (venv / ".installed").is_file()
    log.unlink()
    again = _make(venv)  # idempotent: nothing reinstalled
    assert again.returncode == 0 and not log.exists()
    # one profile per venv: switching is refused with a one-line hint
    other = _make(venv, "DEVICE=cuda")
    assert other.returncode != 0 and "make clean" in other.stdout + other.stderr and not log.exists()

    venv2, log2 = _fake_venv(tmp_path / "cuda")
    cuda = _make(venv2, "DEVICE=cuda")
    assert cuda.returncode == 0, cuda.stderr
    lines = log2.read_text().splitlines()
    assert all(line.startswith("DS_ACCELERATOR=unset DS_BUILD_OPS=0 ") for line in lines), lines
    assert "install --quiet -r requirements-cuda.txt" in lines[1]
    assert (venv2 / ".installed-cuda").is_file() and not (venv2 / ".installed").exists()

    bad = _make(venv2, "DEVICE=gpu")
    assert bad.returncode != 0 and "allowed values: cpu, cuda" in bad.stderr


# ---- Dockerfile -----------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_installs_the_cuda_profile():
    ins = dockerfile_instructions()
    base = [rest for op, rest in ins if op == "FROM"]
    assert len(base) == 1
    m = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-cudnn-(runtime|devel)-ubuntu\d+\.\d+", base[0])
    assert m, base[0]
    assert m.group(1) == CUDA_OF_VARIANT[cuda_variant()], f"base image CUDA {m.group(1)} != torch +{cuda_variant()}"
    env = " ".join(rest for op, rest in ins if op == "ENV")
    assert re.search(r"(^| )DS_BUILD_OPS=0( |$)", env) and "DS_ACCELERATOR" not in env
    runs = [rest for op, rest in ins if op == "RUN"]
    assert ("COPY", "requirements-cuda.txt ./") in ins
    assert any(re.search(r"pip install -r requirements-cuda\.txt", r) for r in runs)
    assert any("python3.11 -m venv" in r for r in runs)
    # any pin the Dockerfile repeats must be requirements-cuda.txt's
    for r in runs:
        for token in re.findall(r"[A-Za-z0-9_.\[\],-]+==[^\s;&|]+", r):
            req = Requirement(token)
            assert normal(req) == normal(CUDA[canonicalize_name(req.name)]), token


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
