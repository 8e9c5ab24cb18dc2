"""The pipelined capture (core.capture.CopyPipeline) driven on the CPU.

DeferredStreams stands in for CUDA: a copy is only recorded when launched and runs when its event is
synchronized or when the compute stream is made to wait for it, so a pipeline that read a host slot before
its copy's event, or wrote a device buffer a pending copy still reads, gives different numbers. The oracle is
a plain synchronous capture over the same batches (run_batches + ActivationCapture + clone), bit for bit,
and for files the default CPU path (depth 1, no copy), byte for byte.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import shutil
import threading
import types

import pytest
import torch

import inference.capture_raw_activations as cra
import utils.storage as storage
from core import capture as core_capture
from core.capture import (CaptureOOMError, CopyPipeline, DeviceRing, HostRing, RingReuseError, SyncStreams,
                          capture_sequences, pad_batch, run_batches)
from core.hooks import ActivationCapture, run_forward
from inference.capture_raw_activations import capture_raw_activations
from tests.helpers import write_responses
from utils import paths
from utils.model import load_model
from utils.storage import BackgroundWriter, load_pt

PAIRS = [(f"prompt number {i} about {'code ' * (i % 4)}", "an answer " * (i % 5)) for i in range(9)]


class DeferredEvent:
    def __init__(self, streams: "DeferredStreams", dst: torch.Tensor, src: torch.Tensor):
        self.streams, self.dst, self.src, self.done = streams, dst, src, False

    def _run(self) -> None:
        if not self.done:
            self.dst.copy_(self.src)
            self.done = True

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.streams.log.append(("sync", self.n))
        self._run()


class DeferredStreams:
    """Copies happen late: at synchronize() or at a compute-stream wait, never at launch."""
    copies = True
    pin_memory = False

    def __init__(self):
        self.log: list[tuple[str, int]] = []
        self.events: list[DeferredEvent] = []

    def copy(self, dst, src):
        ev = DeferredEvent(self, dst, src)
        ev.n = len(self.events)
        self.events.append(ev)
        self.log.append(("copy", ev.n))
        return ev

    def wait(self, event, device):
        self.log.append(("wait", event.n))
        event._run()


@pytest.fixture(scope="module")
def llama(zoo):
    return load_model(zoo("llama")).model


def seqs_for(n: int = 9, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def reference(model, seqs, layers, comps, budget, batch_size=None):
    """The synchronous capture: same batches, clone each hooked tensor's real tokens right in the hook."""
    out = {}

    def fwd(idx):
        batch = pad_batch([seqs[i] for i in idx], 0)
        got = {}

        def keep(layer, comp, t):
            got[(layer, comp)] = t.reshape(-1, t.shape[-1]).index_select(0, batch.real).clone()

        with ActivationCapture(model, layers, comps, stop_after_last=True, on_capture=keep):
            run_forward(model, input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        return got

    for idx, got in run_batches([len(s) for s in seqs], fwd, budget, batch_size):
        offset = 0
        for i in idx:
            n = len(seqs[i])
            out[i] = {L: {c: got[(L, c)][offset:offset + n] for c in comps} for L in layers}
            offset += n
    return out


def assert_bit_equal(got, want):
    assert sorted(got) == sorted(want)
    for i in want:
        for L in want[i]:
            for c in want[i][L]:
                assert torch.equal(got[i][L][c], want[i][L][c]), (i, L, c)
                t = got[i][L][c]
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # owns its storage


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("kind", ["deferred", "sync-copy", "cpu-default"])
def test_pipelined_equals_the_synchronous_capture_bit_for_bit(llama, depth, kind):
    seqs, layers, comps = seqs_for(), [0, 2, 3], ["residual", "attn_contribution", "mlp_contribution"]
    streams = {"deferred": DeferredStreams(), "sync-copy": SyncStreams(copies=True), "cpu-default": None}[kind]
    want = reference(llama, seqs, layers, comps, budget=30)
    got = dict(capture_sequences(llama, seqs, layers, comps, pad_id=0, max_batch_tokens=30, depth=depth,
                                 streams=streams))
    assert_bit_equal(got, want)
    if kind == "deferred":  # every copy waited for, none run at launch
        assert all(ev.done for ev in streams.events) and len(streams.events) >= 4


def test_a_reused_device_buffer_waits_for_the_copy_that_read_it(llama):
    streams = DeferredStreams()
    seqs = [s[:5] + [7] * (5 - len(s)) for s in seqs_for()]  # one length: no buffer outgrows its slot
    got = dict(capture_sequences(llama, seqs, [1], ["residual"], pad_id=0, batch_size=2, depth=3, streams=streams))
    assert_bit_equal(got, reference(llama, seqs, [1], ["residual"], budget=4096, batch_size=2))
    # two device buffers in turn: batch k's buffer is written again by batch k + 2, after a wait on copy k
    waits = [n for what, n in streams.log if what == "wait"]
    assert waits == list(range(len(streams.events) - 2))
    # a batch is cut from its host slot only after its own copy's event
    syncs = [n for what, n in streams.log if what == "sync"]
    assert syncs == list(range(len(streams.events)))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_lag_ring_order_and_pull_driven_backpressure(llama, monkeypatch, depth):
    forwards: list[int] = []
    real = core_capture.run_forward

    def counted(model, **inputs):
        forwards.append(inputs["input_ids"].shape[0])
        return real(model, **inputs)

    monkeypatch.setattr(core_capture, "run_forward", counted)
    seqs = seqs_for(7)
    streams = DeferredStreams()
    seen_at: list[int] = []  # forwards launched when each sequence came out
    gen = capture_sequences(llama, seqs, [0], ["residual"], pad_id=0, batch_size=1, depth=depth, streams=streams)
    next(gen)
    assert len(forwards) == depth  # the first batch comes out once depth - 1 more forwards are launched
    for _ in gen:
        seen_at.append(len(forwards))
    assert seen_at == [min(k + depth, 7) for k in range(1, 7)]
    # batch k's copy is synchronized before batch k + depth takes its slot: slots go round in order
    assert all(ev.done for ev in streams.events)


def test_host_ring_hands_out_in_turn_and_never_a_held_slot():
    ring = HostRing(3, pin_memory=False)
    slots = [ring.take(10, torch.float32) for _ in range(3)]
    assert [k for k, _ in slots] == [0, 1, 2]
    with pytest.raises(RingReuseError, match="slot 0 of 3"):
        ring.take(10, torch.float32)
    ptr = slots[0][1].data_ptr()
    ring.release(0)
    k, buf = ring.take(6, torch.float32)  # fits: the same memory again
    assert k == 0 and buf.data_ptr() == ptr and buf.numel() == 6
    ring.release(1)
    k, buf = ring.take(100, torch.float32)  # larger: a new buffer
    assert k == 1 and buf.numel() == 100 and ring.taken == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="depth"):
        HostRing(0, pin_memory=False)


def test_device_ring_reuses_while_it_fits_and_clear_drops_it():
    streams = DeferredStreams()
    ring = DeviceRing(2, streams)
    k0, a = ring.take((2, 3, 4), torch.float32, torch.device("cpu"))
    ev = streams.copy(torch.empty(24), a.reshape(-1))
    ring.read_by(k0, ev)
    k1, b = ring.take((2, 3, 4), torch.float32, torch.device("cpu"))
    k2, c = ring.take((1, 3, 4), torch.float32, torch.device("cpu"))
    assert (k0, k1, k2) == (0, 1, 0) and c.data_ptr() == a.data_ptr()
    assert streams.log[-1] == ("wait", 0) and ev.done  # waited before the buffer was written again
    ring.clear()
    _, d = ring.take((1, 3, 4), torch.float32, torch.device("cpu"))
    assert d.data_ptr() != a.data_ptr() or d.numel() == 12  # a fresh allocation (the address may repeat)


def test_pipeline_gives_back_the_slot_of_a_failed_batch():
    pipe = CopyPipeline(SyncStreams(), depth=1)  # no copy: the forward writes into the host slot itself
    pipe.buffer((1, 2, 3), torch.float32, torch.device("cpu"))
    pipe.abort(oom=True)
    pipe.buffer((1, 2, 3), torch.float32, torch.device("cpu"))  # would raise RingReuseError without abort
    deferred = CopyPipeline(DeferredStreams(), depth=2)
    deferred.buffer((1, 2, 3), torch.float32, torch.device("cpu"))
    deferred.abort(oom=True)
    assert deferred.device.bufs == [None, None]


def test_out_of_memory_halving_in_the_pipeline_loses_no_sequence(llama, monkeypatch):
    real = core_capture.run_forward
    sizes: list[int] = []

    def small_memory(model, **inputs):
        sizes.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, **inputs)

    seqs = seqs_for(9, seed=3)
    monkeypatch.setattr(core_capture, "run_forward", small_memory)
    streams = DeferredStreams()
    got = dict(capture_sequences(llama, seqs, [0, 3], ["residual"], pad_id=0, batch_size=4, max_batch_tokens=1000,
                                 depth=3, streams=streams))
    assert sizes[:3] == [4, 2, 2]
    sync = dict(capture_sequences(llama, seqs, [0, 3], ["residual"], pad_id=0, batch_size=4, max_batch_tokens=1000))
    assert_bit_equal(got, sync)  # same batches (same halving), the pipelined copy changes no bit
    monkeypatch.setattr(core_capture, "run_forward", real)
    want = reference(llama, seqs, [0, 3], ["residual"], budget=1000, batch_size=2)
    for i in want:  # an independent oracle: the synchronous capture in batches of two
        assert torch.allclose(got[i][3]["residual"], want[i][3]["residual"], atol=1e-5)


def test_batches_done_before_an_error_are_still_yielded(llama, monkeypatch):
    seqs = seqs_for(6, seed=5)
    last = min(range(6), key=lambda i: (len(seqs[i]), -i))  # the shortest goes last
    real = core_capture.run_forward

    def oom_on_last(model, **inputs):
        if inputs["input_ids"].shape[1] == len(seqs[last]) and inputs["input_ids"][0].tolist() == seqs[last]:
            raise RuntimeError("CUDA error: out of memory")
        return real(model, **inputs)

    monkeypatch.setattr(core_capture, "run_forward", oom_on_last)
    out = []
    with pytest.raises(CaptureOOMError) as info:
        for i, _ in capture_sequences(llama, seqs, [0], ["residual"], pad_id=0, batch_size=1, depth=3,
                                      streams=DeferredStreams()):
            out.append(i)
    assert info.value.index == last and sorted(out) == sorted(set(range(6)) - {last})


class _FixedNow(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 1, 2, 3, 4, 5)


def _digests(exp, variant, prompt_set):
    d = paths.raw_dir(exp, variant, prompt_set)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.pt"))}


def test_pipelined_stage_writes_the_same_bytes(zoo, experiments, monkeypatch):
    model_dir = zoo("qwen2")
    experiments("e", {"base": {"model": model_dir}})
    recs = write_responses("e", "base", "s", model_dir, pairs=PAIRS)
    loaded = load_model(model_dir)
    monkeypatch.setattr(cra, "_dt", types.SimpleNamespace(datetime=_FixedNow))
    kw = dict(loaded=loaded, max_batch_tokens=64, progress=False)
    capture_raw_activations("e", "s", **kw)  # the synchronous CPU path (depth 1, no copy)
    sync = _digests("e", "base", "s")
    shutil.rmtree(paths.raw_dir("e", "base", "s"))
    monkeypatch.setattr(cra, "capture_sequences",
                        functools.partial(capture_sequences, depth=3, streams=DeferredStreams()))
    summary = capture_raw_activations("e", "s", **kw)
    assert summary["captured"] == len(recs) and len(sync) == len(recs)
    assert _digests("e", "base", "s") == sync


def test_a_failed_write_names_the_prompt_and_leaves_no_partial_file(zoo, experiments, monkeypatch):
    model_dir = zoo("llama")
    experiments("e", {"base": {"model": model_dir}})
    recs = write_responses("e", "base", "s", model_dir, pairs=PAIRS)
    real = storage.write_pt

    def failing(path, obj):
        if path.name == "4.pt":
            with storage.atomic_write(path) as tmp:
                tmp.write_bytes(b"half a file")
                raise OSError("disk full")
        return real(path, obj)

    monkeypatch.setattr(storage, "write_pt", failing)
    monkeypatch.setattr(cra, "capture_sequences",
                        functools.partial(capture_sequences, depth=2, streams=DeferredStreams()))
    with pytest.raises(OSError, match="disk full") as info:
        capture_raw_activations("e", "s", max_batch_tokens=40, progress=False)
    assert any("4.pt" in note for note in getattr(info.value, "__notes__", []))
    raw = paths.raw_dir("e", "base", "s")
    assert not (raw / "4.pt").exists() and not list(raw.glob(".*.tmp"))
    for f in raw.glob("*.pt"):  # whatever was written is complete
        load_pt(f)
    monkeypatch.setattr(storage, "write_pt", real)
    summary = capture_raw_activations("e", "s", max_batch_tokens=40, progress=False, skip_existing=True)
    assert "4.pt" in {p.rsplit("/", 1)[-1] for p in summary["files"]}
    assert len(list(raw.glob("*.pt"))) == len(recs)


def test_a_blocked_writer_stops_the_forwards(llama, monkeypatch, tmp_path):
    """Backpressure end to end: while the writer thread is stuck, the capture runs at most depth batches ahead."""
    forwards: list[int] = []
    real_forward, real_write = core_capture.run_forward, storage.write_pt
    release, stuck = threading.Event(), threading.Event()

    def counted(model, **inputs):
        forwards.append(1)
        return real_forward(model, **inputs)

    def blocking(path, obj):
        stuck.set()
        assert release.wait(60)
        return real_write(path, obj)

    monkeypatch.setattr(core_capture, "run_forward", counted)
    monkeypatch.setattr(storage, "write_pt", blocking)
    seqs = seqs_for(8)
    submitted: list[int] = []
    errors: list[BaseException] = []

    def loop():
        try:
            with BackgroundWriter(max_pending_bytes=1) as writer:  # one record in the queue at a time
                for i, acts in capture_sequences(llama, seqs, [0], ["residual"], pad_id=0, batch_size=1, depth=2,
                                                 streams=DeferredStreams()):
                    writer.submit(tmp_path / f"{i}.pt", acts)
                    submitted.append(i)
        except BaseException as e:  # surfaced to the test thread below
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    assert stuck.wait(60)
    t.join(0.5)  # give a runaway loop the chance to show itself
    assert len(submitted) == 1 and len(forwards) == 3  # record 0 written (stuck), 1 waiting, batch 2 launched
    release.set()
    t.join(60)
    assert not errors and len(submitted) == 8 and len(list(tmp_path.glob("*.pt"))) == 8

