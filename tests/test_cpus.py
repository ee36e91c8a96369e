"""app.serving.cpus: the CPUs a process may use (affinity, cgroup quota) and the torch threads it gives the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from app.serving import cpus


@pytest.mark.unit
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


@pytest.mark.unit
def test_threads_leave_room_for_decoding():
    assert [cpus.torch_threads_for(n, on_gpu=False) for n in (0.5, 1, 2, 3, 4, 8, 16)] == [1, 1, 2, 3, 3, 6, 12]
    assert cpus.torch_threads_for(1.5, on_gpu=False) == 1  # a quota of 1.5 CPUs: one thread
    assert cpus.torch_threads_for(16, on_gpu=True) == 1


@pytest.mark.unit
def test_configure_applies_the_setting_or_the_policy(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpus, "available_cpus", lambda: (4.0, 8, 4.0))
        assert cpus.configure_torch_threads(0, on_gpu=False) == 3 == torch.get_num_threads()
        assert cpus.configure_torch_threads(2, on_gpu=False) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True
    )


OMP = "from app.serving.cpus import prepare_runtime; prepare_runtime(); import torch; torch.ones(9**7)"


@pytest.mark.integration  # spawns processes
def test_openmp_threads_sleep_when_idle_unless_the_user_says_otherwise():
    # libgomp prints how long its idle threads spin (OMP_DISPLAY_ENV): 0 only if the policy was set before torch
    # loaded it; its default, unset, is 300,000 spins, and ACTIVE far more.
    assert "GOMP_SPINCOUNT = '0'" in _child(OMP, OMP_DISPLAY_ENV="VERBOSE").stderr
    active = _child(OMP, OMP_DISPLAY_ENV="VERBOSE", OMP_WAIT_POLICY="ACTIVE").stderr
    assert "GOMP_SPINCOUNT = '" in active and "GOMP_SPINCOUNT = '0'" not in active
    unset = _child(OMP.replace("prepare_runtime();", ""), OMP_DISPLAY_ENV="VERBOSE").stderr
    assert "GOMP_SPINCOUNT = '" in unset and "GOMP_SPINCOUNT = '0'" not in unset  # what the test would see before


FAULTS = """
import resource, numpy as np
from app.serving import cpus
if {tuned}:
    assert cpus.keep_freed_memory()
def batch():  # what a forward pass does: a few batch-sized tensors alive at once, then all freed
    a = [np.ones(2**20) for _ in range(4)]  # 8 MiB each
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.integration  # spawns processes
def test_freed_batch_sized_blocks_are_reused_not_faulted_in_again():
    untuned = int(_child(FAULTS.format(tuned=False)).stdout)
    tuned = int(_child(FAULTS.format(tuned=True)).stdout)
    assert untuned > 20 * 2000  # glibc's default gives most of it back each time: ~2048 page faults per 8 MiB
    assert tuned < untuned / 10, (tuned, untuned)


@pytest.mark.integration  # spawns processes
def test_spin_keeps_libgomp_spinning_and_the_users_policy_wins():
    spin = _child(OMP.replace("prepare_runtime()", "prepare_runtime('spin')"), OMP_DISPLAY_ENV="VERBOSE").stderr
    assert f"GOMP_SPINCOUNT = '{cpus.SPIN_COUNT}'" in spin
    # auto never overrides what the user set, and says so
    code = "from app.serving import cpus; print(cpus.prepare_runtime('auto'))"
    line = _child(code, OMP_WAIT_POLICY="ACTIVE").stdout
    assert "OMP_WAIT_POLICY=ACTIVE (set in the environment)" in line, line


@pytest.mark.integration  # spawns processes
def test_auto_times_both_policies_here_and_caches_the_choice(tmp_path):
    choice, why = cpus.calibrate_wait(cache_dir=tmp_path)
    assert choice in ("passive", "spin")
    if cpus.torch_threads_for(cpus.available_cpus()[0], on_gpu=False) > 1:
        assert "passive" in why and "spin" in why and " ms" in why, why  # the figures behind the choice
        (cached,) = tmp_path.glob("omp-*.json")
        assert json.loads(cached.read_text())["choice"] == choice
        cached.write_text(json.dumps({"choice": "spin" if choice == "passive" else "passive", "why": "planted"}))
        again, why = cpus.calibrate_wait(cache_dir=tmp_path)
        assert again != choice and why == "planted (cached)"  # read back, not timed again


@pytest.mark.unit
def test_cpu_features_are_read_and_reported(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_bf16 sse\n")
    assert cpus.cpu_features(info) == {"cpu": "Test CPU 9000", "features": ["avx2", "avx512f", "amx_bf16"]}
    monkeypatch.setenv(cpus.RUNTIME_ENV, json.dumps({"omp": "OMP_WAIT_POLICY=PASSIVE", "chosen_by": "x"}))
    assert cpus.runtime_report()["omp"] == "OMP_WAIT_POLICY=PASSIVE"


@pytest.mark.integration  # spawns processes
def test_a_worker_reports_the_choice_its_model_process_made():
    """An HTTP worker inherits the model process's environment, policy and choice alike: its /v1/models must show
    the choice and the figures behind it, not "set in the environment" (what it said before)."""
    parent = {"omp": f"GOMP_SPINCOUNT={cpus.SPIN_COUNT}", "chosen_by": "timed here: 2 threads, passive 9 ms, spin 5 ms"}
    code = "import json; from app.serving import cpus; print(cpus.prepare_runtime('auto'))\n"
    code += "print(json.dumps(cpus.runtime_report()))"
    env = {cpus.RUNTIME_ENV: json.dumps(parent), "GOMP_SPINCOUNT": cpus.SPIN_COUNT}
    line, report = _child(code, **env).stdout.strip().splitlines()
    assert f"GOMP_SPINCOUNT={cpus.SPIN_COUNT} (timed here" in line, line
    assert json.loads(report)["chosen_by"] == parent["chosen_by"]
