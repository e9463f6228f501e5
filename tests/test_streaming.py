"""The causal HiFi-TSE (``model.causal``) and its streaming extractor: streaming in chunks of any
size gives the one-pass output, the state stays the same size however long the stream, the
output never depends on the future, the level stays scale-equivariant, and the command lines
(inference.py --stream, evaluate.py's streamed estimates) run the true stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from config import load_config, model_kwargs
from dsp.audio import SAMPLE_RATE
from evaluation.runner import RunSettings, extract_all
from evaluation.sources import Sample
from extraction.extractor import Extractor
from extraction.streaming import StreamingExtractor
from inference import main
from models.registry import build_model, checkpoint_payload, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
LOOKBACK = 7  # frames: shorter than the test signals, so the attention's cache fills up
CAUSAL = ["model.causal=true", f"model.attn_lookback={LOOKBACK}"]
STREAM_REL_ERR = 1e-5  # the bound: float32 rounding of the same arithmetic


def causal_args(*overrides: str) -> dict:
    return model_kwargs(load_config(REPO / "configs" / "tiny.yaml", [*CAUSAL, *overrides]))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(causal_args()).eval()


def signals(seconds: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture with a level change half way (so the running level matters) and a reference."""
    gen = torch.Generator().manual_seed(seed)
    n = round(seconds * SAMPLE_RATE) + 123  # not a whole number of hops
    mix = 0.1 * torch.randn(1, n, generator=gen)
    mix[:, n // 2 :] *= 5.0
    return mix, 0.1 * torch.randn(1, SAMPLE_RATE, generator=gen)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def streamed(stream: StreamingExtractor, mix: np.ndarray, chunk: int) -> np.ndarray:
    parts = [stream.push(mix[i : i + chunk]) for i in range(0, mix.shape[0], chunk)]
    return np.concatenate([*parts, stream.flush()])


@pytest.mark.parametrize("hops", [1, 3, 7])
def test_streaming_in_hops_equals_one_pass(model: torch.nn.Module, hops: int) -> None:
    mix, ref = signals(1.0)
    with torch.no_grad():
        z_ref = model.encode_reference(ref)
        offline = model(mix, ref)[0].numpy()
    out = streamed(StreamingExtractor(model, z_ref), mix[0].numpy(), hops * model.stft.hop_length)
    assert out.shape == offline.shape
    assert rel_err(out, offline) < STREAM_REL_ERR


def test_streaming_in_odd_chunks_and_again_after_flush(model: torch.nn.Module) -> None:
    """Chunks that are not whole hops are buffered; a flushed extractor starts a new stream."""
    mix, ref = signals(0.5, seed=1)
    with torch.no_grad():
        z_ref = model.encode_reference(ref)
        offline = model(mix, ref)[0].numpy()
    stream = StreamingExtractor(model, z_ref)
    first = streamed(stream, mix[0].numpy(), 1001)
    second = streamed(stream, mix[0].numpy(), 37)
    assert rel_err(first, offline) < STREAM_REL_ERR
    assert rel_err(second, offline) < STREAM_REL_ERR


def test_state_size_is_flat_in_stream_length(model: torch.nn.Module) -> None:
    _, ref = signals(0.1)
    with torch.no_grad():
        stream = StreamingExtractor(model, model.encode_reference(ref))
    hop = model.stft.hop_length
    rng = np.random.default_rng(0)
    sizes = []
    for n_hops in (20, 60, 200):  # all past the attention's look-back
        stream.reset()
        for _ in range(n_hops):
            stream.push(0.1 * rng.standard_normal(hop).astype(np.float32))
        sizes.append(stream.state_size())
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_output_does_not_depend_on_the_future(model: torch.nn.Module) -> None:
    mix, ref = signals(0.5)
    changed = mix.clone()
    cut = mix.shape[1] // 2
    changed[:, cut:] = 0.3 * torch.randn(1, mix.shape[1] - cut)
    with torch.no_grad():
        a, b = model(mix, ref)[0], model(changed, ref)[0]
    # A sample's output depends on input up to one analysis window after it.
    latency = model.stft.win_length
    assert torch.equal(a[: cut - latency], b[: cut - latency])
    assert not torch.equal(a[cut:], b[cut:])


def test_causal_model_is_scale_equivariant(model: torch.nn.Module) -> None:
    mix, ref = signals(0.5)
    with torch.no_grad():
        out, scaled = model(mix, ref), model(1000.0 * mix, ref)
    assert rel_err(scaled[0].numpy(), 1000.0 * out[0].numpy()) < STREAM_REL_ERR


def test_causal_model_trains_and_its_checkpoint_streams(tmp_path: Path) -> None:
    torch.manual_seed(1)
    args = causal_args()
    model = build_model(args)
    mix, ref = signals(0.3)
    loss = model(mix, ref).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    path = tmp_path / "causal.pt"
    torch.save(checkpoint_payload(model, args), path)
    loaded = load_model(path).eval()
    assert loaded.causal
    with torch.no_grad():
        torch.testing.assert_close(loaded(mix, ref), model.eval()(mix, ref))


def test_what_does_not_stream_is_refused(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="Mamba"):
        build_model(causal_args("model.sequence_layer=mamba"))
    offline = build_model(model_kwargs(load_config(REPO / "configs" / "tiny.yaml")))
    with pytest.raises(ValueError, match="causal"):
        StreamingExtractor(offline, model.encode_reference(signals(0.1)[1]))


def test_inference_and_evaluation_stream(model: torch.nn.Module, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """inference.py --stream writes the one-pass output and reports per-hop times;
    evaluate.py's runner scores the streamed estimate (stream_* columns)."""
    mix, ref = signals(0.5, seed=2)
    ckpt = tmp_path / "causal.pt"
    torch.save(checkpoint_payload(model, causal_args()), ckpt)
    sf.write(tmp_path / "mix.wav", mix[0].numpy(), SAMPLE_RATE, subtype="FLOAT")
    sf.write(tmp_path / "ref.wav", ref[0].numpy(), SAMPLE_RATE, subtype="FLOAT")
    code = main(["--ckpt", str(ckpt), "--mix", str(tmp_path / "mix.wav"), "--ref",
                 str(tmp_path / "ref.wav"), "-o", str(tmp_path / "out.wav"), "--stream",
                 "--device", "cpu"])
    assert code == 0
    assert "per-hop compute: p50" in capsys.readouterr().out
    with torch.no_grad():
        offline = model(mix, ref)[0].numpy()
    assert rel_err(sf.read(tmp_path / "out.wav", dtype="float32")[0], offline) < STREAM_REL_ERR
    sample = Sample(id="s", mix=mix[0].numpy(), ref=ref[0].numpy(), target=None)
    estimates = extract_all(Extractor(model), sample, RunSettings(jobs=0, stream=True))
    assert rel_err(estimates["stream_"], offline) < STREAM_REL_ERR


def test_stream_refused_for_an_offline_model(tmp_path: Path) -> None:
    args = model_kwargs(load_config(REPO / "configs" / "tiny.yaml"))
    ckpt = tmp_path / "offline.pt"
    torch.save(checkpoint_payload(build_model(args), args), ckpt)
    sf.write(tmp_path / "mix.wav", np.zeros(4800, np.float32), SAMPLE_RATE)
    code = main(["--ckpt", str(ckpt), "--mix", str(tmp_path / "mix.wav"), "--ref",
                 str(tmp_path / "mix.wav"), "-o", str(tmp_path / "out.wav"), "--stream"])
    assert code == 1
