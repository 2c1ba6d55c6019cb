"""Device profiles: how long each piece of a bundle's network takes on a device, per batch
size (Neurosurgeon-style per-stage timing): every stage, every exit head, the final head.

A profile is measured where it runs (`measure_profile`, `splitexit profile BUNDLE`), or
derived from a measured one by a stated factor for a named device class (`derived`), the
published source of that factor written in the profile. The split planner reads the
edge's times from one (`splitexit.plan.DeviceTimes`), and a live run pads each edge
segment to them, so that this machine behaves like the device. Every figure names the
profile it used.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from splitexit.plan import DeviceTimes

__all__ = ["DEVICE_CLASSES", "DeviceProfile", "ProfileError", "derived", "device_class", "load_profile", "measure_profile"]

FORMAT = "splitexit-device-profile"


class ProfileError(ValueError):
    """A profile that cannot be read or does not fit the network."""


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    name: str
    source: str  # how the times were obtained: where measured, or the factor and its source
    arch: str  # the network the times are of (ModelConfig.arch)
    threads: int
    times: Mapping[int, DeviceTimes]  # by batch size

    def at(self, batch: int = 1) -> DeviceTimes:
        """Times at `batch`, or at the nearest batch size measured (scaled linearly)."""
        if batch in self.times:
            return self.times[batch]
        nearest = min(self.times, key=lambda b: abs(b - batch))
        return self.times[nearest].scaled(batch / nearest)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "source": self.source, "arch": self.arch, "threads": self.threads,
                "batches": {str(b): {"stage_ms": list(t.stage_ms), "exit_ms": {str(k): v for k, v in t.exit_ms.items()},
                                     "head_ms": t.head_ms} for b, t in sorted(self.times.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "profile") -> "DeviceProfile":
        if data.get("format") != FORMAT:
            raise ProfileError(f"{where}: not a {FORMAT} file")
        try:
            times = {int(b): DeviceTimes(stage_ms=tuple(float(v) for v in t["stage_ms"]),
                                         exit_ms={int(k): float(v) for k, v in t["exit_ms"].items()},
                                         head_ms=float(t["head_ms"]))
                     for b, t in data["batches"].items()}
            profile = cls(name=str(data["name"]), source=str(data["source"]), arch=str(data["arch"]),
                          threads=int(data["threads"]), times=times)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if not times:
            raise ProfileError(f"{where}: no batch size measured")
        return profile

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def load_profile(path: str | Path) -> DeviceProfile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: unreadable device profile ({exc})") from exc
    return DeviceProfile.from_dict(data, str(path))


def derived(base: DeviceProfile, *, name: str, factor: float, source: str) -> DeviceProfile:
    """`base` as a device `factor` times slower would run it; `source` says where the
    factor comes from (a published measurement), and it is kept in the profile."""
    if not source.strip():
        raise ProfileError("a derived profile needs the source of its factor")
    return DeviceProfile(name=name, source=f"{base.name} x {factor:g} ({source})", arch=base.arch,
                         threads=base.threads, times={b: t.scaled(factor) for b, t in base.times.items()})


# Device classes derived from a profile measured on an x86 server core (as this project's
# machines are), one thread each. The factor is a published single-thread latency ratio
# for a ResNet: ncnn's benchncnn results (Tencent/ncnn, benchmark/README.md at commit
# f4e9a782913873aa32ecc18d78f023ea3b951b0e), resnet18 fp32 on the CPU, 1 thread, average ms.
_NCNN = "ncnn benchmark/README.md @ f4e9a78, benchncnn resnet18 fp32, 1 thread"
DEVICE_CLASSES: dict[str, tuple[float, str]] = {
    "rpi4": (191.10 / 13.82, f"{_NCNN}: Raspberry Pi 4 (Cortex-A72 1.8 GHz) 191.10 ms over "
                             "AMD EPYC 9V45 (AVX-512) 13.82 ms"),
    "jetson-nano": (221.60 / 13.82, f"{_NCNN}: Jetson Nano CPU (Cortex-A57) 221.60 ms over "
                                    "AMD EPYC 9V45 (AVX-512) 13.82 ms"),
}


def device_class(base: DeviceProfile, name: str) -> DeviceProfile:
    """`base` (measured on an x86 server core) as a device of class `name` (DEVICE_CLASSES)."""
    if name not in DEVICE_CLASSES:
        raise ProfileError(f"unknown device class {name!r}; known: {', '.join(DEVICE_CLASSES)}")
    factor, source = DEVICE_CLASSES[name]
    return derived(base, name=f"{name}-class", factor=factor, source=source)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_profile(model: Any, input_shape: tuple[int, int, int], *, name: str, arch: str, batch_sizes: Sequence[int] = (1,),
                    threads: int | None = None, repeats: int = 20) -> DeviceProfile:
    """Time `model` (a MultiExitNet) here: every stage, exit head and final head, each on
    its real input, median of `repeats`, at each batch size (`splitexit.cost.measure_ms`)."""
    import torch

    from splitexit.cost import measure_ms

    if threads:
        torch.set_num_threads(threads)
    times = {}
    for batch in batch_sizes:
        t = measure_ms(model, input_shape, batch_size=batch, repeats=repeats)
        times[batch] = DeviceTimes(stage_ms=t.stage_ms, exit_ms=t.exit_ms, head_ms=t.head_ms)
    used = torch.get_num_threads()
    source = (f"measured on {_cpu_name()} ({os.cpu_count()} CPUs), torch {torch.__version__}, {used} threads, "
              f"median of {repeats}")
    return DeviceProfile(name=name, source=source, arch=arch, threads=used, times=times)
