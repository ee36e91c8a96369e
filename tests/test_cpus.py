"""app.cpus: the CPUs a process may use (affinity, cgroup quota) and the torch threads it gives the model."""

from __future__ import annotations

import pytest

from app import cpus

pytestmark = pytest.mark.unit


def test_cgroup_v2_and_v1_quotas(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_quota(v1) is None
    assert cpus.cgroup_quota(tmp_path / "nowhere") is None


def test_threads_leave_room_for_decoding():
    assert [cpus.torch_threads_for(n, on_gpu=False) for n in (0.5, 1, 2, 3, 4, 8, 16)] == [1, 1, 2, 3, 3, 6, 12]
    assert cpus.torch_threads_for(1.5, on_gpu=False) == 1  # a quota of 1.5 CPUs: one thread
    assert cpus.torch_threads_for(16, on_gpu=True) == 1


def test_configure_applies_the_setting_or_the_policy(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpus, "available_cpus", lambda: (4.0, 8, 4.0))
        assert cpus.configure_torch_threads(0, on_gpu=False) == 3 == torch.get_num_threads()
        assert cpus.configure_torch_threads(2, on_gpu=False) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
