"""Hardware probe: devices, memory, disk, measured matmul TFLOPS; for `gpunite doctor`, MFU, host records."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gpunite.train.trainer import autocast_dtype, pick_device

_GB = 1024**3
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DeviceInfo:
    device: str
    name: str
    memory_gb: float
    memory_available_gb: float | None


@dataclass
class HardwareReport:
    """What a peer can do; `tflops` is the measured matmul rate in the dtype training uses on `device`."""

    device: str
    device_name: str
    memory_gb: float
    memory_available_gb: float | None
    tflops: float
    tflops_by_dtype: dict[str, float]
    train_dtype: str
    ram_gb: float
    ram_available_gb: float | None
    disk_path: str
    disk_free_gb: float
    cpu_threads: int
    torch_version: str
    platform: str
    devices: list[DeviceInfo] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def ram_gb() -> tuple[float, float | None]:
    """Total and available system memory in GiB (available is None where the OS does not say)."""
    try:
        fields = {}
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields["MemTotal"] / _GB, fields.get("MemAvailable", 0) / _GB or None
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return pages * os.sysconf("SC_PAGE_SIZE") / _GB if pages else 0.0, None


def list_devices() -> list[DeviceInfo]:
    """Every torch device usable here, the CPU last."""
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(
                DeviceInfo(f"cuda:{index}", torch.cuda.get_device_name(index), total / _GB, free / _GB)
            )
    if torch.backends.mps.is_available():
        total, available = ram_gb()  # unified memory
        devices.append(DeviceInfo("mps", "Apple GPU (unified memory)", total, available))
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        for index in range(torch.xpu.device_count()):
            properties = torch.xpu.get_device_properties(index)
            devices.append(DeviceInfo(f"xpu:{index}", properties.name, properties.total_memory / _GB, None))
    total, available = ram_gb()
    devices.append(DeviceInfo("cpu", _cpu_name(), total, available))
    return devices


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, budget_s: float = 0.3) -> float:
    """Measured dense matmul throughput in TFLOPS (0.0 where the dtype does not work on the device).

    The matrix size is picked so one multiply takes a useful fraction of the budget: big enough to reach the
    device's steady rate, small enough that a slow dtype (bf16 on a CPU without bf16 units) stays in budget.
    """
    size = 4096 if device.type != "cpu" else 512
    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        while True:
            a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
            b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
            torch.mm(a, b)  # the first call pays for kernel selection and library start-up
            _synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _synchronize(device)
            one = time.perf_counter() - start
            # Grow on fast devices until one multiply costs about a sixth of the budget.
            if one > budget_s / 6 or size >= 8192:
                break
            size *= 2
        # The best of several short windows: on a shared machine the peak is what the hardware can do,
        # the average is what the neighbours left over.
        window_iterations = 1 if device.type == "cpu" else 8
        flops_per_window = 2.0 * size**3 * window_iterations
        best = 0.0
        deadline = time.perf_counter() + budget_s
        while True:
            start = time.perf_counter()
            for _ in range(window_iterations):
                torch.mm(a, b)
            _synchronize(device)
            end = time.perf_counter()
            best = max(best, flops_per_window / (end - start))
            if end >= deadline:
                break
        return best / 1e12
    except (RuntimeError, TypeError):  # the dtype has no matmul kernel on this device
        return 0.0


def _dtype_name(dtype: torch.dtype | None) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
    return names[dtype]


def probe(
    device: str | torch.device = "auto", disk_path: str | Path | None = None, budget_s: float = 0.3
) -> HardwareReport:
    """Measure this machine; takes about 3 x budget_s seconds of matmuls plus start-up."""
    torch_device = pick_device(device) if isinstance(device, str) else device
    devices = list_devices()
    wanted = str(torch_device) if torch_device.index is not None or torch_device.type == "cpu" else None
    info = next(
        (d for d in devices if d.device == wanted or d.device.split(":")[0] == torch_device.type), devices[-1]
    )
    rates = {
        name: round(measure_matmul_tflops(torch_device, dtype, budget_s), 4)
        for name, dtype in _DTYPES.items()
    }
    train_dtype = _dtype_name(autocast_dtype(torch_device))
    ram_total, ram_available = ram_gb()
    if disk_path is None:
        from gpunite.identity import default_home

        home = default_home()
        disk_path = home if home.exists() else Path.cwd()
    disk_path = Path(disk_path)
    return HardwareReport(
        device=info.device,
        device_name=info.name,
        memory_gb=round(info.memory_gb, 2),
        memory_available_gb=None if info.memory_available_gb is None else round(info.memory_available_gb, 2),
        tflops=rates[train_dtype],
        tflops_by_dtype=rates,
        train_dtype=train_dtype,
        ram_gb=round(ram_total, 2),
        ram_available_gb=None if ram_available is None else round(ram_available, 2),
        disk_path=str(disk_path),
        disk_free_gb=round(shutil.disk_usage(disk_path).free / _GB, 2),
        cpu_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        platform=platform.platform(terse=True),
        devices=devices,
    )


def peak_tflops(device: torch.device, cache_dir: Path | None = None) -> float:
    """The device's measured matmul TFLOPS in its training dtype, cached on disk per device and torch version.

    MFU divides achieved model FLOPs/s by this; measuring once per machine keeps `gpunite train` start-up
    short.
    """
    if cache_dir is None:
        from gpunite.identity import default_home

        cache_dir = default_home()
    dtype = autocast_dtype(device)
    key = "|".join(
        [
            str(device),
            _device_name(device),
            _dtype_name(dtype),
            torch.__version__,
            str(torch.get_num_threads()),
        ]
    )
    cache_file = cache_dir / "peak_tflops.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), (int, float)) and cached[key] > 0:
        return float(cached[key])
    rate = measure_matmul_tflops(device, dtype or torch.float32)
    if isinstance(cached, dict) and rate > 0:
        cached[key] = rate
        try:
            from gpunite.util import atomic_write_bytes

            atomic_write_bytes(cache_file, json.dumps(cached, sort_keys=True, indent=1).encode())
        except OSError:
            pass  # a read-only home only costs a re-measure next time
    return rate


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_name()
    return device.type
