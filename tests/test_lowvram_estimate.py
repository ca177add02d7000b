"""The GPU-free VRAM estimate of the low-VRAM LoRA step (benchmarks/lowvram_estimate.py): the fake-tensor count
equals the same count on real CPU tensors, the weight bytes equal a hand count, and planted defects (in the tracker
or in a switch) change the number."""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks._live_bytes import STAND_IN, LiveBytes
from benchmarks.lowvram_estimate import estimate_step, main
from benchmarks._lora_step import VARIANTS, StepShape
from firered_core.memory import BlockSwap

TINY = StepShape(layers=2, heads=2, size=64, text_dim=32, text_tokens=8, rank=4)
D = TINY.heads * 128  # the blocks' width


def device_bytes(result: dict, when: str, device: str = STAND_IN) -> int:
    return result[when].get(device, 0)


@pytest.mark.parametrize("variant", ["plain", "checkpointing + offload", "all"])
def test_fake_count_equals_the_real_cpu_count(variant):
    fake = estimate_step(TINY, VARIANTS[variant], "cpu", fake=True)
    real = estimate_step(TINY, VARIANTS[variant], "cpu", fake=False)
    assert fake == real
    assert fake["peak"]["cpu"] > fake["resident"]["cpu"] > 0


def test_weight_bytes_match_a_hand_count():
    plain = estimate_step(TINY, VARIANTS["plain"])
    fp8 = estimate_step(TINY, VARIANTS["fp8 base"])
    swap = estimate_step(TINY, VARIANTS["block swap"])
    # per block: 14 Linears, all with a bias and LoRA-wrapped: img/txt_mod D->6D, 8 attention projections D->D,
    # img/txt MLPs D->4D->D: 36 D² weights over 30 D output rows; 4 RMSNorm weights of 128 (the head size)
    weights, rows, norms = 36 * D * D, 30 * D, 4 * 128
    bf16_block = 2 * (weights + rows + norms)
    # fp8: 1 byte per frozen weight instead of 2, plus one bf16 scale per output row
    assert device_bytes(plain, "resident") - device_bytes(fp8, "resident") == TINY.layers * (weights - 2 * rows)
    # block swap: every frozen block tensor lives on the host, nothing else moves there
    assert device_bytes(plain, "resident") - device_bytes(swap, "resident") == TINY.layers * bf16_block
    assert swap["resident"]["cpu"] - plain["resident"]["cpu"] == TINY.layers * bf16_block


def test_switches_lower_the_device_peak_and_use_the_host():
    r = {v: estimate_step(TINY, VARIANTS[v]) for v in ("plain", "checkpointing", "activation offload", "block swap")}
    peak = {v: device_bytes(x, "peak") for v, x in r.items()}
    assert peak["checkpointing"] < peak["plain"] and peak["activation offload"] < peak["plain"]
    assert peak["block swap"] < peak["checkpointing"]
    assert device_bytes(r["activation offload"], "peak", "cpu") > device_bytes(r["plain"], "peak", "cpu")


def test_block_swap_peak_does_not_grow_by_blocks_with_depth():
    """Two more blocks add their LoRA state and saved inputs, not their weights: at most two blocks are on the
    device at once, also in backward (which re-runs the blocks last to first: prefetching the block above, as a
    forward does, would leave every block on the device by its end)."""
    deeper = StepShape(**{**TINY.__dict__, "layers": TINY.layers + 2})
    growth = device_bytes(estimate_step(deeper, VARIANTS["block swap"]), "peak") - device_bytes(
        estimate_step(TINY, VARIANTS["block swap"]), "peak")
    assert 0 < growth < 2 * (36 * D * D + 30 * D + 4 * 128)  # one block's frozen bf16 bytes


class KeepsFreed(LiveBytes):
    def _free(self, key, _ref):  # planted: a freed storage stays counted
        pass


class CountsViews(LiveBytes):
    def add(self, t):  # planted: every tensor counted as its own storage (views, in-place results)
        key = id(t)
        if key not in self.live:
            self.live[key] = (t.device.type, t.untyped_storage().nbytes(), None)
            self.current[t.device.type] += t.untyped_storage().nbytes()
            self.peak[t.device.type] = max(self.peak[t.device.type], self.current[t.device.type])


@pytest.mark.parametrize("tracker", [KeepsFreed, CountsViews])
def test_a_tracker_defect_changes_the_estimate(monkeypatch, tracker):
    import benchmarks.lowvram_estimate as est

    right = estimate_step(TINY, VARIANTS["checkpointing"])
    monkeypatch.setattr(est, "LiveBytes", tracker)
    wrong = estimate_step(TINY, VARIANTS["checkpointing"])
    assert device_bytes(wrong, "peak") > device_bytes(right, "peak")


def test_a_block_swap_that_keeps_blocks_changes_the_estimate(monkeypatch):
    right = estimate_step(TINY, VARIANTS["block swap"])
    monkeypatch.setattr(BlockSwap, "_put_back", lambda self, i: None)  # planted: a block stays after it ran
    wrong = estimate_step(TINY, VARIANTS["block swap"])
    assert device_bytes(wrong, "peak") > device_bytes(right, "peak")


def test_an_offload_that_keeps_activations_changes_the_estimate(monkeypatch):
    right = estimate_step(TINY, VARIANTS["activation offload"])
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", lambda **kw: contextlib.nullcontext())  # planted
    wrong = estimate_step(TINY, VARIANTS["activation offload"])
    assert device_bytes(wrong, "peak") > device_bytes(right, "peak")
    assert device_bytes(wrong, "peak", "cpu") < device_bytes(right, "peak", "cpu")


def test_block_swap_keeps_a_saved_frozen_weight_on_the_device(monkeypatch):
    """Re-pointing a frozen parameter at its CPU copy after backward's recompute (``.data``, as inference does)
    would hand backward a CPU tensor: checkpointing refuses it on a GPU; the stand-in device shows it here."""
    estimate_step(TINY, VARIANTS["block swap"])
    init = BlockSwap.__init__

    def data_swap(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.frozen_only = False  # planted: the hooks re-point parameters through .data

    monkeypatch.setattr(BlockSwap, "__init__", data_swap)
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different metadata"):
        estimate_step(TINY, VARIANTS["block swap"])


def test_cli_prints_the_table(capsys):
    main(["--layers", "1", "--heads", "2", "--sizes", "64", "--text-tokens", "8", "--variants", "plain",
          "block swap", "--jobs", "1"])
    out = capsys.readouterr().out
    assert "1 blocks x 2 heads" in out and "block swap" in out and "24 GiB card" in out
