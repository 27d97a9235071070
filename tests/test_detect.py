"""`swft-lite detect`: recorded nvidia-smi / torch outputs in, the report and recommendation a user reads out.

Only the system boundary is faked - `hardware.run_command` (nvidia-smi), `hardware._import_torch`,
`hardware._import_pynvml`, and disk usage for the low-space warning; the parsing, filtering, verdicts and
recommendation are the real code. tests/data/detect/README.md says which outputs were captured on real GPUs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from swft_lite import hardware
from swft_lite.cli import main
from swft_lite.hardware import GpuInfo, package_verdict, recommend_profile
from swft_lite.profiles import all_profiles

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "detect"
NO_DRIVER_TEXT = (DATA / "no_driver" / "failed.txt").read_text()


class FakeNvidiaSmi:
    """nvidia-smi answering from a recorded folder; checks it is called as an argument list with a timeout."""

    def __init__(self, case: str | None = None, *, missing: bool = False, exit_code: int = 0, text: str = "",
                 hang: bool = False):
        self.case, self.missing, self.exit_code, self.text, self.hang = case, missing, exit_code, text, hang
        self.calls: list[list[str]] = []

    def __call__(self, argv, timeout):
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), argv
        assert timeout and timeout > 0
        self.calls.append(argv)
        if self.missing:
            raise FileNotFoundError(2, "No such file or directory", "nvidia-smi")
        if self.hang:
            raise subprocess.TimeoutExpired(argv, timeout)
        if self.exit_code:
            return self.exit_code, self.text, ""
        if argv == hardware.NVIDIA_SMI_QUERY:
            return 0, (DATA / self.case / "query.csv").read_text(), ""
        if argv == ["nvidia-smi"]:
            return 0, (DATA / self.case / "plain.txt").read_text(), ""
        raise AssertionError(f"unexpected command {argv}")


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine without torch-CUDA or NVML whose nvidia-smi answers from a recording."""
    monkeypatch.setattr(hardware, "_import_torch", lambda: None)
    monkeypatch.setattr(hardware, "_import_pynvml", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    def use(case: str | None = None, **kwargs) -> FakeNvidiaSmi:
        fake = FakeNvidiaSmi(case, **kwargs)
        monkeypatch.setattr(hardware, "run_command", fake)
        return fake

    return use


def detect(*args: str, env: dict | None = None):
    result = CliRunner().invoke(main, ["detect", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.output


def detect_json(*args: str, env: dict | None = None) -> dict:
    return json.loads(detect("--json", *args, env=env))


# --- one recorded machine each ------------------------------------------------------------------------------------

CASES = [
    # folder, recommended profile, GiB nvidia-smi reports, driver, CUDA
    ("rtx4060ti_16gb_windows", "rtx4070", "16.00", "566.36", "12.7"),
    ("rtx4080", "rtx4070", "15.99", "550.120", "12.4"),
    ("rtx3090", "rtx3090", "24.00", "535.183.01", "12.2"),
    ("rtx4090", "rtx4090", "23.99", "550.54.15", "12.4"),
    ("h100_80gb_hbm3", "h100", "79.65", "580.159.04", "13.0"),
]


@pytest.mark.parametrize("case,profile,gib,driver,cuda", CASES)
def test_recommends_the_profile_for_each_recorded_card(machine, case, profile, gib, driver, cuda):
    machine(case)
    out = detect()
    name = (DATA / case / "query.csv").read_text().split(", ")[2]
    assert f"cuda:0  {name}: {gib} GiB total" in out
    assert f"driver {driver}, CUDA {cuda}" in out
    assert f"Recommended profile: {profile} — {name} has {gib} GiB; {profile} is the largest profile whose" in out
    assert f"Next: swft-lite train --profile {profile} --data train.jsonl" in out

    doc = detect_json()
    assert doc["recommended_profile"] == profile
    assert [g["name"] for g in doc["gpus"]] == [name]
    assert (doc["driver_version"], doc["cuda_version"], doc["gpu_source"]) == (driver, cuda, "nvidia-smi")


def test_rtx4090_report_reads_as_the_readme_shows(machine):
    machine("rtx4090")
    out = detect()
    assert ("Recommended profile: rtx4090 — NVIDIA GeForce RTX 4090 has 23.99 GiB; rtx4090 is the largest profile "
            "whose 24 GiB budget fits (`swft-lite estimate`: 22.2 GiB reserved of this card's 22.5 GiB limit). "
            "rtx3090 has the same budget; rtx4090 is the one for this GPU generation "
            "(compute capability 8.9).") in out
    assert "compute capability 8.9; bf16 yes" in out
    assert "22.47 GiB free" in out  # 23012 MiB: the desktop holds the rest
    for section in ("GPU\n", "\nSystem\n", "\nPackages\n", "\nRecommendation\n"):
        assert section in out


def test_generation_decides_between_the_two_24_gib_profiles(machine):
    machine("rtx3090")
    doc = detect_json()
    assert doc["gpus"][0]["compute_capability"] == "8.6"
    assert doc["recommended_profile"] == "rtx3090"
    assert "rtx4090 has the same budget; rtx3090 is the one for this GPU generation (compute capability 8.6)" \
        in doc["reason"]


def test_rtx4070_12gb_gets_no_profile_and_a_clear_statement(machine):
    machine("rtx4070_12gb")
    out = detect()
    assert "Recommended profile" not in out and "Next: swft-lite train" not in out
    assert "No profile fits: NVIDIA GeForce RTX 4070 has 11.99 GiB, and gpt-oss-20b needs about 13–15 GiB of GPU " \
           "memory even at 4 bits." in out
    assert "The smallest profile, rtx4070, needs a 16 GiB card" in out
    doc = detect_json()
    assert doc["recommended_profile"] is None and len(doc["gpus"]) == 1


# --- several GPUs and CUDA_VISIBLE_DEVICES --------------------------------------------------------------------------

UUID0 = "GPU-0f3a6b2e-4c8d-1e97-b5a0-d2c4e6f8a1b3"
UUID1 = "GPU-e9b71d04-a2c6-35f8-8d1e-60b4c2a7f953"


def test_two_gpus_are_both_listed_and_training_uses_the_first(machine):
    machine("2x_rtx3090")
    out = detect()
    assert "cuda:0  NVIDIA GeForce RTX 3090: 24.00 GiB total, 23.17 GiB free" in out
    assert "cuda:1  NVIDIA GeForce RTX 3090: 24.00 GiB total, 23.67 GiB free" in out
    assert "Without --gpus, training uses one GPU: cuda:0 (NVIDIA GeForce RTX 3090). Several: --gpus 2 (or auto) " \
           "trains on cuda:0-1, one process each, profile rtx3090 on every GPU: global batch 2 x 4 x 2 GPU(s) = 16 " \
           "rows an optimizer step." in out
    doc = detect_json()
    assert [(g["index"], g["uuid"]) for g in doc["gpus"]] == [(0, UUID0), (1, UUID1)]
    assert doc["recommended_profile"] == "rtx3090"
    assert doc["several_gpus"]["gpus"] == 2


def test_two_real_h200s_are_both_listed(machine):
    machine("2x_h200")
    doc = detect_json()
    assert [g["name"] for g in doc["gpus"]] == ["NVIDIA H200", "NVIDIA H200"]
    assert doc["gpus"][1]["total_gib"] == 140.4
    assert doc["recommended_profile"] == "h100"


@pytest.mark.parametrize("cvd,uuids", [
    ("1", [UUID1]),
    ("1,0", [UUID1, UUID0]),
    ("GPU-e9b7", [UUID1]),  # CUDA accepts a unique UUID prefix
    ("0,7,1", [UUID0]),  # like CUDA, an entry naming no GPU ends the list
    ("0,-1,1", [UUID0]),  # and so does -1
])
def test_cuda_visible_devices_selects_and_orders_gpus(machine, cvd, uuids):
    machine("2x_rtx3090")
    doc = detect_json(env={"CUDA_VISIBLE_DEVICES": cvd})
    assert [g["uuid"] for g in doc["gpus"]] == uuids
    assert [g["index"] for g in doc["gpus"]] == list(range(len(uuids)))
    assert doc["gpus_hidden"] == 2 - len(uuids)
    assert doc["cuda_visible_devices"] == cvd


def test_cuda_visible_devices_1_lists_only_the_second_gpu(machine):
    machine("2x_rtx3090")
    out = detect(env={"CUDA_VISIBLE_DEVICES": "1"})
    assert "cuda:0  NVIDIA GeForce RTX 3090 (nvidia-smi GPU 1): 24.00 GiB total, 23.67 GiB free" in out
    assert "cuda:1" not in out
    assert "CUDA_VISIBLE_DEVICES='1' (1 hidden)" in out


@pytest.mark.parametrize("cvd", ["", "-1"])
def test_cuda_visible_devices_can_hide_every_gpu(machine, cvd):
    machine("2x_rtx3090")
    out = detect(env={"CUDA_VISIBLE_DEVICES": cvd})
    assert f"No NVIDIA GPU visible: CUDA_VISIBLE_DEVICES={cvd!r} hides all 2 GPU(s) the driver has" in out
    assert "Recommended profile" not in out
    assert detect_json(env={"CUDA_VISIBLE_DEVICES": cvd})["gpus"] == []


def test_mixed_gpus_warn_about_cuda_device_order():
    gpus, _ = hardware.filter_visible([GpuInfo(0, "NVIDIA GeForce RTX 3090", 24.0, smi_index=0),
                                       GpuInfo(1, "NVIDIA GeForce RTX 4090", 24.0, smi_index=1)], None)
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in hardware._order_note(gpus, {})
    assert hardware._order_note(gpus, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) is None


# --- no GPU, no driver ----------------------------------------------------------------------------------------------


def test_nvidia_smi_missing_says_so_plainly_and_exits_0(machine):
    machine(missing=True)
    out = detect()
    assert "No NVIDIA GPU/driver found: nvidia-smi is not installed" in out
    assert "No profile recommended" in out and "Recommended profile" not in out
    doc = detect_json()
    assert doc["gpus"] == [] and doc["recommended_profile"] is None and doc["driver_version"] is None


def test_driver_not_loaded_says_so_plainly_and_exits_0(machine):
    fake = machine(exit_code=9, text=NO_DRIVER_TEXT)
    out = detect()
    assert "No NVIDIA GPU/driver found: nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't " \
           "communicate with the NVIDIA driver." in out
    assert fake.calls[0] == hardware.NVIDIA_SMI_QUERY
    assert detect_json()["recommended_profile"] is None


def test_hung_nvidia_smi_is_reported_not_waited_for(machine):
    machine(hang=True)
    assert "No NVIDIA GPU/driver found: nvidia-smi did not answer" in detect()


# --- the torch and NVML sources -------------------------------------------------------------------------------------


def fake_torch(recorded: dict, available: bool = True):
    """A stand-in for `torch` built from a recorded tests/data/detect/*/torch.json."""
    devices = recorded.get("devices") or [recorded]
    cuda = SimpleNamespace(
        is_available=lambda: available,
        device_count=lambda: len(devices),
        get_device_properties=lambda i: SimpleNamespace(**{k: devices[i][k] for k in
                                                           ("name", "total_memory", "major", "minor", "uuid")}),
        mem_get_info=lambda i: tuple(devices[i]["mem_get_info"]),
    )
    return SimpleNamespace(cuda=cuda, version=SimpleNamespace(cuda=recorded["torch_cuda"]))


def test_torch_source_with_the_real_h100_properties(machine, monkeypatch):
    machine("h100_80gb_hbm3")  # only asked for the driver and CUDA versions
    recorded = json.loads((DATA / "h100_80gb_hbm3" / "torch.json").read_text())
    monkeypatch.setattr(hardware, "_import_torch", lambda: fake_torch(recorded))
    out = detect()
    # torch reports the memory CUDA can use: nvidia-smi's 79.65 GiB less what the driver reserves.
    assert "cuda:0  NVIDIA H100 80GB HBM3: 79.18 GiB total, 78.66 GiB free; compute capability 9.0; bf16 yes" in out
    assert "driver 580.159.04, CUDA 13.0 (the newest the driver supports), torch built for CUDA 13.0; found through " \
           "torch" in out
    assert "Recommended profile: h100 — NVIDIA H100 80GB HBM3 has 79.18 GiB" in out
    doc = detect_json()
    assert doc["gpus"][0]["uuid"] == "GPU-1c46ca53-80f3-d5a1-1c0a-bfd3b063129f"
    assert doc["gpu_source"] == "torch" and doc["torch_cuda"] == "13.0"


def test_torch_that_cannot_see_the_gpu_falls_back_to_nvidia_smi_and_says_why(machine, monkeypatch):
    machine("rtx4090")
    recorded = json.loads((DATA / "h100_80gb_hbm3" / "torch.json").read_text())
    monkeypatch.setattr(hardware, "_import_torch", lambda: fake_torch(recorded, available=False))
    doc = detect_json()
    assert doc["gpu_source"] == "nvidia-smi" and doc["recommended_profile"] == "rtx4090"
    assert any("torch.cuda.is_available() is False" in n for n in doc["notes"])


def test_nvml_source_applies_cuda_visible_devices(machine, monkeypatch):
    fake = machine("2x_rtx3090")
    rows = [line.split(", ") for line in (DATA / "2x_rtx3090" / "query.csv").read_text().splitlines()]
    MiB = 1024**2

    class NVML:  # the pynvml calls detect makes, answering with the 2x RTX 3090 values (old pynvml: bytes)
        nvmlInit = nvmlShutdown = staticmethod(lambda: None)
        nvmlSystemGetDriverVersion = staticmethod(lambda: b"535.183.01")
        nvmlSystemGetCudaDriverVersion = staticmethod(lambda: 12020)
        nvmlDeviceGetCount = staticmethod(lambda: len(rows))
        nvmlDeviceGetHandleByIndex = staticmethod(lambda i: rows[i])
        nvmlDeviceGetName = staticmethod(lambda h: h[2].encode())
        nvmlDeviceGetUUID = staticmethod(lambda h: h[1].encode())
        nvmlDeviceGetMemoryInfo = staticmethod(lambda h: SimpleNamespace(total=int(h[3]) * MiB, free=int(h[4]) * MiB))
        nvmlDeviceGetCudaComputeCapability = staticmethod(lambda h: tuple(int(x) for x in h[5].split(".")))

    monkeypatch.setattr(hardware, "_import_pynvml", lambda: NVML)
    doc = detect_json(env={"CUDA_VISIBLE_DEVICES": "1"})
    assert doc["gpu_source"] == "nvml"
    assert [(g["uuid"], g["smi_index"], g["total_gib"]) for g in doc["gpus"]] == [(UUID1, 1, 24.0)]
    assert (doc["driver_version"], doc["cuda_version"]) == ("535.183.01", "12.2")
    assert fake.calls == []  # NVML answered: nvidia-smi was not needed


# --- parsing details ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,driver,cuda", [
    ("rtx4070_12gb", "560.35.03", "12.6"), ("rtx4060ti_16gb_windows", "566.36", "12.7"), ("rtx3090", "535.183.01", "12.2"),
    ("h100_80gb_hbm3", "580.159.04", "13.0"), ("2x_h200", "580.159.04", "13.0"),
])
def test_header_gives_driver_and_cuda_version(case, driver, cuda):
    assert hardware.parse_nvidia_smi_header((DATA / case / "plain.txt").read_text()) == (driver, cuda)
    assert hardware.parse_nvidia_smi_header(NO_DRIVER_TEXT) == (None, None)


def test_query_parser_copes_with_na_fields_and_a_comma_in_a_name():
    gpus, driver = hardware.parse_nvidia_smi_query(
        "0, GPU-aa, NVIDIA A100-SXM4-80GB, 81920, [N/A], [N/A], 535.104.05\n"
        "1, [N/A], Some Card, Rev. 2, 16384, 16000, 8.6, 535.104.05\n")
    assert driver == "535.104.05"
    assert (gpus[0].free_gib, gpus[0].compute_capability, gpus[0].bf16) == (None, None, None)
    assert gpus[1].name == "Some Card, Rev. 2" and gpus[1].uuid is None and gpus[1].compute_capability == (8, 6)
    with pytest.raises(ValueError, match="expected 7 fields"):
        hardware.parse_nvidia_smi_query("0, GPU-aa, 81920\n")


# --- recommendation boundaries (values as the cards report them) ----------------------------------------------------


@pytest.fixture(scope="module")
def profiles():
    return all_profiles()


@pytest.mark.parametrize("name,total,cc,expected", [
    ("NVIDIA GeForce RTX 4070 (torch)", 11.72, (8, 9), None),
    ("NVIDIA GeForce RTX 4070 Ti SUPER (torch)", 15.59, (8, 9), "rtx4070"),
    # No bf16: `swft-lite estimate` puts rtx4070 at 18.99 GiB against 13.5 / 14.5 GiB (issue 13: detect said rtx4070).
    ("Tesla T4 (ECC on)", 14.74, (7, 5), None),
    ("Tesla V100-SXM2-16GB", 15.77, (7, 0), None),
    # ECC on: the 24 GiB profiles' 22.23 GiB estimate exceeds the 20.7 GiB limit of a 22.2 GiB card.
    ("NVIDIA L4 (ECC on)", 22.17, (8, 9), "rtx4070"),
    ("NVIDIA A10G (ECC on)", 22.18, (8, 6), "rtx4070"),
    ("NVIDIA GeForce RTX 4090 (torch)", 23.65, (8, 9), "rtx4090"),
    ("NVIDIA GeForce RTX 5090", 31.36, (12, 0), "rtx4090"),
    ("NVIDIA A100-SXM4-40GB", 39.39, (8, 0), "rtx3090"),
    ("NVIDIA RTX A6000", 47.43, (8, 6), "rtx3090"),
    ("NVIDIA A100-SXM4-80GB", 79.15, (8, 0), "h100"),
    ("NVIDIA H100 80GB HBM3 (torch)", 79.18, (9, 0), "h100"),
])
def test_largest_fitting_profile(profiles, name, total, cc, expected):
    profile, reason = recommend_profile([GpuInfo(0, name, total, compute_capability=cc)], profiles)
    assert (profile.name if profile else None) == expected, reason


def test_unknown_compute_capability_still_recommends(profiles):
    profile, _ = recommend_profile([GpuInfo(0, "card", 24.0)], profiles)
    assert profile.name in ("rtx3090", "rtx4090")


def test_no_bf16_and_busy_card_are_said(profiles):
    profile, reason = recommend_profile([GpuInfo(0, "Tesla V100-SXM2-32GB", 31.74, free_gib=31.0,
                                                 compute_capability=(7, 0))], profiles)
    assert profile.name == "rtx4070" and "no bf16 (compute capability 7.0 < 8.0)" in reason
    profile, reason = recommend_profile([GpuInfo(0, "RTX 4090", 23.99, free_gib=12.0, compute_capability=(8, 9))],
                                        profiles)
    assert profile.name == "rtx4090"
    assert "Only 12.00 GiB are free right now: other programs hold 11.99 GiB" in reason


def test_recommended_profile_name_for_train(machine):
    machine("rtx4090")
    name, reason = hardware.recommended_profile_name()
    assert name == "rtx4090" and reason.startswith("NVIDIA GeForce RTX 4090 has 23.99 GiB")
    assert not reason.endswith(".")  # train embeds it in its own sentence
    machine(missing=True)
    assert hardware.recommended_profile_name() == (
        None, "No NVIDIA GPU/driver found: nvidia-smi is not installed (no NVIDIA driver on this machine)")


# --- packages -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,version,ok,note_has", [
    ("trl", "1.14.2", True, ""),
    ("trl", "1.15.0", False, "trl 1.15.0's SFTTrainer cannot train on CPU"),
    ("transformers", "5.17.0", True, ""),
    ("transformers", "5.18.0", False, "Unsloth 2026.10.9 needs transformers <= 5.17.0"),
    ("transformers", "5.18.0.dev0", False, "transformers <= 5.17.0"),
    ("transformers", "4.57.1", False, "pip install 'transformers>=5.0,<=5.17.0'"),
    ("torch", "2.14.1+cu128", True, ""),
    ("torch", "2.15.0", False, "torch < 2.15"),
    ("datasets", "5.0.0", False, "datasets < 5"),
    ("peft", "0.22.0", False, "peft 0.21.x"),
    ("unsloth", "2026.10.9", True, ""),
    ("unsloth", "2026.11.2", False, "unsloth 2026.10.9"),
    ("unsloth_zoo", "2026.9.1", False, "unsloth_zoo must match"),
    ("trl", None, False, "not installed — swft-lite needs it"),
    ("trl", "not-a-version", None, "cannot read version"),
])
def test_package_verdicts(name, version, ok, note_has):
    v = package_verdict(name, version)
    assert v.ok is ok, v
    assert note_has in v.note
    if ok:
        assert v.note == ""


def test_missing_unsloth_is_optional_and_says_how_to_install():
    v = package_verdict("unsloth", None)
    assert v.ok is None
    assert v.note == "not installed — needed only for the unsloth backend: pip install 'swft-lite[unsloth]'"
    assert package_verdict("llama-cpp-python", None).note.endswith("pip install 'swft-lite[gguf]'")


def test_cpu_torch_is_flagged_only_when_a_gpu_is_there():
    assert package_verdict("torch", "2.13.0+cpu").ok is True
    v = package_verdict("torch", "2.13.0+cpu", gpu_visible=True)
    assert v.ok is False and "CPU-only build" in v.note


def test_package_table_marks_bad_versions(machine, monkeypatch):
    machine(missing=True)
    real = hardware.installed_version
    fake = {"trl": "1.15.0", "transformers": "5.18.0"}
    monkeypatch.setattr(hardware, "installed_version", lambda dist: fake.get(dist) or real(dist))
    out = detect()
    trl_line = next(line for line in out.splitlines() if " trl " in line)
    assert trl_line.lstrip().startswith("✗") and "1.15.0" in trl_line and "pip install 'trl>=1.14,<1.15'" in trl_line
    doc = detect_json()
    assert doc["packages"]["transformers"] == {
        "installed": "5.18.0", "required": ">=5.0,<=5.17.0", "ok": False,
        "note": "Unsloth 2026.10.9 needs transformers <= 5.17.0: pip install 'transformers>=5.0,<=5.17.0'"}


def test_known_good_pins_match_pyproject():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    declared = {canonicalize_name(r.name): r.specifier for r in reqs}
    for name, kg in hardware.KNOWN_GOOD.items():
        assert declared[canonicalize_name(kg.dist)] == SpecifierSet(kg.spec), name


# --- disk -----------------------------------------------------------------------------------------------------------


def test_disk_is_checked_at_the_nearest_existing_folder(machine, tmp_path):
    machine(missing=True)
    doc = detect_json("--output-dir", str(tmp_path / "runs" / "new"))
    assert doc["disk"]["path"] == str(tmp_path / "runs" / "new")
    assert doc["disk"]["checked_path"] == str(tmp_path)
    assert doc["disk"]["free_gib"] == pytest.approx(shutil.disk_usage(tmp_path).free / 1024**3, abs=0.5)


def test_low_disk_warns_about_the_42_gb_merge(machine, monkeypatch, tmp_path):
    machine(missing=True)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(hardware.shutil, "disk_usage", lambda p: Usage(500 * 10**9, 470 * 10**9, 30 * 10**9))
    out = detect("--output-dir", str(tmp_path))
    assert "Warning: a merged gpt-oss-20b takes ~42 GB (39.1 GiB); only 27.9 GiB are free there" in out
    assert detect_json("--output-dir", str(tmp_path))["disk"]["enough"] is False
    monkeypatch.setattr(hardware.shutil, "disk_usage", lambda p: Usage(500 * 10**9, 400 * 10**9, 100 * 10**9))
    assert "Warning" not in detect("--output-dir", str(tmp_path))


# --- this machine, for real -----------------------------------------------------------------------------------------


def test_real_run_on_this_machine_lists_installed_versions(tmp_path):
    result = CliRunner().invoke(main, ["detect", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for dist in ("torch", "transformers", "peft", "trl", "datasets", "openai-harmony"):
        line = next(line for line in result.output.splitlines() if f" {dist} " in line)
        assert importlib.metadata.version(dist) in line, line
    doc = json.loads(CliRunner().invoke(main, ["detect", "--json", "--output-dir", str(tmp_path)]).output)
    assert isinstance(doc["gpus"], list)
    assert {"gpus", "driver_version", "cuda_version", "ram_gib", "disk", "packages", "recommended_profile",
            "reason"} <= set(doc)
    assert doc["ram_gib"] > 0 and doc["disk"]["free_gib"] > 0
    if shutil.which("nvidia-smi") is None:  # this CPU machine (and CI)
        assert "No NVIDIA GPU/driver found" in result.output
        assert doc["gpus"] == [] and doc["recommended_profile"] is None


def test_detect_reads_versions_without_importing_unsloth_or_torch(tmp_path):
    """A fake unsloth whose import raises: detect must report its version from metadata and never import it."""
    site = tmp_path / "site"
    for dist, version in (("unsloth", "2026.10.9"), ("unsloth_zoo", "2026.9.1")):
        (site / dist).mkdir(parents=True)
        (site / dist / "__init__.py").write_text(f"raise RuntimeError('{dist} was imported')\n")
        info = site / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from swft_lite.cli import main\n"
        f"r = CliRunner().invoke(main, ['detect', '--json', '--output-dir', {str(tmp_path)!r}])\n"
        "doc = json.loads(r.output)\n"
        "heavy = sorted(m for m in ('unsloth', 'unsloth_zoo', 'torch', 'transformers', 'trl', 'peft') "
        "if m in sys.modules)\n"
        "print(json.dumps({'exit': r.exit_code, 'packages': doc['packages'], 'imported': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["exit"] == 0
    assert got["packages"]["unsloth"]["installed"] == "2026.10.9" and got["packages"]["unsloth"]["ok"] is True
    assert got["packages"]["unsloth_zoo"]["ok"] is False
    torch_version = importlib.metadata.version("torch")
    expected = [] if torch_version.endswith("+cpu") else ["torch"]  # a CUDA torch is the first GPU source
    assert [m for m in got["imported"] if m != "torch"] == [] and \
        ("torch" in got["imported"]) == bool(expected), got["imported"]


# --- cards with room beyond their profile ---------------------------------------------------------------------------


def test_a_card_well_above_its_profile_gets_a_tailored_plan(machine):
    machine("2x_h200")
    out = detect()
    assert "This card has room beyond h100's 80 GiB" in out
    doc = detect_json()
    t = doc["tailored"]
    assert t["base_profile"] == "h100" and t["estimated_reserved_gib"] <= t["limit_gib"]
    assert t["changes"]["max_seq_length"] > 8192 or t["changes"].get("per_device_batch_size", 2) > 2
    assert t["command"].startswith("swft-lite train --profile h100 --")


def test_tailored_plan_only_between_profiles():
    from swft_lite.hardware import GpuInfo, tailored_plan
    from swft_lite.profiles import load_profile

    def gpu(gib):
        return GpuInfo(index=0, name="card", total_gib=gib, free_gib=gib, compute_capability=(8, 9))

    # a 24 GB card is what rtx4090 was made for: no second plan beside it
    assert tailored_plan(gpu(23.99), load_profile("rtx4090")) is None
    # a 20 GB card (RTX 4000 Ada, A4500) would otherwise train with the 16 GB settings
    plan = tailored_plan(gpu(19.99), load_profile("rtx4070"))
    assert plan is not None and plan["changes"]["max_seq_length"] > 2048
    assert plan["estimated_reserved_gib"] <= plan["limit_gib"] < 19.99
    assert "--max-seq-length" in plan["flags"]
