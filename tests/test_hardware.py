import json
import subprocess
import sys

import torch

from gpunite.train.hardware import measure_matmul_tflops, peak_tflops, probe


def test_probe_reports_memory_disk_and_measured_tflops(tmp_path):
    report = probe("cpu", disk_path=tmp_path, budget_s=0.1)
    assert report.device == "cpu" and report.train_dtype == "fp32"
    assert report.tflops > 0 and report.tflops == report.tflops_by_dtype["fp32"]
    assert set(report.tflops_by_dtype) == {"fp32", "bf16", "fp16"}
    assert report.memory_gb > 0 and report.ram_gb > 0 and report.disk_free_gb > 0
    assert report.cpu_threads == torch.get_num_threads() and report.torch_version == torch.__version__
    assert report.devices[-1].device == "cpu"
    json.dumps(report.to_dict())  # goes into signed host records as JSON


def test_an_unsupported_dtype_measures_zero_not_an_exception():
    assert measure_matmul_tflops(torch.device("cpu"), torch.bool, budget_s=0.01) == 0.0


def test_peak_tflops_is_measured_once_then_cached(tmp_path):
    first = peak_tflops(torch.device("cpu"), cache_dir=tmp_path)
    assert first > 0
    cache = json.loads((tmp_path / "peak_tflops.json").read_text())
    (key,) = cache
    cache[key] = 123.0  # a cached value is used as is, without measuring again
    (tmp_path / "peak_tflops.json").write_text(json.dumps(cache))
    assert peak_tflops(torch.device("cpu"), cache_dir=tmp_path) == 123.0


def test_doctor_json_cli(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "gpunite", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"GPUNITE_HOME": str(tmp_path), "PATH": ""},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for field in (
        "device",
        "memory_gb",
        "tflops",
        "tflops_by_dtype",
        "disk_free_gb",
        "torch_version",
        "cpu_threads",
        "ram_gb",
        "devices",
    ):
        assert field in report, field
    assert report["tflops"] > 0 and report["tflops_by_dtype"]["fp32"] > 0
