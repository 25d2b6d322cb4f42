"""Sizing thread pools from the CPUs this process may use (issue 18, shared machines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from carbonsr_cli import cpus


def test_cgroup_quota_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cpus.cgroup_cpu_limit(v2, (tmp_path / "q", tmp_path / "p")) == 2
    v2.write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(v2, (tmp_path / "q", tmp_path / "p")) is None
    (tmp_path / "q").write_text("300000")
    (tmp_path / "p").write_text("100000")
    assert cpus.cgroup_cpu_limit(tmp_path / "none", (tmp_path / "q", tmp_path / "p")) == 3
    (tmp_path / "q").write_text("-1")
    assert cpus.cgroup_cpu_limit(tmp_path / "none", (tmp_path / "q", tmp_path / "p")) is None


@pytest.mark.parametrize(
    ("affinity", "quota", "omp", "respect_omp", "want"),
    [
        (16, None, None, True, 16),
        (16, 4, None, True, 4),     # container quota
        (2, 4, None, True, 2),      # taskset
        (16, None, "3", True, 3),   # OMP_NUM_THREADS
        (16, None, "3", False, 16),
        (16, 8, "junk", True, 8),
        (1, None, None, True, 1),
    ],
)
def test_available_cpus_is_the_smallest_limit(monkeypatch: pytest.MonkeyPatch, affinity: int, quota: int | None,
                                              omp: str | None, respect_omp: bool, want: int) -> None:
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: quota)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert cpus.available_cpus(respect_omp=respect_omp) == want


def test_reader_pool_and_torch_threads_follow_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from carbonsr_cli.downscale import planning as plan
    from carbonsr_cli.downscale.readers import reader_config

    monkeypatch.delenv("CARBONSR_READ_PROCS", raising=False)
    monkeypatch.delenv("CARBONSR_READ_THREADS", raising=False)
    monkeypatch.setattr(cpus, "available_cpus", lambda respect_omp=True: 2)
    assert reader_config(10**9) == (1, False)  # the host may have 64 cores: 2 are ours
    before = torch.get_num_threads()
    try:
        assert plan._size_torch_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(cpus, "available_cpus", lambda respect_omp=True: 8)
        assert plan._size_torch_threads() == 7
    finally:
        torch.set_num_threads(before)
