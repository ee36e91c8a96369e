"""scripts/gpu/kit.py, the one run a lent GPU machine gets: its dry run on the CPU, so the kit cannot rot between
loans, and its time-keeping."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "scripts" / "gpu" / "kit.py"


@cache
def kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", KIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_the_device_run_fits_its_lease():
    """15 minutes of device time hold a machine start and two runs: the kit's budget stays under 6 minutes, and
    what comes back stays within the device tool's 8 files."""
    a = kit().parse_args([])
    assert a.device == "cuda" and a.dtype == "bfloat16" and a.model == "mae_vit_base_patch16"
    assert a.budget <= 360 and a.workers == [1, 8, 14] and max(a.batches) == 256
    q = kit().parse_args(["--device", "cpu", "--quick"])
    assert q.dtype == "float32" and q.workers == [1, 2] and q.budget < a.budget


@pytest.mark.unit
def test_a_phase_past_its_budget_is_cut_and_recorded(tmp_path):
    m = kit()
    k = m.Kit(m.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)]))
    import signal

    signal.signal(signal.SIGALRM, m._alarm)
    t0 = time.monotonic()
    k.phase("slow", 1.0, lambda rec: time.sleep(30), need=0.5)
    k.phase("fine", 5.0, lambda rec: k.check(rec, "a check that fails", False), need=0.5)
    k.phase("after", 0, lambda rec: None)
    assert time.monotonic() - t0 < 10
    r = json.loads((tmp_path / "results.json").read_text())
    assert [r["phases"][p]["status"] for p in ("slow", "fine", "after")] == ["timeout", "failed", "skipped"]
    assert r["failed_checks"] == ["fine: a check that fails"] and r["broken_phases"] == ["slow: timeout"]


@pytest.mark.integration
def test_dry_run_on_the_cpu(tmp_path):
    """The whole kit with --device cpu --quick: the bundled model stands in for the ViT-B, MAE_WORKERS 1 and 2."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(KIT), "--device", "cpu", "--quick", "--out", str(out), "--install", "never"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    ph = res["phases"]
    assert [p for p in ph if ph[p]["status"] == "ok"] == ["env", "smoke", "ceiling", "http", "jpeg_decode"]
    assert ph["compile_default"]["status"] == ph["compile_reduce_overhead"]["status"] == "skipped"
    assert res["failed_checks"] == [] and res["broken_phases"] == []
    assert all(c["ok"] for p in ph.values() for c in p.get("checks", []))

    names = {c["name"] for c in ph["smoke"]["checks"]}
    assert {"float32: /v1/models names cpu/float32", "bfloat16: /v1/models names cpu/bfloat16"} <= names
    assert "bfloat16: reconstruct JSON keys exact" in names
    served = ph["smoke"]["served"]
    assert served["float32"]["cos_cls"]["min"] >= 0.9999 and served["bfloat16"]["cos_mean"]["min"] >= 0.999
    assert set(ph["smoke"]["precision_in_process"]) == {"bf16", "bf16_fp32_norm"}

    rows = ph["ceiling"]["rows"]
    assert len(rows) == 12 and all(x["images_per_s"] > 0 for x in rows)
    for w in ("1", "2"):
        run = ph["http"]["runs"][w]
        assert run["images_per_s"] > 0 and run["answers"] > 0 and run["errors"] == 0
        assert run["mean_batch"] >= 1 and run["server_cpu_ms_per_image"] > 0
    d = ph["http"]["drain"]
    assert d["in_flight_at_sigterm"] > 0 and d["lost"] == 0 and d["exit_code"] == 0

    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.json", "servers.log"]  # the device tool brings back at most 8
    log = (out / "servers.log").read_text()
    assert all(f"===== {label} " in log for label in ("smoke-cpu-bf16", "http-w1", "http-w2"))
    md = kit().report(res)
    assert "| MAE_WORKERS=2 | 4 |" in md and "| bfloat16 | reconstruct |" in md and "All checks passed." in md
