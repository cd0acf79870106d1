"""Where the Hopper prefill kernel's time goes, from the clock stamps that
`bench/prefill_variants.cu --timeline FILE` writes (a build with -DOCTAVO_PREFILL_TIMELINE; the
slots are TimelineSlot in cuda/attention_prefill.cu).

    python bench/prefill_timeline.py FILE [--label NAME]

Prints, over the launch's work items: the mean time per part of an item (waiting for its Q and
K(0) after the CTA finished the item before, the first tile, the steps and the time per key tile,
the last P V and the epilogue) and each part's share of all SM time, and how evenly the items
spread over the SMs. SM clocks (clock64) are per SM; they are converted to microseconds with the
clock rate measured from the globaltimer stamps of the longest items."""
from __future__ import annotations

import argparse
import sys

import numpy as np

SLOTS = 9
DRAWN, KEYS_ISSUED, INPUTS_READY, FIRST_TILE, LAST_STEP, DONE, WHERE, DRAWN_NS, DONE_NS = range(SLOTS)


def load(path: str) -> np.ndarray:
    stamps = np.fromfile(path, dtype=np.uint64).reshape(-1, SLOTS).astype(np.int64)
    return stamps[stamps[:, WHERE] != 0]  # items the launch never drew (past a chunk) stay zero


def summarise(stamps: np.ndarray) -> dict:
    """The figures print_summary shows, as a dict (microseconds unless stated)."""
    if len(stamps) == 0:
        raise ValueError("no work item has stamps: was the harness built with "
                         "-DOCTAVO_PREFILL_TIMELINE and run with --timeline?")
    sm = stamps[:, WHERE] & 0xFFFFFFFF
    tiles = (stamps[:, WHERE] >> 32) & 0xFFFF
    cta = stamps[:, WHERE] >> 48
    clocks = (stamps[:, DONE] - stamps[:, DRAWN]).astype(float)
    nanoseconds = (stamps[:, DONE_NS] - stamps[:, DRAWN_NS]).astype(float)
    long_items = nanoseconds >= np.percentile(nanoseconds, 80)
    ghz = float(np.median(clocks[long_items] / np.maximum(nanoseconds[long_items], 1.0)))

    def us(cycles):
        return np.asarray(cycles, dtype=float) / ghz / 1e3

    # An item's wait for its inputs counts from when its CTA finished the item before (or from
    # the draw, for a CTA's first item): what persistence is meant to hide.
    # And how early the producer drew a CTA's next item and issued its K(0), counted back from
    # the end of the item before (negative: after it), which says whether the wait is the
    # producer's.
    wait = np.empty(len(stamps), dtype=np.int64)
    drawn_lead, k0_lead = [], []
    cta_spans = []
    for c in np.unique(cta):
        rows = np.where(cta == c)[0]
        rows = rows[np.argsort(stamps[rows, DONE])]
        previous_done = np.concatenate([[stamps[rows[0], DRAWN]], stamps[rows[:-1], DONE]])
        wait[rows] = stamps[rows, INPUTS_READY] - previous_done
        drawn_lead.extend(previous_done[1:] - stamps[rows[1:], DRAWN])
        k0_lead.extend(previous_done[1:] - stamps[rows[1:], KEYS_ISSUED])
        cta_spans.append((stamps[rows, DONE].max() - stamps[rows[0], DRAWN], len(rows)))
    parts = {
        "waiting for Q and K(0)": wait,
        "first tile (S(0) and its softmax)": stamps[:, FIRST_TILE] - stamps[:, INPUTS_READY],
        "steps": stamps[:, LAST_STEP] - stamps[:, FIRST_TILE],
        "last P V and epilogue": stamps[:, DONE] - stamps[:, LAST_STEP],
    }
    total = sum(float(v.sum()) for v in parts.values())
    multi = tiles > 1
    per_tile = ((stamps[multi, LAST_STEP] - stamps[multi, FIRST_TILE]) / (tiles[multi] - 1)
                if multi.any() else np.array([0.0]))
    spans = np.array([span for span, _ in cta_spans], dtype=float)
    counts = np.array([count for _, count in cta_spans])
    return {
        "items": int(len(stamps)), "ctas": int(len(cta_spans)), "sms": int(len(np.unique(sm))),
        "clock_GHz": ghz, "tiles_mean": float(tiles.mean()),
        "parts": {name: (float(us(v.mean())), float(v.sum()) / total) for name, v in parts.items()},
        "per_tile_us": float(us(np.median(per_tile))),
        "cta_span_us": (float(us(spans.min())), float(us(spans.max()))),
        "items_per_cta": (int(counts.min()), int(counts.max())),
        "producer_k0_after_draw_us": float(us((stamps[:, KEYS_ISSUED] - stamps[:, DRAWN]).mean())),
        "next_drawn_lead_us": float(us(np.mean(drawn_lead))) if drawn_lead else None,
        "next_k0_lead_us": float(us(np.mean(k0_lead))) if k0_lead else None,
    }


def print_summary(summary: dict, label: str) -> None:
    print(f"{label}: {summary['items']} items on {summary['ctas']} CTAs ({summary['sms']} SMs), "
          f"{summary['tiles_mean']:.2f} key tiles an item, SM clock {summary['clock_GHz']:.3f} GHz")
    for name, (mean_us, share) in summary["parts"].items():
        print(f"  {name:36s} {mean_us:8.3f} us an item  {share:6.1%} of SM time")
    print(f"  median time per key tile after the first: {summary['per_tile_us']:.3f} us")
    print(f"  producer issued K(0) {summary['producer_k0_after_draw_us']:.3f} us after drawing "
          f"the item")
    if summary["next_drawn_lead_us"] is not None:
        print(f"  a CTA's next item: drawn {summary['next_drawn_lead_us']:.3f} us and its K(0) "
              f"issued {summary['next_k0_lead_us']:.3f} us before the item before ended "
              f"(negative: after)")
    low, high = summary["cta_span_us"]
    print(f"  CTA busy span {low:.1f} - {high:.1f} us; items per CTA "
          f"{summary['items_per_cta'][0]} - {summary['items_per_cta'][1]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--label", default="prefill")
    args = parser.parse_args(argv)
    try:
        summary = summarise(load(args.path))
    except ValueError as error:
        sys.exit(f"prefill_timeline: {error}")
    print_summary(summary, args.label)


if __name__ == "__main__":
    main()
