"""The GPU machine's Python image, and running code here as if only its packages were installed.

The lent GPU machines (H100 / H200) run an image with Python 3.12 and a fixed package set
(`IMAGE_PACKAGES`, read off such a machine on 2026-11-17): jax 0.11 with the CUDA 13 plugin, flax,
optax, orbax-checkpoint, torch 2.11, timm, ... but no ml-collections, clu, grain, array-record,
tensorflow-datasets or tensorflow, and no network. What the project needs beyond it travels as
wheel files in `.whl/` (`benchmarks/fetch_gpu_wheels.sh`).

This module answers, on the CPU machine, before any GPU minute is spent:

  * which requirements of the carried wheels the image does not satisfy (`missing_requirements`);
  * whether code imports and runs with only some packages installed: `site_farm` builds a folder
    of symbolic links to this interpreter's site-packages, filtered by distribution, and
    `farm_env` runs `python -S` on it, so that a hidden package is truly absent (no module, no
    metadata), not merely blocked.

  python -m benchmarks.gpu_image check-wheels .whl
  python -m benchmarks.gpu_image run --image --wheels .whl -- python -m benchmarks.gpu_check ...
  python -m benchmarks.gpu_image run --hide tensorflow-cpu,grain -- python -c "import ..."

The simulation uses this interpreter's versions (here Python 3.11, jax 0.10.2), so it catches a
missing module or distribution, not a version difference.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence

# `pip list` of the 'cuda' image of nvidia-h100-x1 / nvidia-h200, 2026-11-17 (KINDS.md).
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# The versions known there: a session's `pip list` (KINDS.md) and what gpu_check printed on a
# visit; the others are unknown here.
IMAGE_VERSIONS = {"python": "3.12.3", "jax": "0.11.2", "jaxlib": "0.11.2", "numpy": "2.5.2",
                  "torch": "2.11.0", "torchvision": "0.26.0", "triton": "3.6.0",
                  # Printed by gpu_check on the H200, 2026-11-27 (gpu_runs/2026-11-27_h200).
                  "flax": "0.12.10", "optax": "0.2.8", "orbax-checkpoint": "0.12.4",
                  "chex": "0.1.92", "timm": "1.0.29", "protobuf": "7.36.2", "etils": "1.14.0",
                  "absl-py": "2.5.0", "pyyaml": "6.0.3", "wrapt": "2.5.0"}
# Absent there, and what the GPU-side code of this project must do without.
DATA_PIPELINE_DISTRIBUTIONS = ("grain", "array-record", "tensorflow-datasets")
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-io-gcs-filesystem",
                            "tensorflow-metadata", "tf-keras", "keras")
TARGET_ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3",
                      "sys_platform": "linux", "platform_system": "Linux",
                      "platform_machine": "x86_64", "os_name": "posix",
                      "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def normalize(name: str) -> str:
  """PEP 503 name: lower case, runs of -_. as one '-'."""
  return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------- wheel requirements


def wheel_metadata(path: pathlib.Path) -> email.message.Message:
  with zipfile.ZipFile(path) as wheel:
    names = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
    if len(names) != 1:
      raise ValueError(f"{path}: expected one *.dist-info/METADATA, found {names}")
    return email.parser.Parser().parsestr(wheel.read(names[0]).decode("utf-8"))


def _requirement_applies(requirement) -> bool:
  """False for requirements behind an extra or a marker false on the GPU image."""
  if requirement.marker is None:
    return True
  return requirement.marker.evaluate({**TARGET_ENVIRONMENT, "extra": ""})


def missing_requirements(wheels: Iterable[pathlib.Path]) -> dict[str, list[str]]:
  """{wheel file name: requirements neither the image nor another carried wheel provides}.

  Also flags a requirement whose version the image is known to contradict (IMAGE_VERSIONS).
  """
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.version import Version  # pylint: disable=g-import-not-at-top

  wheels = sorted(wheels)
  carried = {normalize(wheel_metadata(w)["Name"]) for w in wheels}
  out = {}
  for wheel in wheels:
    problems = []
    for text in wheel_metadata(wheel).get_all("Requires-Dist") or []:
      requirement = Requirement(text)
      if not _requirement_applies(requirement):
        continue
      name = normalize(requirement.name)
      if name not in IMAGE_PACKAGES and name not in carried:
        problems.append(f"{text} (not in the image, not carried)")
      elif name in IMAGE_VERSIONS and requirement.specifier and not requirement.specifier.contains(
          Version(IMAGE_VERSIONS[name]), prereleases=True):
        problems.append(f"{text} (the image has {name} {IMAGE_VERSIONS[name]})")
    out[wheel.name] = problems
  return out


def requirement_names(wheels: Iterable[pathlib.Path]) -> list[str]:
  """Every distribution the wheels require on the image (to print their versions there)."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  names = set()
  for wheel in wheels:
    for text in wheel_metadata(wheel).get_all("Requires-Dist") or []:
      requirement = Requirement(text)
      if _requirement_applies(requirement):
        names.add(normalize(requirement.name))
  return sorted(names)


def rehearsal_requirements(requirement_files: Sequence[pathlib.Path],
                           wheels: Sequence[pathlib.Path]) -> list[str]:
  """pip requirement lines of a CPU environment like the GPU image, to rehearse a visit on its
  versions (benchmarks/rehearse_image.sh), the carried wheels being installed on top:

  * the versions known on the image (IMAGE_VERSIONS), pinned;
  * every other image package that the requirement files name or the wheels need, unpinned
    (their versions there are not known here: gpu_check prints them);
  * what the requirement files name and the image lacks (test-only packages), as written;
  * no TensorFlow, and nothing the wheels carry.
  """
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  carried = {normalize(wheel_metadata(w)["Name"]) for w in wheels}
  excluded = carried | {normalize(d) for d in TENSORFLOW_DISTRIBUTIONS}
  lines = {name: f"{name}=={version}" for name, version in IMAGE_VERSIONS.items()
           if name != "python"}
  for path in requirement_files:
    for line in pathlib.Path(path).read_text().splitlines():
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      name = normalize(Requirement(line).name)
      if name in lines or name in excluded:
        continue
      lines[name] = name if name in IMAGE_PACKAGES else line
  for name in requirement_names(wheels):
    if name in IMAGE_PACKAGES and name not in lines and name not in excluded:
      lines[name] = name
  return [lines[name] for name in sorted(lines)]


# ----------------------------------------------------------------------------- simulated sites


def _site_packages() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["purelib"])


def _owners(site: pathlib.Path) -> dict[str, set[str]]:
  """{top-level entry of site-packages: normalised names of the distributions owning it}."""
  owners: dict[str, set[str]] = {}
  for info in site.glob("*.dist-info"):
    dist = normalize(info.name[:-len(".dist-info")].rsplit("-", 1)[0])
    owners.setdefault(info.name, set()).add(dist)
    record = info / "RECORD"
    if not record.exists():
      continue
    for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
      path = line.split(",", 1)[0]
      if not path or path.startswith(".."):
        continue
      top = path.split("/", 1)[0]
      owners.setdefault(top, set()).add(dist)
  return owners


def site_farm(dest: pathlib.Path, keep: Callable[[str], bool], keep_unowned: bool,
              site: pathlib.Path | None = None) -> pathlib.Path:
  """A folder of links to the entries of `site` (default: this interpreter's site-packages).

  An entry is linked when a distribution owning it passes `keep`; an entry owned by kept and
  dropped distributions alike (a namespace package such as `google/`) becomes a real folder with
  the kept distributions' entries linked inside. `keep_unowned`: link entries no RECORD names.
  """
  site = site or _site_packages()
  dest.mkdir(parents=True, exist_ok=True)
  owners = _owners(site)
  for entry in sorted(site.iterdir()):
    if entry.name.endswith(".pth") or entry.name == "__pycache__":
      continue
    dists = owners.get(entry.name)
    if not dists:
      if keep_unowned:
        (dest / entry.name).symlink_to(entry)
      continue
    kept = {d for d in dists if keep(d)}
    if kept == dists:
      (dest / entry.name).symlink_to(entry)
    elif kept and entry.is_dir():
      _link_namespace(entry, dest / entry.name, site, kept)
  return dest


def _link_namespace(entry: pathlib.Path, dest: pathlib.Path, site: pathlib.Path,
                    kept: set[str]) -> None:
  """Links the second-level entries of a shared folder that the kept distributions own."""
  wanted = set()
  for info in site.glob("*.dist-info"):
    if normalize(info.name[:-len(".dist-info")].rsplit("-", 1)[0]) not in kept:
      continue
    record = info / "RECORD"
    for line in (record.read_text(encoding="utf-8", errors="replace").splitlines()
                 if record.exists() else []):
      parts = line.split(",", 1)[0].split("/")
      if len(parts) > 2 and parts[0] == entry.name:
        wanted.add(parts[1])
  dest.mkdir()
  for name in sorted(wanted):
    if (entry / name).exists():
      (dest / name).symlink_to(entry / name)


def farm_env(farm: pathlib.Path, extra_paths: Sequence[str] = (),
             base: dict[str, str] | None = None) -> dict[str, str]:
  """Environment for `python -S` seeing `extra_paths`, then the farm, and nothing of the venv."""
  env = dict(os.environ if base is None else base)
  env["PYTHONPATH"] = os.pathsep.join([*extra_paths, str(farm)])
  env["PYTHONNOUSERSITE"] = "1"
  return env


def hide_predicate(hidden: Iterable[str]) -> Callable[[str], bool]:
  hidden = {normalize(h) for h in hidden}
  return lambda dist: dist not in hidden


def image_predicate(carried: Iterable[str] = ()) -> Callable[[str], bool]:
  allowed = IMAGE_PACKAGES | {normalize(c) for c in carried}
  return lambda dist: dist in allowed


def local_equivalents(wheels: Sequence[pathlib.Path]) -> list[pathlib.Path]:
  """The same distributions and versions as `wheels`, built for this interpreter.

  The carried wheels are for CPython 3.12; a dry run on another Python downloads (or builds) the
  same versions for itself, cached in /tmp.
  """
  tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
  cache = pathlib.Path(tempfile.gettempdir()) / f"gpu_image_wheels_{tag}"
  cache.mkdir(exist_ok=True)
  out = []
  for wheel in wheels:
    meta = wheel_metadata(wheel)
    name, version = meta["Name"], meta["Version"]
    stem = normalize(name).replace("-", "_")
    found = [w for w in cache.glob("*.whl") if normalize(w.name.split("-")[0]) == normalize(name)
             and w.name.split("-")[1] == version]
    if not found:
      spec = f"{name}=={version}"
      done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                             "--only-binary=:all:", "-d", str(cache), spec], check=False)
      if done.returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(cache),
                        spec], check=True)
      found = [w for w in cache.glob("*.whl") if normalize(w.name.split("-")[0]) == normalize(name)
               and w.name.split("-")[1] == version]
    if not found:
      raise FileNotFoundError(f"no wheel of {name} {version} ({stem}) for this interpreter")
    out.append(found[0])
  return out


def install_wheels(wheel_dir: pathlib.Path, target: pathlib.Path) -> list[pathlib.Path]:
  """pip install --no-index --no-deps --target, as on the GPU machine; returns the wheels.

  On an interpreter other than CPython 3.12 the same versions built for it are installed.
  """
  wheels = sorted(wheel_dir.glob("*.whl"))
  if wheels and sys.version_info[:2] != (3, 12):
    print(f"gpu_image: Python {sys.version.split()[0]} here: installing the same versions as "
          f"{wheel_dir} built for it", file=sys.stderr)
    wheels = local_equivalents(wheels)
  if wheels:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(target), *map(str, wheels)], check=True)
  return wheels


# ----------------------------------------------------------------------------- command line


def _check_wheels(wheel_dir: pathlib.Path) -> int:
  wheels = sorted(wheel_dir.glob("*.whl"))
  if not wheels:
    print(f"no wheels in {wheel_dir}")
    return 1
  total = 0
  bad = 0
  for wheel, problems in missing_requirements(wheels).items():
    size = (wheel_dir / wheel).stat().st_size
    total += size
    print(f"{size / 2**20:7.2f} MiB  {wheel}")
    for problem in problems:
      bad += 1
      print(f"           missing: {problem}")
  print(f"{total / 2**20:7.2f} MiB  in {len(wheels)} wheels; "
        f"{'every requirement is met' if not bad else f'{bad} requirement(s) unmet'} "
        "(versions of image packages other than "
        f"{', '.join(sorted(IMAGE_VERSIONS))} are not known here: gpu_check prints them)")
  return 1 if bad else 0


def _run(args) -> int:
  with tempfile.TemporaryDirectory(prefix="gpu_image_") as tmp:
    tmp = pathlib.Path(tmp)
    extra = []
    carried = []
    if args.wheels:
      wheels = install_wheels(pathlib.Path(args.wheels), tmp / "wheels")
      carried = [wheel_metadata(w)["Name"] for w in wheels]
      extra.append(str(tmp / "wheels"))
    if args.image:
      keep, keep_unowned = image_predicate(carried), False
    else:
      keep, keep_unowned = hide_predicate(args.hide.split(",") if args.hide else ()), True
    farm = site_farm(tmp / "site", keep, keep_unowned)
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    command = [sys.executable if c == "python" else c for c in args.command]
    if command and command[0] == sys.executable:
      command.insert(1, "-S")
    env = farm_env(farm, [repo, *extra])
    return subprocess.run(command, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_image",
                                   description=__doc__.split("\n", maxsplit=1)[0])
  sub = parser.add_subparsers(dest="verb", required=True)
  check = sub.add_parser("check-wheels", help="sizes and unmet requirements of carried wheels")
  check.add_argument("wheel_dir", nargs="?", default=".whl")
  run = sub.add_parser("run", help="run a command with only some packages installed")
  run.add_argument("--image", action="store_true",
                   help="only the GPU image's packages (and --wheels)")
  run.add_argument("--hide", default="",
                   help="comma-separated distributions to hide (others stay)")
  run.add_argument("--wheels", default="", help="install these wheels first, as gpu_check does")
  run.add_argument("command", nargs=argparse.REMAINDER)
  rehearsal = sub.add_parser("rehearsal-requirements",
                             help="pip requirements of a CPU environment like the image")
  rehearsal.add_argument("wheel_dir", nargs="?", default=".whl")
  args = parser.parse_args(argv)
  if args.verb == "check-wheels":
    return _check_wheels(pathlib.Path(args.wheel_dir))
  if args.verb == "rehearsal-requirements":
    repo = pathlib.Path(__file__).resolve().parents[1]
    print("\n".join(rehearsal_requirements(
        [repo / "requirements.txt", repo / "requirements-dev.txt"],
        sorted(pathlib.Path(args.wheel_dir).glob("*.whl")))))
    return 0
  if args.command and args.command[0] == "--":
    args.command = args.command[1:]
  if not args.command:
    parser.error("run needs a command after --")
  return _run(args)


if __name__ == "__main__":
  sys.exit(main())
