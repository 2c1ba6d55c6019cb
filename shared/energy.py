"""DVFS energy accounting: frequency/voltage tables of real boards, a power model, and
clock controllers (simulated, and Linux cpufreq).

Model (METHODS.md §4). A board runs at one of its published frequency levels f (MHz) with
voltage V(f); while busy it draws P(f) = P_static + k·V(f)²·f watts (or a measured table,
interpolated between levels), and P_idle while it waits. Work is compute-bound: a segment
that takes t(f_max) ms at the top clock takes t(f) = t(f_max)·f_max/f at f. Energy of a
segment is P(f)·t(f); W × ms = mJ, the unit used throughout.

Tables: what is published and what is modelled
----------------------------------------------
Frequencies are the levels the Linux drivers list (sysfs `available_frequencies`). Voltages
come in three kinds (`Board.voltage_kind`):

* "published": the board's own operating-points table gives (f, V) pairs.
* "published-example": a vendor document prints one chip's voltage table as an example;
  real chips differ by process corner and temperature, so treat it as representative.
* "modelled": no per-level voltage table was found; V is linear in f between V_min at
  f_min and V_max at f_max (`linear_voltages`), and the bounds are stated where defined.

Power coefficients (P_static, k, P_idle) are not published for any of these boards: they
are modelled, with k fixed by an assumed dynamic power at f_max (`k_for`). Supply a measured
per-level power table (`power_table_w`) to replace the formula.

Sources
-------
jetson-tx2-gpu  13 levels 114.75–1300.5 MHz: L4T devfreq
                /sys/devices/17000000.gp10b/devfreq/17000000.gp10b/available_frequencies on
                Jetson TX2, as reproduced in public TX2 DVFS code (gpu_clock_list tables).
                Voltages: published example — the GPU NAFLL software LUT printed in NVIDIA's
                DRIVE 5.0 Linux SDK Development Guide, "Voltage Scaling" page
                (`cat /sys/kernel/debug/bpmp/debug/clk/nafll_gpu/swlut`, column −40..105 °C),
                a Tegra "Parker" (T186) chip, the TX2's SoC. The LUT lists (mV, NDIV) with
                f = NDIV × 25.5 MHz; a level needs the lowest LUT voltage whose f ≥ level.
jetson-tx2-cpu  12 levels 345.6–2035.2 MHz: L4T cpufreq scaling_available_frequencies on
                Jetson TX2 (both the Denver 2 and the Cortex-A57 cluster list these levels).
                Voltages: MODELLED. No published TX2 CPU voltage table or rail DVFS bounds
                were found; V is linear between 0.80 V and 1.10 V, bounds *assumed* within
                the range of published ARM big-core tables (cf. rk3399-a72: 0.825–1.20 V).
rk3399-a72      8 levels 408–1800 MHz with voltages: published, Linux
                arch/arm64/boot/dts/rockchip/rk3399-opp.dtsi `cluster1_opp` (Cortex-A72).
rk3399-gpu      6 levels 200–800 MHz with voltages: published, same file, `gpu_opp_table`
                (Mali-T860 MP4).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Mapping, Protocol, Sequence

__all__ = [
    "BOARDS", "Board", "CpufreqController", "PowerControlError", "PowerController", "SimulatedController",
    "get_board", "k_for", "linear_voltages",
]

VoltageKind = Literal["published", "published-example", "modelled"]
_EPS_MHZ = 1e-6  # frequencies equal within a micro-MHz are the same level


@dataclass(frozen=True)
class Board:
    """One DVFS domain of a board: its frequency levels and power model."""

    name: str
    levels: tuple[tuple[float, float], ...]  # (MHz, V), ascending in MHz
    p_static_w: float  # drawn while busy, at any clock
    k: float  # W / (V²·MHz): P_dyn = k·V²·f
    p_idle_w: float  # drawn while waiting (clock-gated)
    power_table_w: tuple[float, ...] = ()  # measured busy power per level; overrides the formula
    voltage_kind: VoltageKind = "modelled"
    source: str = ""

    def __post_init__(self) -> None:
        levels = tuple((float(f), float(v)) for f, v in self.levels)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "power_table_w", tuple(float(p) for p in self.power_table_w))
        if not levels:
            raise ValueError(f"board {self.name!r}: needs at least one frequency level")
        freqs = [f for f, _ in levels]
        volts = [v for _, v in levels]
        if any(not math.isfinite(f) or f <= 0 for f in freqs) or any(not math.isfinite(v) or v <= 0 for v in volts):
            raise ValueError(f"board {self.name!r}: frequencies and voltages must be positive numbers")
        if any(b <= a for a, b in zip(freqs, freqs[1:])):
            raise ValueError(f"board {self.name!r}: levels must be strictly ascending in MHz, got {freqs}")
        if any(b < a for a, b in zip(volts, volts[1:])):
            raise ValueError(f"board {self.name!r}: voltage must not fall as frequency rises, got {volts}")
        for label, value in (("p_static_w", self.p_static_w), ("k", self.k), ("p_idle_w", self.p_idle_w)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"board {self.name!r}: {label} must be a non-negative number, got {value}")
        table = self.power_table_w
        if table and (len(table) != len(levels) or any(not math.isfinite(p) or p <= 0 for p in table)):
            raise ValueError(f"board {self.name!r}: power_table_w needs one positive power per level "
                             f"({len(levels)}), got {list(table)}")
        if self.voltage_kind not in ("published", "published-example", "modelled"):
            raise ValueError(f"board {self.name!r}: unknown voltage_kind {self.voltage_kind!r}")

    @property
    def frequencies(self) -> tuple[float, ...]:
        return tuple(f for f, _ in self.levels)

    @property
    def f_max(self) -> float:
        return self.levels[-1][0]

    @property
    def f_min(self) -> float:
        return self.levels[0][0]

    def _check_range(self, f: float) -> float:
        f = float(f)
        if not math.isfinite(f) or f < self.f_min - _EPS_MHZ or f > self.f_max + _EPS_MHZ:
            raise ValueError(f"board {self.name!r}: {f} MHz is outside {self.f_min}–{self.f_max} MHz")
        return min(max(f, self.f_min), self.f_max)

    def _interp(self, f: float, values: Sequence[float]) -> float:
        # piecewise linear between levels: exact at every level, defined in between
        freqs = self.frequencies
        f = self._check_range(f)
        for i in range(len(freqs) - 1):
            lo, hi = freqs[i], freqs[i + 1]
            if f <= hi:
                w = (f - lo) / (hi - lo)
                return values[i] + w * (values[i + 1] - values[i])
        return values[-1]

    def nearest_level(self, f: float) -> float:
        """The available level closest to f (ties go up: never slower than asked for);
        clamped to the board's range, so never below its minimum."""
        f = float(f)
        if not math.isfinite(f):
            raise ValueError(f"board {self.name!r}: frequency must be a finite number, got {f}")
        return min(self.frequencies, key=lambda level: (abs(level - f), -level))

    def level_at_least(self, f: float) -> float:
        """The slowest level that is at least f (f_max when f is above it)."""
        for level in self.frequencies:
            if level >= float(f) - _EPS_MHZ:
                return level
        return self.f_max

    def voltage(self, f: float) -> float:
        return self._interp(f, [v for _, v in self.levels])

    def power(self, f: float) -> float:
        """Busy power in W at f MHz."""
        if self.power_table_w:
            return self._interp(f, self.power_table_w)
        f = self._check_range(f)
        return self.p_static_w + self.k * self.voltage(f) ** 2 * f

    def scaled_time(self, t_at_fmax: float, f: float) -> float:
        """Compute-bound time at f of work that takes `t_at_fmax` at the top clock."""
        return float(t_at_fmax) * self.f_max / self._check_range(f)

    def energy(self, t_at_fmax_ms: float, f: float) -> float:
        """mJ spent running work of `t_at_fmax_ms` (ms at f_max) at f MHz."""
        return self.power(f) * self.scaled_time(t_at_fmax_ms, f)


def linear_voltages(freqs: Sequence[float], v_min: float, v_max: float) -> tuple[tuple[float, float], ...]:
    """Modelled levels: V linear in f from v_min at the lowest to v_max at the highest level."""
    lo, hi = float(min(freqs)), float(max(freqs))
    if hi <= lo or v_max < v_min or v_min <= 0:
        raise ValueError(f"need at least two frequencies and 0 < v_min <= v_max, "
                         f"got {lo}–{hi} MHz, {v_min}–{v_max} V")
    return tuple((float(f), round(v_min + (v_max - v_min) * (float(f) - lo) / (hi - lo), 6)) for f in freqs)


def k_for(levels: Sequence[tuple[float, float]], dynamic_w_at_fmax: float) -> float:
    """The k that gives `dynamic_w_at_fmax` watts of dynamic power at the top level."""
    f, v = levels[-1]
    return float(dynamic_w_at_fmax) / (v * v * f)


def _swlut_voltages(freqs: Sequence[float], lut: Sequence[tuple[int, int]],
                    step_mhz: float) -> tuple[tuple[float, float], ...]:
    """Voltage per level from a NAFLL software LUT of (mV, NDIV), f = NDIV·step: the lowest
    voltage whose frequency reaches the level."""
    out = []
    for f in freqs:
        volts = [mv for mv, ndiv in lut if ndiv * step_mhz >= f - _EPS_MHZ]
        if not volts:
            raise ValueError(f"LUT does not reach {f} MHz")
        out.append((float(f), min(volts) / 1000.0))
    return tuple(out)


# Tegra "Parker" GPU NAFLL swlut (NVIDIA DRIVE 5.0 Linux SDK Development Guide, Voltage
# Scaling, example output, column -40C..105C): (mV, NDIV), rows 0..17 (to 1300.5 MHz).
_PARKER_GPU_SWLUT = (
    (502, 9), (511, 9), (520, 10), (529, 13), (538, 16), (547, 19), (556, 22), (565, 25), (574, 28),
    (583, 31), (592, 33), (601, 36), (610, 39), (619, 41), (628, 44), (637, 46), (646, 49), (655, 51),
)
_TX2_GPU_MHZ = (114.75, 216.75, 318.75, 420.75, 522.75, 624.75, 726.75, 828.75, 930.75, 1032.75, 1134.75,
                1236.75, 1300.5)
_TX2_CPU_MHZ = (345.6, 499.2, 652.8, 806.4, 960.0, 1113.6, 1267.2, 1420.8, 1574.4, 1728.0, 1881.6, 2035.2)
_TX2_GPU_LEVELS = _swlut_voltages(_TX2_GPU_MHZ, _PARKER_GPU_SWLUT, 25.5)
_TX2_CPU_LEVELS = linear_voltages(_TX2_CPU_MHZ, 0.80, 1.10)
_RK3399_A72_LEVELS = ((408.0, 0.825), (600.0, 0.825), (816.0, 0.825), (1008.0, 0.875), (1200.0, 0.950),
                      (1416.0, 1.025), (1608.0, 1.100), (1800.0, 1.200))
_RK3399_GPU_LEVELS = ((200.0, 0.800), (297.0, 0.800), (400.0, 0.825), (500.0, 0.875), (600.0, 0.925),
                      (800.0, 1.100))

# Power coefficients below are modelled (assumed, not measured): dynamic power at f_max in
# the order of what the boards' rail monitors show under DNN load, a static share while
# busy, and a small clock-gated idle power.
BOARDS: Mapping[str, Board] = MappingProxyType({b.name: b for b in (
    Board("jetson-tx2-gpu", _TX2_GPU_LEVELS, p_static_w=0.30, k=k_for(_TX2_GPU_LEVELS, 5.0), p_idle_w=0.10,
          voltage_kind="published-example",
          source="levels: L4T devfreq gp10b available_frequencies; V: Parker GPU swlut example, NVIDIA DRIVE 5.0 "
                 "Linux SDK Development Guide (Voltage Scaling)"),
    Board("jetson-tx2-cpu", _TX2_CPU_LEVELS, p_static_w=0.30, k=k_for(_TX2_CPU_LEVELS, 3.0), p_idle_w=0.10,
          voltage_kind="modelled",
          source="levels: L4T cpufreq scaling_available_frequencies; V: modelled linear 0.80-1.10 V (assumed)"),
    Board("rk3399-a72", _RK3399_A72_LEVELS, p_static_w=0.20, k=k_for(_RK3399_A72_LEVELS, 2.5), p_idle_w=0.05,
          voltage_kind="published", source="Linux rk3399-opp.dtsi cluster1_opp"),
    Board("rk3399-gpu", _RK3399_GPU_LEVELS, p_static_w=0.20, k=k_for(_RK3399_GPU_LEVELS, 2.0), p_idle_w=0.05,
          voltage_kind="published", source="Linux rk3399-opp.dtsi gpu_opp_table"),
)})


def get_board(name: str) -> Board:
    board = BOARDS.get(str(name))
    if board is None:
        raise ValueError(f"unknown board {name!r}; known: {', '.join(sorted(BOARDS))}")
    return board


class PowerControlError(RuntimeError):
    """A clock cannot be set or read (no permission, no such interface)."""


class PowerController(Protocol):
    """Sets the clock of one DVFS domain."""

    def set_frequency(self, mhz: float) -> float:
        """Ask for `mhz`; returns the level actually set."""
        ...

    def current(self) -> float:
        """The clock now, in MHz."""
        ...


class SimulatedController:
    """A controller that only remembers: for the offline model and tests. (A plain class,
    not a frozen dataclass: its whole job is to hold the current clock.)"""

    def __init__(self, board: Board) -> None:
        self.board = board
        self._current = board.f_max
        self.switches = 0  # level changes, what a real board pays a transition for

    def set_frequency(self, mhz: float) -> float:
        level = self.board.nearest_level(mhz)
        if level != self._current:
            self.switches += 1
            self._current = level
        return level

    def current(self) -> float:
        return self._current


class CpufreqController:
    """Linux cpufreq: writes `scaling_setspeed` (userspace governor) where it can, else caps
    the clock with `scaling_max_freq`. Needs root on a real board; everywhere else it
    refuses with a PowerControlError saying what was missing."""

    def __init__(self, policy_dir: str | Path = "/sys/devices/system/cpu/cpufreq/policy0",
                 board: Board | None = None) -> None:
        self.policy_dir = Path(policy_dir)
        self.board = board

    def _read(self, name: str) -> str:
        try:
            return (self.policy_dir / name).read_text().strip()
        except OSError as exc:
            raise PowerControlError(f"cannot read {self.policy_dir / name}: {exc.strerror or exc}") from exc

    def _level(self, mhz: float) -> float:
        if self.board is not None:
            return self.board.nearest_level(mhz)
        available = self.policy_dir / "scaling_available_frequencies"
        if available.is_file():
            try:
                levels = [int(x) / 1000.0 for x in available.read_text().split()]
            except (OSError, ValueError):
                levels = []
            if levels:
                return min(levels, key=lambda level: (abs(level - mhz), -level))
        return float(mhz)

    def _writable(self, name: str) -> Path | None:
        path = self.policy_dir / name
        return path if path.is_file() and os.access(path, os.W_OK) else None

    def set_frequency(self, mhz: float) -> float:
        level = self._level(float(mhz))
        khz = str(int(round(level * 1000)))
        targets = []
        setspeed = self._writable("scaling_setspeed")
        governor = (self.policy_dir / "scaling_governor")
        # scaling_setspeed only takes effect under the userspace governor
        if setspeed is not None and governor.is_file() and self._read("scaling_governor") == "userspace":
            targets.append(setspeed)
        cap = self._writable("scaling_max_freq")
        if cap is not None:
            targets.append(cap)
        errors = []
        for path in targets:
            try:
                path.write_text(khz)
                return level
            except OSError as exc:
                errors.append(f"{path.name}: {exc.strerror or exc}")
        detail = "; ".join(errors) if errors else "neither scaling_setspeed (with the userspace governor) nor " \
                                                  "scaling_max_freq is a writable file"
        raise PowerControlError(f"cannot set the clock of {self.policy_dir} to {level} MHz: {detail} "
                                f"(needs root on a Linux cpufreq board)")

    def current(self) -> float:
        text = self._read("scaling_cur_freq")
        try:
            return int(text) / 1000.0
        except ValueError as exc:
            raise PowerControlError(f"{self.policy_dir / 'scaling_cur_freq'} holds {text!r}, not kHz") from exc
