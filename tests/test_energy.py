from __future__ import annotations

import math
from pathlib import Path

import pytest

from splitexit.energy import (
    BOARDS, Board, CpufreqController, PowerControlError, SimulatedController, get_board, k_for, linear_voltages,
)

# The public level lists (L4T sysfs on Jetson TX2; Linux rk3399-opp.dtsi)
TX2_GPU_MHZ = (114.75, 216.75, 318.75, 420.75, 522.75, 624.75, 726.75, 828.75, 930.75, 1032.75, 1134.75, 1236.75,
               1300.5)
TX2_CPU_MHZ = (345.6, 499.2, 652.8, 806.4, 960.0, 1113.6, 1267.2, 1420.8, 1574.4, 1728.0, 1881.6, 2035.2)


@pytest.mark.parametrize("board", list(BOARDS.values()), ids=list(BOARDS))
def test_tables_sorted_and_documented(board: Board) -> None:
    freqs = board.frequencies
    assert list(freqs) == sorted(freqs) and len(set(freqs)) == len(freqs)
    volts = [v for _, v in board.levels]
    assert volts == sorted(volts) and all(0.4 < v < 1.5 for v in volts)
    assert board.voltage_kind in ("published", "published-example", "modelled")
    assert board.source
    # power grows with the clock, and the idle power is below any busy power
    powers = [board.power(f) for f in freqs]
    assert all(b > a for a, b in zip(powers, powers[1:]))
    assert board.p_idle_w < powers[0]


def test_tx2_tables_match_published_levels() -> None:
    gpu, cpu = get_board("jetson-tx2-gpu"), get_board("jetson-tx2-cpu")
    assert gpu.frequencies == TX2_GPU_MHZ and len(gpu.levels) == 13
    assert (gpu.f_min, gpu.f_max) == (114.75, 1300.5)
    assert cpu.frequencies == TX2_CPU_MHZ and len(cpu.levels) == 12
    assert (cpu.f_min, cpu.f_max) == (345.6, 2035.2)
    # GPU voltages from the Parker swlut example: 502 mV at the bottom, 655 mV at 1300.5 MHz (NDIV 51)
    assert gpu.voltage_kind == "published-example"
    assert gpu.voltage(114.75) == pytest.approx(0.502) and gpu.voltage(1300.5) == pytest.approx(0.655)
    assert gpu.voltage(1134.75) == pytest.approx(0.637)  # 44 x 25.5 = 1122 < 1134.75, so NDIV 46
    # CPU voltages are modelled: linear between the stated bounds
    assert cpu.voltage_kind == "modelled"
    assert cpu.voltage(cpu.f_min) == pytest.approx(0.80) and cpu.voltage(cpu.f_max) == pytest.approx(1.10)
    mid = (cpu.f_min + cpu.f_max) / 2
    assert cpu.voltage(mid) == pytest.approx(0.95, abs=1e-6)


def test_rk3399_published_operating_points() -> None:
    a72, gpu = get_board("rk3399-a72"), get_board("rk3399-gpu")
    assert a72.voltage_kind == gpu.voltage_kind == "published"
    assert a72.levels[0] == (408.0, 0.825) and a72.levels[-1] == (1800.0, 1.2)
    assert gpu.levels[0] == (200.0, 0.8) and gpu.levels[-1] == (800.0, 1.1)


def test_nearest_level_rounds_and_clamps() -> None:
    gpu = get_board("jetson-tx2-gpu")
    assert gpu.nearest_level(700.0) == 726.75
    assert gpu.nearest_level(650.0) == 624.75
    assert gpu.nearest_level((114.75 + 216.75) / 2) == 216.75  # a tie goes up: never slower than asked
    assert gpu.nearest_level(1.0) == 114.75  # never below the minimum
    assert gpu.nearest_level(5000.0) == 1300.5
    assert gpu.nearest_level(1032.75) == 1032.75
    assert gpu.level_at_least(1011.5) == 1032.75 and gpu.level_at_least(0) == 114.75
    with pytest.raises(ValueError, match="finite"):
        gpu.nearest_level(math.nan)


def test_power_time_and_energy_model() -> None:
    gpu = get_board("jetson-tx2-gpu")
    f, v = gpu.levels[-1]
    assert gpu.power(f) == pytest.approx(gpu.p_static_w + gpu.k * v * v * f)
    assert gpu.power(gpu.f_max) == pytest.approx(0.30 + 5.0)  # k fixed by 5 W dynamic at f_max
    assert gpu.scaled_time(10.0, gpu.f_max) == 10.0
    assert gpu.scaled_time(10.0, gpu.f_max / 2) == pytest.approx(20.0)  # compute-bound: t ~ 1/f
    assert gpu.energy(10.0, 624.75) == pytest.approx(gpu.power(624.75) * 10.0 * 1300.5 / 624.75)
    # a middle clock does the same work for less energy than f_max: what DVFS buys
    assert gpu.energy(1.0, 624.75) < gpu.energy(1.0, gpu.f_max)
    with pytest.raises(ValueError, match="outside"):
        gpu.power(50.0)
    with pytest.raises(ValueError, match="outside"):
        gpu.scaled_time(1.0, 2000.0)


def test_measured_power_table_overrides_formula() -> None:
    board = Board("measured", ((100.0, 0.6), (200.0, 0.7)), p_static_w=0.0, k=0.0, p_idle_w=0.1,
                  power_table_w=(1.0, 3.0))
    assert board.power(100.0) == 1.0 and board.power(200.0) == 3.0 and board.power(150.0) == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels=()), "at least one"),
    (dict(levels=((200.0, 0.7), (100.0, 0.6))), "ascending"),
    (dict(levels=((100.0, 0.8), (200.0, 0.7))), "voltage must not fall"),
    (dict(levels=((100.0, -0.8),)), "positive"),
    (dict(p_idle_w=-1.0), "p_idle_w"),
    (dict(power_table_w=(1.0,)), "one positive power per level"),
    (dict(voltage_kind="guessed"), "voltage_kind"),
])
def test_bad_board_raises(kwargs: dict, match: str) -> None:
    params = dict(name="b", levels=((100.0, 0.6), (200.0, 0.7)), p_static_w=0.1, k=0.01, p_idle_w=0.05)
    params.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Board(**params)


def test_registry_is_read_only_and_names_unknown_boards() -> None:
    with pytest.raises(TypeError):
        BOARDS["x"] = get_board("rk3399-a72")  # type: ignore[index]
    with pytest.raises(ValueError, match="known: jetson-tx2-cpu"):
        get_board("pi5")
    assert linear_voltages((1.0, 2.0, 3.0), 0.5, 1.0) == ((1.0, 0.5), (2.0, 0.75), (3.0, 1.0))
    with pytest.raises(ValueError, match="v_min"):
        linear_voltages((1.0, 2.0), 1.0, 0.5)
    assert k_for(((100.0, 1.0),), 2.0) == pytest.approx(0.02)


def test_simulated_controller_rounds_and_counts_switches() -> None:
    ctl = SimulatedController(get_board("jetson-tx2-gpu"))
    assert ctl.current() == 1300.5
    assert ctl.set_frequency(700.0) == 726.75 and ctl.current() == 726.75
    ctl.set_frequency(720.0)  # same level: no switch
    ctl.set_frequency(1e9)
    assert ctl.current() == 1300.5 and ctl.switches == 2


def test_cpufreq_refuses_without_writable_files(tmp_path: Path) -> None:
    ctl = CpufreqController(tmp_path, board=get_board("jetson-tx2-cpu"))
    with pytest.raises(PowerControlError, match="neither scaling_setspeed"):
        ctl.set_frequency(1000.0)
    with pytest.raises(PowerControlError, match="scaling_cur_freq"):
        ctl.current()
    # a sysfs node that cannot be written even by root (a directory in its place)
    (tmp_path / "scaling_max_freq").mkdir()
    with pytest.raises(PowerControlError, match="cannot set the clock"):
        ctl.set_frequency(1000.0)


def test_cpufreq_writes_where_it_can(tmp_path: Path) -> None:
    (tmp_path / "scaling_max_freq").write_text("2035200\n")
    (tmp_path / "scaling_cur_freq").write_text("960000\n")
    (tmp_path / "scaling_available_frequencies").write_text("345600 960000 2035200\n")
    ctl = CpufreqController(tmp_path)
    assert ctl.current() == 960.0
    assert ctl.set_frequency(900.0) == 960.0  # nearest level from the sysfs list
    assert (tmp_path / "scaling_max_freq").read_text() == "960000"
    # under the userspace governor, scaling_setspeed comes first
    (tmp_path / "scaling_governor").write_text("userspace\n")
    (tmp_path / "scaling_setspeed").write_text("<unsupported>\n")
    assert ctl.set_frequency(2000.0) == 2035.2
    assert (tmp_path / "scaling_setspeed").read_text() == "2035200"
    assert (tmp_path / "scaling_max_freq").read_text() == "960000"
