"""`swft-lite detect`: what GPU, driver, memory, disk and packages this machine has, and which profile fits it.

Nothing heavy is imported here: unsloth never (it patches torch and transformers on import), torch only when it is
installed as a build that can see a GPU (a `+cpu` wheel is skipped, saving its ~2 s import). Package versions come
from `importlib.metadata`.

The probing sits at the system boundary, in three small functions the tests replace: `run_command` (nvidia-smi),
`_import_torch` and `_import_pynvml`. Everything else - parsing nvidia-smi's CSV and header, turning NVML values or
torch device properties into `GpuInfo`, CUDA_VISIBLE_DEVICES, package verdicts, the recommendation - is plain
functions over plain values, so recorded real outputs (tests/data/detect/) exercise all of it without a GPU.

Order of sources: torch (when importable and `torch.cuda.is_available()`: it is what training will see), else NVML
(pynvml / nvidia-ml-py, when importable), else `nvidia-smi --query-gpu=...`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from swft_lite.licences import scan_unsloth
from swft_lite.estimate import estimate as memory_estimate
from swft_lite.profiles import FIT_FRACTION, by_generation, card_fits, largest_fitting, why_none_fits

GIB = 1024**3
MIB = 1024**2


# gpt-oss-20b LoRA needs about 13-15 GiB even with 4-bit weights (shared/gpu/README.md: 13.0 GiB attention-only r 8 at
# 2048 tokens, 14.9 GiB attention + experts).
MIN_GIB_STATEMENT = "gpt-oss-20b needs about 13–15 GiB of GPU memory even at 4 bits"

# A merged bf16 gpt-oss-20b is ~42 GB on disk.
MERGED_MODEL_BYTES = 42 * 10**9

NVIDIA_SMI = "nvidia-smi"
QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "memory.free", "compute_cap", "driver_version")
NVIDIA_SMI_QUERY = [NVIDIA_SMI, "--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv,noheader,nounits"]
NVIDIA_SMI_TIMEOUT_S = 15
NO_GPU_HEADLINE = "No NVIDIA GPU/driver found"


# --- the system boundary (replaced in tests) -----------------------------------------------------------------------


def run_command(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Run a program (an argument list, never a shell string); (exit code, stdout, stderr).

    Raises FileNotFoundError when the program is not installed and subprocess.TimeoutExpired when it hangs.
    """
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _import_torch():
    """torch, or None when it is missing or a CPU-only build (a `+cpu` wheel cannot see a GPU: skip its import)."""
    version = installed_version("torch")
    if version is None or version.endswith("+cpu") or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def _import_pynvml():
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml

    return pynvml


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- GPUs ----------------------------------------------------------------------------------------------------------


@dataclass
class GpuInfo:
    index: int  # the CUDA ordinal the training process sees (cuda:N), after CUDA_VISIBLE_DEVICES
    name: str
    total_gib: float
    free_gib: float | None = None
    compute_capability: tuple[int, int] | None = None
    uuid: str | None = None
    smi_index: int | None = None  # nvidia-smi / NVML numbering (PCI bus order), ignores CUDA_VISIBLE_DEVICES

    @property
    def bf16(self) -> bool | None:
        """bf16 tensor cores: compute capability 8.0 (Ampere) and newer."""
        return None if self.compute_capability is None else self.compute_capability >= (8, 0)

    @property
    def compute_capability_str(self) -> str | None:
        return None if self.compute_capability is None else "%d.%d" % self.compute_capability

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "uuid": self.uuid, "smi_index": self.smi_index,
                "total_gib": round(self.total_gib, 2),
                "free_gib": None if self.free_gib is None else round(self.free_gib, 2),
                "compute_capability": self.compute_capability_str, "bf16": self.bf16}


@dataclass
class GpuProbe:
    """What one source said: the GPUs this process can use, and why there are none when there are none."""

    source: str | None  # "torch", "nvml", "nvidia-smi" or None
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_version: str | None = None  # the newest CUDA the driver supports (nvidia-smi header / NVML)
    problem: str | None = None  # why no GPU was found
    hidden: int = 0  # GPUs the driver has that CUDA_VISIBLE_DEVICES hides
    torch_cuda: str | None = None  # the CUDA version torch was built for (torch source only)
    notes: list[str] = field(default_factory=list)


def _na(text: str) -> bool:
    return text.strip() in ("", "[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]")


def parse_compute_capability(text: str | None) -> tuple[int, int] | None:
    if text is None or _na(text):
        return None
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_nvidia_smi_query(text: str) -> tuple[list[GpuInfo], str | None]:
    """GPUs and driver version from `nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits`.

    One line per GPU, e.g. `0, GPU-4c1f..., NVIDIA GeForce RTX 4090, 24564, 23812, 8.9, 550.54.15` (memory in MiB).
    """
    gpus: list[GpuInfo] = []
    driver = None
    n_right = len(QUERY_FIELDS) - QUERY_FIELDS.index("name") - 1
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < len(QUERY_FIELDS):
            raise ValueError(f"unexpected nvidia-smi line (expected {len(QUERY_FIELDS)} fields): {line!r}")
        # A GPU name could hold a comma: take the fields around it from both ends.
        index, uuid = parts[0], parts[1]
        name = ", ".join(parts[2:len(parts) - n_right])
        total, free, cc, drv = parts[len(parts) - n_right:]
        if _na(total):
            raise ValueError(f"nvidia-smi gave no memory.total for GPU {index}: {line!r}")
        gpus.append(GpuInfo(index=len(gpus), name=name, total_gib=float(total) * MIB / GIB,
                            free_gib=None if _na(free) else float(free) * MIB / GIB,
                            compute_capability=parse_compute_capability(cc), uuid=None if _na(uuid) else uuid,
                            smi_index=int(index)))
        driver = driver or (None if _na(drv) else drv)
    return gpus, driver


def parse_nvidia_smi_header(text: str) -> tuple[str | None, str | None]:
    """(driver version, CUDA version) from plain `nvidia-smi` output, whose header reads
    `| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |`."""
    drv = re.search(r"Driver Version:\s*([0-9][0-9.]*)", text)
    cuda = re.search(r"CUDA Version:\s*([0-9][0-9.]*)", text)
    return (drv.group(1) if drv else None), (cuda.group(1) if cuda else None)


def gpu_from_nvml(index: int, name: str | bytes, uuid: str | bytes | None, memory_total: int, memory_free: int | None,
                  compute_capability: tuple[int, int] | None) -> GpuInfo:
    """A GpuInfo from NVML's values (nvmlDeviceGetName/UUID/MemoryInfo in bytes/CudaComputeCapability)."""
    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    cc = tuple(int(x) for x in compute_capability) if compute_capability else None
    return GpuInfo(index=index, name=text(name), total_gib=memory_total / GIB,
                   free_gib=None if memory_free is None else memory_free / GIB,
                   compute_capability=cc, uuid=text(uuid), smi_index=index)


def cuda_version_from_nvml(version: int | None) -> str | None:
    """NVML's nvmlSystemGetCudaDriverVersion: 12040 -> '12.4'."""
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def gpu_from_torch(index: int, props: Any, free_bytes: int | None) -> GpuInfo:
    """A GpuInfo from `torch.cuda.get_device_properties(i)` (name, total_memory, major, minor, maybe uuid)."""
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        uuid = str(uuid)
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else "GPU-" + uuid
    return GpuInfo(index=index, name=str(props.name), total_gib=props.total_memory / GIB,
                   free_gib=None if free_bytes is None else free_bytes / GIB,
                   compute_capability=(int(props.major), int(props.minor)), uuid=uuid)


def filter_visible(gpus: list[GpuInfo], cuda_visible_devices: str | None) -> tuple[list[GpuInfo], str | None]:
    """The GPUs a CUDA program sees under CUDA_VISIBLE_DEVICES, in its order, renumbered cuda:0, cuda:1, ...

    nvidia-smi and NVML ignore the variable, so this applies it to their list: entries are indices or (prefixes of)
    GPU UUIDs; like CUDA, an entry that names no GPU (or -1) ends the list; unset keeps every GPU, empty hides all.
    Returns the visible GPUs and a note when an entry was not understood.
    """
    if cuda_visible_devices is None:
        return [dataclasses.replace(g, index=i) for i, g in enumerate(gpus)], None
    chosen: list[GpuInfo] = []
    note = None
    entries = [e.strip() for e in cuda_visible_devices.split(",")]
    if entries == [""]:
        return [], None
    for entry in entries:
        match = None
        if re.fullmatch(r"-?\d+", entry):
            if int(entry) < 0:  # -1: "no more GPUs"
                break
            match = next((g for g in gpus if g.smi_index == int(entry)), None)
        elif entry.upper().startswith("GPU-"):
            found = [g for g in gpus if g.uuid and g.uuid.lower().startswith(entry.lower())]
            match = found[0] if len(found) == 1 else None
        if match is None:
            note = (f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}: {entry!r} names no GPU nvidia-smi lists, "
                    f"so CUDA stops reading the list there")
            break
        if match not in chosen:
            chosen.append(match)
    return [dataclasses.replace(g, index=i) for i, g in enumerate(chosen)], note


def _order_note(gpus: list[GpuInfo], env: dict[str, str]) -> str | None:
    """CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID; nvidia-smi numbers them by PCI bus."""
    if len({g.name for g in gpus}) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        return ("these GPUs differ and CUDA numbers GPUs fastest first, nvidia-smi by PCI bus: the cuda:N here may "
                "not be CUDA's. Set CUDA_DEVICE_ORDER=PCI_BUS_ID to make them agree.")
    return None


def probe_nvidia_smi(env: dict[str, str]) -> GpuProbe:
    try:
        rc, out, err = run_command(NVIDIA_SMI_QUERY, NVIDIA_SMI_TIMEOUT_S)
    except FileNotFoundError:
        return GpuProbe(None, problem="nvidia-smi is not installed (no NVIDIA driver on this machine)")
    except subprocess.TimeoutExpired:
        return GpuProbe(None, problem=f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT_S} s (driver hung?)")
    except OSError as exc:
        return GpuProbe(None, problem=f"nvidia-smi could not be run: {exc}")
    if rc != 0:
        message = " ".join((out.strip() or err.strip() or "no output").split())
        return GpuProbe(None, problem=f"nvidia-smi failed (exit {rc}): {message}")
    try:
        all_gpus, driver = parse_nvidia_smi_query(out)
    except ValueError as exc:
        return GpuProbe(None, problem=str(exc))
    probe = GpuProbe("nvidia-smi", driver_version=driver)
    header_driver, probe.cuda_version = _driver_and_cuda_from_header()
    probe.driver_version = probe.driver_version or header_driver
    _apply_visibility(probe, all_gpus, env)
    return probe


def _driver_and_cuda_from_header() -> tuple[str | None, str | None]:
    try:
        rc, out, _ = run_command([NVIDIA_SMI], NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return parse_nvidia_smi_header(out) if rc == 0 else (None, None)


def _apply_visibility(probe: GpuProbe, all_gpus: list[GpuInfo], env: dict[str, str]) -> None:
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    probe.gpus, note = filter_visible(all_gpus, cvd)
    probe.hidden = len(all_gpus) - len(probe.gpus)
    if note:
        probe.notes.append(note)
    if not probe.gpus and all_gpus:
        probe.problem = (f"CUDA_VISIBLE_DEVICES={cvd!r} hides all {len(all_gpus)} GPU(s) the driver has "
                         f"({', '.join(g.name for g in all_gpus)})")
    order = _order_note(probe.gpus, env)
    if order:
        probe.notes.append(order)


def probe_nvml(env: dict[str, str]) -> GpuProbe | None:
    """The GPUs through NVML, or None when pynvml is missing or NVML cannot start (then nvidia-smi says why)."""
    pynvml = _import_pynvml()
    if pynvml is None:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: let nvidia-smi explain
        return None
    try:
        probe = GpuProbe("nvml")
        drv = pynvml.nvmlSystemGetDriverVersion()
        probe.driver_version = drv.decode() if isinstance(drv, bytes) else drv
        try:
            probe.cuda_version = cuda_version_from_nvml(pynvml.nvmlSystemGetCudaDriverVersion())
        except Exception:
            pass
        all_gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                cc = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            except Exception:
                cc = None
            all_gpus.append(gpu_from_nvml(i, pynvml.nvmlDeviceGetName(h), pynvml.nvmlDeviceGetUUID(h),
                                          mem.total, mem.free, cc))
        _apply_visibility(probe, all_gpus, env)
        return probe
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def probe_torch() -> tuple[GpuProbe | None, str | None]:
    """The GPUs torch sees (it applies CUDA_VISIBLE_DEVICES itself), or (None, why torch cannot be used)."""
    torch = _import_torch()
    if torch is None:
        return None, None
    try:
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            return None, (f"torch {installed_version('torch')} ({build}) cannot use the GPU: "
                          "torch.cuda.is_available() is False")
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, _total = torch.cuda.mem_get_info(i)
            except Exception:
                free = None
            gpus.append(gpu_from_torch(i, props, free))
    except Exception as exc:  # a broken driver can make any of these raise
        return None, f"torch could not query the GPU: {type(exc).__name__}: {exc}"
    # torch applies CUDA_VISIBLE_DEVICES and CUDA's own numbering: its cuda:N are the ones training uses.
    return GpuProbe("torch", gpus=gpus, torch_cuda=torch.version.cuda), None


def probe_gpus(env: dict[str, str] | None = None) -> GpuProbe:
    """torch if it can see a GPU, else NVML, else nvidia-smi; driver and CUDA versions from NVML or nvidia-smi."""
    env = dict(os.environ if env is None else env)
    probe, torch_note = probe_torch()
    if probe is not None:
        # torch does not know the driver: ask the driver's own tools for the versions.
        other = probe_nvml(env) or probe_nvidia_smi(env)
        probe.driver_version, probe.cuda_version = other.driver_version, other.cuda_version
    else:
        probe = probe_nvml(env) or probe_nvidia_smi(env)
    if torch_note and probe.gpus:
        probe.notes.append(torch_note)
    return probe


# --- system --------------------------------------------------------------------------------------------------------


@dataclass
class DiskInfo:
    path: str  # the output folder asked about
    checked_path: str  # the nearest folder that exists (where the data will land)
    free_gib: float
    total_gib: float

    @property
    def enough_for_merge(self) -> bool:
        return self.free_gib * GIB >= MERGED_MODEL_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "checked_path": self.checked_path, "free_gib": round(self.free_gib, 2),
                "total_gib": round(self.total_gib, 2), "needed_gib": round(MERGED_MODEL_BYTES / GIB, 1),
                "enough": self.enough_for_merge}


def nearest_existing(path: Path) -> Path:
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_info(output_dir: str | Path) -> DiskInfo:
    checked = nearest_existing(Path(output_dir))
    usage = shutil.disk_usage(checked)
    return DiskInfo(str(output_dir), str(checked), usage.free / GIB, usage.total / GIB)


def system_memory() -> tuple[float | None, float | None]:
    """(total, available) RAM in GiB."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total / GIB, vm.available / GIB
    except ImportError:
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        return pages * size / GIB, avail * size / GIB
    except (ValueError, OSError, AttributeError):
        return None, None


# --- packages ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownGood:
    dist: str  # the distribution name for importlib.metadata
    spec: str  # PEP 440 specifier: what this project pins (pyproject.toml)
    why: str  # said when the installed version is outside the pin
    extra: str | None = None  # the swft-lite extra that installs it; None: a core dependency
    needed_for: str = ""


# Keep in step with pyproject.toml (tests/test_detect.py checks they agree).
KNOWN_GOOD: dict[str, KnownGood] = {k.dist: k for k in (
    KnownGood("torch", ">=2.6,<2.15", "Unsloth 2026.10.9 needs torch < 2.15"),
    KnownGood("transformers", ">=5.0,<=5.17.0", "Unsloth 2026.10.9 needs transformers <= 5.17.0"),
    KnownGood("peft", ">=0.21,<0.22", "swft-lite is built and tested on peft 0.21.x"),
    KnownGood("trl", ">=1.14,<1.15", "swft-lite pins trl 1.14.x: trl 1.15.0's SFTTrainer cannot train on CPU, "
              "and Unsloth 2026.10.9 needs trl <= 1.15.0"),
    KnownGood("datasets", ">=3.0,<5", "Unsloth 2026.10.9 needs datasets < 5"),
    # Every shipped profile loads the base in 4 bits (load_in_4bit = true), on either backend: bitsandbytes is
    # needed for any of them, not only under Unsloth.
    KnownGood("bitsandbytes", ">=0.45", "4-bit loading needs bitsandbytes >= 0.45", "unsloth",
              "4-bit loading, which every shipped profile uses (either backend)"),
    KnownGood("unsloth", "==2026.10.9", "swft-lite is tested with unsloth 2026.10.9", "unsloth",
              "the unsloth backend"),
    KnownGood("unsloth_zoo", "==2026.10.9", "unsloth_zoo must match unsloth 2026.10.9", "unsloth",
              "the unsloth backend"),
    KnownGood("openai-harmony", ">=0.0.4", "gpt-oss's chat format needs openai-harmony >= 0.0.4"),
    KnownGood("llama-cpp-python", ">=0.3.16", "GGUF checks need llama-cpp-python >= 0.3.16", "gguf", "GGUF export"),
    KnownGood("gguf", ">=0.17", "GGUF export needs gguf >= 0.17", "gguf", "GGUF export"),
)}


@dataclass
class PackageVerdict:
    name: str
    installed: str | None
    required: str
    ok: bool | None  # None: an optional package that is not installed
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"installed": self.installed, "required": self.required, "ok": self.ok, "note": self.note}


def version_satisfies(version: str, spec: str) -> bool | None:
    """Whether `version` meets the PEP 440 `spec` (pre-releases included); None when it cannot be parsed."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging comes with transformers
        return None
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return None


def package_verdict(name: str, installed: str | None, *, gpu_visible: bool = False) -> PackageVerdict:
    """Judge one installed version (or None) against the known-good pins."""
    kg = KNOWN_GOOD[name]
    pin = f"pip install '{kg.dist}{kg.spec}'"
    if installed is None:
        if kg.extra:
            return PackageVerdict(name, None, kg.spec, None, f"not installed — needed only for {kg.needed_for}: "
                                                              f"pip install 'swft-lite[{kg.extra}]'")
        return PackageVerdict(name, None, kg.spec, False, f"not installed — swft-lite needs it: {pin}")
    ok = version_satisfies(installed, kg.spec)
    if ok is None:
        return PackageVerdict(name, installed, kg.spec, None, f"cannot read version {installed!r}; wanted {kg.spec}")
    if not ok:
        return PackageVerdict(name, installed, kg.spec, False, f"{kg.why}: {pin}")
    if name == "torch" and installed.endswith("+cpu") and gpu_visible:
        return PackageVerdict(name, installed, kg.spec, False,
                              "a CPU-only build: training cannot use the GPU; install a CUDA build of torch "
                              "(https://pytorch.org/get-started/locally/)")
    return PackageVerdict(name, installed, kg.spec, True, "")


def check_packages(versions: dict[str, str | None] | None = None, *, gpu_visible: bool = False) -> list[PackageVerdict]:
    """Verdicts for every known package; `versions` (name -> version or None) defaults to what is installed."""
    if versions is None:
        versions = {name: installed_version(kg.dist) for name, kg in KNOWN_GOOD.items()}
    return [package_verdict(name, versions.get(name), gpu_visible=gpu_visible) for name in KNOWN_GOOD]


# --- the report ----------------------------------------------------------------------------------------------------


@dataclass
class DetectReport:
    gpu: GpuProbe
    ram_gib: float | None
    ram_available_gib: float | None
    disk: DiskInfo
    packages: list[PackageVerdict]
    cuda_visible_devices: str | None
    licences: list = field(default_factory=list)  # swft_lite.licences.PackageLicences of unsloth, unsloth_zoo


def gather(output_dir: str | Path = "output", env: dict[str, str] | None = None) -> DetectReport:
    env = dict(os.environ if env is None else env)
    probe = probe_gpus(env)
    ram, avail = system_memory()
    return DetectReport(gpu=probe, ram_gib=ram, ram_available_gib=avail, disk=disk_info(output_dir),
                        packages=check_packages(gpu_visible=bool(probe.gpus)),
                        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"), licences=scan_unsloth())


# --- recommendation ------------------------------------------------------------------------------------------------


def fits(gpu: GpuInfo, profile) -> bool:
    return card_fits(profile.vram_budget_gib, gpu.total_gib)


def recommend_profile(gpus: list[GpuInfo], profiles: list) -> tuple[Any | None, str]:
    """(the profile to train with on the first visible GPU, or None; a sentence saying why).

    The largest profile that fits the card by the one rule of swft_lite.profiles (its budget class, total >= budget *
    FIT_FRACTION, and `swft-lite estimate`'s memory figure within the card's limit); profiles of the same budget are
    told apart by GPU generation.
    """
    if not gpus:
        return None, ("No profile recommended: no NVIDIA GPU is visible here. Training needs one "
                      "(16 GB or more); run `swft-lite detect` on the machine that has it.")
    gpu = gpus[0]
    smallest = min(profiles, key=lambda p: p.vram_budget_gib) if profiles else None
    same = largest_fitting(profiles, gpu.total_gib, gpu.compute_capability, estimator=memory_estimate)
    if not same:
        reason = f"No profile fits: {gpu.name} has {gpu.total_gib:.2f} GiB, and {MIN_GIB_STATEMENT}."
        if smallest is not None:
            if card_fits(smallest.vram_budget_gib, gpu.total_gib):  # in the class, but the estimate says no
                why = why_none_fits(profiles, gpu.total_gib, gpu.compute_capability, estimator=memory_estimate)
                reason += " " + why[0].upper() + why[1:] + "."
            else:
                reason += (f" The smallest profile, {smallest.name}, needs a {smallest.vram_budget_gib:g} GiB card "
                           f"({smallest.description.split(':')[0]}).")
        return None, reason
    choice = by_generation(same, gpu.compute_capability)
    e = memory_estimate(choice, card_gib=gpu.total_gib, capability=gpu.compute_capability)
    reason = (f"{gpu.name} has {gpu.total_gib:.2f} GiB; {choice.name} is the largest profile whose "
              f"{choice.vram_budget_gib:g} GiB budget fits (`swft-lite estimate`: {e.reserved_gib:.1f} GiB reserved "
              f"of this card's {e.limit_gib:g} GiB limit).")
    others = [p.name for p in same if p is not choice]
    if others:
        cc = gpu.compute_capability_str or "unknown"
        reason += (f" {', '.join(others)} has the same budget; {choice.name} is the one for this GPU generation "
                   f"(compute capability {cc}).")
    if gpu.bf16 is False:
        reason += (f" This card has no bf16 (compute capability {gpu.compute_capability_str} < 8.0); the profiles "
                   "were sized on bf16 cards.")
    if gpu.free_gib is not None and gpu.free_gib < choice.vram_budget_gib * FIT_FRACTION:
        reason += (f" Only {gpu.free_gib:.2f} GiB are free right now: other programs hold "
                   f"{gpu.total_gib - gpu.free_gib:.2f} GiB; close them before training.")
    return choice, reason


# Cards with this much more memory than their profile's budget get a plan tailored to them (a 20 GB card should not
# train with the 16 GB settings); closer to the budget, the profile itself is the plan.
TAILOR_MARGIN_GIB = 2.0
# Plans stay within row lengths the estimator was calibrated near; longer rows are an extrapolation.
TAILOR_MAX_SEQ = 16384


def tailored_plan(gpu: GpuInfo, profile) -> dict | None:
    """Settings for a card well above its profile's budget, from `swft-lite estimate`'s memory model; None when the
    profile already fits the card or the estimator finds nothing better."""
    if profile is None or gpu.total_gib < profile.vram_budget_gib + TAILOR_MARGIN_GIB:
        return None
    from swft_lite.estimate import estimate, plan_for_card
    from swft_lite.profiles import ProfileError

    try:
        plan = plan_for_card(gpu.total_gib, gpu.compute_capability, max_seq=TAILOR_MAX_SEQ)
    except ProfileError:
        return None
    changes = {k: getattr(plan, k) for k in ("max_seq_length", "per_device_batch_size", "gradient_accumulation_steps",
                                             "token_budget", "load_in_4bit", "lora_targets")
               if getattr(plan, k) != getattr(profile, k)}
    if not changes or plan.tokens_per_step <= profile.tokens_per_step:
        return None
    flags = []
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    e = estimate(plan, card_gib=gpu.total_gib, capability=gpu.compute_capability)
    return {"base_profile": profile.name, "changes": changes, "flags": flags,
            "estimated_reserved_gib": round(e.reserved_gib, 1), "limit_gib": round(e.limit_gib, 1),
            "command": f"swft-lite train --profile {profile.name} {' '.join(flags)} --data train.jsonl"}


# --- output --------------------------------------------------------------------------------------------------------


def to_json(report: DetectReport, profile, reason: str, tailored: dict | None = None) -> str:
    g = report.gpu
    doc = {
        "gpus": [x.to_dict() for x in g.gpus],
        "gpu_source": g.source,
        "gpu_problem": g.problem,
        "gpus_hidden": g.hidden,
        "cuda_visible_devices": report.cuda_visible_devices,
        "driver_version": g.driver_version,
        "cuda_version": g.cuda_version,
        "torch_cuda": g.torch_cuda,
        "ram_gib": None if report.ram_gib is None else round(report.ram_gib, 2),
        "ram_available_gib": None if report.ram_available_gib is None else round(report.ram_available_gib, 2),
        "disk": report.disk.to_dict(),
        "packages": {p.name: p.to_dict() for p in report.packages},
        "licences": {p.package: p.to_dict() for p in report.licences},
        "recommended_profile": None if profile is None else profile.name,
        "reason": reason,
        "tailored": tailored,
        "several_gpus": None if len(g.gpus) <= 1 else _gpus_plan(g.gpus, profile),
        "notes": g.notes,
    }
    return json.dumps(doc, indent=2)


def _gpus_plan(gpus, profile) -> dict:
    from swft_lite.distributed import gpus_plan

    return gpus_plan(gpus, profile)


def no_gpu_sentence(probe: GpuProbe) -> str:
    headline = "No NVIDIA GPU visible" if probe.hidden else NO_GPU_HEADLINE
    return f"{headline}: {probe.problem or 'none visible'}"


def _mark(ok: bool | None) -> str:
    return {True: "✓", False: "✗", None: "–"}[ok]


def format_licences(licences: list) -> list[str]:
    lines = [f"  {p.summary()}" for p in licences]
    if any(p.agpl_files for p in licences):
        lines.append("  AGPL-3.0 code runs when training with the unsloth backend: whoever redistributes it, or "
                     "serves a product built on it over a network, must meet AGPL-3.0's terms (README: Licences). "
                     "The hf backend runs none of it.")
    return lines


def format_report(report: DetectReport, profile, reason: str, tailored: dict | None = None) -> str:
    g = report.gpu
    out: list[str] = ["GPU"]
    if not g.gpus:
        out.append(f"  {no_gpu_sentence(g)}.")
    for x in g.gpus:
        free = "" if x.free_gib is None else f", {x.free_gib:.2f} GiB free"
        cc = x.compute_capability_str or "?"
        bf16 = {True: "yes", False: "no", None: "?"}[x.bf16]
        smi = "" if x.smi_index in (None, x.index) else f" (nvidia-smi GPU {x.smi_index})"
        out.append(f"  cuda:{x.index}  {x.name}{smi}: {x.total_gib:.2f} GiB total{free}; "
                   f"compute capability {cc}; bf16 {bf16}")
    versions = []
    if g.driver_version:
        versions.append(f"driver {g.driver_version}")
    if g.cuda_version:
        versions.append(f"CUDA {g.cuda_version} (the newest the driver supports)")
    if g.torch_cuda:
        versions.append(f"torch built for CUDA {g.torch_cuda}")
    if versions:
        out.append("  " + ", ".join(versions) + (f"; found through {g.source}" if g.source else ""))
    if report.cuda_visible_devices is not None:
        hidden = f" ({g.hidden} hidden)" if g.hidden else ""
        out.append(f"  CUDA_VISIBLE_DEVICES={report.cuda_visible_devices!r}{hidden}")
    if len(g.gpus) > 1:
        from swft_lite.distributed import gpus_plan

        out.append(f"  Without --gpus, training uses one GPU: cuda:0 ({g.gpus[0].name}). Several: "
                   f"{gpus_plan(g.gpus, profile)['sentence']}.")
    for note in g.notes:
        out.append(f"  Note: {note}")

    out += ["", "System"]
    if report.ram_gib is not None:
        out.append(f"  RAM   {report.ram_gib:.1f} GiB ({report.ram_available_gib:.1f} GiB available)")
    d = report.disk
    where = d.checked_path if d.checked_path == str(Path(d.path).expanduser().absolute()) else \
        f"{d.checked_path} (nearest existing folder of {d.path})"
    out.append(f"  Disk  {d.free_gib:.1f} GiB free of {d.total_gib:.1f} GiB at {where}")
    if not d.enough_for_merge:
        out.append(f"  Warning: a merged gpt-oss-20b takes ~42 GB ({MERGED_MODEL_BYTES / GIB:.1f} GiB); only "
                   f"{d.free_gib:.1f} GiB are free there. Free space or pass --output-dir on a larger disk.")

    out += ["", "Packages"]
    width = max(len(p.name) for p in report.packages)
    vwidth = max(len(p.installed or "not installed") for p in report.packages)
    rwidth = max(len(p.required) for p in report.packages)
    for p in report.packages:
        note = p.note.removeprefix("not installed — ")  # the version column says it already
        line = f"  {_mark(p.ok)} {p.name.ljust(width)}  {(p.installed or 'not installed').ljust(vwidth)}  " \
               f"{p.required.ljust(rwidth)}  {note}"
        out.append(line.rstrip())

    out += ["", "Licences (headers of the installed Unsloth files the unsloth backend runs)"]
    out += format_licences(report.licences)

    out += ["", "Recommendation"]
    if profile is not None:
        out.append(f"  Recommended profile: {profile.name} — {reason}")
        out.append(f"  Next: swft-lite train --profile {profile.name} --data train.jsonl")
        if tailored:
            out.append(f"  This card has room beyond {profile.name}'s {profile.vram_budget_gib:g} GiB: estimated "
                       f"{tailored['estimated_reserved_gib']:g} GiB of its {tailored['limit_gib']:g} GiB limit with")
            out.append(f"    {tailored['command']}")
    else:
        out.append(f"  {reason}")
    return "\n".join(out)


def recommended_profile_name(env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(profile name or None, reason) for this machine's first visible GPU - what `detect` recommends.

    For `train` without --profile: probes the GPUs only (no packages, no disk). The reason carries no final period,
    since callers embed it in their own sentence.
    """
    from swft_lite.profiles import all_profiles

    probe = probe_gpus(env)
    profile, reason = recommend_profile(probe.gpus, all_profiles())
    if not probe.gpus and probe.problem:
        reason = no_gpu_sentence(probe)
    return (None if profile is None else profile.name), reason.rstrip(".")
