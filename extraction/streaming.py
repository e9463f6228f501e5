"""Streaming extraction: a causal model run hop by hop on a live signal.

``StreamingExtractor.push(chunk)`` takes samples as they arrive (any number) and returns the
samples of the estimate that are final, ``flush()`` the rest once the stream ends. It carries
the whole state itself: the STFT analysis buffer, the model's state (running level, each
block's LSTM state and attention keys and values of past frames) and the iSTFT overlap-add
tail, each of a fixed size, so memory is flat in the stream's length. The concatenated output
is what the model's ``extract`` gives on the whole signal at once (tests/test_streaming.py).

Latency: a sample is final once the last frame whose window covers it has been computed, so
the output lags the input by the analysis window (``win_length``: 20 ms at the recipe's STFT)
plus up to one hop of buffering when chunks are not whole hops; compute time comes on top.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from models.layers.conditioning import SpeakerReference


class StreamingExtractor:
    """A causal model (``model.causal``; hifi_tse) over a stream, batch 1, given its encoded
    reference (``encode_reference``; ``Extractor.streaming`` checks and encodes it). The model's
    ``stream_frames`` is the step backend: the PyTorch model's, or an ``OnnxModel``'s
    (extraction/onnx_runtime.py), which runs the exported step in ONNX Runtime; the STFT framing
    and overlap-add here are the same for both.

    Frames follow the model's centred STFT exactly: frame ``t`` is centred on sample
    ``t * hop``, the signal is zero before its start and, at ``flush``, zero-padded to a whole
    number of hops as ``dsp.stft.STFT`` pads it.
    """

    def __init__(self, model: nn.Module, z_ref: SpeakerReference, *,
                 device: torch.device | str = "cpu") -> None:
        if not getattr(model, "causal", False) or not hasattr(model, "stream_frames"):
            raise ValueError("streaming needs a causal model (model.causal: true, hifi_tse)")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.z_ref = z_ref
        stft = model.stft
        self.n_fft, self.hop = stft.n_fft, stft.hop_length
        # torch.stft's window: the Hann window zero-padded to n_fft, centred.
        left = (self.n_fft - stft.win_length) // 2
        window = torch.zeros(self.n_fft, device=self.device)
        window[left : left + stft.win_length] = stft.window.to(self.device)
        self.window = window
        # Output sample n (stream coordinates) is final once no later frame's window reaches
        # it: frame t covers padded samples [t * hop + left, t * hop + left + win_length).
        self._left, self._win = left, stft.win_length
        self.reset()

    def reset(self) -> None:
        """Start a new stream with the same reference."""
        half = self.n_fft // 2
        # Analysis buffer in padded coordinates (the stream preceded by n_fft / 2 zeros).
        self._buffer = np.zeros(half, dtype=np.float32)
        self._buffer_start = 0  # padded index of _buffer[0]
        self._frames = 0  # frames computed so far
        self._state: dict[str, Any] | None = None
        # Overlap-add of the synthesis frames and of the squared window, from padded index
        # _ola_start on; what lies before it has been emitted, except the n_fft / 2 padded
        # samples before the stream, which are dropped.
        self._ola = np.zeros(0, dtype=np.float64)
        self._env = np.zeros(0, dtype=np.float64)
        self._ola_start = self._left  # frame 0's support starts here
        self._received = self._emitted = 0

    @torch.inference_mode()
    def _run_frames(self, padded: np.ndarray, n_frames: int) -> None:
        """Analyse ``n_frames`` frames starting at frame ``_frames``, run the model and add
        their synthesis frames to the overlap-add."""
        starts = (self._frames + np.arange(n_frames)) * self.hop - self._buffer_start
        segments = np.stack([padded[s : s + self.n_fft] for s in starts])  # (t, n_fft)
        frames = torch.from_numpy(segments).to(self.device) * self.window
        spec = torch.fft.rfft(frames, dim=-1).T[None]  # (1, F, t) complex64
        est, self._state = self.model.stream_frames(spec, self.z_ref, self._state)
        out = torch.fft.irfft(est[0].T.to(torch.complex64), n=self.n_fft, dim=-1) * self.window
        # Only the window's support is added: the zeros around it would reach back into what
        # has been emitted.
        lo, hi = self._left, self._left + self._win
        out = out[:, lo:hi].double().cpu().numpy()  # (t, win_length)
        square = self.window[lo:hi].double().square().cpu().numpy()
        first = self._frames * self.hop + lo  # padded index of the first new frame's support
        end = first + (n_frames - 1) * self.hop + self._win
        grow = end - (self._ola_start + self._ola.shape[0])
        if grow > 0:
            self._ola = np.concatenate([self._ola, np.zeros(grow)])
            self._env = np.concatenate([self._env, np.zeros(grow)])
        for i in range(n_frames):
            at = first + i * self.hop - self._ola_start
            self._ola[at : at + self._win] += out[i]
            self._env[at : at + self._win] += square
        self._frames += n_frames

    def _emit(self, until: int) -> np.ndarray:
        """The final output up to padded index ``until`` (exclusive), dropped from the OLA."""
        n = max(0, until - self._ola_start)
        skip = min(n, max(0, self.n_fft // 2 - self._ola_start))  # before the stream starts
        out = (self._ola[skip:n] / self._env[skip:n]).astype(np.float32)
        self._ola, self._env = self._ola[n:], self._env[n:]
        self._ola_start += n
        self._emitted += out.shape[0]
        return out

    def _process(self, chunk: np.ndarray) -> np.ndarray:
        buffer = np.concatenate([self._buffer, np.asarray(chunk, dtype=np.float32)])
        available = self._buffer_start + buffer.shape[0]  # padded samples received
        n_frames = max(0, (available - self.n_fft) // self.hop + 1 - self._frames)
        if n_frames:
            self._run_frames(buffer, n_frames)
        # Keep what the next frame needs: from its start on.
        keep_from = self._frames * self.hop - self._buffer_start
        self._buffer, self._buffer_start = buffer[keep_from:], self._buffer_start + keep_from
        # Frame t's support starts at padded index t * hop + left: before the next frame's,
        # every sample is final.
        return self._emit(self._frames * self.hop + self._left)

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Take the next samples of the stream (mono, at the model's rate, any number) and
        return the estimate's samples that became final (possibly none).

        Shape: chunk (n,) -> (m,) float32
        """
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self._received += chunk.shape[0]
        return self._process(chunk)

    def flush(self) -> np.ndarray:
        """End the stream: the rest of the estimate, so that everything returned adds up to
        exactly the samples pushed. The extractor is then ready for a new stream."""
        n, emitted = self._received, self._emitted
        # The STFT pads the signal to whole hops, and centring adds n_fft / 2 zeros after it.
        tail = -n % self.hop + self.n_fft // 2
        rest = self._process(np.zeros(tail, dtype=np.float32))[: max(0, n - emitted)]
        self.reset()
        return rest

    def state_size(self) -> int:
        """Elements held for the stream (buffers and model state): flat in its length."""
        tensors = [] if self._state is None else [
            *self._state["level"].values(),
            *(t for block in self._state["blocks"] for t in block.values())]
        return (sum(t.numel() for t in tensors) + self._buffer.shape[0]
                + self._ola.shape[0] + self._env.shape[0])
