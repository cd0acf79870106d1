"""bench/prefill_timeline.py on any machine: it reads the stamps bench/prefill_variants.cu
--timeline writes (9 per work item, TimelineSlot in cuda/attention_prefill.cu) and splits each
CTA's time into its parts; here on stamps made up with known parts."""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "prefill_timeline.py")


def _module():
    spec = importlib.util.spec_from_file_location("prefill_timeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _made_up_stamps(path, ctas=3, items_per_cta=4, ghz=1.5):
    """Items back to back on each CTA: 3000 cycles waiting for inputs, 1500 on the first tile,
    600 a further tile, 900 on the epilogue; item i of a CTA has 2 + i tiles. A CTA's later
    items are drawn 1500 cycles before the item before ends, and their K(0) issued 600 after."""
    rows = []
    for cta in range(ctas):
        clock = 10_000 * cta
        for i in range(items_per_cta):
            tiles = 2 + i
            drawn = clock if i == 0 else clock - 1500
            ready = clock + 3000
            first = ready + 1500
            last = first + 600 * (tiles - 1)
            done = last + 900
            where = (7 + cta) | (tiles << 32) | (cta << 48)
            rows.append([drawn, drawn + 600, ready, first, last, done, where,
                         round(drawn / ghz), round(done / ghz)])
            clock = done
    stamps = np.zeros((64, 9), dtype=np.uint64)  # items never drawn stay zero
    stamps[:len(rows)] = np.array(rows, dtype=np.uint64)
    stamps.tofile(path)


def test_parts_of_made_up_items(tmp_path):
    timeline = _module()
    path = str(tmp_path / "stamps.bin")
    _made_up_stamps(path)
    summary = timeline.summarise(timeline.load(path))
    assert summary["items"] == 12 and summary["ctas"] == 3 and summary["sms"] == 3
    assert summary["clock_GHz"] == pytest.approx(1.5, rel=1e-3)
    parts = summary["parts"]
    assert parts["waiting for Q and K(0)"][0] == pytest.approx(2.0, rel=1e-3)  # 3000 cycles
    assert parts["first tile (S(0) and its softmax)"][0] == pytest.approx(1.0, rel=1e-3)
    assert parts["last P V and epilogue"][0] == pytest.approx(0.6, rel=1e-3)
    assert summary["per_tile_us"] == pytest.approx(0.4, rel=1e-3)
    assert sum(share for _, share in parts.values()) == pytest.approx(1.0)
    assert summary["items_per_cta"] == (4, 4)
    assert summary["producer_k0_after_draw_us"] == pytest.approx(0.4, rel=1e-3)
    assert summary["next_drawn_lead_us"] == pytest.approx(1.0, rel=1e-3)
    assert summary["next_k0_lead_us"] == pytest.approx(0.6, rel=1e-3)


def test_command_line_prints_the_parts_and_refuses_an_empty_dump(tmp_path):
    path = str(tmp_path / "stamps.bin")
    _made_up_stamps(path)
    run = subprocess.run([sys.executable, SCRIPT, path, "--label", "made-up"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("made-up: 12 items on 3 CTAs")
    assert re.search(r"waiting for Q and K\(0\)\s+2\.000 us", run.stdout)
    assert "next item: drawn 1.000 us and its K(0) issued 0.600 us before" in run.stdout

    empty = str(tmp_path / "empty.bin")
    np.zeros((8, 9), dtype=np.uint64).tofile(empty)
    run = subprocess.run([sys.executable, SCRIPT, empty], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0
    assert "OCTAVO_PREFILL_TIMELINE" in run.stderr
